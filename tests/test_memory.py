"""The training memory guard: its estimate against what autograd keeps, and the 2B refusal.

The activation term is held to the bytes `torch.autograd.graph.saved_tensors_hooks` sees a real
training forward keep, on small Qwen3-VL shapes other than those its coefficients were fitted on;
the 2B shapes are checked by parameter count against the published checkpoint and refused on a
device too small for them without allocating anything.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import get_peft_model
from transformers import Qwen3VLForConditionalGeneration

from modal_jobs import demo_data
from modal_jobs.config import ConfigError, LoraSpec, TextDims, load_config
from modal_jobs.ml import memory
from modal_jobs.ml.batching import collate, encode
from modal_jobs.ml.loss import AnswerLoss
from modal_jobs.ml.model import lora_config, patch_embed_as_matmul
from modal_jobs.ml.presets import build_model, build_processor, model_config
from tests.conftest import REPO

CONFIG = load_config(REPO / "config")
TINY = CONFIG.models["tiny"]
GIB = 2**30
# Qwen/Qwen3-VL-2B-Instruct as published: 2,127,532,032 parameters in 625 bf16 tensors, of which
# 406,957,056 in the vision tower (README "The real model path" gives the sources).
PUBLISHED_2B_PARAMETERS = 2_127_532_032
PUBLISHED_2B_VISION = 406_957_056


def small_model(processor: Any, text: dict[str, int], lora: LoraSpec, checkpointing: bool) -> Any:
    """A random-init Qwen3-VL of `text`'s dimensions with a router LoRA, in training mode."""
    preset = TINY.model_copy(update={"text": TextDims(**{**TINY.text.model_dump(), **text})})
    model = build_model(preset, processor)
    model.requires_grad_(False)
    patch_embed_as_matmul(model)
    model = get_peft_model(model, lora_config(lora))
    if checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    model.train()
    return model


