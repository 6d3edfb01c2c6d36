"""Sensor tick cost over many unchanged expert files, against a full re-hash (the baseline).

Builds `--files` small files across 6 experts in a temp dir, then times: the baseline (hash every
file, what `expert_version` alone does), the sensor's first tick (empty index: hashes everything
and saves the index) and a warm tick in a fresh index object loaded from disk (nothing changed:
stats only). Prints one JSON object. Dagster's sensor limit is 60 s per tick.

    .venv/bin/python benchmarks/sensor_tick.py --files 100000
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

from modal_jobs.hashing import expert_version
from mole_assets.resources import MoleResource
from mole_assets.sensors import scan_experts

EXPERTS = ("calendar", "spreadsheet", "terminal", "email", "code_editor", "map")


def build(root: Path, files: int, size: int) -> Path:
    experts = root / "experts"
    for index in range(files):
        name = EXPERTS[index % len(EXPERTS)]
        folder = experts / name / "datasets" / "images" / f"{index // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:07d}.png").write_bytes(os.urandom(size))
    config = root / "config"
    config.mkdir()
    repo = Path(__file__).resolve().parents[1] / "config"
    for file in ("loras.json", "models.yaml"):
        (config / file).write_text((repo / file).read_text())
    dataset = yaml.safe_load((repo / "dataset.yaml").read_text())
    dataset["experts_dir"] = str(experts)
    (config / "dataset.yaml").write_text(yaml.safe_dump(dataset))
    return config


def timed(fn: object) -> tuple[float, object]:
    began = time.perf_counter()
    result = fn()  # type: ignore[operator]
    return time.perf_counter() - began, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--bytes", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = build(root, args.files, args.bytes)
        experts = root / "experts"
        baseline, _ = timed(lambda: [expert_version(experts / n) for n in EXPERTS])
        mole = MoleResource(config_dir=str(config), home=str(root / "home"))
        cold, first = timed(lambda: scan_experts(mole, 0.0, time.time()))
        restarted = MoleResource(config_dir=str(config), home=str(root / "home"))
        warm, second = timed(lambda: scan_experts(restarted, 0.0, time.time()))
    print(
        json.dumps(
            {
                "files": args.files,
                "bytes_per_file": args.bytes,
                "full_rehash_seconds": round(baseline, 2),
                "first_tick_seconds": round(cold, 2),
                "unchanged_tick_seconds": round(warm, 2),
                "unchanged_tick_rehashed": second.rehashed,  # type: ignore[attr-defined]
                "first_tick_rehashed": first.rehashed,  # type: ignore[attr-defined]
                "speedup": round(baseline / warm, 2),
                "sensor_limit_seconds": 60,
            }
        )
    )


if __name__ == "__main__":
    main()
