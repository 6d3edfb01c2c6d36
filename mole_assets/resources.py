"""The `mole` resource: where config and volumes live, and how a stage's compute is launched."""

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg

from modal_jobs.config import ConfigError, MoleConfig, load_config
from modal_jobs.layout import Volumes
from modal_jobs.stage import StageSpec

BACKENDS = ("local",)
# Asset key → the `modal_jobs` module that computes it.
STAGES = {
    "routing_dataset": "dataset",
    "tokenized_shards": "shards",
    "router_checkpoint": "train",
    "expert_adapters": "experts",
    "eval_report": "evaluate",
    "deployed_router": "deploy",
}


class MoleResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Config dir, `MOLE_HOME` and backend; launches stages as Pipes subprocesses.

    Empty fields fall back to `MOLE_CONFIG_DIR`, `MOLE_HOME` and `MOLE_BACKEND`.
    """

    config_dir: str = ""
    home: str = ""
    backend: str = ""

    def load(self) -> MoleConfig:
        """The validated config (read fresh, so edits apply to the next materialization)."""
        return load_config(Path(self.config_dir) if self.config_dir else None)

    def volumes(self) -> Volumes:
        """The local volumes under `MOLE_HOME`."""
        return Volumes.local(Path(self.home) if self.home else None)

    def spec(self, run: str, **extra: Any) -> dict[str, Any]:
        """The JSON stage spec for `run` (plus stage-specific fields)."""
        spec = StageSpec(run=run, config=self.load(), volumes=self.volumes())
        return {**spec.model_dump(mode="json"), **extra}

    def selected_backend(self) -> str:
        """`backend`, else `MOLE_BACKEND`, else `local`; unknown values fail clearly."""
        backend = self.backend or os.environ.get("MOLE_BACKEND", "local")
        if backend not in BACKENDS:
            raise ConfigError(
                f"MOLE_BACKEND={backend!r} is not supported by this version; "
                f"fix: use one of {BACKENDS}"
            )
        return backend

    def plan(self, stage: str, run: str) -> dict[str, Any]:
        """What launching `stage` for `run` would do (for `mole materialize --dry`)."""
        layout = self.volumes().run(run)
        return {
            "backend": self.selected_backend(),
            "launcher": "dagster.PipesSubprocessClient",
            "command": f"{sys.executable} -m modal_jobs.{stage}",
            "run_root": str(layout.root),
            "inference_volume": str(self.volumes().inference),
        }

    def launch(self, context: dg.AssetExecutionContext, spec: dict[str, Any]) -> Iterator[Any]:
        """Run the asset's stage as `python -m modal_jobs.<stage>` under Pipes; yield results."""
        self.selected_backend()
        stage = STAGES[context.asset_key.to_user_string()]
        client = dg.PipesSubprocessClient()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        invocation = client.run(
            command=[sys.executable, "-m", f"modal_jobs.{stage}"],
            context=context,
            extras={"spec": spec},
            env=env,
        )
        yield from invocation.get_results()
