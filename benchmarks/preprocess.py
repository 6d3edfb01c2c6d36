"""Tokenizing screenshots: the `tokenized_shards` stage vs a plain per-sample processor loop.

Writes `--per-expert` fresh demo screens per expert (mixed sizes) and the routing dataset over
them in a temp dir, then preprocesses every sample of it (train, val and eval) on the tiny
preset's processor (built into MOLE_HOME on first use, outside the timings):
- baseline, what a straightforward script does: per sample, the chat template's text, then
  `processor(text=[text], images=[image], return_tensors="pt")` (the processor resizes, rescales,
  normalises and patchifies), and the float32 tensors saved as one safetensors file per sample;
- ours: `shards.run` end to end (processor load, encoding, shards, index.json), with
  `MOLE_PREPROCESS_WORKERS` = 1 and = 2.
The three runs alternate `--repeats` times and each reports its fastest; samples/s count every
sample over that wall time; bytes per sample are what each leaves on disk.
`speedup` = best of ours / baseline samples/s; `bytes_ratio` = baseline / ours bytes per sample.
Batch-time pixels, 8 sized screenshots, median of interleaved repeats: the image processor
(what `collate` called before) vs `vision_inputs` (what it calls now). Load from other processes
on the machine still hits the runs unevenly.

    MOLE_HOME=.mole python benchmarks/preprocess.py [--per-expert 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoProcessor

from modal_jobs import artifacts
from modal_jobs.config import load_config
from modal_jobs.demo_data import write_demo_data
from modal_jobs.layout import Volumes
from modal_jobs.ml import shard_files
from modal_jobs.ml.batching import conversation, vision_inputs
from modal_jobs.ml.presets import resolve_base
from modal_jobs.stage import StageSpec
from modal_jobs.stages import dataset, shards

REPO = Path(__file__).resolve().parents[1]
RUN = "bench"


def make_spec(root: Path, per_expert: int) -> StageSpec:
    """Demo experts, a config over them and the run's routing dataset, all under `root`."""
    experts = root / "experts"
    write_demo_data(experts, per_expert, seed=11)
    config = root / "config"
    shutil.copytree(REPO / "config", config)
    data = yaml.safe_load((config / "dataset.yaml").read_text())
    data["experts_dir"] = str(experts)
    data["experts"] = {
        name: {**spec, "count": per_expert} for name, spec in data["experts"].items()
    }
    (config / "dataset.yaml").write_text(yaml.safe_dump(data))
    models = Volumes.local().models  # the cached tiny base lives under MOLE_HOME
    volumes = Volumes(root / "data", root / "inference", models)
    spec = StageSpec(run=RUN, config=load_config(config), volumes=volumes)
    dataset.run(spec)
    return spec


def all_rows(spec: StageSpec) -> list[dict[str, Any]]:
    """Every sample of the routing dataset, in split order."""
    return [
        row
        for split in artifacts.SPLITS
        for row in artifacts.read_split(spec.layout.dataset, split)
    ]


def baseline(spec: StageSpec, base: str, out: Path) -> float:
    """Per-sample processor call and one safetensors file per sample; returns seconds."""
    began = time.perf_counter()
    processor = AutoProcessor.from_pretrained(base)
    system = spec.config.dataset.system_prompt
    out.mkdir()
    for n, row in enumerate(all_rows(spec)):
        messages = conversation(system, row["instruction"], row["label"])
        text = processor.apply_chat_template(messages, tokenize=False)
        with Image.open(spec.layout.dataset / row["image"]) as image:
            inputs = processor(text=[text], images=[image.convert("RGB")], return_tensors="pt")
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(out / f"{n:06d}.safetensors"))
    return time.perf_counter() - began


def ours(spec: StageSpec, workers: int) -> float:
    """The whole `tokenized_shards` stage with `workers` local processes; returns seconds."""
    os.environ[shards.WORKERS_ENV] = str(workers)
    began = time.perf_counter()
    shards.run(spec)
    return time.perf_counter() - began


def folder_bytes(folder: Path) -> int:
    """Bytes of every file in a folder."""
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def batch_pixels_ms(spec: StageSpec, base: str, repeats: int = 30) -> dict[str, float]:
    """Median ms to turn 8 sized screenshots into pixel values: image processor vs ours."""
    processor = AutoProcessor.from_pretrained(base)
    split = shard_files.load_split(
        spec.layout.shards, artifacts.read_index(spec.layout.shards), "eval"
    )
    pixels = [item.pixels for item in split.items[:8]]
    bounds = spec.config.image_bounds
    size = {"shortest_edge": bounds.min_pixels, "longest_edge": bounds.max_pixels}
    timings: dict[str, list[float]] = {"image_processor": [], "ours": []}
    for _ in range(repeats):
        began = time.perf_counter()
        processor.image_processor(images=pixels, size=size, return_tensors="pt")
        timings["image_processor"].append(time.perf_counter() - began)
        began = time.perf_counter()
        vision_inputs(processor, pixels)
        timings["ours"].append(time.perf_counter() - began)
    return {name: round(1000 * float(np.median(t)), 2) for name, t in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-expert", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = make_spec(Path(tmp), args.per_expert)
        config = spec.config
        base = resolve_base(config.loras.base_model, config.preset, spec.volumes.models)
        samples = len(all_rows(spec))
        seconds: dict[str, list[float]] = {"baseline": [], "workers_1": [], "workers_2": []}
        plain = Path(tmp) / "baseline"
        for _ in range(args.repeats):
            seconds["baseline"].append(baseline(spec, base, plain))
            baseline_bytes = folder_bytes(plain) / samples
            shutil.rmtree(plain)  # about 1 MB a sample
            for workers in (1, 2):
                seconds[f"workers_{workers}"].append(ours(spec, workers))
        rates = {name: samples / min(times) for name, times in seconds.items()}
        ours_bytes = folder_bytes(spec.layout.shards) / samples
        best = max(rates["workers_1"], rates["workers_2"])
        result = {
            "samples": samples,
            "repeats": args.repeats,
            "cpus": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "baseline_samples_per_s": round(rates["baseline"], 1),
            "ours_samples_per_s": {
                name: round(rate, 1) for name, rate in rates.items() if name != "baseline"
            },
            "baseline_bytes_per_sample": round(baseline_bytes),
            "ours_bytes_per_sample": round(ours_bytes),
            "speedup": round(best / rates["baseline"], 2),
            "bytes_ratio": round(baseline_bytes / ours_bytes, 2),
            "batch_pixels_ms_batch8": batch_pixels_ms(spec, base),
            "seconds": {name: [round(t, 2) for t in times] for name, times in seconds.items()},
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
