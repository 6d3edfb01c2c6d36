"""The training loop's throughput pieces, each checked against the plain way it replaces:
length-grouped batches, the batch loader, the answer-only vocabulary projection and gradient
checkpointing; and its resume: a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

from modal_jobs import demo_data
from modal_jobs.config import ConfigError, ImageBounds, MoleConfig, load_config
from modal_jobs.errors import MoleError
from modal_jobs.layout import Volumes
from modal_jobs.ml import rng
from modal_jobs.ml.batching import Encoded, answer_loss, collate, encode
from modal_jobs.ml.distributed import Ranks
from modal_jobs.ml.dropout import InstructionDropout
from modal_jobs.ml.loader import LengthGrouped, loader_workers, step_batches
from modal_jobs.ml.loss import AnswerLoss
from modal_jobs.ml.model import Runtime, causal_lm, load_base, load_processor, lora_config
from modal_jobs.ml.shard_files import Split
from modal_jobs.ml.vision_cache import SAMPLE_IDS, VisionCache
from modal_jobs.stage import StageSpec
from modal_jobs.stages import dataset, shards, train
from modal_jobs.stages.train import Batches, Hyper, batch_plan, cache_vision

from .conftest import REPO, write_config

BOUNDS = ImageBounds(min_pixels=4096, max_pixels=40960)


def test_length_grouped_plan_is_a_function_of_seed_and_step() -> None:
    lengths = [random.Random(n).randint(40, 400) for n in range(100)]
    plan = LengthGrouped(lengths, 8, seed=3)
    steps = [plan.at(step) for step in range(40)]
    resumed = LengthGrouped(lengths, 8, seed=3)  # a fresh process resuming at step 30
    assert [resumed.at(step) for step in range(30, 40)] == steps[30:]
    assert LengthGrouped(lengths, 8, seed=4).at(0) != steps[0]
    for epoch in range(3):  # an epoch: 12 full batches of distinct samples
        seen = [i for batch in steps[12 * epoch : 12 * epoch + 12] for i in batch]
        assert len(seen) == len(set(seen)) == 96
    assert all(len(batch) == 8 for batch in steps)


def test_length_grouped_batches_pad_far_less_than_random_ones() -> None:
    lengths = [random.Random(n).randint(40, 400) for n in range(512)]

    def padding(batches: list[list[int]]) -> float:
        real = sum(lengths[i] for batch in batches for i in batch)
        padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
        return 1 - real / padded

    grouped = LengthGrouped(lengths, 16, seed=0).epoch(0)
    shuffled = random.Random(0).sample(range(512), 512)
    plain = [shuffled[i : i + 16] for i in range(0, 512, 16)]
    assert padding(grouped) < 0.05 < 0.3 < padding(plain)


def test_small_split_trains_on_all_of_it_every_step() -> None:
    plan = LengthGrouped([5, 9, 7], 16, seed=0)
    assert sorted(plan.at(0)) == sorted(plan.at(7)) == [0, 1, 2]


def test_ranks_share_a_global_batch_without_overlap() -> None:
    batch = list(range(11))
    shares = [Ranks(rank, rank, 3).share(batch) for rank in range(3)]
    assert [i for share in shares for i in share] == batch
    assert sorted(len(share) for share in shares) == [3, 4, 4]


def square(step: int) -> int:
    return step * step


def fail_at_2(step: int) -> int:
    if step == 2:
        raise ValueError("bad sample")
    return step


@pytest.mark.parametrize("workers", [0, 2])
def test_step_batches_come_in_step_order(workers: int) -> None:
    made = step_batches(square, range(3, 12), workers)
    assert list(made) == [(s, s * s) for s in range(3, 12)]


@pytest.mark.parametrize("workers", [0, 2])
def test_step_batches_raise_what_collating_raised(workers: int) -> None:
    seen = []
    with pytest.raises(ValueError, match="bad sample"):
        seen.extend(step for step, _ in step_batches(fail_at_2, range(5), workers))
    assert seen == [0, 1]


def test_loader_workers_only_for_a_gpu() -> None:
    assert loader_workers(torch.device("cpu")) == 0
    assert loader_workers(torch.device("cuda", 0)) == 2


def test_a_global_batch_smaller_than_the_process_count_is_refused() -> None:
    sample = Encoded(
        np.zeros(9, np.int32), np.zeros(9, np.uint8), 5, 7, np.zeros((32, 32, 3)), (1, 2, 2)
    )
    split = Split.of([sample] * 10, np.zeros(10, dtype=np.int64))
    hyper = Hyper(steps=4, batch_size=2, learning_rate=1e-3, warmup_steps=0)
    assert batch_plan(split, hyper, 0, Ranks(1, 1, 2)).batch_size == 2
    with pytest.raises(ConfigError, match="batch size 2 is smaller than the 4 training processes"):
        batch_plan(split, hyper, 0, Ranks(0, 0, 4))


@pytest.fixture(scope="module")
def batch(tiny_base: str) -> dict[str, torch.Tensor]:
    """Six demo screens of mixed sizes, tokenized and collated like training does."""
    processor = load_processor(tiny_base)
    rng = random.Random(11)
    items: list[Encoded] = []
    for expert in demo_data.EXPERTS[:6]:
        sample = demo_data.render_sample(expert, rng)
        items.append(
            encode(processor, sample.image, BOUNDS, "Route it.", sample.instruction, expert)
        )
    return collate(processor, items, BOUNDS)


def router(tiny_base: str) -> Any:
    """The tiny base with a router LoRA whose B matrices are non-zero (so LoRA changes outputs)."""
    torch.manual_seed(0)
    config = load_config(REPO / "config")
    model = get_peft_model(load_base(tiny_base, Runtime.detect()), lora_config(config.preset.lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.train()
    return model


def lora_grads(model: Any) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_grads(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The same LoRA parameters got gradients, equal up to float rounding."""
    assert got.keys() == expected.keys() and len(got) > 0
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_answer_only_head_equals_the_full_logits_loss(
    tiny_base: str, batch: dict[str, torch.Tensor]
) -> None:
    model = router(tiny_base)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    reference = answer_loss(model(**inputs).logits, batch["labels"])
    reference.backward()
    expected = lora_grads(model)

    total, count = AnswerLoss(model)(batch)
    (total / count).backward()
    got = lora_grads(model)

    assert int(count) == int((batch["labels"][:, 1:] != -100).sum()) > 0
    torch.testing.assert_close(total / count, reference, rtol=1e-5, atol=1e-6)
    assert_same_grads(got, expected)


