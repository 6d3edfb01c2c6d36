"""Turning (screenshot, conversation) into model inputs, shared by every stage that runs the model.

A screenshot is decoded and resized once with Qwen-VL's own `smart_resize` rule into the
configured pixel bounds and kept as uint8 pixels. Its image grid and token count follow from that
size, so encoding only renders the chat template and tokenizes. At batch time the image
processor's steps (rescale, normalise, patchify) run in torch on those already-sized pixels, with
the processor's own settings and layout, so training, eval and serving see identical inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2.functional import InterpolationMode, resize
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from modal_jobs.config import ImageBounds
from modal_jobs.ml.decode import decode_screen

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """One tokenized sample: ids, the answer span (empty for a prompt) and its sized pixels."""

    input_ids: np.ndarray
    mm_token_type_ids: np.ndarray
    prompt_len: int
    answer_end: int
    pixels: np.ndarray
    grid_thw: tuple[int, int, int]


def resize_factor(processor: Any) -> int:
    """Pixels per merged image token side (patch size × spatial merge size)."""
    image_processor = processor.image_processor
    return int(image_processor.patch_size * image_processor.merge_size)


def fitted_size(height: int, width: int, bounds: ImageBounds, factor: int) -> tuple[int, int]:
    """Qwen-VL's `smart_resize` into the bounds: each side a multiple of `factor`."""
    fitted = smart_resize(
        height, width, factor=factor, min_pixels=bounds.min_pixels, max_pixels=bounds.max_pixels
    )
    return int(fitted[0]), int(fitted[1])


def read_screen(path: Path) -> np.ndarray:
    """A screenshot file as RGB uint8 pixels (height × width × 3), decoded once."""
    return decode_screen(path.read_bytes())


def resize_screen(image: Image.Image | np.ndarray, bounds: ImageBounds, factor: int) -> np.ndarray:
    """A screenshot resized into the pixel bounds, each side a multiple of `factor`: RGB uint8.

    Bicubic with antialiasing in torchvision's uint8 kernels, as transformers' fast image
    processors resize: within 2 levels of PIL's bicubic (mean difference ~0.001) and ~5× faster,
    which matters because resizing was the largest per-sample cost of tokenization.
    """
    if isinstance(image, Image.Image):
        rgb = np.array(image.convert("RGB"), dtype=np.uint8)  # writable, as torch wants
    else:
        rgb = image
    height, width = fitted_size(rgb.shape[0], rgb.shape[1], bounds, factor)
    if (height, width) == rgb.shape[:2]:
        return rgb
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    sized = resize(chw, [height, width], InterpolationMode.BICUBIC, antialias=True)
    out: np.ndarray = sized.permute(1, 2, 0).contiguous().numpy()
    return out


def conversation(system: str | None, instruction: str, answer: str | None) -> list[dict[str, Any]]:
    """Chat messages in the processor's format: optional system, user (image + text), answer."""
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    user = [{"type": "image"}, {"type": "text", "text": instruction}]
    messages.append({"role": "user", "content": user})
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def encode(
    processor: Any,
    image: Image.Image | np.ndarray,
    bounds: ImageBounds,
    system: str | None,
    instruction: str,
    answer: str | None,
) -> Encoded:
    """Tokenize one sample with the processor's chat template; the answer span gets the loss.

    The image grid and its token count follow from the sized screenshot alone, so the image is
    decoded and resized once and the processor's image pipeline does not run here (`collate`
    makes pixel values per batch); the ids, types and grid are those of the processor's own call.
    """
    factor = resize_factor(processor)
    sized = resize_screen(image, bounds, factor)
    # The image processor fits its input into the bounds again; for all but extremely elongated
    # screenshots that keeps the size, and `collate` repeats the step exactly where it does not.
    grid = image_grid(processor, *fitted_size(sized.shape[0], sized.shape[1], bounds, factor))
    texts = [chat_text(processor, grid, system, instruction, None)]
    if answer is not None:
        texts.append(chat_text(processor, grid, system, instruction, answer))
    prompt_ids, *answered = processor.tokenizer(texts)["input_ids"]
    ids = answered[0] if answered else prompt_ids
    prompt_len = len(prompt_ids)
    input_ids = np.array(ids, dtype=np.int32)
    answer_end = _answer_end(processor, input_ids, prompt_len) if answered else prompt_len
    types = processor.create_mm_token_type_ids([ids])[0]
    return Encoded(
        input_ids=input_ids,
        mm_token_type_ids=np.array(types, dtype=np.uint8),
        prompt_len=prompt_len,
        answer_end=answer_end,
        pixels=sized,
        grid_thw=grid,
    )


