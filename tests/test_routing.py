"""Routing's shortcut and stacked inference's batching, each against the plain way it replaces:
label-token logits at the slot against the full vocabulary head, the vision tower run up front
against the model run on the pixels, and a batch of `generate()` answers against the same
prompts answered one at a time."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import get_peft_model

from modal_jobs import demo_data
from modal_jobs.config import ImageBounds, load_config
from modal_jobs.ml.batching import Encoded, collate, encode
from modal_jobs.ml.labels import LabelMap
from modal_jobs.ml.model import Runtime, causal_lm, load_base, load_processor, lora_config
from modal_jobs.ml.ood import slot_batch
from modal_jobs.ml.routing import slot_logits
from modal_jobs.ml.vision import STD_FLOOR
from modal_jobs.serving.inference import RouterInfo, Stack

from .conftest import REPO

BOUNDS = ImageBounds(min_pixels=4096, max_pixels=40960)
# Instructions of clearly different lengths, so a batch of their prompts needs padding.
INSTRUCTIONS = ("Which app is this?", "", "Describe every window, menu and button you can see.")


def prompts(processor: Any) -> list[Encoded]:
    """Three demo screens as router prompts (no answer), of three different lengths."""
    rng = random.Random(3)
    items = []
    for expert, instruction in zip(demo_data.EXPERTS, INSTRUCTIONS, strict=False):
        sample = demo_data.render_sample(expert, rng)
        items.append(encode(processor, sample.image, BOUNDS, "Route it.", instruction, None))
    assert len({len(item.input_ids) for item in items}) == len(items)
    return items


def test_slot_logits_with_a_biased_head_equal_the_full_logits(tiny_base: str) -> None:
    processor = load_processor(tiny_base)
    model = load_base(tiny_base, Runtime.detect()).eval()
    lm = causal_lm(model)
    # Qwen3-VL's head has no bias; give it one (non-zero) to check it is sliced like the rows.
    head = lm.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.normal_(0, 1.0)
    lm.lm_head = biased
    items = prompts(processor)
    batch = collate(processor, items, BOUNDS)
    batch.pop("labels")
    label_ids = torch.tensor([7, 300, 1900, 42])
    slots = [item.prompt_len - 1 for item in items]
    with torch.no_grad():
        got = slot_logits(model, batch, slots, label_ids)
        full = model(**batch).logits
    expected = full[torch.arange(len(items)), torch.tensor(slots)][:, label_ids]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # A dropped bias would move every compared logit by more than the tolerance.
    assert float(biased.bias.detach()[label_ids].abs().min()) > 1e-3


@pytest.fixture(scope="module")
def stack(tiny_base: str, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """The tiny base with a saved (untrained) router adapter, as stacked inference loads it."""
    folder = tmp_path_factory.mktemp("router")
    preset = load_config(REPO / "config").preset
    torch.manual_seed(0)
    get_peft_model(
        load_base(tiny_base, Runtime.detect()), lora_config(preset.lora)
    ).save_pretrained(str(folder))
    labels = LabelMap(("a", "b"), ("a", "b"), (7, 300))
    info = RouterInfo(Path(folder), tiny_base, labels, "Route it.", BOUNDS, 0.0, 1.0)
    return Stack(info, {}, Runtime.detect())


def test_a_batch_generates_what_each_prompt_generates_alone(stack: Stack) -> None:
    items = prompts(stack.processor)
    with stack.adapter(None):
        alone = [stack.generate([item], 12)[0] for item in items]
        together = stack.generate(items, 12)
    assert any(alone), "the tiny base generated nothing to compare"
    assert together == alone


def test_slot_batch_equals_the_model_run_on_the_pixels(tiny_base: str) -> None:
    """The vision tower run once up front gives the label logits and hidden state the model gives
    on the pixels itself, and the screen statistics of that tower's last-block patch states."""
    processor = load_processor(tiny_base)
    model = load_base(tiny_base, Runtime.detect()).eval()
    lm = causal_lm(model)
    items = prompts(processor)
    labels = LabelMap(("a", "b", "c"), ("a", "b", "c"), (7, 300, 1900))
    rows, features = slot_batch(model, processor, items, BOUNDS, labels)
    batch = collate(processor, items, BOUNDS)
    batch.pop("labels")
    slots = torch.tensor([item.prompt_len - 1 for item in items])
    with torch.no_grad():
        plain = lm.model(**batch, use_cache=False).last_hidden_state[torch.arange(3), slots]
        states = lm.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    torch.testing.assert_close(torch.from_numpy(rows.hidden), plain.float(), rtol=1e-5, atol=1e-5)
    head = lm.lm_head(plain).float()[:, [7, 300, 1900]]
    torch.testing.assert_close(torch.from_numpy(rows.logits), head, rtol=1e-5, atol=1e-5)
    assert len(features) == len(items)
    sizes = batch["image_grid_thw"].prod(-1).tolist()
    width = states.last_hidden_state.shape[1]
    assert rows.screen is not None and rows.screen.shape == (3, 4 * width)
    for n, patches in enumerate(states.last_hidden_state.split(sizes)):
        own = patches.double().numpy()
        expected = np.r_[own.mean(0), np.log(own.std(0) + STD_FLOOR), own.max(0), own.min(0)]
        np.testing.assert_allclose(rows.screen[n], expected, rtol=1e-4, atol=1e-5)
