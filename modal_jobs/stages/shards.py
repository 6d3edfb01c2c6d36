"""Stage `tokenized_shards`: the routing dataset through the real `Qwen3VLProcessor`.

Each sample becomes: token ids from the processor's chat template (system prompt, image,
instruction, label), `mm_token_type_ids`, the answer span that carries the loss, the image grid,
and the screenshot's pixels already resized into the pixel bounds (uint8). Shards are safetensors
files of flat arrays plus offsets, one per `SHARD_SIZE` rows of a split. On Modal each shard is
one `.map` call; locally the stage process and `MOLE_PREPROCESS_WORKERS - 1` helper processes
share smaller pieces of rows, and the stage process writes every shard, so the files are the same
bytes whatever the number of workers. Reading memory-maps a shard and builds a sample only when
it is asked for.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file

from modal_jobs.artifacts import OOD_SPLITS, SPLITS, read_split
from modal_jobs.atomic import atomic_dir, write_json
from modal_jobs.config import ConfigError, ImageBounds
from modal_jobs.hashing import combine, file_sha256
from modal_jobs.ml.batching import Encoded, encode, read_screen
from modal_jobs.ml.labels import NO_EXPERT, LabelMap, label_map
from modal_jobs.ml.model import load_processor
from modal_jobs.ml.presets import resolve_base
from modal_jobs.ml.shard_files import pack
from modal_jobs.stage import Check, StageResult, StageSpec, json_value, number, path_value, text

log = logging.getLogger(__name__)

# The out-of-distribution screens are prompts only (no label, class -1): scored, never trained on.
ALL_SPLITS = (*SPLITS, *OOD_SPLITS)

SHARD_SIZE = 512
# Rows one local process encodes at a time: small enough to share a shard between processes.
PIECE_SIZE = 32
WORKERS_ENV = "MOLE_PREPROCESS_WORKERS"
# More processes than this mostly add memory and contention for the disk.
MAX_DEFAULT_WORKERS = 8
# About what a helper takes to start. On Linux helpers are forked from this process, which has
# torch, transformers and the processor loaded already (well under a second); where only spawn
# exists, each one imports them and loads the processor again (seconds on a busy small machine).
# Helpers start only with more than twice that much work ahead: below, their start-up (which
# competes for the same CPUs) costs about what they would save.
FORK = "fork" in multiprocessing.get_all_start_methods()
HELPER_START_SECONDS = 0.5 if FORK else 8.0


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
    """Tokenize every split of the run's routing dataset into shards, with local workers."""
    started = time.perf_counter()
    base = prepare(spec)
    processor = load_processor(base)
    entries = tokenize_locally(spec, base, plan(spec), processor, preprocess_workers())
    return finish(spec, base, entries, time.perf_counter() - started)


