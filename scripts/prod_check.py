"""`make prod-check`: mole as a service end to end, one JSON line on stdout.

Starts a throwaway PostgreSQL server and the three services (`deploy/`), writes small demo
expert datasets, starts `expert_datasets_sensor`, changes one expert and waits for the retrain
the sensor starts in the daemon (through the queue); a second run launched at the same time
shares the `gpu` pool. Everything runs in a temp folder and is stopped afterwards; the exit
status is 0 only if every check holds. The tiny base comes from `MOLE_TEST_MODELS` or this
checkout's `MOLE_HOME` models volume when built there before (`make demo`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_graphql import DagsterGraphQLClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modal_jobs.demo_data import write_demo_data  # noqa: E402
from modal_jobs.layout import Volumes, mole_home  # noqa: E402
from mole_assets.partitions import RUN_NAMES  # noqa: E402
from mole_assets.postgres import throwaway  # noqa: E402
from mole_assets.service import running, service_env  # noqa: E402
from mole_assets.service_state import (  # noqa: E402
    TEST_MODE_RUN_CONFIG,
    eventually,
    failure_reasons,
    finished,
    gpu_spans,
    overlaps,
    sensor_runs,
    sensor_ticks,
    start_sensor,
    went_through_queue,
)
from tests.conftest import write_config  # noqa: E402 - the tests' config writer, reused

PER_EXPERT = 8
CHANGED = "terminal"


def settle(experts: Path) -> None:
    """Date every file an hour back, so the sensor's quiet period sees them settled."""
    past = time.time() - 3600
    for path in experts.rglob("*"):
        os.utime(path, (past, past))


def edit_one_sample(expert_dir: Path) -> None:
    """A real content change (one sample's instruction) that keeps the dataset valid."""
    jsonl = sorted(expert_dir.rglob("*.jsonl"))[0]
    lines = jsonl.read_text().splitlines()
    sample = json.loads(lines[0])
    sample["messages"][0]["content"] += " (edited)"
    jsonl.write_text("\n".join([json.dumps(sample), *lines[1:]]) + "\n")


def seed_models(home: Path) -> None:
    """Copy built tiny bases into the temp `MOLE_HOME`: `MOLE_TEST_MODELS`, else this checkout's.

    Without one the tiny base is built first (minutes on a small CPU); `make demo` builds it.
    """
    seed = Path(os.environ.get("MOLE_TEST_MODELS") or Volumes.local(mole_home()).models)
    if (seed / "presets").is_dir():
        shutil.copytree(seed / "presets", Volumes.local(home).models / "presets")


def exercise(client: DagsterGraphQLClient, experts: Path) -> dict[str, Any]:
    """Baseline, change, the sensor's retrain and a manual run beside it; what happened."""
    instance = dg.DagsterInstance.get()
    start_sensor(client)
    eventually(lambda: next((t for t in sensor_ticks(instance) if t.cursor), None), "baseline")
    edit_one_sample(experts / CHANGED)
    instance.add_dynamic_partitions(RUN_NAMES, ["prod-check-manual"])
    manual = client.submit_job_execution(
        "train_router",
        run_config=TEST_MODE_RUN_CONFIG,
        tags={"dagster/partition": "prod-check-manual"},
    )
    sensor_run = eventually(lambda: next(iter(sensor_runs(instance)), None), "the sensor's run")
    done = finished(instance, sensor_run.run_id, timeout=1200)
    manual_done = finished(instance, manual, timeout=1200)
    spans = gpu_spans(instance, [done.run_id, manual])
    storage = type(instance.run_storage).__name__
    # A failed run says why on stderr: the services' temp folder is gone once this returns.
    for run in (done, manual_done):
        if run.status != dg.DagsterRunStatus.SUCCESS:
            reasons = failure_reasons(instance, run.run_id) or ["no failure event was logged"]
            print(f"prod-check: run {run.run_id} {run.status.value}:", file=sys.stderr)
            print("\n".join(reasons), file=sys.stderr)
    return {
        "storage": "postgres" if storage.startswith("Postgres") else storage,
        "sensor_runs": len(sensor_runs(instance)),
        "run_status": done.status.value,
        "run_partition": done.tags.get("dagster/partition"),
        "queued": went_through_queue(instance, done.run_id),
        "manual_run_status": manual_done.status.value,
        "gpu_steps": len(spans),
        "pool_overlap": bool(overlaps(spans)),
    }


def main() -> int:
    """Run the check; print one JSON line; 0 when everything held."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mole-prod-check-") as tmp, throwaway() as pg:
        root = Path(tmp)
        experts = root / "experts"
        write_demo_data(experts, PER_EXPERT, seed=0)
        settle(experts)
        config = write_config(
            root / "config", experts, PER_EXPERT, min_accuracy=0.0, expert_adapters=False
        )
        seed_models(root / "home")
        env = service_env(os.environ, pg.url, root)
        env.update(
            MOLE_HOME=str(root / "home"),
            MOLE_CONFIG_DIR=str(config),
            MOLE_SENSOR_QUIET_SECONDS="1",
            MOLE_SENSOR_INTERVAL_SECONDS="2",
            MOLE_SENSOR_TRAIN_MODE="test",
        )
        os.environ.update(env)
        with running(env, root / "logs") as service:
            client = DagsterGraphQLClient("127.0.0.1", port_number=service.web_port)
            result = exercise(client, experts)
    result["seconds"] = round(time.monotonic() - started, 1)
    ok = (
        result["storage"] == "postgres"
        and result["sensor_runs"] == 1
        and result["run_status"] == "SUCCESS"
        and result["queued"]
        and result["manual_run_status"] == "SUCCESS"
        and not result["pool_overlap"]
    )
    print(json.dumps({**result, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