def test_gradient_checkpointing_gives_the_same_gradients(
    tiny_base: str, batch: dict[str, torch.Tensor]
) -> None:
    model = router(tiny_base)
    total, count = AnswerLoss(model)(batch)
    (total / count).backward()
    expected = lora_grads(model)

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(
        layer.gradient_checkpointing for layer in causal_lm(model).model.language_model.layers
    )
    total, count = AnswerLoss(model)(batch)
    (total / count).backward()
    got = lora_grads(model)

    assert_same_grads(got, expected)


def test_cached_vision_outputs_give_the_same_loss_and_gradients(
    tiny_base: str, batch: dict[str, torch.Tensor]
) -> None:
    model = router(tiny_base)
    total, count = AnswerLoss(model)(batch)
    (total / count).backward()
    expected = lora_grads(model)

    cache = VisionCache(model)
    first = cache.apply({**batch, SAMPLE_IDS: torch.tensor([4, 8, 15, 16, 23, 42])})
    assert "pixel_values" not in first and len(cache) == 6
    # The second visit reads the cache: pixels that are not these screens change nothing.
    again = {**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])}
    second = cache.apply({**again, SAMPLE_IDS: torch.tensor([4, 8, 15, 16, 23, 42])})
    for cached in (first, second):
        got_total, got_count = AnswerLoss(model)(cached)
        (got_total / got_count).backward()
        got = lora_grads(model)
        torch.testing.assert_close(got_total / got_count, total / count, rtol=1e-5, atol=1e-6)
        assert_same_grads(got, expected)


