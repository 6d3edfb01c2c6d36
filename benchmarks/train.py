"""Router training: mole's loop vs `transformers.Trainer`, same model and data; ONE JSON object.

Needs the demo run's tokenized shards under MOLE_HOME (`make demo` makes them). Both sides train
a fresh router LoRA (same seed, same `lora_config`) on the tiny base from the run's train split
(mixed-size screenshots), with the same batch size, steps, learning rate, warm-up + cosine
schedule, AdamW betas and gradient clipping, on the same device and dtype:
- ours: `modal_jobs.stages.train.run`, on a copy of the shards in a scratch volume (length-grouped
  batches, the vocabulary projection at answer positions only, the frozen vision outputs kept per
  sample from its second visit on; on a GPU, collation ahead by loader workers);
- ours_no_vision_cache: the same with the vision cache's budget at 0 bytes, so the gain of each
  part is visible;
- trainer: what a user writes: a torch Dataset of per-sample processor outputs (the image
  processor runs in `__getitem__`), a collator that right-pads `input_ids` / `attention_mask` /
  `mm_token_type_ids` / `labels` (-100 outside the answer) and concatenates `pixel_values` /
  `image_grid_thw`, and `Trainer(model=peft_model, args=...)` with its own length grouping
  (`train_sampling_strategy="group_by_length"`, transformers 5's `group_by_length=True`) and as
  many data-loader workers as ours uses (`loader.loader_workers`: none on CPU).
Real tokens are the non-padding ones; tokens/s is over the training loop's wall time (model
loading excluded on both sides). Each side runs `--repeats` times, in an order that rotates every
repeat, and its fastest run is reported (with every run's figure): on a shared machine other jobs
only ever slow a run down. Final loss = mean of the last `--last` steps' batch losses (the two sides
see batches in different orders, so those are noisy); `val_loss` = each trained adapter's
answer-token loss on the run's val split, the same samples for both.

    MOLE_HOME=.mole python benchmarks/train.py [--steps 150] [--batch-size 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from modal_jobs.artifacts import read_index
from modal_jobs.config import ImageBounds, load_config
from modal_jobs.layout import Volumes
from modal_jobs.ml import vision_cache
from modal_jobs.ml.batching import IGNORE_INDEX, Encoded, collate
from modal_jobs.ml.loader import loader_workers
from modal_jobs.ml.loss import AnswerLoss
from modal_jobs.ml.model import Runtime, load_base, load_processor, lora_config
from modal_jobs.ml.shard_files import load_split
from modal_jobs.stages import train

SIDES = ("ours", "ours_no_vision_cache", "trainer")


def ours(spec: train.TrainSpec, cache_vision: bool = True) -> dict[str, Any]:
    """mole's own training stage on `spec` (its run's shards already in place)."""
    budget = vision_cache.BUDGET_BYTES
    vision_cache.BUDGET_BYTES = budget if cache_vision else 0
    try:
        train.run(spec)
    finally:
        vision_cache.BUDGET_BYTES = budget
    summary = json.loads((spec.layout.checkpoint / "training_summary.json").read_text())
    curve = json.loads((spec.layout.checkpoint / "loss_curve.json").read_text())
    base = load_base(summary["base"], Runtime.detect())
    trained = PeftModel.from_pretrained(base, str(spec.layout.checkpoint))
    return {
        "real_tokens_per_s": summary["tokens_per_second"],
        "padding_fraction": summary["padding_fraction"],
        "losses": [loss for _, loss in curve],
        "val_loss": heldout_loss(trained, spec),
    }


@torch.no_grad()
def heldout_loss(model: Any, spec: train.TrainSpec, batch_size: int = 16) -> float:
    """Answer-token loss of a trained adapter on the run's val split (the same samples for both).

    The two sides' last training batches differ, so their training losses are noisy to compare.
    """
    index = read_index(spec.layout.shards)
    processor = load_processor(index["base"])
    items = list(load_split(spec.layout.shards, index, "val").items)
    bounds = ImageBounds(**index["image_bounds"])
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(items), batch_size):
        batch = collate(processor, items[start : start + batch_size], bounds)
        loss, answers = AnswerLoss(model)({k: v.to(device) for k, v in batch.items()})
        total, count = total + float(loss), count + int(answers)
    return total / count


class Samples(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Per-sample processor outputs: ids, token types, answer-only labels, pixel patches.

    As a user's `__getitem__` does, the image processor runs on one sample when it is asked for
    (on the shard's already-sized pixels, so both sides do the same image work); the token ids
    come from the shards, so neither side pays tokenization.
    """

    def __init__(self, processor: Any, items: list[Encoded], bounds: ImageBounds) -> None:
        self.processor = processor
        self.items = items
        self.size = {"shortest_edge": bounds.min_pixels, "longest_edge": bounds.max_pixels}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.items[index]
        ids = torch.from_numpy(item.input_ids.astype(np.int64))
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[item.prompt_len : item.answer_end] = ids[item.prompt_len : item.answer_end]
        vision = self.processor.image_processor(
            images=[item.pixels], size=self.size, return_tensors="pt"
        )
        return {
            "input_ids": ids,
            "mm_token_type_ids": torch.from_numpy(item.mm_token_type_ids.astype(np.int64)),
            "labels": labels,
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
        }