def image_grid(processor: Any, height: int, width: int) -> tuple[int, int, int]:
    """Patch grid (frames, rows, columns) of a screenshot already sized to `height` × `width`."""
    patch = int(processor.image_processor.patch_size)
    return (1, height // patch, width // patch)


def chat_text(
    processor: Any,
    grid: tuple[int, int, int],
    system: str | None,
    instruction: str,
    answer: str | None,
) -> str:
    """The chat template's text with the image placeholder repeated once per merged patch."""
    messages = conversation(system, instruction, answer)
    text = str(
        processor.apply_chat_template(
            messages, add_generation_prompt=answer is None, tokenize=False
        )
    )
    found = text.count(processor.image_token)
    if found != 1 or processor.video_token in text:
        raise ValueError(
            f"the chat text holds {found} {processor.image_token} for one image (and no "
            f"{processor.video_token} is allowed): remove them from the instruction or prompt"
        )
    tokens = grid[0] * grid[1] * grid[2] // processor.image_processor.merge_size**2
    return text.replace(processor.image_token, processor.image_token * tokens)


def _answer_end(processor: Any, ids: np.ndarray, prompt_len: int) -> int:
    """End of the answer span: through the first end-of-turn token after the prompt."""
    end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    hits = np.nonzero(ids[prompt_len:] == end_id)[0]
    return prompt_len + int(hits[0]) + 1 if len(hits) else len(ids)


def collate(
    processor: Any, items: Sequence[Encoded], bounds: ImageBounds
) -> dict[str, torch.Tensor]:
    """Right-pad a batch; labels keep only answer tokens; pixels become the model's patch rows."""
    width = max(len(item.input_ids) for item in items)
    pad_id = processor.tokenizer.pad_token_id or 0
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    mm_types = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.from_numpy(item.input_ids.astype(np.int64))
        attention[row, :n] = 1
        mm_types[row, :n] = torch.from_numpy(item.mm_token_type_ids.astype(np.int64))
        span = slice(item.prompt_len, item.answer_end)
        labels[row, span] = input_ids[row, span]
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "mm_token_type_ids": mm_types,
        **_vision(processor, [item.pixels for item in items], bounds),
        "labels": labels,
    }


def _vision(
    processor: Any, images: Sequence[np.ndarray], bounds: ImageBounds
) -> dict[str, torch.Tensor]:
    factor = resize_factor(processor)
    if all(fitted_size(px.shape[0], px.shape[1], bounds, factor) == px.shape[:2] for px in images):
        return vision_inputs(processor, images)
    # One `smart_resize` pass can leave a very elongated screenshot above max_pixels (or shards
    # were sized under other bounds): the image processor resizes those again, as it always has.
    size = {"shortest_edge": bounds.min_pixels, "longest_edge": bounds.max_pixels}
    vision = processor.image_processor(images=list(images), size=size, return_tensors="pt")
    return {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}


def vision_inputs(processor: Any, images: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    """`pixel_values` and `image_grid_thw` of sized uint8 screenshots, as the image processor makes.

    Rescale and normalise per channel, then Qwen-VL's patch layout, image after image, each
    written straight into its rows of the batch's tensor.
    """
    config = processor.image_processor
    mean, std = _channel_stats(config)
    grids = [image_grid(processor, pixels.shape[0], pixels.shape[1]) for pixels in images]
    width = 3 * config.temporal_patch_size * config.patch_size**2
    pixel_values = torch.empty((sum(h * w for _, h, w in grids), width), dtype=torch.float32)
    start = 0
    for pixels, (_, rows, columns) in zip(images, grids, strict=True):
        # Pixels straight from PIL (serving) are read-only, and torch wants a writable buffer.
        rgb = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
        image = rgb.to(torch.float32).sub_(mean).div_(std)  # channels last, as stored
        out = pixel_values[start : start + rows * columns]
        patchify(image, out, config.patch_size, config.merge_size, config.temporal_patch_size)
        start += rows * columns
    return {"pixel_values": pixel_values, "image_grid_thw": torch.tensor(grids, dtype=torch.long)}


def _channel_stats(config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std on the 0-255 scale: rescale and normalise in one step.

    The image processor fuses them the same way (float32 mean and std divided by the rescale
    factor) when both steps are on, as in Qwen-VL's processors: the values then match bit for bit.
    """
    scale = config.rescale_factor if config.do_rescale else 1.0
    mean = torch.tensor(config.image_mean if config.do_normalize else [0.0, 0.0, 0.0])
    std = torch.tensor(config.image_std if config.do_normalize else [1.0, 1.0, 1.0])
    return mean * (1.0 / scale), std * (1.0 / scale)


def patchify(image: torch.Tensor, out: torch.Tensor, patch: int, merge: int, temporal: int) -> None:
    """Write one (height, width, channels) image into `out` as Qwen-VL patch rows.

    `out` is (rows × columns, C·T·P·P). Rows follow merge blocks (each `merge` × `merge`
    neighbouring patches consecutive); a row holds channel after channel, and a still image fills
    every one of the `temporal` frames.
    """
    height, width, channels = image.shape
    rows, columns = height // patch, width // patch
    blocks = image.reshape(
        rows // merge, merge, patch, columns // merge, merge, patch, channels
    ).permute(0, 3, 1, 4, 6, 2, 5)
    frames = blocks.unsqueeze(5).expand(-1, -1, -1, -1, -1, temporal, -1, -1)
    out.view(rows // merge, columns // merge, merge, merge, channels, temporal, patch, patch).copy_(
        frames
    )


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens only."""
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
