"""Screenshot bytes to RGB uint8 pixels, shared by tokenization and serving (torch-free).

PNG (what screenshots are) is decoded by libspng through `pyspng`, about twice as fast as
Pillow and the same pixels (a grey image's level repeated, an alpha channel dropped, as
Pillow's `convert("RGB")` does); other formats, and PNGs libspng gives in another layout, go to
Pillow. Damaged bytes fail in Pillow with its own error (an `OSError`).
"""

from __future__ import annotations

import io

import numpy as np
import pyspng
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_screen(data: bytes) -> np.ndarray:
    """Encoded image bytes as RGB uint8 pixels (height × width × 3)."""
    if data.startswith(PNG_SIGNATURE):
        try:
            pixels = pyspng.load(data)
        except RuntimeError:  # damaged, or a layout libspng's default output does not take
            pixels = np.zeros(0)
        if pixels.dtype == np.uint8 and pixels.ndim == 2:
            return np.repeat(pixels[:, :, None], 3, axis=2)
        if pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] in (3, 4):
            return np.ascontiguousarray(pixels[:, :, :3])
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"), dtype=np.uint8)
