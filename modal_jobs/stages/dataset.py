"""Stage `routing_dataset`: validate expert datasets, then merge, balance and split them.

Input contract: `<experts_dir>/<expert>/datasets/**/*.jsonl`, one object a line with `id`,
`image` (relative to the JSONL's folder, inside the expert's folder) and `messages`. Every defect
is collected with its file and line; any defect fails the stage before anything is written.
Output (written to a temporary folder, renamed into place whole): `{train,val,eval}.jsonl`,
content-addressed `images/<sha256>.<ext>`, and `manifest.json` with source data versions,
counts and hashes. Beside them, `ood_val.jsonl` and `ood_eval.jsonl`: screens of no expert drawn
here from the dataset seed (modal_jobs/demo_data/ood.py), never trained on, for choosing and
then judging when the router abstains. The train split also holds `negatives.count` screens of
none drawn by other code (modal_jobs/demo_data/negatives.py), answered with the reserved
`negatives.label`: rows without an `expert`, with `kind` and `label`.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from modal_jobs.artifacts import OOD_SPLITS, SPLITS, read_split
from modal_jobs.atomic import atomic_dir, write_json
from modal_jobs.config import DatasetConfig
from modal_jobs.demo_data.negatives import NEGATIVE_KINDS, render_negative
from modal_jobs.demo_data.ood import OOD_KINDS, render_ood
from modal_jobs.errors import MoleError
from modal_jobs.hashing import combine, expert_version, file_sha256
from modal_jobs.ml.conditions import GENERIC_EVAL, GENERIC_TRAIN, pick
from modal_jobs.stage import Check, StageResult, StageSpec, json_value, md, number, path_value

MAX_IMAGE_PIXELS = 50_000_000
MAX_REPORTED = 25


class DatasetError(MoleError):
    """Expert data violates the input contract; the message lists every defect found."""


@dataclass(frozen=True)
class Record:
    """One validated expert sample."""

    expert: str
    id: str
    image: Path
    image_sha: str
    instruction: str
    answer: str
    source: str


class Defects:
    """Collects defects as `file:line: problem` so one run reports them all."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, problem: str) -> None:
        """Record one defect."""
        self.items.append(f"{where}: {problem}")

    def raise_if_any(self, context: str) -> None:
        """Fail with every defect (the first MAX_REPORTED) if any were found."""
        if not self.items:
            return
        shown = "\n  ".join(self.items[:MAX_REPORTED])
        more = len(self.items) - MAX_REPORTED
        tail = f"\n  … and {more} more" if more > 0 else ""
        raise DatasetError(f"{context}: {len(self.items)} problem(s)\n  {shown}{tail}")


def run(spec: StageSpec) -> StageResult:
    """Validate every configured expert, sample, split and write the routing dataset."""
    config = spec.config
    experts_dir = config.experts_dir
    defects = Defects()
    _check_expert_folders(
        config.config_dir / "dataset.yaml", experts_dir, set(config.dataset.experts), defects
    )
    records = {
        name: load_expert(experts_dir / name, name, defects) for name in config.dataset.experts
    }
    _check_shared_images(records, defects)
    defects.raise_if_any(f"invalid expert data under {experts_dir}")
    chosen = _sample(records, spec, defects)
    defects.raise_if_any("not enough expert data")
    splits = split_records(chosen, spec)
    versions = {name: expert_version(experts_dir / name) for name in config.dataset.experts}
    manifest = _write(spec, splits, versions)
    return _result(spec, manifest)


