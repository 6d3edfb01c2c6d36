"""Running the `modal` CLI from mole: finding it, and the one call made outside Dagster.

`dagster_modal.ModalClient` runs a bare `modal`; `make ui` and the `mole` console script do not
put the virtual environment on PATH, so `modal_env` appends the running Python's bin folder (a
`modal` earlier on PATH still wins). Imports neither dagster nor torch: `mole deploy --rollback`
starts at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from modal_jobs.errors import MoleError
from modal_jobs.launch.compute import APP_FILE

# The folder of the running Python: where `pip install` put the `modal` CLI.
ENV_BIN = str(Path(sys.executable).parent)
# `modal run modal_jobs/mole_app.py::…` resolves the app file (and `modal_jobs`) from here.
PROJECT_DIR = Path(__file__).resolve().parents[2]


def modal_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with this environment's `modal` CLI reachable on PATH."""
    path = env.get("PATH", os.defpath)
    if ENV_BIN in path.split(os.pathsep):
        return dict(env)
    return {**env, "PATH": path + os.pathsep + ENV_BIN}


def rollback() -> str:
    """`modal run mole_app.py::rollback`: roll back in the one deploy container; the new current."""
    done = subprocess.run(
        ["modal", "run", f"{APP_FILE}::rollback"],
        cwd=PROJECT_DIR,
        env=modal_env(os.environ),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise MoleError(f"rollback on Modal failed:\n{done.stderr.strip()}")
    return done.stdout.strip().rsplit(" ", 1)[-1]
