"""What stages and serving read back from a run's volumes: plain JSON and paths, no torch.

The shards' index, a routing-dataset split, the eval report and the registered expert adapters.
Anything that only reads these (the CLI's `runs`, `report` and `deploy --rollback`, the deploy
stage) imports this module and stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modal_jobs.config import MoleConfig
from modal_jobs.errors import MoleError
from modal_jobs.layout import Volumes
from modal_jobs.stage import StageSpec

SPLITS = ("train", "val", "eval")
# Screens of no expert: `ood_val` chooses the abstention score, `ood_eval` is held out.
OOD_SPLITS = ("ood_val", "ood_eval")


class ExpertsError(MoleError):
    """A registered expert adapter is missing or cannot be trained."""


def read_index(shards_dir: Path) -> dict[str, Any]:
    """The shards' index.json."""
    return dict(json.loads((shards_dir / "index.json").read_text()))


class ArtifactError(MoleError):
    """A stage's input artifact on the volume is unreadable (edited or damaged by hand)."""


def read_split(dataset_dir: Path, split: str) -> list[dict[str, Any]]:
    """Rows of one split of a written routing dataset; a damaged row names its file and line."""
    path = dataset_dir / f"{split}.jsonl"
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ArtifactError(
                f"{path}:{number}: not a JSON object ({exc.msg}); fix: re-materialize "
                "routing_dataset rather than editing its files"
            ) from None
    return rows


def read_report(spec: StageSpec) -> dict[str, Any]:
    """The run's report.json."""
    return dict(json.loads((spec.layout.report / "report.json").read_text()))


def adapter_folder(volumes: Volumes, adapter: str) -> Path:
    """An adapter entry's folder: a relative entry is on the inference volume."""
    return (volumes.inference / adapter).resolve()


def adapter_paths(config: MoleConfig, volumes: Volumes) -> dict[str, Path]:
    """Every registered expert's adapter folder (relative paths are on the inference volume)."""
    return {
        name: adapter_folder(volumes, entry.adapter)
        for name, entry in sorted(config.loras.experts.items())
    }


def managed(config: MoleConfig) -> dict[str, str]:
    """Registered experts whose adapter mole trains: expert → routing-dataset expert."""
    out = {}
    for name, entry in sorted(config.loras.experts.items()):
        if Path(entry.adapter).is_absolute():
            continue
        source = entry.dataset or name
        if source not in config.dataset.experts:
            raise ExpertsError(
                f"{config.config_dir / 'loras.json'}: experts.{name}.dataset {source!r} is not an "
                "expert of dataset.yaml; fix: name one of "
                f"{sorted(config.dataset.experts)} or give an absolute adapter path"
            )
        out[name] = source
    return out


def require_adapters(config: MoleConfig, volumes: Volumes) -> dict[str, Path]:
    """`adapter_paths`, failing clearly when a registered adapter folder is missing."""
    paths = adapter_paths(config, volumes)
    for name, path in paths.items():
        if not (path / "adapter_config.json").is_file():
            raise ExpertsError(
                f"{config.config_dir / 'loras.json'}: expert {name!r} adapter {path} does not "
                "exist; fix: materialize `expert_adapters` (mole materialize RUN) or correct "
                f"experts.{name}.adapter"
            )
    return paths
