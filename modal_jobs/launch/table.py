"""The one stage table: per asset, its module, its run options and how Modal launches it.

Both launchers read it: `mole_assets/resources.py` runs `python -m modal_jobs.stages.<module>`
locally, or `modal run modal_jobs/mole_app.py::<entrypoint>` (whose functions, GPU and volumes
are the rows of `compute.functions()`); the asset's Dagster `Config` derives from the row's
options model (`modal_jobs/stage.py`). Adding a stage is adding a row here. Imports neither
torch nor modal, so `mole materialize --dry` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from modal_jobs.launch.compute import APP_FILE, APP_NAME, functions
from modal_jobs.layout import DATA_VOLUME, INFERENCE_VOLUME, MODAL_MOUNT_ROOT
from modal_jobs.stage import ExpertsOptions, TrainOptions


@dataclass(frozen=True)
class Stage:
    """One asset's compute: its stage module, Modal entrypoint and functions, run options.

    `options` is the model its Dagster `Config` and stage spec share (None: it takes none).
    """

    asset: str
    module: str
    entrypoint: str
    functions: tuple[str, ...]
    note: str
    options: type[BaseModel] | None = None

    @property
    def func_ref(self) -> str:
        """What `dagster_modal.ModalClient` passes to `modal run`."""
        return f"{APP_FILE}::{self.entrypoint}"

    def modal_plan(self) -> dict[str, Any]:
        """The Modal backend's `--dry` entry for this asset."""
        table = functions()
        return {
            "backend": "modal",
            "launcher": "dagster_modal.ModalClient",
            "command": f"modal run {self.func_ref}",
            "app": APP_NAME,
            "note": self.note,
            "functions": [table[name].describe() for name in self.functions],
            "run_root": str(MODAL_MOUNT_ROOT / DATA_VOLUME / "runs"),
        }


STAGES = {
    stage.asset: stage
    for stage in (
        Stage(
            "routing_dataset",
            "dataset",
            "dataset",
            (),
            "built in the entrypoint process, where the expert data is; then batch-uploaded "
            f"to the {DATA_VOLUME} volume (unchanged files skipped by content hash)",
        ),
        Stage(
            "tokenized_shards",
            "shards",
            "shards",
            ("shards_plan", "shards_chunk", "shards_finish"),
            "plan once, .map() one container per shard chunk, merge into index.json",
        ),
        Stage(
            "router_checkpoint",
            "train",
            "train",
            ("train_router",),
            "resumes from the newest train_state/step-N; torchrun for GPU count > 1",
            TrainOptions,
        ),
        Stage(
            "expert_adapters",
            "experts",
            "experts",
            ("train_experts",),
            f"managed expert LoRAs, written to the {INFERENCE_VOLUME} volume",
            ExpertsOptions,
        ),
        Stage("eval_report", "evaluate", "evaluate", ("evaluate_router",), "held-out eval split"),
        Stage(
            "deployed_router",
            "deploy",
            "deploy",
            ("deploy_router",),
            "atomic publish to the inference volume; one deploy at a time (max_containers=1)",
        ),
    )
}