def _check_expert_folders(
    config_file: Path, experts_dir: Path, configured: set[str], defects: Defects
) -> None:
    if not experts_dir.is_dir():
        raise DatasetError(
            f"{config_file}: experts_dir {experts_dir} does not exist; fix: point experts_dir at "
            "your expert datasets or create them (e.g. `mole demo-data --out DIR`)"
        )
    present = {p.name for p in experts_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    for name in sorted(configured - present):
        defects.add(
            str(experts_dir / name), f"expert {name!r} is in {config_file} but has no folder"
        )
    for name in sorted(present - configured):
        defects.add(
            str(experts_dir / name),
            f"expert {name!r} has data but is not in {config_file}; fix: add it under `experts:` "
            "or move its folder out of experts_dir",
        )


def _check_shared_images(records: dict[str, list[Record]], defects: Defects) -> None:
    """One screenshot labelled with two experts is contradictory (and would leak across splits)."""
    owner: dict[str, Record] = {}
    for expert_records in records.values():
        for record in expert_records:
            first = owner.setdefault(record.image_sha, record)
            if first.expert != record.expert:
                defects.add(
                    record.source,
                    f"the same image is also used by expert {first.expert!r} at {first.source}; "
                    "fix: keep each screenshot in one expert",
                )


def load_expert(folder: Path, expert: str, defects: Defects) -> list[Record]:
    """Parse and validate every JSONL line of one expert; defects are recorded, not raised."""
    files = sorted((folder / "datasets").rglob("*.jsonl")) if folder.is_dir() else []
    if folder.is_dir() and not files:
        defects.add(str(folder), "empty expert: no datasets/**/*.jsonl files")
    before = len(defects.items)
    records: list[Record] = []
    seen: dict[str, str] = {}
    for path in files:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for number_, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = _parse_line(folder, expert, path, number_, line, defects)
            if record is None:
                continue
            if record.id in seen:
                defects.add(
                    record.source, f"duplicate id {record.id!r} (first at {seen[record.id]})"
                )
                continue
            seen[record.id] = record.source
            records.append(record)
    if files and not records and len(defects.items) == before:
        defects.add(str(folder), "empty expert: its JSONL files hold no samples")
    return records


def _parse_line(
    folder: Path, expert: str, path: Path, line_no: int, line: str, defects: Defects
) -> Record | None:
    where = f"{path}:{line_no}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        defects.add(where, f"malformed JSON ({exc.msg} at column {exc.colno})")
        return None
    problem = _schema_problem(row)
    if problem:
        defects.add(where, problem)
        return None
    image, problem = _resolve_image(folder, path.parent, row["image"])
    if image is None:
        defects.add(where, problem)
        return None
    problem = decode_problem(image)
    if problem:
        defects.add(where, f"image {row['image']!r}: {problem}")
        return None
    user = next(m["content"] for m in row["messages"] if m["role"] == "user")
    answer = next((m["content"] for m in row["messages"] if m["role"] == "assistant"), "")
    return Record(expert, row["id"], image, file_sha256(image), user, answer, where)


def _schema_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return "expected a JSON object with id, image and messages"
    for key in ("id", "image"):
        if not isinstance(row.get(key), str) or not row[key]:
            return f"field {key!r} must be a non-empty string"
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "field 'messages' must be a non-empty list"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return f"messages[{index}] must be an object with a string 'content'"
        if message.get("role") not in ("system", "user", "assistant"):
            return f"messages[{index}].role must be system, user or assistant"
    if not any(m["role"] == "user" for m in messages):
        return "messages must contain a user message (the instruction)"
    return None


def _resolve_image(expert_root: Path, base: Path, relative: str) -> tuple[Path | None, str]:
    if Path(relative).is_absolute():
        return None, f"image path {relative!r} is absolute; fix: make it relative to {base}"
    candidate = base / relative
    resolved = candidate.resolve()
    if not resolved.is_relative_to(expert_root.resolve()):
        return None, f"image path {relative!r} escapes the expert folder {expert_root}"
    if not resolved.is_file():
        return None, f"image {relative!r} not found at {candidate}"
    return resolved, ""


def decode_problem(path: Path) -> str | None:
    """Why `path` is not a fully decodable image of sane size, or None if it is."""
    if path.stat().st_size == 0:
        return "zero-byte file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(path)
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as exc:
        return f"not a decodable image ({exc})"


def _decode(path: Path) -> str | None:
    with Image.open(path) as probe:
        if probe.width * probe.height > MAX_IMAGE_PIXELS:
            return f"{probe.width}x{probe.height} exceeds {MAX_IMAGE_PIXELS} pixels"
        probe.load()
    return None


def _sample(
    records: dict[str, list[Record]], spec: StageSpec, defects: Defects
) -> dict[str, list[Record]]:
    dataset = spec.config.dataset
    chosen: dict[str, list[Record]] = {}
    for name, expert in dataset.experts.items():
        pool = sorted(records[name], key=lambda r: r.id)
        if len(pool) < expert.count and dataset.shortfall == "error":
            defects.add(
                str(spec.config.experts_dir / name),
                f"dataset.yaml asks for {expert.count} samples of {name!r} but only {len(pool)} "
                "exist; fix: lower `count` or set `shortfall: use_available`",
            )
            continue
        rng = random.Random(f"{dataset.seed}:{name}")
        chosen[name] = rng.sample(pool, min(expert.count, len(pool)))
    return chosen


def split_records(chosen: dict[str, list[Record]], spec: StageSpec) -> dict[str, list[Record]]:
    """Split each expert by image (one image never lands in two splits), then merge."""
    fractions = spec.config.dataset.splits
    splits: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for expert, records in chosen.items():
        by_image: dict[str, list[Record]] = defaultdict(list)
        for record in records:
            by_image[record.image_sha].append(record)
        groups = sorted(by_image.values(), key=lambda group: group[0].id)
        random.Random(f"{spec.config.dataset.seed}:split:{expert}").shuffle(groups)
        n_eval = max(1, round(len(groups) * fractions.eval))
        n_val = round(len(groups) * fractions.val)
        cut = {
            "eval": groups[:n_eval],
            "val": groups[n_eval : n_eval + n_val],
            "train": groups[n_eval + n_val :],
        }
        for split, members in cut.items():
            splits[split].extend(r for group in members for r in group)
    return splits


def _write(
    spec: StageSpec, splits: dict[str, list[Record]], versions: dict[str, str]
) -> dict[str, Any]:
    dataset = spec.config.dataset
    with atomic_dir(spec.layout.dataset) as staging:
        (staging / "images").mkdir()
        hashes: dict[str, str] = {}
        for split, records in splits.items():
            rows = [_row(staging, record, dataset.label_of(record.expert)) for record in records]
            if split == "train":
                rows += negatives(staging, dataset, records)
            _write_rows(staging / f"{split}.jsonl", rows)
            hashes[split] = file_sha256(staging / f"{split}.jsonl")
        ood_counts = write_ood(staging, dataset.seed, dataset.ood.count, dataset.ood.val_fraction)
        hashes.update({s: file_sha256(staging / f"{s}.jsonl") for s in OOD_SPLITS})
        manifest = {
            "run": spec.run,
            "dataset_version": combine(f"{s}:{hashes[s]}" for s in (*SPLITS, *OOD_SPLITS)),
            "source_versions": versions,
            "split_sha256": hashes,
            "counts": {
                s: dict(sorted(Counter(r.expert for r in splits[s]).items())) for s in SPLITS
            },
            "ood_counts": ood_counts,
            "negatives": dataset.negatives.count,
            "labels": {name: dataset.label_of(name) for name in dataset.experts},
            "system_prompt": dataset.system_prompt,
            "config": dataset.model_dump(mode="json"),
        }
        write_json(staging / "manifest.json", manifest)
    return manifest


def write_ood(staging: Path, seed: int, count: int, val_fraction: float) -> dict[str, int]:
    """`ood_val.jsonl` and `ood_eval.jsonl` with their screens; returns the count of each.

    The kinds take turns, so both parts hold every kind; each screen is a function of (seed,
    part, number). Half the screens come with a generic instruction (from the eval wordings,
    which training never sees), half with none: the router must abstain on the screen alone.
    """
    n_val = round(count * val_fraction)
    counts = {}
    for split, size in zip(OOD_SPLITS, (n_val, count - n_val), strict=True):
        rows = drawn(staging, split, seed, size, OOD_KINDS, render_ood)
        for i, row in enumerate(rows):
            row["instruction"] = pick(GENERIC_EVAL, f"{seed}:{split}:{i}") if i % 2 else ""
        _write_rows(staging / f"{split}.jsonl", rows)
        counts[split] = size
    return counts


def negatives(
    staging: Path, dataset: DatasetConfig, train: Sequence[Record]
) -> list[dict[str, Any]]:
    """`negatives.count` train rows of screens of none (kinds in turn), answered with its label.

    A third come with a generic training wording, a third with none and a third with an
    instruction of a random expert sample: an app's words alone must not make a screen the app's.
    """
    seed, spec = dataset.seed, dataset.negatives
    rows = drawn(staging, "negatives", seed, spec.count, NEGATIVE_KINDS, render_negative)
    for i, row in enumerate(rows):
        key = f"{seed}:negatives:{i}"
        borrowed = random.Random(key).choice(train).instruction if train else ""
        row["instruction"] = (pick(GENERIC_TRAIN, key), "", borrowed)[i % 3]
        row["label"] = spec.label
    return rows


def drawn(
    staging: Path,
    part: str,
    seed: int,
    count: int,
    kinds: Sequence[str],
    render: Callable[[str, random.Random], Image.Image],
) -> list[dict[str, Any]]:
    """`count` generated screens saved content-addressed under `images/`, kinds in turn.

    Screen `i` is a function of (seed, part, i) alone; rows have `id`, `kind` and `image`.
    """
    rows = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        image = render(kind, random.Random(f"{seed}:{part}:{i}"))
        partial = staging / "images" / f".{part}-{i}.png"
        image.save(partial, format="PNG", compress_level=3)
        name = f"images/{file_sha256(partial)}.png"
        partial.replace(staging / name)
        rows.append({"id": f"{part}/{kind}-{i:04d}", "kind": kind, "image": name})
    return rows


def _write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def _row(staging: Path, record: Record, label: str) -> dict[str, Any]:
    name = f"{record.image_sha}{record.image.suffix.lower()}"
    target = staging / "images" / name
    if not target.exists():
        shutil.copyfile(record.image, target)
    return {
        "id": f"{record.expert}/{record.id}",
        "expert": record.expert,
        "label": label,
        "image": f"images/{name}",
        "instruction": record.instruction,
        "answer": record.answer,
        "source": record.source,
    }


def _result(spec: StageSpec, manifest: dict[str, Any]) -> StageResult:
    root = spec.layout.dataset
    counts = manifest["counts"]
    table = ["| expert | " + " | ".join(SPLITS) + " |", "|---|" + "---|" * len(SPLITS)]
    for name in spec.config.dataset.experts:
        table.append(
            f"| {name} | " + " | ".join(str(counts[s].get(name, 0)) for s in SPLITS) + " |"
        )
    metadata = {
        "path": path_value(root),
        "num_samples": number(sum(sum(c.values()) for c in counts.values())),
        "counts": md("\n".join(table)),
        "source_versions": json_value(manifest["source_versions"]),
        "dataset_version": md(f"`{manifest['dataset_version']}`"),
    }
    return StageResult(manifest["dataset_version"][:16], metadata, verify(root, spec))


def verify(root: Path, spec: StageSpec) -> list[Check]:
    """Asset checks on the written dataset: class balance, split leakage, decodable images."""
    rows = {split: read_split(root, split) for split in (*SPLITS, *OOD_SPLITS)}
    train_counts = Counter(r["expert"] for r in rows["train"] if "expert" in r)
    expected = set(spec.config.dataset.experts)
    low, high = min(train_counts.values(), default=0), max(train_counts.values(), default=0)
    balanced = set(train_counts) == expected and low > 0 and high <= 1.5 * low
    images = {split: {r["image"] for r in split_rows} for split, split_rows in rows.items()}
    names = list(images)
    shared = set().union(
        *(images[a] & images[b] for i, a in enumerate(names) for b in names[i + 1 :])
    )
    broken = sorted(p for p in set().union(*images.values()) if decode_problem(root / p))
    return [
        Check(
            "class_balance",
            balanced,
            "every expert present; largest ≤ 1.5× smallest (train)",
            {"train_counts": json_value(dict(train_counts))},
        ),
        Check(
            "split_leakage",
            not shared,
            "no image appears in two splits (out-of-distribution parts included)",
            {"shared_images": number(len(shared))},
        ),
        Check(
            "images_decodable",
            not broken,
            "every dataset image decodes",
            {"undecodable": json_value(broken[:20])},
        ),
    ]


if __name__ == "__main__":
    from modal_jobs.launch.pipes import main

    main(run, StageSpec)
