"""Tokenizing screenshots: the `tokenized_shards` stage vs two baselines at equal processes.

Writes `--per-expert` fresh demo screens per expert (mixed sizes) and the routing dataset over
them in a temp dir, then preprocesses every sample of it (train, val and eval) on the tiny
preset's processor (built into MOLE_HOME on first use, outside the timings), each side with
`--workers` processes:
- loop: what a straightforward script does, split over the processes: per sample, the chat
  template's text, then `processor(text=[text], images=[image], return_tensors="pt")` (the
  processor resizes, rescales, normalises and patchifies), and the float32 tensors saved as one
  safetensors file per sample;
- datasets_map: what users of LLaMA-Factory or ms-swift run: `datasets.Dataset.map` with the same
  per-sample processor call and `num_proc` = the workers, its outputs written as Arrow files;
- ours: `shards.run` end to end (processor load, encoding, shards, index.json) with
  `MOLE_PREPROCESS_WORKERS` = the workers.
Every process of every side runs torch on one thread, as ours' helpers do (two threads in each of
two processes on two cores made the baselines thrash).
A machine shared with other jobs slows runs unevenly, so the sides run in short alternating
rounds (the order rotates every round), and each ratio is the median over rounds of the
per-round ratio. `speedup` = ours against the stronger baseline (higher median samples/s);
`bytes_ratio` = loop / ours bytes per sample. Batch-time pixels, 8 sized screenshots, median of
interleaved repeats: the image processor (what `collate` called before) vs `vision_inputs`.

    MOLE_HOME=.mole python benchmarks/preprocess.py [--per-expert 100] [--rounds 5] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
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


def loop_part(base: str, system: str, root: Path, rows: list[dict[str, Any]], out: Path) -> None:
    """One process's share of the loop baseline: processor call and a safetensors file a sample."""
    one_thread()
    processor = AutoProcessor.from_pretrained(base)
    for row in rows:
        messages = conversation(system, row["instruction"], row["label"])
        text = processor.apply_chat_template(messages, tokenize=False)
        with Image.open(root / row["image"]) as image:
            inputs = processor(text=[text], images=[image.convert("RGB")], return_tensors="pt")
        tensors = {k: v.contiguous() for k, v in inputs.items()}
        save_file(tensors, str(out / f"{row['number']:06d}.safetensors"))


def one_thread() -> None:
    """One torch thread per process, as ours' helpers run: W processes use W cores, no more."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def loop(spec: StageSpec, base: str, out: Path, workers: int) -> float:
    """The per-sample loop over `workers` processes; returns seconds."""
    began = time.perf_counter()
    out.mkdir()
    rows = [{**row, "number": n} for n, row in enumerate(all_rows(spec))]
    system = spec.config.dataset.system_prompt
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        parts = [rows[n::workers] for n in range(workers)]
        for done in [
            pool.submit(loop_part, base, system, spec.layout.dataset, part, out) for part in parts
        ]:
            done.result()
    return time.perf_counter() - began


def datasets_map(spec: StageSpec, base: str, out: Path, workers: int) -> float:
    """`datasets.Dataset.map` with the processor and `num_proc` = workers; returns seconds."""
    import datasets

    began = time.perf_counter()
    processor = AutoProcessor.from_pretrained(base)
    system, root = spec.config.dataset.system_prompt, spec.layout.dataset

    def process(row: dict[str, Any]) -> dict[str, Any]:
        one_thread()
        messages = conversation(system, row["instruction"], row["label"])
        text = processor.apply_chat_template(messages, tokenize=False)
        with Image.open(root / row["image"]) as image:
            inputs = processor(text=[text], images=[image.convert("RGB")], return_tensors="np")
        return {
            k: v if k in ("pixel_values", "image_grid_thw") else v[0] for k, v in inputs.items()
        }

    columns = ["image", "instruction", "label"]
    rows = [{key: row[key] for key in columns} for row in all_rows(spec)]
    out.mkdir()
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(rows).map(
        process,
        num_proc=workers,
        remove_columns=columns,
        cache_file_name=str(out / "processed.arrow"),
    )
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
    parser.add_argument("--per-expert", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = make_spec(Path(tmp), args.per_expert)
        config = spec.config
        base = resolve_base(config.loras.base_model, config.preset, spec.volumes.models)
        samples = len(all_rows(spec))
        scratch = Path(tmp) / "baselines"
        sides = {
            "loop": lambda: loop(spec, base, scratch, args.workers),
            "datasets_map": lambda: datasets_map(spec, base, scratch, args.workers),
            "ours": lambda: ours(spec, args.workers),
        }
        folders = {"loop": scratch, "datasets_map": scratch, "ours": spec.layout.shards}
        seconds, written = alternate(sides, folders, scratch, args.rounds)
        per_sample = {name: size / samples for name, size in written.items()}
        result = summary(seconds, samples, per_sample, args)
        result["batch_pixels_ms_batch8"] = batch_pixels_ms(spec, base)
    print(json.dumps(result))


def alternate(
    sides: dict[str, Callable[[], float]], folders: dict[str, Path], scratch: Path, rounds: int
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Every side once a round, the order rotating; seconds per round and bytes each wrote."""
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    written: dict[str, int] = {}
    names = list(sides)
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            seconds[name].append(sides[name]())
            written[name] = folder_bytes(folders[name])
            if folders[name] == scratch:
                shutil.rmtree(scratch)  # about 1 MB a sample
    return seconds, written


def summary(
    seconds: dict[str, list[float]],
    samples: int,
    written: dict[str, float],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Median samples/s per side, median per-round ratios, bytes per sample."""
    rates = {name: samples / np.array(times) for name, times in seconds.items()}
    ratios = {name: rates["ours"] / rates[name] for name in ("loop", "datasets_map")}
    stronger = max(ratios, key=lambda name: float(np.median(rates[name])))
    return {
        "samples": samples,
        "rounds": args.rounds,
        "workers": args.workers,
        "cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "samples_per_s_median": {name: round(float(np.median(r)), 1) for name, r in rates.items()},
        "speedup_vs": {name: round(float(np.median(r)), 2) for name, r in ratios.items()},
        "stronger_baseline": stronger,
        "speedup": round(float(np.median(ratios[stronger])), 2),
        "bytes_per_sample": {name: round(b) for name, b in written.items()},
        "bytes_ratio": round(written["loop"] / written["ours"], 2),
        "seconds": {name: [round(t, 2) for t in times] for name, times in seconds.items()},
    }


if __name__ == "__main__":
    main()
