"""Stage `deployed_router`: publish a run's router to the inference volume.

Each deployment is an immutable folder `routers/<run>-<adapter sha>/`, renamed into place whole;
`registry.json` (replaced atomically) names the current one and keeps the history, so a reader
sees the old router or the new one, never a mix, and rollback is one registry write. A lock file
keeps two deployments from interleaving.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from modal_jobs.atomic import atomic_dir, write_json
from modal_jobs.errors import MoleError
from modal_jobs.evaluate import read_report
from modal_jobs.layout import Volumes
from modal_jobs.shards import read_index
from modal_jobs.stage import StageResult, StageSpec, number, path_value, text

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "training_summary.json")


class DeployError(MoleError):
    """The router may not or cannot be deployed."""


def run(spec: StageSpec) -> StageResult:
    """Copy the run's adapter and routing metadata to the inference volume and make it current."""
    report = read_report(spec)
    gate = spec.config.loras.router.min_accuracy
    if report["accuracy"] < gate:
        raise DeployError(
            f"{spec.layout.report / 'report.json'}: eval accuracy {report['accuracy']:.3f} is "
            f"below router.min_accuracy {gate} in config/loras.json; fix: train longer or "
            "improve the data, then re-run eval_report"
        )
    version = f"{spec.run}-{report['checkpoint_sha256'][:12]}"
    with deploy_lock(spec.volumes):
        target = spec.volumes.routers / version
        if not target.is_dir():
            _write_version(spec, target, report)
        entry = {
            "version": version,
            "run": spec.run,
            "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"],
            "deployed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        registry = read_registry(spec.volumes)
        registry["history"].append(entry)
        registry["current"] = version
        write_json(spec.volumes.registry, registry)
    metadata = {
        "path": path_value(target),
        "version": text(version),
        "accuracy": number(round(report["accuracy"], 4)),
        "registry": path_value(spec.volumes.registry),
    }
    return StageResult(report["checkpoint_sha256"][:16], metadata)


def _write_version(spec: StageSpec, target: Path, report: dict[str, Any]) -> None:
    index = read_index(spec.layout.shards)
    with atomic_dir(target) as staging:
        for name in ADAPTER_FILES:
            shutil.copyfile(spec.layout.checkpoint / name, staging / name)
        write_json(staging / "report.json", report)
        write_json(
            staging / "router.json",
            {
                "base": index["base"],
                "labels": index["labels"],
                "system_prompt": index["system_prompt"],
                "image_bounds": index["image_bounds"],
                "abstain_below": spec.config.loras.router.abstain_below,
                "temperature": report["calibration"]["temperature"],
            },
        )


@contextmanager
def deploy_lock(volumes: Volumes) -> Iterator[None]:
    """Exclusive lock over registry updates on the inference volume."""
    volumes.inference.mkdir(parents=True, exist_ok=True)
    with open(volumes.inference / ".deploy.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_registry(volumes: Volumes) -> dict[str, Any]:
    """The deployment registry (`current` and `history`), empty if nothing was deployed."""
    if not volumes.registry.is_file():
        return {"current": None, "history": []}
    return dict(json.loads(volumes.registry.read_text()))


def current_router(volumes: Volumes) -> Path:
    """The folder of the router that is deployed now."""
    current = read_registry(volumes)["current"]
    if not current:
        raise DeployError(f"{volumes.registry}: no router is deployed; fix: `mole deploy RUN`")
    return volumes.routers / str(current)


def rollback(volumes: Volumes) -> str:
    """Make the router that was current before the present one current again; returns it.

    The registry's history lists every change of `current` in order (deployments and rollbacks),
    so rolling back twice walks further back rather than toggling between two versions.
    """
    with deploy_lock(volumes):
        registry = read_registry(volumes)
        current = registry["current"]
        stack = [entry["version"] for entry in registry["history"] if "rollback_from" not in entry]
        rolled_back = {
            entry["rollback_from"] for entry in registry["history"] if "rollback_from" in entry
        }
        earlier = [v for v in stack if v != current and v not in rolled_back]
        if not current or not earlier:
            raise DeployError(
                f"{volumes.registry}: no earlier deployment to roll back to; "
                "fix: deploy another run first (`mole deploy RUN`)"
            )
        previous = earlier[-1]
        registry["history"].append(
            {
                "version": previous,
                "rollback_from": current,
                "deployed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
        )
        registry["current"] = previous
        write_json(volumes.registry, registry)
    return str(previous)


if __name__ == "__main__":
    from modal_jobs.pipes import main

    main(run, StageSpec)
