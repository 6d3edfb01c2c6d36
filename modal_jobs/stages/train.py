"""Stage `router_checkpoint`: train the router LoRA on the tokenized shards.

Reads top to bottom: spec → data → model → optimizer → loop → checkpoint. Resumable: every
`checkpoint_every` steps the adapter, optimizer, scheduler, loss curve and every rank's RNG state
(`modal_jobs/ml/rng.py`) go to the run's `train_state/step-N/` (atomically), and a restarted run
continues from the newest complete one as if it had never stopped.
The published output is `adapter_config.json` + `adapter_model.safetensors`, loadable with
vanilla `peft.PeftModel.from_pretrained` onto the saved base.

Throughput: batches are length-grouped (`modal_jobs/ml/loader.py`) and, on a GPU, collated ahead
by loader workers; the vocabulary projection runs only at answer positions (`ml/loss.py`);
bf16 and flash-attention (`Runtime`) and gradient checkpointing on GPU; and `torchrun` runs it
data-parallel (`modal_jobs/ml/distributed.py`) with the same result as one process.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.tensorboard import SummaryWriter

from modal_jobs.artifacts import read_index
from modal_jobs.atomic import atomic_dir, pause_point, write_json
from modal_jobs.config import ConfigError, ImageBounds
from modal_jobs.errors import MoleError
from modal_jobs.hashing import file_sha256
from modal_jobs.ml import memory, plots, rng
from modal_jobs.ml.batching import collate
from modal_jobs.ml.distributed import Ranks, agree, all_sum, barrier, data_parallel, process_group
from modal_jobs.ml.dropout import InstructionDropout
from modal_jobs.ml.loader import LengthGrouped, loader_workers, step_batches
from modal_jobs.ml.loss import AnswerLoss
from modal_jobs.ml.model import Runtime, causal_lm, load_base, load_processor, lora_config
from modal_jobs.ml.optim import adamw, optimizer_step
from modal_jobs.ml.shard_files import Split, load_split
from modal_jobs.ml.vision_cache import SAMPLE_IDS, VisionCache, worth_caching
from modal_jobs.stage import (
    StageResult,
    StageSpec,
    TrainOptions,
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
Curve = list[tuple[int, float]]


class TrainSpec(StageSpec, TrainOptions):
    """A router-training run: the run, config and volumes plus its options."""

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

    Under `torchrun` every rank trains its share of each batch and rank 0 alone writes resume
    points, TensorBoard events and the published adapter; every rank returns what was published.
    `on_resume_point(path)` runs after each resume point is complete (on Modal: commit the
    data volume, so a preempted container's retry finds it).
    """
    started = time.perf_counter()
    hyper = hyper_parameters(spec)
    ranks = Ranks.from_env()
    detected = Runtime.detect()
    runtime = replace(detected, device=ranks.device(detected.device))
    with process_group(ranks, runtime.device):
        # data
        index = read_index(spec.layout.shards)
        train = training_split(spec, index)
        order = batch_plan(train, hyper, spec.seed, ranks)
        shares = (ranks.share(order.at(step)) for step in range(hyper.steps))
        checkpointing = gradient_checkpointing(spec, runtime)
        memory.check_plan(
            index["base"], spec.config.preset.lora, runtime, checkpointing, shares, train
        )

        # model
        processor = load_processor(index["base"])
        model = router_model(index["base"], spec, runtime)

        # optimizer (and the newest resume point, if a previous attempt left one)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer, scheduler = adamw(
            trainable, hyper.learning_rate, hyper.warmup_steps, hyper.steps
        )
        resumed = resume(spec.layout.resume, model, optimizer, scheduler, ranks.rank)
        start = agree(resumed.step, ranks, "resume step")

        # loop
        bounds = ImageBounds(**index["image_bounds"])
        dropout = InstructionDropout(
            processor,
            bounds,
            index["system_prompt"],
            index["labels"]["labels"],
            spec.instruction_dropout,
            spec.seed,
            index["labels"].get("none_label"),
        )
        batches = Batches(processor, train, bounds, order, ranks, runtime.device, dropout)
        loop = train_loop(
            spec, hyper, model, batches, (optimizer, scheduler), resumed, on_resume_point
        )

        # checkpoint
        if ranks.main:
            summary = {
                **describe(spec, index, hyper, start),
                **loop.summary(),
                "gradient_checkpointing": gradient_checkpointing(spec, runtime),
                "processes": ranks.world,
                "device": str(runtime.device),
                "wall_seconds": time.perf_counter() - started,
            }
            publish(spec.layout.checkpoint, model, summary, loop.curve)
            shutil.rmtree(spec.layout.resume, ignore_errors=True)
        barrier(ranks)
    published = json.loads((spec.layout.checkpoint / "training_summary.json").read_text())
    return _result(spec, published, loop.curve)


