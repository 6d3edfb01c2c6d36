"""The processor-driven preprocessing that `modal_jobs.ml.batching` replaced, kept as the reference.

`encode_reference` is the former `encode`: the screenshot resized with `smart_resize`, then the
full `Qwen3VLProcessor(text=..., images=...)` call (which also normalises and patchifies pixels,
discarded here) and a second tokenizer call for the prompt length. `vision_reference` is the
former batch-time image path: the processor's image processor on the sized uint8 pixels. Tests
hold the fast path to these outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from modal_jobs.config import ImageBounds
from modal_jobs.ml.batching import Encoded, conversation


def encode_reference(
    processor: Any,
    image: Image.Image,
    bounds: ImageBounds,
    system: str | None,
    instruction: str,
    answer: str | None,
) -> Encoded:
    """One sample through the processor's own call (the pre-#6 `encode`)."""
    sized = _resize(image, bounds, processor)
    prompt = processor.apply_chat_template(
        conversation(system, instruction, None), add_generation_prompt=True, tokenize=False
    )
    text = prompt
    if answer is not None:
        text = processor.apply_chat_template(
            conversation(system, instruction, answer), tokenize=False
        )
    size = {"shortest_edge": bounds.min_pixels, "longest_edge": bounds.max_pixels}
    out = processor(text=[text], images=[sized], size=size, return_tensors="np")
    ids = out["input_ids"][0].astype(np.int32)
    merge = processor.image_processor.merge_size**2
    n_tokens = int(np.prod(out["image_grid_thw"][0])) // merge
    expanded = prompt.replace(processor.image_token, processor.image_token * n_tokens, 1)
    prompt_len = len(processor.tokenizer(expanded)["input_ids"])
    answer_end = prompt_len
    if answer is not None:
        end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        hits = np.nonzero(ids[prompt_len:] == end_id)[0]
        answer_end = prompt_len + int(hits[0]) + 1 if len(hits) else len(ids)
    t, h, w = (int(v) for v in out["image_grid_thw"][0])
    return Encoded(
        input_ids=ids,
        mm_token_type_ids=out["mm_token_type_ids"][0].astype(np.uint8),
        prompt_len=prompt_len,
        answer_end=answer_end,
        pixels=np.asarray(sized, dtype=np.uint8),
        grid_thw=(t, h, w),
    )


def vision_reference(
    processor: Any, images: Sequence[np.ndarray], bounds: ImageBounds
) -> dict[str, torch.Tensor]:
    """`pixel_values` and `image_grid_thw` from the processor's image processor (pre-#6 collate)."""
    size = {"shortest_edge": bounds.min_pixels, "longest_edge": bounds.max_pixels}
    out = processor.image_processor(images=list(images), size=size, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def _resize(image: Image.Image, bounds: ImageBounds, processor: Any) -> Image.Image:
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    height, width = smart_resize(
        image.height,
        image.width,
        factor=factor,
        min_pixels=bounds.min_pixels,
        max_pixels=bounds.max_pixels,
    )
    rgb = image.convert("RGB")
    if (height, width) == (rgb.height, rgb.width):
        return rgb
    return rgb.resize((width, height), Image.Resampling.BICUBIC)
