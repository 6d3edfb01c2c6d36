"""`expert_datasets_sensor`: start a retrain when an expert dataset really changed.

Each tick scans every configured expert through a per-file (size, mtime, sha256) index kept
under `MOLE_HOME/sensors/`, so unchanged files are only stat-ed, never re-read. An expert whose
newest file is younger than the quiet period is still being written and is left for a later
tick. When a settled expert's content hash differs from the one in the cursor, the sensor adds
a run partition `auto-<UTC timestamp>-<short hash>` and requests the chain up to `eval_report`
(and `deployed_router` too when `router.auto_deploy` is set; the blocking accuracy check still
gates it). The first tick records a baseline and starts nothing.

Environment (read by the code server, where sensors are evaluated): `MOLE_SENSOR_QUIET_SECONDS`
(default 30), `MOLE_SENSOR_INTERVAL_SECONDS` (minimum seconds between ticks, default 30, read
when the definitions load) and `MOLE_SENSOR_TRAIN_MODE` (`full` default; `fast` or `test` train
less, for trials and tests). The index is per-daemon state: a second daemon on another machine
would rebuild its own, which costs one full read of the datasets and nothing else.
"""

import datetime as dt
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import dagster as dg

from modal_jobs.config import ConfigError
from modal_jobs.hashing import FileHashIndex, combine
from modal_jobs.stage import ExpertsMode, TrainMode
from mole_assets.jobs import train_and_deploy_job, train_router_job
from mole_assets.partitions import run_names
from mole_assets.resources import MoleResource

QUIET_SECONDS_ENV = "MOLE_SENSOR_QUIET_SECONDS"
DEFAULT_QUIET_SECONDS = 30.0
INTERVAL_SECONDS_ENV = "MOLE_SENSOR_INTERVAL_SECONDS"
TRAIN_MODE_ENV = "MOLE_SENSOR_TRAIN_MODE"


@dataclass(frozen=True)
class Tick:
    """What one scan found: settled versions, experts still being written, files re-hashed."""

    versions: dict[str, str]
    settling: list[str]
    rehashed: int
    files: int


def scan_experts(mole: MoleResource, quiet_seconds: float, now: float) -> Tick:
    """Scan every configured expert through the persistent file-hash index."""
    config = mole.load()
    index = FileHashIndex(mole.home_path() / "sensors" / "expert_file_index.json")
    versions: dict[str, str] = {}
    settling: list[str] = []
    rehashed = files = 0
    for name in sorted(config.dataset.experts):
        scan = index.scan(config.experts_dir / name)
        rehashed += scan.rehashed
        files += scan.files
        if now - scan.newest_mtime < quiet_seconds:
            settling.append(name)
        else:
            versions[name] = scan.version
    index.save()
    return Tick(versions, settling, rehashed, files)


def run_name(versions: dict[str, str], now: float) -> str:
    """`auto-<UTC timestamp>-<short hash of every expert version>`."""
    stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    digest = combine(f"{k}:{v}" for k, v in sorted(versions.items()))[:8]
    return f"auto-{stamp}-{digest}"


def train_run_config() -> dict[str, Any]:
    """The retrain's run config for `MOLE_SENSOR_TRAIN_MODE` (empty for `full`).

    Raises:
        ConfigError: the variable names no training mode.
    """
    value = os.environ.get(TRAIN_MODE_ENV, TrainMode.full.value)
    try:
        mode = TrainMode(value)
    except ValueError:
        choices = [m.value for m in TrainMode]
        raise ConfigError(f"{TRAIN_MODE_ENV}={value!r}; fix: use one of {choices}") from None
    if mode is TrainMode.full:
        return {}
    # The demo experts have no 20-step variant: `fast` and `test` both train a handful.
    ops = {"router_checkpoint": {"config": {"mode": mode.value}}}
    return {"ops": {**ops, "expert_adapters": {"config": {"mode": ExpertsMode.test.value}}}}


@dg.sensor(
    name="expert_datasets_sensor",
    jobs=[train_router_job, train_and_deploy_job],
    minimum_interval_seconds=int(os.environ.get(INTERVAL_SECONDS_ENV, "30")),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Retrain the router when an expert dataset's content changes (debounced).",
)
def expert_datasets_sensor(
    context: dg.SensorEvaluationContext, mole: MoleResource
) -> dg.SensorResult | dg.SkipReason:
    """Compare settled expert versions with the cursor; request a run on a real change."""
    now = time.time()
    quiet = float(os.environ.get(QUIET_SECONDS_ENV, DEFAULT_QUIET_SECONDS))
    tick = scan_experts(mole, quiet, now)
    known: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    changed = sorted(n for n, v in tick.versions.items() if known.get(n) != v)
    cursor = json.dumps({**known, **tick.versions}, sort_keys=True)
    context.log.info(
        f"scanned {tick.files} files, re-hashed {tick.rehashed}; "
        f"settling: {tick.settling or 'none'}; changed: {changed or 'none'}"
    )
    observations = [
        dg.AssetObservation(
            asset_key=dg.AssetKey(["expert_datasets", name]),
            tags={"dagster/data_version": tick.versions[name][:16]},
        )
        for name in changed
    ]
    if not known or not changed:
        reason = "baseline recorded" if not known else "no settled expert dataset changed"
        return dg.SensorResult(skip_reason=reason, cursor=cursor, asset_events=observations)
    name = run_name({**known, **tick.versions}, now)
    job = train_and_deploy_job if mole.load().loras.router.auto_deploy else train_router_job
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=name,
                partition_key=name,
                job_name=job.name,
                run_config=train_run_config(),
                tags={"mole/changed_experts": ",".join(changed)},
            )
        ],
        dynamic_partitions_requests=[run_names.build_add_request([name])],
        cursor=cursor,
        asset_events=observations,
    )