def describe(spec: TrainSpec, index: dict[str, Any], hyper: Hyper, start: int) -> dict[str, Any]:
    """What the run trained: base, labels, data version, hyper-parameters, where it resumed."""
    return {
        "base": index["base"],
        "labels": index["labels"],
        "resumed_from": start,
        **asdict(hyper),
        "mode": spec.mode,
        "instruction_dropout": spec.instruction_dropout,
        "shards_version": index["shards_version"],
    }


def training_split(spec: TrainSpec, index: dict[str, Any]) -> Split:
    """The train split (in `test` mode, a seeded subset of `TEST_SAMPLES`)."""
    train = load_split(spec.layout.shards, index, "train")
    if not train.items:
        raise MoleError(
            f"{spec.layout.shards / 'index.json'}: the train split holds no samples; fix: raise "
            "the experts' `count` or lower the val/eval fractions in config/dataset.yaml, then "
            "re-materialize routing_dataset and tokenized_shards"
        )
    if spec.mode != "test":
        return train
    keep = sorted(np.random.default_rng(spec.seed).permutation(len(train.items))[:TEST_SAMPLES])
    return train.subset(keep)


def batch_plan(train: Split, hyper: Hyper, seed: int, ranks: Ranks) -> LengthGrouped:
    """Every step's global batch; each of the `ranks.world` processes needs a sample of it."""
    order = LengthGrouped(train.lengths.tolist(), hyper.batch_size, seed)
    if order.batch_size < ranks.world:
        raise ConfigError(
            f"batch size {order.batch_size} is smaller than the {ranks.world} training "
            f"processes; fix: set batch_size to at least {ranks.world} or run fewer processes"
        )
    return order


def gradient_checkpointing(spec: TrainSpec, runtime: Runtime) -> bool:
    """As configured; by default on for CUDA and off on CPU.

    Checkpointing keeps only each decoder layer's inputs and recomputes the rest during the
    backward pass: on a GPU, activation memory is what limits batch size and sequence length,
    so the extra forward buys room; on CPU memory is plentiful and the recomputation only costs
    time (about a third more per step).
    """
    if spec.gradient_checkpointing is not None:
        return spec.gradient_checkpointing
    return runtime.device.type == "cuda"


def router_model(base: str, spec: TrainSpec, runtime: Runtime) -> PeftModel:
    """The frozen base with a fresh (seeded) router LoRA, checkpointing as configured."""
    torch.manual_seed(spec.seed)
    model = get_peft_model(load_base(base, runtime), lora_config(spec.config.preset.lora))
    if gradient_checkpointing(spec, runtime):
        # Non-reentrant: the reentrant variant needs layer inputs that require grad (the frozen
        # embeddings give none, so LoRA would get no gradient) and clashes with DDP's hooks.
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    return model


