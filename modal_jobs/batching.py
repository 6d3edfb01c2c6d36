"""Turning (screenshot, conversation) into model inputs, shared by every stage that runs the model.

A screenshot is resized once with Qwen-VL's own `smart_resize` rule into the configured pixel
bounds and kept as uint8 pixels; the processor's image pipeline (normalise, patchify) runs on
those already-sized pixels at batch time, so training, eval and serving see identical inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from modal_jobs.config import ImageBounds

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


def resize_screen(image: Image.Image, bounds: ImageBounds, factor: int) -> Image.Image:
    """Resize a screenshot into the pixel bounds, each side a multiple of `factor` (RGB)."""
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
    image: Image.Image,
    bounds: ImageBounds,
    system: str | None,
    instruction: str,
    answer: str | None,
) -> Encoded:
    """Tokenize one sample with the processor's chat template; the answer span gets the loss."""
    sized = resize_screen(image, bounds, resize_factor(processor))
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
    prompt_len = len(processor.tokenizer(_expanded_prompt(processor, prompt, out))["input_ids"])
    answer_end = _answer_end(processor, ids, prompt_len) if answer is not None else prompt_len
    grid = tuple(int(v) for v in out["image_grid_thw"][0])
    return Encoded(
        input_ids=ids,
        mm_token_type_ids=out["mm_token_type_ids"][0].astype(np.uint8),
        prompt_len=prompt_len,
        answer_end=answer_end,
        pixels=np.asarray(sized, dtype=np.uint8),
        grid_thw=(grid[0], grid[1], grid[2]),
    )


def _expanded_prompt(processor: Any, prompt: str, out: Any) -> str:
    merge = processor.image_processor.merge_size**2
    n_tokens = int(np.prod(out["image_grid_thw"][0])) // merge
    return str(prompt.replace(processor.image_token, processor.image_token * n_tokens, 1))


def _answer_end(processor: Any, ids: np.ndarray, prompt_len: int) -> int:
    """End of the answer span: through the first end-of-turn token after the prompt."""
    end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    hits = np.nonzero(ids[prompt_len:] == end_id)[0]
    return prompt_len + int(hits[0]) + 1 if len(hits) else len(ids)


def collate(
    processor: Any, items: Sequence[Encoded], bounds: ImageBounds
) -> dict[str, torch.Tensor]:
    """Right-pad a batch; labels keep only answer tokens; pixels go through the image processor."""
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
    size = {"shortest_edge": bounds.min_pixels, "longest_edge": bounds.max_pixels}
    vision = processor.image_processor(
        images=[item.pixels for item in items], size=size, return_tensors="pt"
    )
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "mm_token_type_ids": mm_types,
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
        "labels": labels,
    }


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens only."""
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
