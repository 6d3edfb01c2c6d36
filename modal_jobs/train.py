"""Stage `router_checkpoint`: train the router LoRA on the tokenized shards.

Reads top to bottom: spec → data → model → optimizer → loop → checkpoint. Resumable: every
`checkpoint_every` steps the adapter, optimizer, scheduler and RNG state go to the run's
`train_state/step-N/` (atomically), and a restarted run continues from the newest complete one.
The published output is `adapter_config.json` + `adapter_model.safetensors`, loadable with
vanilla `peft.PeftModel.from_pretrained` onto the saved base.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.tensorboard import SummaryWriter

from modal_jobs import plots
from modal_jobs.atomic import atomic_dir, write_json
from modal_jobs.batching import answer_loss, collate
from modal_jobs.config import ImageBounds
from modal_jobs.hashing import file_sha256
from modal_jobs.model import Runtime, load_base, load_processor, lora_config
from modal_jobs.optim import adamw, optimizer_step
from modal_jobs.shards import Split, load_split, read_index
from modal_jobs.stage import (
    StageResult,
    StageSpec,
    json_value,
    number,
    path_value,
    png_markdown,
    text,
)

log = logging.getLogger(__name__)

FAST_STEPS = 20
TEST_SAMPLES = 48
TEST_STEPS = 8
KEEP_CHECKPOINTS = 2
ResumePointHook = Callable[[Path], None] | None


class TrainSpec(StageSpec):
    """Router-training hyper-parameters; unset ones come from the model preset."""

    mode: Literal["full", "fast", "test"] = "full"
    steps: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    warmup_steps: int | None = None
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10

    def total_steps(self) -> int:
        """Steps this run trains for, after the mode is applied."""
        if self.mode == "fast":
            return FAST_STEPS
        if self.mode == "test":
            return TEST_STEPS
        return self.steps or self.config.preset.train.steps


@dataclass(frozen=True)
class Hyper:
    """Resolved hyper-parameters of one training run."""

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int


def hyper_parameters(spec: TrainSpec) -> Hyper:
    """The spec's hyper-parameters, falling back to the model preset's defaults."""
    defaults = spec.config.preset.train
    steps = spec.total_steps()
    warmup = defaults.warmup_steps if spec.warmup_steps is None else spec.warmup_steps
    return Hyper(
        steps=steps,
        batch_size=spec.batch_size or defaults.batch_size,
        learning_rate=spec.learning_rate or defaults.learning_rate,
        warmup_steps=min(warmup, steps // 5),
    )


def run(spec: TrainSpec, on_resume_point: ResumePointHook = None) -> StageResult:
    """Train (or resume) the router adapter and publish it atomically.

    `on_resume_point(path)` runs after each resume point is complete (on Modal: commit the
    data volume, so a preempted container's retry finds it).
    """
    started = time.perf_counter()
    hyper = hyper_parameters(spec)

    # data
    index = read_index(spec.layout.shards)
    train = load_split(spec.layout.shards, index, "train")
    if spec.mode == "test":
        keep = sorted(np.random.default_rng(spec.seed).permutation(len(train.items))[:TEST_SAMPLES])
        train = Split([train.items[i] for i in keep], train.classes[keep])

    # model
    runtime = Runtime.detect()
    processor = load_processor(index["base"])
    torch.manual_seed(spec.seed)
    model = get_peft_model(load_base(index["base"], runtime), lora_config(spec.config.preset.lora))

    # optimizer (and the newest resume point, if a previous attempt left one)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = adamw(trainable, hyper.learning_rate, hyper.warmup_steps, hyper.steps)
    start = resume(spec.layout.resume, model, optimizer, scheduler)

    # loop
    batches = Batches(processor, train, ImageBounds(**index["image_bounds"]), runtime.device)
    loop = train_loop(spec, hyper, model, batches, (optimizer, scheduler), start, on_resume_point)

    # checkpoint
    summary = {
        "base": index["base"],
        "labels": index["labels"],
        "resumed_from": start,
        **asdict(hyper),
        "mode": spec.mode,
        "shards_version": index["shards_version"],
        "final_loss": loop.curve[-1][1] if loop.curve else None,
        "tokens_per_second": loop.tokens / loop.seconds if loop.seconds > 0 else 0.0,
        "wall_seconds": time.perf_counter() - started,
        "device": str(runtime.device),
    }
    publish(spec.layout.checkpoint, model, summary, loop.curve)
    shutil.rmtree(spec.layout.resume, ignore_errors=True)
    return _result(spec, summary, loop.curve)


@dataclass(frozen=True)
class Batches:
    """Turns a step number into a collated batch on the device."""

    processor: Any
    split: Split
    bounds: ImageBounds
    device: torch.device

    def at(self, step: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        """The batch of `step` (deterministic, so a resumed run sees the same data)."""
        picks = batch_indices(len(self.split.items), batch_size, step, seed)
        batch = collate(self.processor, [self.split.items[i] for i in picks], self.bounds)
        return {key: value.to(self.device) for key, value in batch.items()}


@dataclass
class LoopStats:
    """What the loop measured: loss per step, real (non-padding) tokens and seconds."""

    curve: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


def train_loop(
    spec: TrainSpec,
    hyper: Hyper,
    model: PeftModel,
    batches: Batches,
    schedule: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler],
    start: int,
    on_resume_point: ResumePointHook = None,
) -> LoopStats:
    """Optimise from `start` to `hyper.steps`, logging to TensorBoard and saving resume points."""
    optimizer, scheduler = schedule
    trainable = [p for p in model.parameters() if p.requires_grad]
    writer = SummaryWriter(str(spec.layout.tensorboard))
    stats = LoopStats()
    began = time.perf_counter()
    model.train()
    for step in range(start, hyper.steps):
        batch = batches.at(step, hyper.batch_size, spec.seed)
        labels = batch.pop("labels")
        loss = answer_loss(model(**batch).logits, labels)
        optimizer_step(loss, trainable, optimizer, scheduler)
        done = step + 1
        stats.tokens += int(batch["attention_mask"].sum())
        stats.curve.append((done, loss.item()))
        writer.add_scalar("train/loss", stats.curve[-1][1], done)
        writer.add_scalar("train/lr", scheduler.get_last_lr()[0], done)
        if done % spec.log_every == 0 or done == hyper.steps:
            log.info("step %d/%d loss %.4f", done, hyper.steps, stats.curve[-1][1])
        if done % spec.checkpoint_every == 0 and done < hyper.steps:
            point = save_state(spec.layout.resume, done, model, optimizer, scheduler)
            if on_resume_point is not None:
                on_resume_point(point)
    writer.close()
    stats.seconds = time.perf_counter() - began
    return stats


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The samples of `step`: epochs of seeded permutations, so a resumed run sees the same data."""
    per_epoch = max(1, n // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = random.Random(f"{seed}:{epoch}").sample(range(n), n)
    return order[offset * batch_size : (offset + 1) * batch_size] or order[:batch_size]


def save_state(root: Path, step: int, model: Any, optimizer: Any, scheduler: Any) -> Path:
    """Write a complete resume point `step-N/` (safetensors + JSON only), pruning old ones."""
    point = root / f"step-{step:07d}"
    with atomic_dir(point) as staging:
        save_file(get_peft_model_state_dict(model), str(staging / "adapter.safetensors"))
        tensors, layout = _flatten_optimizer(optimizer.state_dict())
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(staging / "optimizer.safetensors"))
        write_json(
            staging / "state.json",
            {
                "step": step,
                "optimizer": layout,
                "scheduler": scheduler.state_dict(),
            },
        )
    for old in sorted(root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return point


def resume(root: Path, model: Any, optimizer: Any, scheduler: Any) -> int:
    """Restore the newest readable resume point; return the step to continue from (0 if none).

    Points are complete by construction (renamed into place whole); one damaged afterwards (a
    truncated file, a bad disk) is skipped with a warning in favour of the one before it.
    """
    for point in sorted(root.glob("step-*"), reverse=True):
        try:
            state = json.loads((point / "state.json").read_text())
            adapter = load_file(str(point / "adapter.safetensors"))
            tensors = load_file(str(point / "optimizer.safetensors"))
            rng = tensors.pop("rng.torch")
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            log.warning("skipping unreadable resume point %s: %s", point, exc)
            continue
        set_peft_model_state_dict(model, adapter)
        torch.set_rng_state(rng)
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        log.info("resumed from %s (step %d)", point, state["step"])
        return int(state["step"])
    return 0


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(
    tensors: dict[str, torch.Tensor], layout: dict[str, Any]
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in layout["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": layout["param_groups"]}


def publish(
    target: Path, model: PeftModel, summary: dict[str, Any], curve: list[tuple[int, float]]
) -> None:
    """Write the final adapter, summary and loss curve to `target` in one atomic rename."""
    with atomic_dir(target) as staging:
        model.save_pretrained(str(staging), safe_serialization=True)
        summary["adapter_sha256"] = file_sha256(staging / "adapter_model.safetensors")
        write_json(staging / "training_summary.json", summary)
        write_json(staging / "loss_curve.json", [[s, loss] for s, loss in curve])
        if curve:
            (staging / "loss_curve.png").write_bytes(
                plots.loss_curve([s for s, _ in curve], [loss for _, loss in curve])
            )


def _result(
    spec: TrainSpec, summary: dict[str, Any], curve: list[tuple[int, float]]
) -> StageResult:
    metadata = {
        "path": path_value(spec.layout.checkpoint),
        "steps": number(summary["steps"]),
        "resumed_from_step": number(summary["resumed_from"]),
        "final_loss": number(round(summary["final_loss"] or 0.0, 5)),
        "tokens_per_second": number(round(summary["tokens_per_second"], 1)),
        "wall_seconds": number(round(summary["wall_seconds"], 2)),
        "mode": text(spec.mode),
        "device": text(summary["device"]),
        "shards_version": text(summary["shards_version"]),
        "loss_curve_values": json_value([[s, round(v, 5)] for s, v in curve]),
        "tensorboard": path_value(spec.layout.tensorboard),
    }
    png = spec.layout.checkpoint / "loss_curve.png"
    if png.is_file():
        metadata["loss_curve"] = png_markdown(png.read_bytes(), "loss curve")
    return StageResult(summary["adapter_sha256"][:16], metadata)


if __name__ == "__main__":
    from modal_jobs.pipes import main

    main(run, TrainSpec)
