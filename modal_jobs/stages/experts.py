"""Stage `expert_adapters`: small demo expert LoRAs, so stacked inference works out of the box.

`config/loras.json` registers expert adapters. An adapter given as a relative path lives on the
inference volume and is *managed* by mole: this stage trains it on the run's routing-dataset train
rows of the expert named by `dataset` (instruction → the expert's answer, loss on the answer
only, no router system prompt), with the router's LoRA shape (language model only). Each adapter
is written to its folder in one atomic rename. Absolute paths are the user's own adapters and are
left alone.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from PIL import Image

from modal_jobs.artifacts import ExpertsError, adapter_paths, managed, read_index, read_split
from modal_jobs.atomic import atomic_dir, write_json
from modal_jobs.config import ImageBounds
from modal_jobs.hashing import combine, file_sha256
from modal_jobs.ml.batching import Encoded, answer_loss, collate, encode
from modal_jobs.ml.model import Runtime, load_base, load_processor, lora_config
from modal_jobs.ml.optim import adamw, optimizer_step
from modal_jobs.stage import (
    ExpertsOptions,
    StageResult,
    StageSpec,
    json_value,
    number,
    path_value,
)

log = logging.getLogger(__name__)

TEST_STEPS = 4


class ExpertsSpec(StageSpec, ExpertsOptions):
    """Demo expert training: the run, config and volumes plus its options."""


def run(spec: ExpertsSpec) -> StageResult:
    """Train every managed expert adapter on its train rows and write it atomically."""
    started = time.perf_counter()
    index = read_index(spec.layout.shards)
    bounds = ImageBounds(**index["image_bounds"])
    processor = load_processor(index["base"])
    runtime = Runtime.detect()
    rows = read_split(spec.layout.dataset, "train")
    paths = adapter_paths(spec.config, spec.volumes)
    trained: dict[str, Any] = {}
    for name, source in managed(spec.config).items():
        items = [
            _encode(processor, spec.layout.dataset, row, bounds)
            for row in rows
            if row.get("expert") == source
        ]
        if not items:
            raise ExpertsError(
                f"{spec.layout.dataset / 'train.jsonl'}: no train rows of expert {source!r}; "
                "fix: give it samples in dataset.yaml"
            )
        trained[name] = train_expert(spec, name, items, (processor, bounds, runtime), paths[name])
        trained[name]["train_rows"] = len(items)
    seconds = time.perf_counter() - started
    return _result(spec, trained, paths, seconds)


def _encode(processor: Any, dataset_dir: Path, row: dict[str, Any], bounds: ImageBounds) -> Encoded:
    with Image.open(dataset_dir / row["image"]) as image:
        return encode(processor, image, bounds, None, row["instruction"], row["answer"])


def train_expert(
    spec: ExpertsSpec,
    name: str,
    items: list[Encoded],
    tools: tuple[Any, ImageBounds, Runtime],
    target: Path,
) -> dict[str, Any]:
    """Train one expert LoRA from the base and publish `target` whole; returns its summary."""
    processor, bounds, runtime = tools
    base_dir = read_index(spec.layout.shards)["base"]
    seed = int.from_bytes(hashlib.sha256(f"{spec.seed}:{name}".encode()).digest()[:4], "big")
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_dir, runtime), lora_config(spec.config.preset.lora))
    steps = TEST_STEPS if spec.mode == "test" else spec.steps
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = adamw(trainable, spec.learning_rate, steps // 10, steps)
    rng = random.Random(seed)
    model.train()
    losses = []
    for _ in range(steps):
        picks = rng.sample(items, min(spec.batch_size, len(items)))
        batch = {k: v.to(runtime.device) for k, v in collate(processor, picks, bounds).items()}
        labels = batch.pop("labels")
        loss = answer_loss(model(**batch).logits, labels)
        optimizer_step(loss, trainable, optimizer, scheduler)
        losses.append(loss.item())
    summary = {"expert": name, "base": base_dir, "steps": steps, "final_loss": losses[-1]}
    with atomic_dir(target) as staging:
        model.save_pretrained(str(staging), safe_serialization=True)
        write_json(staging / "expert_summary.json", summary)
    log.info("expert %s: %d steps, loss %.3f → %.3f", name, steps, losses[0], losses[-1])
    return summary


def _result(
    spec: ExpertsSpec, trained: dict[str, Any], paths: dict[str, Path], seconds: float
) -> StageResult:
    hashes = {n: file_sha256(paths[n] / "adapter_model.safetensors") for n in trained}
    metadata = {
        "path": path_value(spec.volumes.inference / "experts"),
        "experts": json_value(
            {
                n: {"loss": round(s["final_loss"], 4), "rows": s["train_rows"]}
                for n, s in trained.items()
            }
        ),
        "registered": json_value({n: str(p) for n, p in paths.items()}),
        "wall_seconds": number(round(seconds, 2)),
    }
    version = combine(f"{n}:{h}" for n, h in sorted(hashes.items()))[:16] if hashes else "none"
    return StageResult(version, metadata)


if __name__ == "__main__":
    from modal_jobs.launch.pipes import main

    main(run, ExpertsSpec)
