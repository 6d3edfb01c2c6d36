"""The `mole` resource: where config and volumes live, and how a stage's compute is launched."""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_modal import ModalClient

from modal_jobs.config import ConfigError, MoleConfig, load_config
from modal_jobs.errors import MoleError
from modal_jobs.launch import warm
from modal_jobs.launch.compute import stage_command, train_procs
from modal_jobs.launch.modal_cli import PROJECT_DIR, modal_env
from modal_jobs.launch.pipes import BAD_INPUT_EXTRA
from modal_jobs.launch.table import STAGES
from modal_jobs.layout import Volumes, mole_home
from modal_jobs.stage import StageSpec
from mole_assets.messages import WholeLineTempFileReader

BACKENDS = ("local", "modal")


def raise_bad_input(message_file: Path) -> None:
    """If the stage reported bad input, fail with its message and no retries (data is wrong)."""
    if message_file.is_file():
        raise dg.Failure(description=message_file.read_text(), allow_retries=False) from None


@contextlib.contextmanager
def bad_input_fails_once() -> Iterator[Path]:
    """A file for the stage to write bad input to; a launch that wrote it fails unretried."""
    with tempfile.TemporaryDirectory() as scratch:
        bad_input = Path(scratch) / "bad_input.txt"
        try:
            yield bad_input
        except Exception:  # the stage failed; it may have said why the input is bad
            raise_bad_input(bad_input)
            raise


class MoleResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Config dir, `MOLE_HOME` and backend; launches stages as Pipes subprocesses.

    `local`: `python -m modal_jobs.stages.<stage>` (training under `torchrun` when
    `MOLE_TRAIN_PROCS` is above 1). `modal`: `dagster_modal.ModalClient` runs
    `modal run modal_jobs/mole_app.py::<entrypoint>` (see `modal_jobs/launch/cloud.py`).

    Empty fields fall back to `MOLE_CONFIG_DIR`, `MOLE_HOME` and `MOLE_BACKEND`.
    """

    config_dir: str = ""
    home: str = ""
    backend: str = ""

    def load(self) -> MoleConfig:
        """The validated config (read fresh, so edits apply to the next materialization)."""
        return load_config(Path(self.config_dir) if self.config_dir else None)

    def home_path(self) -> Path:
        """`home`, else `MOLE_HOME`: local volumes, caches and sensor state."""
        return Path(self.home).resolve() if self.home else mole_home()

    def volumes(self) -> Volumes:
        """The local volumes under the home folder."""
        return Volumes.local(self.home_path())

    def spec(self, run: str, **extra: Any) -> dict[str, Any]:
        """The JSON stage spec for `run` (plus stage-specific fields).

        Bad input found here — a partition name that is not a plain name (added through the UI
        or GraphQL, which do not check it), an invalid config — fails once, before anything is
        launched or written.
        """
        try:
            spec = StageSpec(run=run, config=self.load(), volumes=self.volumes())
        except MoleError as exc:
            raise dg.Failure(description=str(exc), allow_retries=False) from None
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

    def plan(self, asset: str, run: str) -> dict[str, Any]:
        """What launching `asset` for `run` would do (`materialize --dry`)."""
        layout = self.volumes().run(run)
        if self.on_modal(asset):
            return {**STAGES[asset].modal_plan(), "run_root": str(Volumes.modal().run(run).root)}
        return {
            "backend": "local",
            "launcher": "dagster.PipesSubprocessClient",
            "command": " ".join(self.command(STAGES[asset].module)),
            "run_root": str(layout.root),
            "inference_volume": str(self.volumes().inference),
        }

    def command(self, stage: str) -> list[str]:
        """The local command running `stage` (module).

        Warm (`MOLE_WARM_STAGES`, default on) unless `MOLE_TRAIN_PROCS` > 1 makes it `torchrun`.
        """
        return stage_command(stage, train_procs() if stage == "train" else 1, warm.enabled())

    def on_modal(self, asset: str) -> bool:
        """Whether `asset` runs on Modal (every stage has a Modal launch in the stage table)."""
        return self.selected_backend() == "modal" and asset in STAGES

    def modal_client(self) -> ModalClient:
        """The `dagster_modal` client (a Pipes subprocess client running `modal run`)."""
        client = ModalClient(project_directory=PROJECT_DIR)  # takes no message_reader argument
        client.message_reader = WholeLineTempFileReader()
        return client

    def launch(self, context: dg.AssetExecutionContext, spec: dict[str, Any]) -> Iterator[Any]:
        """Run the asset's stage under Pipes on the selected backend; yield the results.

        Either way, bad input reported by the stage fails the asset once (no retry policy).
        """
        asset = context.asset_key.to_user_string()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with bad_input_fails_once() as bad_input:
            extras = {"spec": spec, BAD_INPUT_EXTRA: str(bad_input)}
            if self.on_modal(asset):
                invocation = self.modal_client().run(
                    func_ref=STAGES[asset].func_ref,
                    context=context,
                    extras=extras,
                    env=modal_env(env),
                )
            else:
                invocation = dg.PipesSubprocessClient(message_reader=WholeLineTempFileReader()).run(
                    command=self.command(STAGES[asset].module),
                    context=context,
                    extras=extras,
                    env=env,
                )
        yield from invocation.get_results()
