"""The training loop's throughput pieces, each checked against the plain way it replaces:
length-grouped batches, the batch loader, the answer-only vocabulary projection and gradient
checkpointing."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from peft import get_peft_model

from modal_jobs import demo_data
from modal_jobs.config import ConfigError, ImageBounds, load_config
from modal_jobs.ml.batching import Encoded, answer_loss, collate, encode
from modal_jobs.ml.distributed import Ranks
from modal_jobs.ml.loader import LengthGrouped, loader_workers, step_batches
from modal_jobs.ml.loss import AnswerLoss
from modal_jobs.ml.model import Runtime, causal_lm, load_base, load_processor, lora_config
from modal_jobs.ml.shard_files import Split
from modal_jobs.ml.vision_cache import SAMPLE_IDS, VisionCache
from modal_jobs.stages.train import Hyper, batch_plan

from .conftest import REPO

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
