"""The stage contract: what every stage is given (its spec and options) and what it returns.

Stages are plain functions `run(spec) -> StageResult`; the launchers (local Pipes subprocess or
a Modal entrypoint) turn a `StageResult` into a Dagster materialization with the same metadata.
A stage's run options are declared once here: the stage spec extends them, and the asset's
Dagster `Config` (what the Launchpad edits) is built from the same class.
"""

from __future__ import annotations

import base64
import enum
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from modal_jobs.config import MoleConfig
from modal_jobs.layout import RunLayout, Volumes, check_name

MetadataValue = dict[str, Any]


def md(text: str) -> MetadataValue:
    """Markdown metadata (tables, embedded images)."""
    return {"type": "md", "raw_value": text}


def json_value(value: Any) -> MetadataValue:
    """JSON metadata."""
    return {"type": "json", "raw_value": value}


def path_value(path: Path) -> MetadataValue:
    """A filesystem path on the run's volume."""
    return {"type": "path", "raw_value": str(path)}


def number(value: float | int) -> MetadataValue:
    """A float or int metadata value."""
    kind = "int" if isinstance(value, int) else "float"
    return {"type": kind, "raw_value": value}


def text(value: str) -> MetadataValue:
    """A plain text metadata value."""
    return {"type": "text", "raw_value": value}


def png_markdown(png: bytes, alt: str) -> MetadataValue:
    """A PNG shown inline in the Dagster UI (markdown with a data URI)."""
    encoded = base64.b64encode(png).decode()
    return md(f"![{alt}](data:image/png;base64,{encoded})")


@dataclass(frozen=True)
class Check:
    """An asset-check result a stage computed on what it wrote."""

    name: str
    passed: bool
    description: str
    metadata: dict[str, MetadataValue] = field(default_factory=dict)
    severity: Literal["ERROR", "WARN"] = "ERROR"


@dataclass(frozen=True)
class StageResult:
    """Metadata, data version and check results of one stage run."""

    data_version: str
    metadata: dict[str, MetadataValue]
    checks: list[Check] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain dict, for Modal return values and `--spec` runs without Dagster."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageResult:
        """Inverse of `to_json` (a Modal function's return value, back in the entrypoint)."""
        checks = [Check(**check) for check in data.get("checks", [])]
        return cls(data["data_version"], dict(data["metadata"]), checks)

    def with_metadata(self, extra: dict[str, MetadataValue]) -> StageResult:
        """The same result with `extra` metadata added (e.g. what the run cost)."""
        return StageResult(self.data_version, {**self.metadata, **extra}, self.checks)


class StageSpec(BaseModel):
    """What every stage needs: the run partition, the validated config and the volume roots."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    run: str
    config: MoleConfig
    volumes: Volumes

    @field_validator("run")
    @classmethod
    def _plain_run_name(cls, value: str) -> str:
        # A `MoleError`, not a ValueError: pydantic lets it through, so it reads as bad input.
        return check_name(value, "run name")

    @property
    def layout(self) -> RunLayout:
        """This run's artifact paths on the data volume."""
        return self.volumes.run(self.run)


class TrainMode(enum.StrEnum):
    """How much to train: the preset's steps, `FAST_STEPS`, or a few steps on a small subset."""

    full = "full"
    fast = "fast"
    test = "test"


class TrainOptions(BaseModel):
    """Router-training options (`router_checkpoint`); unset ones come from the model preset."""

    mode: TrainMode = Field(TrainMode.full, description="full, fast (20 steps) or test.")
    steps: int | None = Field(None, description="Optimizer steps (full mode).")
    batch_size: int | None = Field(None, description="Samples per optimizer step.")
    learning_rate: float | None = None
    warmup_steps: int | None = None
    seed: int = 0
    checkpoint_every: int = Field(100, description="Steps between resume checkpoints.")
    log_every: int = Field(10, description="Steps between loss log lines.")
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations in backward; unset: on for CUDA, off on CPU."
    )


class ExpertsMode(enum.StrEnum):
    """Demo expert training: the configured steps, or a handful per expert."""

    full = "full"
    test = "test"


class ExpertsOptions(BaseModel):
    """Demo expert-adapter training options (`expert_adapters`)."""

    mode: ExpertsMode = Field(ExpertsMode.full, description="full, or test (a few steps each).")
    steps: int = Field(40, description="Optimizer steps per expert (full mode).")
    batch_size: int = 8
    learning_rate: float = 0.003
    seed: int = 0
