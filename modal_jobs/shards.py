"""Stage `tokenized_shards`: the routing dataset through the real `Qwen3VLProcessor`.

Each sample becomes: token ids from the processor's chat template (system prompt, image,
instruction, label), `mm_token_type_ids`, the answer span that carries the loss, the image grid,
and the screenshot's pixels already resized into the pixel bounds (uint8). Shards are safetensors
files of flat arrays plus offsets, memory-mappable and loaded without per-sample Python objects.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from safetensors.numpy import load_file, save_file

from modal_jobs.atomic import atomic_dir, write_json
from modal_jobs.batching import Encoded, encode
from modal_jobs.dataset import SPLITS, read_split
from modal_jobs.hashing import combine, file_sha256
from modal_jobs.labels import label_map
from modal_jobs.model import load_processor
from modal_jobs.presets import resolve_base
from modal_jobs.stage import Check, StageResult, StageSpec, json_value, number, path_value, text

SHARD_SIZE = 512


@dataclass(frozen=True)
class Chunk:
    """One shard's worth of rows of one split: tokenized independently, in any container."""

    split: str
    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        """The shard's file name (the same whichever launcher wrote it)."""
        return f"{self.split}-{self.index:05d}.safetensors"


def run(spec: StageSpec) -> StageResult:
    """Tokenize every split of the run's routing dataset into shards."""
    started = time.perf_counter()
    base = prepare(spec)
    processor = load_processor(base)
    entries = [tokenize_chunk(spec, base, chunk, processor) for chunk in plan(spec)]
    return finish(spec, base, entries, time.perf_counter() - started)


def prepare(spec: StageSpec) -> str:
    """Resolve the base model (building `tiny` on first use) and empty the parts folder."""
    config = spec.config
    base = resolve_base(config.loras.base_model, config.preset, spec.volumes.models)
    shutil.rmtree(parts_dir(spec), ignore_errors=True)
    parts_dir(spec).mkdir(parents=True)
    return base


def parts_dir(spec: StageSpec) -> Path:
    """Where chunks land before `finish` renames them into `tokenized_shards/` together."""
    return spec.layout.shards.with_name(f".{spec.layout.shards.name}.parts")


