"""Volume layout: the one module that knows where every artifact of a run lives.

Locally the volumes are folders under `MOLE_HOME/volumes/`; on Modal the same names are Modal
Volumes mounted under `/vol/`. Everything else asks this module for paths, and this module is
the one gate for names that become folders (run names, expert names): a name that is not plain
is refused before any path is built from it, whoever chose it (CLI, UI, GraphQL, sensor, config).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from modal_jobs.errors import MoleError

DATA_VOLUME = "moe-lora-data"
INFERENCE_VOLUME = "moe-lora-inference"
HF_CACHE_VOLUME = "moe-lora-hf-cache"
MODAL_MOUNT_ROOT = Path("/vol")
# Letters, digits, `_`, `.` and `-`, starting with a letter or digit (so never `.` or `..`, never
# hidden), no separators, at most 80 characters: safe as one folder name on every volume.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")


class BadName(MoleError):
    """A run or expert name that cannot be a folder name."""


def check_name(name: str, what: str = "run name") -> str:
    """`name` if it is plain (see `PLAIN_NAME`), else a `MoleError` naming the rule."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise BadName(
            f"invalid {what} {name!r}: use letters, digits, '_', '.' or '-' (max 80), "
            "starting with a letter or digit"
        )
    return name


def mole_home() -> Path:
    """`MOLE_HOME`, default `./.mole`: local volumes, model caches and the Dagster instance."""
    return Path(os.environ.get("MOLE_HOME", ".mole")).resolve()


@dataclass(frozen=True)
class Volumes:
    """Roots of the three volumes a stage may touch."""

    data: Path
    inference: Path
    models: Path

    @classmethod
    def local(cls, home: Path | None = None) -> Volumes:
        """Volumes as folders under `MOLE_HOME/volumes`."""
        root = (home or mole_home()) / "volumes"
        return cls(root / DATA_VOLUME, root / INFERENCE_VOLUME, root / HF_CACHE_VOLUME)

    @classmethod
    def modal(cls) -> Volumes:
        """Volumes as mounted inside Modal containers."""
        root = MODAL_MOUNT_ROOT
        return cls(root / DATA_VOLUME, root / INFERENCE_VOLUME, root / HF_CACHE_VOLUME)

    def run(self, name: str) -> RunLayout:
        """The layout of one run partition on the data volume (refuses a name that is not plain)."""
        return RunLayout(self.runs / check_name(name, "run name"))

    @property
    def runs(self) -> Path:
        """The folder holding every run's folder on the data volume."""
        return self.data / "runs"

    @property
    def registry(self) -> Path:
        """The deployment registry (current router and history) on the inference volume."""
        return self.inference / "registry.json"

    @property
    def routers(self) -> Path:
        """Immutable deployed router versions on the inference volume."""
        return self.inference / "routers"


@dataclass(frozen=True)
class RunLayout:
    """Where one run's artifacts live on the data volume."""

    root: Path

    @property
    def dataset(self) -> Path:
        """`routing_dataset`: manifest.json, {train,val,eval}.jsonl, images/<sha256>.png."""
        return self.root / "routing_dataset"

    @property
    def shards(self) -> Path:
        """`tokenized_shards`: index.json and <split>-<n>.safetensors."""
        return self.root / "tokenized_shards"

    @property
    def checkpoint(self) -> Path:
        """`router_checkpoint`: the final adapter and training metadata."""
        return self.root / "router_checkpoint"

    @property
    def resume(self) -> Path:
        """Intermediate training checkpoints (step-N/), kept apart from the published adapter."""
        return self.root / "train_state"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files of this run's training."""
        return self.root / "tensorboard"

    @property
    def report(self) -> Path:
        """`eval_report`: report.json, report.md and PNG figures."""
        return self.root / "eval_report"