@dataclass(frozen=True)
class Batches:
    """Turns a step number into this rank's share of the step's (length-grouped) batch."""

    processor: Any
    split: Split
    bounds: ImageBounds
    order: LengthGrouped
    ranks: Ranks
    device: torch.device
    dropout: InstructionDropout

    def at(self, step: int) -> dict[str, torch.Tensor]:
        """This rank's share of `step`'s batch, collated on the CPU, with its sample indices."""
        ids = self.ranks.share(self.order.at(step))
        items = [self.split.items[i] for i in ids]
        items = self.dropout.apply(step, ids, items, self.split.classes[list(ids)])
        batch = collate(self.processor, items, self.bounds)
        return {**batch, SAMPLE_IDS: torch.tensor(ids)}

    def stream(self, steps: range) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """`(step, batch)` for `steps` in order, on the CPU (pinned and collated ahead on a GPU)."""
        cuda = self.device.type == "cuda"
        return step_batches(self.at, steps, loader_workers(self.device), pin_memory=cuda)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` on the training device (asynchronously from pinned memory)."""
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}


@dataclass
class LoopStats:
    """What the loop measured, summed over ranks: loss per step, tokens and seconds."""

    curve: Curve = field(default_factory=list)
    tokens: int = 0
    positions: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Final loss, real (non-padding) tokens per second and the share of padding."""
        return {
            "final_loss": self.curve[-1][1] if self.curve else None,
            "tokens_per_second": self.tokens / self.seconds if self.seconds > 0 else 0.0,
            "padding_fraction": 1 - self.tokens / self.positions if self.positions else 0.0,
        }


def train_loop(
    spec: TrainSpec,
    hyper: Hyper,
    model: PeftModel,
    batches: Batches,
    schedule: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler],
    resumed: Resumed,
    on_resume_point: ResumePointHook = None,
) -> LoopStats:
    """Optimise from `resumed.step` to `hyper.steps`, continuing the resumed loss curve.

    Rank 0 logs to TensorBoard and saves resume points. On a GPU, loader worker processes
    collate the next batches while the current step runs.
    """
    optimizer, scheduler = schedule
    ranks = batches.ranks
    loss_fn = data_parallel(AnswerLoss(model), ranks, batches.device)
    cache = VisionCache(model) if cache_vision(model, batches, hyper, resumed.step) else None
    board = Board(spec.layout.tensorboard if ranks.main else None)
    stats = LoopStats(curve=list(resumed.curve))
    began = time.perf_counter()
    model.train()
    for step, batch in batches.stream(range(resumed.step, hyper.steps)):
        batch = batches.to_device(batch)
        if cache is not None:
            batch = cache.apply(batch)
        loss, tokens, positions = train_step(loss_fn, batch, ranks, schedule)
        done = step + 1
        stats.curve.append((done, loss))
        stats.tokens += tokens
        stats.positions += positions
        board.scalars(done, {"train/loss": loss, "train/lr": float(scheduler.get_last_lr()[0])})
        if ranks.main and (done % spec.log_every == 0 or done == hyper.steps):
            log.info("step %d/%d loss %.4f", done, hyper.steps, loss)
        if done % spec.checkpoint_every == 0 and done < hyper.steps:
            board.close()  # the hook may commit the volume the event file is on
            save_resume_point(spec, (done, stats.curve), model, schedule, ranks, on_resume_point)
    board.close()
    stats.seconds = time.perf_counter() - began
    return stats


def cache_vision(model: Any, batches: Batches, hyper: Hyper, start: int) -> bool:
    """Whether to keep the frozen vision outputs per sample (`modal_jobs/ml/vision_cache.py`).

    Only the visits still to come count: a run resumed near its end revisits few samples.
    """
    merge = causal_lm(model).config.vision_config.spatial_merge_size ** 2
    tokens = int(batches.split.grids.prod(axis=1).sum()) // merge
    # A batch never holds more samples than the split (the plan clamps it).
    per_step = min(batches.order.batch_size, len(batches.split.items))
    visits = (hyper.steps - start) * per_step
    return worth_caching(model, tokens, visits, len(batches.split.items))


def train_step(
    loss_fn: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    ranks: Ranks,
    schedule: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler],
) -> tuple[float, int, int]:
    """One optimizer step on this rank's share of the batch.

    Returns the global batch's mean loss, real (non-padding) tokens and padded positions, all
    ranks together. The loss is normalised by the answer tokens of the whole global batch; DDP
    averages gradients over ranks, so each rank's sum is scaled by the world size: the result is
    the gradient of the single-process mean, however unevenly answer tokens fall between ranks.
    """
    optimizer, scheduler = schedule
    total, answers = loss_fn(batch)
    mask = batch["attention_mask"]
    counts = all_sum(
        torch.stack([answers, mask.sum(), mask.new_tensor(mask.numel())]).double(), ranks
    )
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    scale = (ranks.world / counts[0]).to(total.dtype)
    optimizer_step(total * scale, trainable, optimizer, scheduler)
    loss = all_sum(total.detach().double(), ranks) / counts[0]
    _, tokens, positions = counts.tolist()
    return float(loss), int(tokens), int(positions)


class Board:
    """TensorBoard scalars (none when `folder` is None) in event files closed around commits.

    On Modal a commit reloads the volume, and a reload fails while a file of the volume is open
    (modal/volume.py `commit` → `_do_reload`): the writer is closed before each resume point's
    hook and a new event file starts at the next step. TensorBoard reads every event file of a
    folder as one run.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._writer: SummaryWriter | None = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log `values` (tag → value) at `step`."""
        if self.folder is None:
            return
        if self._writer is None:
            self._writer = SummaryWriter(str(self.folder))
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flush and close the event file (the next `scalars` opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def save_resume_point(
    spec: TrainSpec,
    progress: tuple[int, Curve],
    model: PeftModel,
    schedule: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler],
    ranks: Ranks,
    on_resume_point: ResumePointHook,
) -> None:
    """Save the resume point of `progress` (step, loss curve so far), then run the hook.

    Every rank calls it: each one's RNG state goes into the point, which rank 0 writes. The hook
    runs on rank 0 (on Modal: commit the data volume, so a preempted container's retry finds it).
    """
    states = rng.gathered(ranks)
    if not ranks.main:
        return
    step, curve = progress
    point = save_state(spec.layout.resume, step, model, *schedule, curve, states)
    if on_resume_point is not None:
        on_resume_point(point)
    pause_point("resume-point", step=step, path=str(point))


def save_state(
    root: Path,
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    curve: Sequence[tuple[int, float]] = (),
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a complete resume point `step-N/` (safetensors + JSON only), pruning old ones.

    `rng_states` holds every rank's generators (default: this process's, as a single rank).
    """
    point = root / f"step-{step:07d}"
    with atomic_dir(point) as staging:
        save_file(get_peft_model_state_dict(model), str(staging / "adapter.safetensors"))
        tensors, layout = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(staging / "optimizer.safetensors"))
        write_json(staging / "rng.json", rng_states or [rng.capture()])
        write_json(
            staging / "state.json",
            {
                "step": step,
                "optimizer": layout,
                "scheduler": scheduler.state_dict(),
                "curve": [[s, loss] for s, loss in curve],
            },
        )
    for old in sorted(root.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return point


@dataclass(frozen=True)
class Resumed:
    """Where training continues: the step and the loss curve up to it (0 and none when fresh)."""

    step: int = 0
    curve: tuple[tuple[int, float], ...] = ()


def resume(root: Path, model: Any, optimizer: Any, scheduler: Any, rank: int = 0) -> Resumed:
    """Restore the newest readable resume point (with rank `rank`'s generators); where to go on.

    Points are complete by construction (renamed into place whole); one damaged afterwards (a
    truncated file, a bad disk) is skipped with a warning in favour of the one before it.
    """
    for point in sorted(root.glob("step-*"), reverse=True):
        try:
            state = json.loads((point / "state.json").read_text())
            adapter = load_file(str(point / "adapter.safetensors"))
            tensors = load_file(str(point / "optimizer.safetensors"))
            states = json.loads((point / "rng.json").read_text())
            curve = tuple((int(s), float(loss)) for s, loss in state["curve"])
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            log.warning("skipping unreadable resume point %s: %s", point, exc)
            continue
        set_peft_model_state_dict(model, adapter)
        # Another world size cannot replay the same draws; each rank still gets a saved state.
        rng.restore(states[rank % len(states)])
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        log.info("resumed from %s (step %d)", point, state["step"])
        return Resumed(int(state["step"]), curve)
    return Resumed()


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


def publish(target: Path, model: PeftModel, summary: dict[str, Any], curve: Curve) -> None:
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
        "padding_fraction": number(round(summary["padding_fraction"], 4)),
        "processes": number(summary["processes"]),
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
    from modal_jobs.launch.pipes import main

    main(run, TrainSpec)
