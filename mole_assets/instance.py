"""The Dagster instance mole uses: settings in `DAGSTER_HOME` (default `MOLE_HOME/dagster`).

On first use a `dagster.yaml` is written there (never overwritten afterwards) with the sections
the service's `deploy/dagster.yaml` shares with the embedded instance: run monitoring with a
maximum run time, run retries for infrastructure failures only (a validation error is bad data
and is never retried), and one concurrent step per pool (mole's GPU stages share `gpu`).
Storage is SQLite under that folder, or PostgreSQL when `MOLE_DAGSTER_PG_URL` is set: then the
folder holds settings only and run history, partitions, cursors and versions live in the
database. The service runs with `service_home()`: a per-machine folder holding a copy of
`deploy/dagster.yaml`, step logs and scratch files.
"""

import os
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from modal_jobs.config import ConfigError
from modal_jobs.layout import mole_home

PG_URL_ENV = "MOLE_DAGSTER_PG_URL"
DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy"
SHARED_SECTIONS = ("run_monitoring", "run_retries", "concurrency", "telemetry")
HEADER = (
    "# Written by mole on first use from deploy/dagster.yaml's shared sections; edit freely\n"
    "# (mole never overwrites this file).\n"
)


def default_settings(postgres: bool) -> dict[str, Any]:
    """The embedded instance's settings: the service's shared sections (+ its storage)."""
    service = yaml.safe_load((DEPLOY_DIR / "dagster.yaml").read_text())
    settings = {key: service[key] for key in SHARED_SECTIONS}
    if postgres:
        settings = {"storage": service["storage"], **settings}
    return settings


def storage_of(settings_file: Path) -> str:
    """`postgres` or `sqlite`: which storage the `dagster.yaml` at `settings_file` selects."""
    settings = yaml.safe_load(settings_file.read_text()) or {}
    storage = settings.get("storage") or {}
    return "postgres" if "postgres" in storage else "sqlite"


def dagster_home() -> Path:
    """`DAGSTER_HOME` (set to `MOLE_HOME/dagster` when unset), created with default settings.

    Raises:
        ConfigError: `MOLE_DAGSTER_PG_URL` is set but the existing `dagster.yaml` selects
            another storage (the variable would be silently ignored).
    """
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(mole_home() / "dagster")))
    home.mkdir(parents=True, exist_ok=True)
    settings = home / "dagster.yaml"
    postgres = bool(os.environ.get(PG_URL_ENV))
    if not settings.exists():
        body = yaml.safe_dump(default_settings(postgres), sort_keys=False)
        settings.write_text(HEADER + body)
    if postgres and storage_of(settings) != "postgres":
        raise ConfigError(
            f"{settings}: {PG_URL_ENV} is set but this dagster.yaml has no postgres storage; "
            f"fix: add `storage: postgres: postgres_url: {{env: {PG_URL_ENV}}}` to it, "
            "or point DAGSTER_HOME at a fresh folder (or at deploy/)"
        )
    return home


def service_home(state_dir: Path) -> Path:
    """`state_dir/dagster` with `deploy/dagster.yaml` copied in (refreshed on every start).

    The copy makes `deploy/dagster.yaml` the one place the service is configured, while
    Dagster's per-machine files (step logs, daemon scratch) stay out of the checkout.
    """
    home = state_dir / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DEPLOY_DIR / "dagster.yaml", home / "dagster.yaml")
    return home


def instance() -> dg.DagsterInstance:
    """The Dagster instance `dagster_home()` describes."""
    dagster_home()
    return dg.DagsterInstance.get()


if __name__ == "__main__":
    print(dagster_home())