class PadCollator:
    """Right-pad to the longest sample of the batch; counts real and padded positions."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id
        self.batches: list[tuple[int, int]] = []  # (real tokens, padded positions) per batch

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(row["input_ids"]) for row in rows)

        def pad(key: str, value: int) -> torch.Tensor:
            out = torch.full((len(rows), width), value, dtype=torch.long)
            for n, row in enumerate(rows):
                out[n, : len(row[key])] = row[key]
            return out

        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for n, row in enumerate(rows):
            mask[n, : len(row["input_ids"])] = 1
        self.batches.append((int(mask.sum()), mask.numel()))
        return {
            "input_ids": pad("input_ids", self.pad_id),
            "attention_mask": mask,
            "mm_token_type_ids": pad("mm_token_type_ids", 0),
            "labels": pad("labels", IGNORE_INDEX),
            "pixel_values": torch.cat([row["pixel_values"] for row in rows]),
            "image_grid_thw": torch.cat([row["image_grid_thw"] for row in rows]),
        }


class Clock(TrainerCallback):  # type: ignore[misc]
    """Wall time of the training loop proper (after the Trainer's own set-up)."""

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        self.began = time.perf_counter()

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        self.seconds = time.perf_counter() - self.began


def baseline(spec: train.TrainSpec, scratch: Path) -> dict[str, Any]:
    """`transformers.Trainer` with default-style padding collation, same hyper-parameters."""
    hyper = train.hyper_parameters(spec)
    index = read_index(spec.layout.shards)
    processor = load_processor(index["base"])
    items = load_split(spec.layout.shards, index, "train").items
    dataset = Samples(processor, items, ImageBounds(**index["image_bounds"]))
    torch.manual_seed(spec.seed)
    runtime = Runtime.detect()
    model = get_peft_model(load_base(index["base"], runtime), lora_config(spec.config.preset.lora))
    collator, clock = PadCollator(processor.tokenizer.pad_token_id or 0), Clock()
    args = TrainingArguments(
        output_dir=str(scratch / "trainer"),
        per_device_train_batch_size=hyper.batch_size,
        max_steps=hyper.steps,
        learning_rate=hyper.learning_rate,
        warmup_steps=hyper.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        weight_decay=0.0,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        label_names=["labels"],
        bf16=runtime.dtype == torch.bfloat16,
        seed=spec.seed,
        disable_tqdm=True,
        train_sampling_strategy="group_by_length",
        dataloader_num_workers=loader_workers(runtime.device),
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[clock]
    )
    trainer.remove_callback(PrinterCallback)  # its per-step prints would break the one JSON line
    trainer.train()
    val_loss = heldout_loss(trainer.model, spec)
    counted = collator.batches[: hyper.steps]  # the loader may have collated one batch ahead
    return {
        "real_tokens_per_s": sum(real for real, _ in counted) / clock.seconds,
        "padding_fraction": 1 - sum(r for r, _ in counted) / sum(p for _, p in counted),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "val_loss": val_loss,
    }


def main() -> int:
    """Run both trainings (alternating, `--repeats` times each) and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo", help="run whose tokenized shards to train on")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--last", type=int, default=10, help="steps averaged for the final loss")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the best counts")
    args = parser.parse_args()
    shards = Volumes.local().run(args.run).shards
    if not (shards / "index.json").is_file():
        print(json.dumps({"error": f"no tokenized shards at {shards} (run `make demo` first)"}))
        return 2
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SIDES}
    with tempfile.TemporaryDirectory() as scratch:
        spec = train.TrainSpec(
            run="bench",
            config=load_config(),
            volumes=Volumes.local(Path(scratch)),
            steps=args.steps,
            batch_size=args.batch_size,
            checkpoint_every=args.steps,
            log_every=args.steps,
        )
        shutil.copytree(shards, spec.layout.shards)
        measures = {
            "ours": lambda: ours(spec),
            "ours_no_vision_cache": lambda: ours(spec, cache_vision=False),
            "trainer": lambda: baseline(spec, Path(scratch)),
        }
        for repeat in range(args.repeats):
            # Rotate which goes first: the machine's other load falls on every side alike.
            for name in SIDES[repeat % 3 :] + SIDES[: repeat % 3]:
                runs[name].append(measures[name]())
    report = {name: best(measured, args.last) for name, measured in runs.items()}
    hyper = train.hyper_parameters(spec)
    mine, theirs = report["ours"], report["trainer"]
    result = {
        "device": str(Runtime.detect().device),
        "torch_threads": torch.get_num_threads(),
        "steps": hyper.steps,
        "batch_size": hyper.batch_size,
        "learning_rate": hyper.learning_rate,
        "samples": read_index(shards)["splits"]["train"]["count"],
        **report,
        "speedup": mine["real_tokens_per_s"] / theirs["real_tokens_per_s"],
        "speedup_no_vision_cache": report["ours_no_vision_cache"]["real_tokens_per_s"]
        / theirs["real_tokens_per_s"],
        "trainer_sampling": "group_by_length",
        "loss_rel_diff": abs(mine["final_loss"] - theirs["final_loss"]) / theirs["final_loss"],
        "val_loss_rel_diff": abs(mine["val_loss"] - theirs["val_loss"]) / theirs["val_loss"],
    }
    print(json.dumps(result))
    return 0


def best(runs: list[dict[str, Any]], last: int) -> dict[str, Any]:
    """The fastest of the repeated runs, with every run's tokens/s and its final loss."""
    fastest = max(runs, key=lambda run: run["real_tokens_per_s"])
    losses = fastest["losses"]
    return {
        "real_tokens_per_s": fastest["real_tokens_per_s"],
        "real_tokens_per_s_runs": [run["real_tokens_per_s"] for run in runs],
        "padding_fraction": fastest["padding_fraction"],
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-last:])),
        "val_loss": fastest["val_loss"],
    }


if __name__ == "__main__":
    sys.exit(main())
