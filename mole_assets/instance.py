"""The Dagster instance mole uses: `DAGSTER_HOME`, default `MOLE_HOME/dagster`, with defaults.

On first use a `dagster.yaml` is written there (never overwritten afterwards): run monitoring
with a maximum run time, run retries for infrastructure failures only (a validation error is
bad data and is never retried), and a limit of one concurrent step per pool — mole's GPU stages
share the `gpu` pool, so one machine never runs two of them at once.
"""

import os
from pathlib import Path

import dagster as dg

from modal_jobs.layout import mole_home

DAGSTER_YAML = """\
# Written by mole on first use; edit freely (mole never overwrites this file).
run_monitoring:
  enabled: true
  start_timeout_seconds: 180
  max_runtime_seconds: 21600  # 6 h: a hung run is failed rather than left running
run_retries:
  enabled: true
  max_retries: 2
  retry_on_asset_or_op_failure: false  # retry infrastructure failures only, never bad data
concurrency:
  pools:
    granularity: op
    default_limit: 1  # the `gpu` pool: one GPU stage at a time; `deploy`: one deployment
telemetry:
  enabled: false
"""


def dagster_home() -> Path:
    """`DAGSTER_HOME` (set to `MOLE_HOME/dagster` when unset), created with default settings."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(mole_home() / "dagster")))
    home.mkdir(parents=True, exist_ok=True)
    settings = home / "dagster.yaml"
    if not settings.exists():
        settings.write_text(DAGSTER_YAML)
    return home


def instance() -> dg.DagsterInstance:
    """The Dagster instance under `dagster_home()`."""
    dagster_home()
    return dg.DagsterInstance.get()


if __name__ == "__main__":
    print(dagster_home())