def test_generators_round_trip_through_json() -> None:
    saved = json.loads(json.dumps(rng.capture()))
    drawn = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # move every generator elsewhere
    rng.restore(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == drawn


def test_cache_counts_only_the_visits_still_to_come(tiny_base: str) -> None:
    model = load_base(tiny_base, Runtime.detect())
    sample = Encoded(
        np.zeros(9, np.int32), np.zeros(9, np.uint8), 5, 7, np.zeros((32, 32, 3)), (1, 2, 2)
    )
    split = Split.of([sample] * 10, np.zeros(10, dtype=np.int64))
    order = LengthGrouped(split.lengths.tolist(), 4, seed=0)
    keep = InstructionDropout(None, BOUNDS, "", ["a"], rate=0.0, seed=0)
    batches = Batches(None, split, BOUNDS, order, Ranks(), torch.device("cpu"), keep)
    hyper = Hyper(steps=6, batch_size=4, learning_rate=1e-3, warmup_steps=0)
    assert cache_vision(model, batches, hyper, start=0)  # 24 visits of 10 samples
    assert not cache_vision(model, batches, hyper, start=4)  # 8 visits left: none repeats
    # A batch size above the split's is clamped to it: 2 steps of 3 samples revisit each once.
    small = Split.of([sample] * 3, np.zeros(3, dtype=np.int64))
    clamped = LengthGrouped(small.lengths.tolist(), 16, seed=0)
    few = Batches(None, small, BOUNDS, clamped, Ranks(), torch.device("cpu"), keep)
    assert cache_vision(model, few, Hyper(2, 16, 1e-3, 0), start=0)
    assert not cache_vision(model, few, Hyper(2, 16, 1e-3, 0), start=1)


@dataclass
class Prepared:
    spec: StageSpec
    config_dir: Path


def prepare(root: Path, experts: Path, run: str, count: int) -> Prepared:
    """A run's dataset and shards with `count` samples per expert.

    Data and inference volumes are the test's own; the models volume is the session's, where
    `tiny_base` built the base once (a private one would build it again, minutes on 2 cores).
    """
    config_dir = write_config(root / "config", experts, count=count, expert_adapters=False)
    volumes = replace(Volumes.local(root / "home"), models=Volumes.local().models)
    spec = StageSpec(run=run, config=load_config(config_dir), volumes=volumes)
    dataset.run(spec)
    shards.run(spec)
    return Prepared(spec, config_dir)


def test_an_empty_train_split_is_refused_with_the_fix(
    tmp_path: Path, experts_dir: Path, tiny_base: str
) -> None:
    # One sample per expert: each goes to eval (which always gets one), leaving train empty.
    prepared = prepare(tmp_path, experts_dir, "empty", count=1)
    index = json.loads((prepared.spec.layout.shards / "index.json").read_text())
    assert index["splits"]["train"]["count"] == 0
    with pytest.raises(MoleError) as err:
        train.run(train.TrainSpec(**prepared.spec.model_dump(), mode="test"))
    message = str(err.value)
    assert message.startswith(f"{prepared.spec.layout.shards / 'index.json'}: the train split")
    assert "fix: raise the experts' `count`" in message
    assert not prepared.spec.layout.checkpoint.exists()


class Interrupted(Exception):
    """Stands in for a preempted container: raised once a chosen resume point is complete."""


def with_dropout(config: MoleConfig, dropout: float) -> MoleConfig:
    """`config` whose router LoRA uses `dropout` (the base, built from the preset, is unchanged:
    training loads the base the shards name)."""
    preset = config.preset.model_copy(
        update={"lora": config.preset.lora.model_copy(update={"dropout": dropout})}
    )
    return config.model_copy(update={"models": {**config.models, config.loras.base_model: preset}})


def test_a_resumed_run_equals_an_uninterrupted_one(
    tmp_path: Path, experts_dir: Path, tiny_base: str
) -> None:
    prepared = prepare(tmp_path, experts_dir, "resumed", count=8)
    config = with_dropout(prepared.spec.config, 0.1)
    assert lora_config(config.preset.lora).lora_dropout == 0.1
    spec = train.TrainSpec(
        **{**prepared.spec.model_dump(), "config": config},
        steps=12,
        batch_size=8,
        checkpoint_every=4,
    )
    layout = spec.layout

    def trained() -> tuple[dict[str, torch.Tensor], list[list[float]]]:
        adapter = load_file(str(layout.checkpoint / "adapter_model.safetensors"))
        curve = json.loads((layout.checkpoint / "loss_curve.json").read_text())
        shutil.rmtree(layout.checkpoint)
        return adapter, curve

    train.run(spec)
    reference, reference_curve = trained()

    def preempt_at_8(point: Path) -> None:
        if point.name == "step-0000008":
            raise Interrupted(point.name)

    with pytest.raises(Interrupted):
        train.run(spec, on_resume_point=preempt_at_8)
    assert sorted(p.name for p in layout.resume.iterdir()) == ["step-0000004", "step-0000008"]
    # Everything a fresh process would not share with the interrupted one: other draws first.
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    result = train.run(spec)
    assert result.metadata["resumed_from_step"]["raw_value"] == 8
    adapter, curve = trained()

    # One process, the same kernels and the same batches: only the vision cache differs (it
    # starts empty after the resume, so a sample's frozen vision features are recomputed inside
    # another batch, equal to float32 rounding, ~1e-6 relative). Twelve AdamW steps carry that
    # into the weights well below 1e-4 relative, while a lost or wrong RNG state (other dropout
    # masks) moves the losses from step 9 on by about 1e-2 and the weights by more than 1e-2.
    assert [s for s, _ in curve] == [s for s, _ in reference_curve] == list(range(1, 13))
    for (step, loss), (_, expected) in zip(curve, reference_curve, strict=True):
        assert loss == pytest.approx(expected, rel=1e-4), f"step {step}"
    assert adapter.keys() == reference.keys()
    for name, weight in reference.items():
        assert (adapter[name] - weight).abs().max() <= 1e-4 * weight.abs().max(), name