def plan(spec: StageSpec) -> list[Chunk]:
    """Every split cut into chunks of `SHARD_SIZE` rows."""
    chunks = []
    for split in SPLITS:
        total = len(read_split(spec.layout.dataset, split))
        for start in range(0, total, SHARD_SIZE):
            stop = min(start + SHARD_SIZE, total)
            chunks.append(Chunk(split, start // SHARD_SIZE, start, stop))
    return chunks


def tokenize_chunk(
    spec: StageSpec, base: str, chunk: Chunk, processor: Any = None
) -> dict[str, Any]:
    """Encode one chunk into `parts_dir/<chunk.name>`; returns its index entry."""
    processor = processor or load_processor(base)
    labels = label_map(spec.config.dataset, processor)
    dataset_dir = spec.layout.dataset
    rows = read_split(dataset_dir, chunk.split)[chunk.start : chunk.stop]
    items = [_encode_row(row, dataset_dir, processor, spec) for row in rows]
    classes = np.array([labels.experts.index(row["expert"]) for row in rows], dtype=np.int64)
    target = parts_dir(spec) / chunk.name
    partial = target.with_name(f".{target.name}.partial")
    save_file(pack(items, classes), str(partial))
    partial.replace(target)  # a retried chunk overwrites whole, never half a file
    return {
        "split": chunk.split,
        "name": chunk.name,
        "count": len(items),
        "sha256": file_sha256(target),
        "tokens": sum(len(item.input_ids) for item in items),
    }


def finish(
    spec: StageSpec, base: str, entries: list[dict[str, Any]], seconds: float
) -> StageResult:
    """Move every chunk into `tokenized_shards/` with its index.json, in one atomic rename."""
    config = spec.config
    labels = label_map(config.dataset, load_processor(base))
    parts = parts_dir(spec)
    splits: dict[str, Any] = {}
    with atomic_dir(spec.layout.shards) as staging:
        for split in SPLITS:
            mine = sorted((e for e in entries if e["split"] == split), key=lambda e: e["name"])
            for entry in mine:
                (parts / entry["name"]).replace(staging / entry["name"])
            splits[split] = {
                "files": [{k: e[k] for k in ("name", "count", "sha256")} for e in mine],
                "count": sum(e["count"] for e in mine),
                "tokens": sum(e["tokens"] for e in mine),
            }
        index = {
            "run": spec.run,
            "base": base,
            "labels": labels.to_json(),
            "system_prompt": config.dataset.system_prompt,
            "image_bounds": config.image_bounds.model_dump(),
            "dataset_version": _dataset_version(spec.layout.dataset),
            "splits": splits,
        }
        index["shards_version"] = combine(
            f"{s}:{f['sha256']}" for s in SPLITS for f in splits[s]["files"]
        )
        write_json(staging / "index.json", index)
    shutil.rmtree(parts, ignore_errors=True)
    return _result(spec, index, seconds)


def _dataset_version(dataset_dir: Path) -> str:
    return str(json.loads((dataset_dir / "manifest.json").read_text())["dataset_version"])


def _encode_row(row: dict[str, Any], dataset_dir: Path, processor: Any, spec: StageSpec) -> Encoded:
    with Image.open(dataset_dir / row["image"]) as image:
        return encode(
            processor,
            image,
            spec.config.image_bounds,
            spec.config.dataset.system_prompt,
            row["instruction"],
            row["label"],
        )


def pack(items: list[Encoded], classes: np.ndarray) -> dict[str, np.ndarray]:
    """Flatten encoded samples into arrays + offsets (one safetensors shard)."""
    lengths = np.array([len(i.input_ids) for i in items], dtype=np.int64)
    pixel_sizes = np.array([i.pixels.size for i in items], dtype=np.int64)
    return {
        "input_ids": np.concatenate([i.input_ids for i in items]).astype(np.int32),
        "mm_token_type_ids": np.concatenate([i.mm_token_type_ids for i in items]),
        "token_offsets": np.concatenate([[0], np.cumsum(lengths)]),
        "prompt_len": np.array([i.prompt_len for i in items], dtype=np.int64),
        "answer_end": np.array([i.answer_end for i in items], dtype=np.int64),
        "pixels": np.concatenate([i.pixels.reshape(-1) for i in items]),
        "pixel_offsets": np.concatenate([[0], np.cumsum(pixel_sizes)]),
        "pixel_hw": np.array([i.pixels.shape[:2] for i in items], dtype=np.int64),
        "grid_thw": np.array([i.grid_thw for i in items], dtype=np.int64),
        "classes": classes,
    }


@dataclass(frozen=True)
class Split:
    """One tokenized split loaded back: samples and their class indices."""

    items: list[Encoded]
    classes: np.ndarray


def load_split(shards_dir: Path, index: dict[str, Any], split: str) -> Split:
    """Load every shard of a split (views into the loaded arrays, no re-tokenization)."""
    items: list[Encoded] = []
    classes: list[np.ndarray] = []
    for entry in index["splits"][split]["files"]:
        arrays = load_file(str(shards_dir / entry["name"]))
        items.extend(unpack(arrays))
        classes.append(arrays["classes"])
    return Split(items, np.concatenate(classes) if classes else np.zeros(0, dtype=np.int64))


def unpack(arrays: dict[str, np.ndarray]) -> list[Encoded]:
    """Inverse of `pack`."""
    tok, pix = arrays["token_offsets"], arrays["pixel_offsets"]
    out = []
    for n in range(len(arrays["prompt_len"])):
        height, width = (int(v) for v in arrays["pixel_hw"][n])
        t, h, w = (int(v) for v in arrays["grid_thw"][n])
        out.append(
            Encoded(
                input_ids=arrays["input_ids"][tok[n] : tok[n + 1]],
                mm_token_type_ids=arrays["mm_token_type_ids"][tok[n] : tok[n + 1]],
                prompt_len=int(arrays["prompt_len"][n]),
                answer_end=int(arrays["answer_end"][n]),
                pixels=arrays["pixels"][pix[n] : pix[n + 1]].reshape(height, width, 3),
                grid_thw=(t, h, w),
            )
        )
    return out


def _result(spec: StageSpec, index: dict[str, Any], seconds: float) -> StageResult:
    splits = index["splits"]
    total = sum(s["count"] for s in splits.values())
    answer_only = all(s["count"] > 0 for s in splits.values())
    metadata = {
        "path": path_value(spec.layout.shards),
        "base_model": text(index["base"]),
        "labels": json_value(index["labels"]),
        "samples": json_value({k: v["count"] for k, v in splits.items()}),
        "tokens": number(sum(s["tokens"] for s in splits.values())),
        "samples_per_second": number(round(total / max(seconds, 1e-9), 1)),
        "wall_seconds": number(round(seconds, 2)),
        "dataset_version": text(index["dataset_version"]),
    }
    check = Check("splits_nonempty", answer_only, "train, val and eval each hold samples")
    return StageResult(index["shards_version"][:16], metadata, [check])


def read_index(shards_dir: Path) -> dict[str, Any]:
    """The shards' index.json."""
    return dict(json.loads((shards_dir / "index.json").read_text()))


if __name__ == "__main__":
    from modal_jobs.pipes import main

    main(run, StageSpec)
