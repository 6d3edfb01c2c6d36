"""Stage `deployed_router`: publish a run's router to the inference volume.

Each deployment is an immutable folder `routers/<run>-<adapter sha>/`, renamed into place whole;
`registry.json` (replaced atomically) names the current one and keeps the history, so a reader
sees the old router or the new one, never a mix, and rollback is one registry write. A lock file
keeps two deployments from interleaving.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

from modal_jobs.artifacts import read_index, read_report
from modal_jobs.atomic import atomic_dir, write_json
from modal_jobs.serving.registry import DeployError, deploy_lock, read_registry
from modal_jobs.stage import StageResult, StageSpec, number, path_value, text

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "training_summary.json")


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
    abstention = report["ood"]["router"] if report.get("ood") else None
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
                "temperature": report["calibration"]["temperature"],
                "ood": abstention,
                # The adapters it was deployed with, so that a server (or a rollback) needs no
                # config: relative entries are on the inference volume.
                "experts": {
                    name: entry.adapter for name, entry in sorted(spec.config.loras.experts.items())
                },
            },
        )
        # A file the abstention score reads (the prototypes) travels with router.json.
        if abstention and abstention.get("prototypes"):
            name = abstention["prototypes"]
            shutil.copyfile(spec.layout.report / name, staging / name)


if __name__ == "__main__":
    from modal_jobs.launch.pipes import main

    main(run, StageSpec)