def saved_bytes(model: Any, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Bytes of the tensors autograd keeps for the backward pass (parameters excluded), answers."""
    parameters = {p.data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in parameters:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, answers = AnswerLoss(model)(batch)
    return sum(storages.values()), int(answers)


@pytest.fixture(scope="module")
def processor() -> Any:
    """The tiny preset's processor with its tokenizer trained on a few screens (no pre-training:
    only shapes matter here)."""
    rng = random.Random(1)
    samples = [demo_data.render_sample(e, rng) for e in demo_data.EXPERTS]
    return build_processor(TINY, [text for s in samples for text in (s.instruction, s.answer)])


@pytest.fixture(scope="module")
def batch(processor: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    rng = random.Random(3)
    items = [
        encode(processor, demo_data.render_sample(e, rng).image, TINY.image, "Route.", "Which?", e)
        for e in demo_data.EXPERTS[:5]
    ]
    return processor, collate(processor, items, TINY.image)


# Shapes the coefficients were not fitted on (those varied hidden 64-128, intermediate 128-512).
SHAPES = [
    {"hidden_size": 80, "intermediate_size": 192, "num_hidden_layers": 3,
     "num_attention_heads": 5, "num_key_value_heads": 1},
    {"hidden_size": 48, "intermediate_size": 320, "num_hidden_layers": 2,
     "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 24},
]  # fmt: skip


@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("text", SHAPES)
def test_activation_estimate_matches_what_autograd_keeps(
    batch: tuple[Any, dict[str, torch.Tensor]], text: dict[str, int], dropout: float
) -> None:
    processor, inputs = batch
    lora = LoraSpec(r=8, alpha=16, dropout=dropout)
    model = small_model(processor, text, lora, checkpointing=False)
    measured, answers = saved_bytes(model, inputs)
    head_kept = answers * model.config.text_config.vocab_size * 4  # the fp32 log-softmax
    rows, width = inputs["input_ids"].shape
    step = memory.Step(rows, width, int(inputs["image_grid_thw"].prod(1).sum()))
    shapes = memory.Shapes.of(model.get_base_model().config)
    estimated = memory.estimate(shapes, lora, step, torch.float32, checkpointing=False)
    assert estimated.activations == pytest.approx(measured - head_kept, rel=0.1)


def test_checkpointing_keeps_less_and_stays_within_its_estimate(
    batch: tuple[Any, dict[str, torch.Tensor]],
) -> None:
    processor, inputs = batch
    lora = LoraSpec(r=8, alpha=16, dropout=0.05)
    full, _ = saved_bytes(small_model(processor, SHAPES[0], lora, checkpointing=False), inputs)
    model = small_model(processor, SHAPES[0], lora, checkpointing=True)
    kept, answers = saved_bytes(model, inputs)
    rows, width = inputs["input_ids"].shape
    step = memory.Step(rows, width, int(inputs["image_grid_thw"].prod(1).sum()))
    shapes = memory.Shapes.of(model.get_base_model().config)
    on = memory.estimate(shapes, lora, step, torch.float32, checkpointing=True)
    off = memory.estimate(shapes, lora, step, torch.float32, checkpointing=False)
    head_kept = answers * shapes.vocab * 4
    assert kept < full
    assert kept - head_kept <= on.activations < off.activations


def test_lora_parameter_count_is_what_peft_trains(processor: Any) -> None:
    lora = LoraSpec(r=8, alpha=16)
    model = small_model(processor, SHAPES[1], lora, checkpointing=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shapes = memory.Shapes.of(model.get_base_model().config)
    assert shapes.lora_parameters(lora.r) == trainable > 0
    frozen = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert shapes.parameters == frozen


@pytest.fixture(scope="module")
def config_2b(processor: Any) -> Any:
    """The 2B preset's `Qwen3VLConfig` (any tokenizer with Qwen's special tokens gives the ids)."""
    return model_config(CONFIG.models["qwen3-vl-2b-local"], processor.tokenizer)


@pytest.fixture(scope="module")
def shapes_2b(config_2b: Any) -> memory.Shapes:
    return memory.Shapes.of(config_2b)


def test_2b_preset_has_the_published_parameter_count(
    config_2b: Any, shapes_2b: memory.Shapes
) -> None:
    assert shapes_2b.parameters == PUBLISHED_2B_PARAMETERS
    config = config_2b
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    assert sum(p.numel() for p in model.model.visual.parameters()) == PUBLISHED_2B_VISION


def test_a_2b_plan_too_big_for_the_device_is_refused_with_the_numbers(
    shapes_2b: memory.Shapes,
) -> None:
    lora = CONFIG.models["qwen3-vl-2b-local"].lora
    # Batch 8 of screenshots at the preset's cap (784 image tokens, 3,136 patches) + the prompt.
    step = memory.Step(rows=8, width=900, patches=8 * 3136)
    estimated = memory.estimate(shapes_2b, lora, step, torch.bfloat16, checkpointing=False)
    assert estimated.weights == PUBLISHED_2B_PARAMETERS * 2
    assert 24 * GIB < estimated.total < 80 * GIB
    with pytest.raises(ConfigError) as refused:
        memory.check_fits(estimated, 24 * GIB, batch_size=8)
    message = str(refused.value)
    assert f"~{estimated.total / GIB:.2f} GiB" in message and "24.00 GiB free" in message
    fits = int(message.split("set batch_size to ")[1].split()[0])
    assert 0 < fits < 8
    # The batch the message names fits; one more row does not.
    for rows, ok in ((fits, True), (fits + 1, False)):
        smaller = memory.Step(rows, step.width, rows * 3136)
        total = memory.estimate(shapes_2b, lora, smaller, torch.bfloat16, False).total
        assert (total <= memory.HEADROOM * 24 * GIB) is ok
    memory.check_fits(estimated, 141 * GIB, batch_size=8)  # an H200 takes it


def test_gradient_checkpointing_lets_the_2b_plan_fit_a_24_gib_gpu(
    shapes_2b: memory.Shapes,
) -> None:
    lora = CONFIG.models["qwen3-vl-2b-local"].lora
    step = memory.Step(rows=8, width=900, patches=8 * 3136)
    checkpointed = memory.estimate(shapes_2b, lora, step, torch.bfloat16, checkpointing=True)
    memory.check_fits(checkpointed, 24 * GIB, batch_size=8)


def test_weights_alone_too_big_says_so(shapes_2b: memory.Shapes) -> None:
    estimated = memory.estimate(
        shapes_2b, LoraSpec(), memory.Step(1, 100, 256), torch.float32, checkpointing=True
    )
    with pytest.raises(ConfigError, match="the weights alone do not fit"):
        memory.check_fits(estimated, 4 * GIB, batch_size=1)


def test_the_train_stage_check_reads_the_base_config_and_passes_a_small_plan(
    processor: Any, tmp_path: Path
) -> None:
    from modal_jobs.ml.model import Runtime
    from modal_jobs.ml.shard_files import Split

    model_config(TINY, processor.tokenizer).save_pretrained(tmp_path)  # all the check reads
    rng = random.Random(0)
    items = [
        encode(processor, demo_data.render_sample(e, rng).image, TINY.image, None, "x", e)
        for e in demo_data.EXPERTS
    ]
    split = Split.of(items, np.zeros(len(items), dtype=np.int64))
    plan = [[0, 1, 2], [3, 4, 5]]
    estimated = memory.check_plan(str(tmp_path), TINY.lora, Runtime.detect(), False, plan, split)
    widest = max(plan, key=lambda rows: len(rows) * int(split.lengths[rows].max()))
    assert estimated.step.width == int(split.lengths[widest].max())
    assert estimated.step.patches == int(split.grids[widest].prod(axis=1).sum())
    assert 0 < estimated.total < GIB
