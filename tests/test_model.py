"""The model-level fast paths are exact: patch embedding as a matmul, slot-only routing logits."""

from __future__ import annotations

import random

import torch
from peft import get_peft_model
from transformers import Qwen3VLForConditionalGeneration

from modal_jobs.config import ImageBounds, LoraSpec
from modal_jobs.demo_data import render_sample
from modal_jobs.ml.batching import collate, encode
from modal_jobs.ml.model import PatchMatmul, Runtime, load_base, load_processor, lora_config
from modal_jobs.ml.routing import slot_logits


def test_patch_embedding_matmul_matches_the_conv(tiny_base: str) -> None:
    reference = Qwen3VLForConditionalGeneration.from_pretrained(tiny_base)
    fast = load_base(tiny_base, Runtime.detect())
    assert type(reference.model.visual.patch_embed.proj) is torch.nn.Conv3d
    assert isinstance(fast.model.visual.patch_embed.proj, PatchMatmul)
    assert fast.state_dict().keys() == reference.state_dict().keys()
    config = reference.config.vision_config
    width = config.in_channels * config.temporal_patch_size * config.patch_size**2
    patches = torch.randn(37, width)
    with torch.no_grad():
        expected = reference.model.visual.patch_embed(patches)
        got = fast.model.visual.patch_embed(patches)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_slot_logits_equal_the_full_head_at_the_answer_slot(tiny_base: str) -> None:
    processor = load_processor(tiny_base)
    torch.manual_seed(0)
    model = get_peft_model(load_base(tiny_base, Runtime.detect()), lora_config(LoraSpec()))
    for module in model.modules():  # a non-zero adapter, so the LoRA path is exercised
        if hasattr(module, "lora_B"):
            for layer in module.lora_B.values():
                torch.nn.init.normal_(layer.weight, std=0.05)
    bounds = ImageBounds(min_pixels=4096, max_pixels=40960)
    items = [
        encode(processor, sample.image, bounds, "Route.", "Which app?", None)
        for sample in (
            render_sample(app, random.Random(seed))
            for seed, app in enumerate(("calendar", "terminal", "map"))
        )
    ]
    batch = collate(processor, items, bounds)
    batch.pop("labels")
    label_ids = torch.tensor([5, 17, 300, 1000])
    slots = [item.prompt_len - 1 for item in items]
    model.eval()
    with torch.no_grad():
        full = model(**batch, use_cache=False).logits
        fast = slot_logits(model, batch, slots, label_ids)
    expected = full[torch.arange(len(items)), torch.tensor(slots)][:, label_ids]
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