def preprocess_workers() -> int:
    """Processes that encode locally: `MOLE_PREPROCESS_WORKERS`, else the usable CPUs (≤ 8)."""
    raw = os.environ.get(WORKERS_ENV, "").strip()
    if not raw:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(cpus or 1, MAX_DEFAULT_WORKERS))
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(
            f"{WORKERS_ENV}={raw!r}: expected a whole number of processes, at least 1; "
            f"fix: unset it (one per CPU, at most {MAX_DEFAULT_WORKERS}) or set e.g. 2"
        )
    return int(raw)


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
    for split in ALL_SPLITS:
        total = len(read_split(spec.layout.dataset, split))
        for start in range(0, total, SHARD_SIZE):
            stop = min(start + SHARD_SIZE, total)
            chunks.append(Chunk(split, start // SHARD_SIZE, start, stop))
    return chunks


def tokenize_chunk(
    spec: StageSpec, base: str, chunk: Chunk, processor: Any = None
) -> dict[str, Any]:
    """Encode one chunk into `parts_dir/<chunk.name>`; returns its index entry (one Modal call)."""
    processor = processor or load_processor(base)
    rows = read_split(spec.layout.dataset, chunk.split)[chunk.start : chunk.stop]
    items = Encoder.of(spec).encode(processor, rows)
    return write_chunk(
        spec, chunk, items, classes_of(label_map(spec.config.dataset, processor), rows)
    )


@dataclass(frozen=True)
class Encoder:
    """What encoding a row needs besides the processor; small and picklable for helpers."""

    dataset_dir: Path
    bounds: ImageBounds
    system_prompt: str

    @classmethod
    def of(cls, spec: StageSpec) -> Encoder:
        """The run's dataset folder, pixel bounds and system prompt."""
        config = spec.config
        return cls(spec.layout.dataset, config.image_bounds, config.dataset.system_prompt)

    def encode(self, processor: Any, rows: Sequence[dict[str, Any]]) -> list[Encoded]:
        """Each row's screenshot and conversation as model inputs, in order."""
        return [self._row(processor, row) for row in rows]

    def _row(self, processor: Any, row: dict[str, Any]) -> Encoded:
        image = read_screen(self.dataset_dir / row["image"])
        return encode(
            processor, image, self.bounds, self.system_prompt, row["instruction"], row.get("label")
        )


def classes_of(labels: LabelMap, rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """Each row's expert as an index into the label map (`NO_EXPERT` for a screen of none)."""
    return np.array(
        [labels.experts.index(row["expert"]) if "expert" in row else NO_EXPERT for row in rows],
        dtype=np.int64,
    )


def write_chunk(
    spec: StageSpec, chunk: Chunk, items: list[Encoded], classes: np.ndarray
) -> dict[str, Any]:
    """Save one chunk's samples as `parts_dir/<chunk.name>`; returns its index entry."""
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


def tokenize_locally(
    spec: StageSpec, base: str, chunks: list[Chunk], processor: Any, workers: int
) -> list[dict[str, Any]]:
    """Every chunk, its rows encoded in pieces by this process and `workers - 1` helpers.

    Each chunk is written by this process, in order of its pieces, as soon as all of them are
    back: the same file whoever encoded which piece, and only a few chunks are held in memory.
    """
    rows = {split: read_split(spec.layout.dataset, split) for split in ALL_SPLITS}
    labels = label_map(spec.config.dataset, processor)
    pieces = [
        (number, rows[chunk.split][start : min(start + PIECE_SIZE, chunk.stop)])
        for number, chunk in enumerate(chunks)
        for start in range(chunk.start, chunk.stop, PIECE_SIZE)
    ]
    missing = Counter(number for number, _ in pieces)
    done: dict[int, dict[int, list[Encoded]]] = {number: {} for number in range(len(chunks))}
    entries: list[dict[str, Any]] = []

    def collect(index: int, items: list[Encoded]) -> None:
        number = pieces[index][0]
        done[number][index] = items
        missing[number] -= 1
        if missing[number] == 0:
            chunk = chunks[number]
            samples = [item for _, part in sorted(done.pop(number).items()) for item in part]
            chunk_rows = rows[chunk.split][chunk.start : chunk.stop]
            entries.append(write_chunk(spec, chunk, samples, classes_of(labels, chunk_rows)))

    helpers = min(workers, len(pieces)) - 1
    parts = [part for _, part in pieces]
    by_helpers = share_pieces(Encoder.of(spec), base, processor, parts, helpers, collect)
    log.info("%d workers: helpers encoded %d of %d pieces", workers, by_helpers, len(pieces))
    return sorted(entries, key=lambda entry: entry["name"])


def share_pieces(
    encoder: Encoder,
    base: str,
    processor: Any,
    pieces: list[list[dict[str, Any]]],
    helpers: int,
    collect: Callable[[int, list[Encoded]], None],
) -> int:
    """Encode every piece, here and in up to `helpers` helper processes; `collect(index, items)`.

    Helpers cost time to start (`HELPER_START_SECONDS`), so they start only once this process
    has timed a piece and sees more than twice that much work left, and it keeps encoding while
    they start. Returns how many pieces helpers encoded.
    """
    todo = deque(enumerate(pieces))
    began, done = time.perf_counter(), 0
    while todo:
        pace = (time.perf_counter() - began) / max(done, 1)
        if helpers > 0 and done > 0 and pace * len(todo) > 2 * HELPER_START_SECONDS:
            with Helpers(encoder, base, processor, helpers) as pool:
                return pool.share(todo, encoder, processor, collect)
        index, rows = todo.popleft()
        collect(index, encoder.encode(processor, rows))
        done += 1
    return 0


class Helpers:
    """Helper processes (forked where possible) that encode pieces of rows."""

    def __init__(self, encoder: Encoder, base: str, processor: Any, count: int) -> None:
        # Fork: the helper inherits the loaded processor. The parent holds no lock a helper needs
        # (helpers only decode, resize on one torch thread and tokenize), and tokenizers turns its
        # own thread pool off in a forked child (said quietly: the variable is set beforehand).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.pool = ProcessPoolExecutor(
            count,
            mp_context=multiprocessing.get_context("fork" if FORK else "spawn"),
            initializer=_start_helper,
            initargs=(encoder, processor if FORK else base, os.getpid()),
        )
        # One no-op per helper: each one done means a helper has started.
        self.started = [self.pool.submit(_helper_ready) for _ in range(count)]
        self.running: dict[Future[list[Encoded]], int] = {}
        self.encoded = 0

    def __enter__(self) -> Helpers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def share(
        self,
        todo: deque[tuple[int, list[dict[str, Any]]]],
        encoder: Encoder,
        processor: Any,
        collect: Callable[[int, list[Encoded]], None],
    ) -> int:
        """Encode `todo` from the front here and from the back in started helpers."""
        while todo or self.running:
            # Two pieces wait per started helper, so none idles while this process encodes.
            ready = sum(future.done() for future in self.started)
            while todo and len(self.running) < 2 * ready:
                index, rows = todo.pop()
                self.running[self.pool.submit(_helper_encode, rows)] = index
            if todo:
                index, rows = todo.popleft()
                collect(index, encoder.encode(processor, rows))
            else:
                wait(self.running, return_when=FIRST_COMPLETED)
            for future in [future for future in self.running if future.done()]:
                collect(self.running.pop(future), future.result())
                self.encoded += 1
        return self.encoded


# A helper process's own processor and encoder, set once by `_start_helper`.
_HELPER: dict[str, Any] = {}


def _start_helper(encoder: Encoder, processor_or_base: Any, parent: int) -> None:
    # One torch thread: the resize is small, and a forked child must not use the parent's pool.
    torch.set_num_threads(1)
    _HELPER["encoder"] = encoder
    loaded = not isinstance(processor_or_base, str)
    _HELPER["processor"] = processor_or_base if loaded else load_processor(processor_or_base)
    # A killed stage process cannot stop its helpers: they notice being orphaned and exit.
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _helper_ready() -> None:
    """Nothing: returns once the helper that runs it has started."""


def _helper_encode(rows: list[dict[str, Any]]) -> list[Encoded]:
    encoder: Encoder = _HELPER["encoder"]
    return encoder.encode(_HELPER["processor"], rows)


def finish(
    spec: StageSpec, base: str, entries: list[dict[str, Any]], seconds: float
) -> StageResult:
    """Move every chunk into `tokenized_shards/` with its index.json, in one atomic rename."""
    config = spec.config
    labels = label_map(config.dataset, load_processor(base))
    parts = parts_dir(spec)
    splits: dict[str, Any] = {}
    with atomic_dir(spec.layout.shards) as staging:
        for split in ALL_SPLITS:
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
            f"{s}:{f['sha256']}" for s in ALL_SPLITS for f in splits[s]["files"]
        )
        write_json(staging / "index.json", index)
    shutil.rmtree(parts, ignore_errors=True)
    return _result(spec, index, seconds)


def _dataset_version(dataset_dir: Path) -> str:
    return str(json.loads((dataset_dir / "manifest.json").read_text())["dataset_version"])


def _result(spec: StageSpec, index: dict[str, Any], seconds: float) -> StageResult:
    splits = index["splits"]
    total = sum(s["count"] for s in splits.values())
    answer_only = all(splits[s]["count"] > 0 for s in SPLITS)
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


if __name__ == "__main__":
    from modal_jobs.launch.pipes import main

    main(run, StageSpec)
