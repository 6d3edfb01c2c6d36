"""`make modal-emulated`: the whole graph for a fresh run on the emulated Modal cloud.

    python -m tests.modal_emulated [--root DIR] [--models DIR] [--backend modal|local]

Writes demo experts and a config under `--root` (default: a temp folder), then materializes all
six assets of run `emulated` (training in `test` mode) with `MOLE_BACKEND=modal` through
`dagster_modal.ModalClient`, whose `modal` is the emulator's (`tests/modal_emulator`). Prints one
JSON line: `{"run", "assets": {asset: "ok" | "failed"}, "accuracy", "registry_current"}`.
`--experts DIR` uses those expert datasets (the dataset records their paths, so two runs to be
compared byte for byte share them). `--models` seeds the HF cache volume with tiny bases built
before (a volume kept from an earlier run); without it the first container builds one.
`--backend local` runs the same graph on the local backend, for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modal_jobs.layout import HF_CACHE_VOLUME, INFERENCE_VOLUME, Volumes

from .conftest import write_config
from .modal_emulator import Cloud, unavailable

RUN = "emulated"
PER_EXPERT = 16
NEGATIVES = 10
ASSETS = (
    "routing_dataset",
    "tokenized_shards",
    "router_checkpoint",
    "expert_adapters",
    "eval_report",
    "deployed_router",
)


def prepare(
    root: Path, backend: str, models: Path | None, experts: Path | None = None
) -> dict[str, str]:
    """Experts (unless given), config and (`modal`) the emulated workspace; the environment."""
    from modal_jobs.demo_data import write_demo_data

    if experts is None:
        experts = root / "experts"
        write_demo_data(experts, PER_EXPERT, seed=5)
    # With screens of none to train on, so the reserved answer's path runs on both backends.
    negatives = {"negatives": {"count": NEGATIVES, "label": "none"}}
    config = write_config(root / "config", experts, PER_EXPERT, min_accuracy=0.0, dataset=negatives)
    env = {
        "MOLE_HOME": str(root / "home"),
        "DAGSTER_HOME": str(root / "dagster"),
        "MOLE_CONFIG_DIR": str(config),
        "MOLE_BACKEND": backend,
    }
    seed_to = Volumes.local(root / "home").models
    if backend == "modal":
        cloud = Cloud(root / "cloud")
        cloud.set_secret("huggingface", {"HF_TOKEN": "emulated-token"})
        seed_to = cloud.volume(HF_CACHE_VOLUME)
        env["PATH"] = f"{cloud.shim()}{os.pathsep}{os.environ.get('PATH', os.defpath)}"
    if models and (models / "presets").is_dir():
        shutil.copytree(models / "presets", seed_to / "presets", dirs_exist_ok=True)
    return env


def summary(root: Path, backend: str, result: Any) -> dict[str, Any]:
    """The JSON line: per-asset outcome, eval accuracy and the registry's current router."""
    ok = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    accuracy = None
    for event in result.get_asset_materialization_events():
        if event.asset_key.to_user_string() == "eval_report":
            accuracy = event.event_specific_data.materialization.metadata["accuracy"].value
    inference = (
        Cloud(root / "cloud").volume(INFERENCE_VOLUME)
        if backend == "modal"
        else Volumes.local(root / "home").inference
    )
    registry = inference / "registry.json"
    current = json.loads(registry.read_text())["current"] if registry.is_file() else None
    return {
        "run": RUN,
        "assets": {asset: "ok" if asset in ok else "failed" for asset in ASSETS},
        "accuracy": accuracy,
        "registry_current": current,
    }


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send this process's and its children's stdout to stderr: stdout carries the JSON line."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def details(result: Any) -> dict[str, Any]:
    """Per asset its metadata (key → type and value), and every check's (asset, name, passed)."""
    import dagster as dg

    metadata = {
        e.asset_key.to_user_string(): {
            key: [type(value).__name__, str(value.value)]
            for key, value in e.event_specific_data.materialization.metadata.items()
        }
        for e in result.get_asset_materialization_events()
    }
    checks = sorted(
        (
            e.event_specific_data.asset_key.to_user_string(),
            e.event_specific_data.check_name,
            e.event_specific_data.passed,
        )
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
    )
    return {"metadata": metadata, "checks": checks}


def main(argv: list[str] | None = None) -> int:
    """Run the graph; print the JSON line; exit 0 only if every asset materialized."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path)
    parser.add_argument("--models", type=Path)
    parser.add_argument("--backend", choices=("modal", "local"), default="modal")
    parser.add_argument("--details", type=Path, help="also write metadata types and checks here")
    parser.add_argument("--experts", type=Path, help="expert datasets to use (default: new demo)")
    args = parser.parse_args(argv)
    if args.backend == "modal" and (reason := unavailable()):
        print(f"error: cannot emulate Modal containers here: {reason}", file=sys.stderr)
        return 2
    root = args.root or Path(tempfile.mkdtemp(prefix="mole-modal-emulated-"))
    os.environ.update(prepare(root.resolve(), args.backend, args.models, args.experts))
    from mole_assets.cli import materialize

    with stdout_to_stderr():
        # Resume points inside the 8 test-mode steps: each commits the data volume mid-training.
        result = materialize(RUN, list(ASSETS), mode="test", train={"checkpoint_every": 3})
    line = summary(root.resolve(), args.backend, result)
    if args.details:
        args.details.write_text(json.dumps(details(result)))
    print(json.dumps(line))
    return 0 if set(line["assets"].values()) == {"ok"} else 1


if __name__ == "__main__":
    raise SystemExit(main())
