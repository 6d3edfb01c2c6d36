"""mole as a service against a real PostgreSQL server: code server, daemon and webserver as
three processes (`deploy/`), the sensor ticking in the daemon, runs through the queue, the `gpu`
pool across runs, a crash mid-run, and state surviving a restart of everything."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.events import DagsterEventType
from dagster_graphql import DagsterGraphQLClient

from modal_jobs.config import ConfigError
from mole_assets.assets import GPU_POOL
from mole_assets.cli import main
from mole_assets.instance import PG_URL_ENV, dagster_home, storage_of
from mole_assets.partitions import RUN_NAMES
from mole_assets.postgres import Postgres, throwaway
from mole_assets.sensors import INTERVAL_SECONDS_ENV, QUIET_SECONDS_ENV, TRAIN_MODE_ENV
from mole_assets.service import Service, initialize_pools, running, service_env
from mole_assets.service_state import (
    GPU_STEPS,
    TEST_MODE_RUN_CONFIG,
    events,
    eventually,
    failure_reasons,
    finished,
    gpu_spans,
    overlaps,
    pool_waits,
    sensor_runs,
    sensor_ticks,
    start_sensor,
    went_through_queue,
)
from scripts.prod_check import edit_one_sample, settle

from .conftest import copy_experts, write_config

COUNT = 8  # samples per expert: the queue, pool and crash are the subject, not the model
# The crashed run's limit is set once it has reached training (how long that takes depends on
# the machine's load): this many seconds after that point, so monitoring gives up on the dead
# run soon. The retry inherits the parent's tags; an operator's tag raises its limit to one a
# whole run fits in.
CRASH_MARGIN = 10
RETRY_MAX_RUNTIME = 900
MAX_RUNTIME = "dagster/max_runtime"
PARTITION = "dagster/partition"


@dataclass
class Deployment:
    service: Service
    postgres: Postgres
    experts: Path
    client: DagsterGraphQLClient

    def instance(self) -> dg.DagsterInstance:
        """A fresh connection to the service's instance (the test process reads Postgres too)."""
        return dg.DagsterInstance.get()


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, experts_dir: Path, tiny_base: str
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("service")
    experts = copy_experts(experts_dir, root / "experts")
    settle(experts)
    # No registered expert adapters: `expert_adapters` has nothing to train (the slow part).
    config = write_config(
        root / "config", experts, count=COUNT, min_accuracy=0.0, expert_adapters=False
    )
    with throwaway() as postgres, pytest.MonkeyPatch.context() as patch:
        env = service_env(os.environ, postgres.url, root)
        env.update(
            {
                "MOLE_CONFIG_DIR": str(config),
                QUIET_SECONDS_ENV: "1",
                INTERVAL_SECONDS_ENV: "2",
                TRAIN_MODE_ENV: "test",
            }
        )
        for key in ("DAGSTER_HOME", "MOLE_DAGSTER_PG_URL", "MOLE_CONFIG_DIR"):
            patch.setenv(key, env[key])
        with running(env, root / "logs") as service:
            client = DagsterGraphQLClient("127.0.0.1", port_number=service.web_port)
            yield Deployment(service, postgres, experts, client)


def launch(d: Deployment, run: str, tags: dict[str, str] | None = None) -> str:
    d.instance().add_dynamic_partitions(RUN_NAMES, [run])
    return d.client.submit_job_execution(
        "train_router",
        run_config=TEST_MODE_RUN_CONFIG,
        tags={PARTITION: run, **(tags or {})},
    )


@dataclass
class SensorRetrain:
    """The sensor's retrain after one expert changed, and a manual run launched beside it."""

    baseline: Any  # the first tick that recorded a cursor
    sensor_run: dg.DagsterRun
    manual_run: dg.DagsterRun
    ticks_after: int  # sensor ticks counted once both runs had finished


@pytest.fixture(scope="module")
def sensor_retrain(deployment: Deployment) -> SensorRetrain:
    """Start the sensor, change one expert and launch a manual run at the same time.

    The two runs are the sensor test's subject and the `gpu` pool test's pair: one deployment
    runs them once for both.
    """
    d = deployment
    start_sensor(d.client)
    instance = d.instance()
    baseline = eventually(
        lambda: next((t for t in sensor_ticks(instance) if t.cursor), None), "the baseline tick"
    )
    assert sensor_runs(instance) == [], "the baseline tick started a run"
    edit_one_sample(d.experts / "terminal")
    manual = launch(d, "svc-pool")
    sensor_run = eventually(lambda: next(iter(sensor_runs(instance)), None), "the sensor's run")
    done = finished(instance, sensor_run.run_id, timeout=900)
    manual_done = finished(instance, manual, timeout=900)
    return SensorRetrain(baseline, done, manual_done, len(sensor_ticks(instance)))


def latest_materialization_run(
    instance: dg.DagsterInstance, key: dg.AssetKey, partition: str
) -> str | None:
    """The run id of the newest materialization of `key`'s `partition`."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    ).records
    return records[0].run_id if records else None


@pytest.mark.timeout(1800)  # whole runs on a busy 2-core machine
def test_sensor_in_the_daemon_starts_one_retrain_through_the_queue(
    deployment: Deployment, sensor_retrain: SensorRetrain
) -> None:
    d, retrain = deployment, sensor_retrain
    instance = d.instance()
    assert retrain.baseline.skip_reason == "baseline recorded"
    done = retrain.sensor_run
    assert done.status == dg.DagsterRunStatus.SUCCESS, d.service.log("code-server")[-3000:]
    assert done.tags["mole/changed_experts"] == "terminal"
    partition = done.tags[PARTITION]
    assert partition.startswith("auto-") and instance.has_dynamic_partition(RUN_NAMES, partition)
    assert went_through_queue(instance, done.run_id)
    assert latest_materialization_run(instance, dg.AssetKey("eval_report"), partition) == (
        done.run_id
    )
    # Later ticks see the change as known: still exactly one retrain.
    ticks = retrain.ticks_after
    eventually(lambda: len(sensor_ticks(instance)) > ticks + 1 or None, "two more ticks")
    assert len(sensor_runs(instance)) == 1


@pytest.mark.timeout(1800)  # whole runs on a busy 2-core machine
def test_two_runs_at_once_take_turns_on_the_gpu_pool(
    deployment: Deployment, sensor_retrain: SensorRetrain
) -> None:
    instance = deployment.instance()
    runs = [sensor_retrain.sensor_run, sensor_retrain.manual_run]
    assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS] * 2
    run_ids = [r.run_id for r in runs]
    records = [instance.get_run_record_by_id(run_id) for run_id in run_ids]
    starts = [r.start_time for r in records if r is not None and r.start_time]
    ends = [r.end_time for r in records if r is not None and r.end_time]
    assert len(starts) == len(ends) == 2
    assert max(starts) < min(ends), "the two runs did not run at the same time"
    spans = gpu_spans(instance, run_ids)
    assert len(spans) == 2 * len(GPU_STEPS)
    assert overlaps(spans) == []
    assert pool_waits(instance, run_ids) > 0, "no step ever waited for the gpu pool"


@pytest.mark.timeout(1800)  # whole runs on a busy 2-core machine
def test_crash_of_daemon_and_run_worker_is_resolved_by_monitoring_and_retried(
    deployment: Deployment,
) -> None:
    d = deployment
    run_id = launch(d, "svc-crash", tags={MAX_RUNTIME: str(RETRY_MAX_RUNTIME)})
    instance = d.instance()

    def training_started() -> bool | None:
        steps = events(instance, run_id, DagsterEventType.STEP_START)
        return any(e.step_key == "router_checkpoint" for e in steps) or None

    eventually(training_started, "router_checkpoint starting")
    record = instance.get_run_record_by_id(run_id)
    assert record is not None and record.start_time is not None
    limit = round(time.time() - record.start_time) + CRASH_MARGIN
    instance.add_run_tags(run_id, {MAX_RUNTIME: str(limit)})
    # The daemon and the code server (whose child is the run worker) die like a lost machine.
    d.service.kill("daemon")
    d.service.kill("code-server")
    time.sleep(2)
    run = instance.get_run_by_id(run_id)
    assert run is not None and run.status == dg.DagsterRunStatus.STARTED  # nobody noticed yet
    d.service.start("code-server")
    d.service.wait_for_code_server(180)
    d.service.start("daemon")
    failed = finished(instance, run_id, timeout=limit + 300)
    assert failed.status == dg.DagsterRunStatus.FAILURE
    # The reason is on the run: monitoring cancels it for its runtime, then (no worker answers)
    # marks it failed.
    said = [e.dagster_event.message or "" for e in instance.all_logs(run_id) if e.dagster_event]
    reason = f"exceeding maximum runtime of {limit} seconds"
    assert any(reason in m for m in said), said[-5:]

    def retry() -> dg.DagsterRun | None:
        tagged = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/parent_run_id": run_id}))
        return next(iter(tagged), None)

    retry_id = eventually(retry, "a retry").run_id
    instance.add_run_tags(retry_id, {MAX_RUNTIME: str(RETRY_MAX_RUNTIME)})
    retried = finished(instance, retry_id, RETRY_MAX_RUNTIME)
    assert retried.status == dg.DagsterRunStatus.SUCCESS, d.service.log("code-server")[-3000:]
    assert retried.tags["dagster/retry_number"] == "1"
    # Nothing lost: the retry re-ran only what had not finished before the crash.
    rerun = {e.step_key for e in events(instance, retried.run_id, DagsterEventType.STEP_START)}
    assert "routing_dataset" not in rerun and "tokenized_shards" not in rerun
    assert "router_checkpoint" in rerun
    materialized = instance.get_materialized_partitions(dg.AssetKey("eval_report"))
    assert "svc-crash" in materialized


def data_version(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    """The newest data version of `key`: its last materialization, else its last observation."""
    event = instance.get_latest_materialization_event(key)
    if event is not None and event.asset_materialization is not None:
        return (event.asset_materialization.tags or {}).get("dagster/data_version")
    observed = instance.fetch_observations(key, limit=1).records
    if observed and observed[0].event_log_entry.asset_observation is not None:
        version = observed[0].event_log_entry.asset_observation.data_version
        return str(version) if version is not None else None
    return None


def snapshot(instance: dg.DagsterInstance) -> dict[str, Any]:
    keys = instance.get_asset_keys()
    return {
        "runs": {
            r.run_id: (r.status.value, r.tags.get(PARTITION))
            for r in instance.get_runs()
            if r.is_finished  # a retry the daemon starts meanwhile is not history yet
        },
        "partitions": sorted(instance.get_dynamic_partitions(RUN_NAMES)),
        "versions": {k.to_user_string(): data_version(instance, k) for k in keys},
        "materialized": {k.to_user_string(): instance.get_materialized_partitions(k) for k in keys},
    }


def test_runs_partitions_and_versions_survive_restarting_every_service(
    deployment: Deployment,
) -> None:
    d = deployment
    d.instance().add_dynamic_partitions(RUN_NAMES, ["svc-restart"])
    observed = d.client.submit_job_execution("observe_expert_datasets")
    assert finished(d.instance(), observed).status == dg.DagsterRunStatus.SUCCESS
    before = snapshot(d.instance())
    assert observed in before["runs"] and "svc-restart" in before["partitions"]
    assert before["versions"]["expert_datasets/map"] is not None
    d.service.stop_all()
    d.postgres.stop()
    d.postgres.start()
    d.service.start_all()
    after = snapshot(d.instance())
    assert {k: v for k, v in after["runs"].items() if k in before["runs"]} == before["runs"]
    assert {k: v for k, v in after.items() if k != "runs"} == {
        k: v for k, v in before.items() if k != "runs"
    }
    # The restarted webserver serves the same history.
    assert d.client.get_run_status(observed) == dg.DagsterRunStatus.SUCCESS


def test_cli_uses_the_service_database_and_keeps_no_state_in_its_folder(
    deployment: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "cli-dagster"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv(PG_URL_ENV, deployment.postgres.url)
    assert main(["runs", "add", "svc-cli"]) == 0
    assert deployment.instance().has_dynamic_partition(RUN_NAMES, "svc-cli")
    assert storage_of(home / "dagster.yaml") == "postgres"
    assert sorted(p.name for p in home.iterdir()) == ["dagster.yaml"]


def test_postgres_url_with_a_sqlite_instance_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.delenv(PG_URL_ENV, raising=False)
    dagster_home()  # an embedded SQLite instance, written first
    monkeypatch.setenv(PG_URL_ENV, "postgresql+psycopg2://mole@127.0.0.1:1/mole")
    with pytest.raises(ConfigError, match=r"dagster\.yaml: MOLE_DAGSTER_PG_URL is set"):
        dagster_home()


def test_failure_reasons_name_the_failed_step_and_its_error() -> None:
    """What `make prod-check` prints for a failed run: the step and the error it raised."""

    @dg.asset
    def broken() -> None:
        raise ValueError("the reason it failed")

    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([broken], instance=instance, raise_on_error=False)
        assert not result.success
        reasons = failure_reasons(instance, result.run_id)
    assert any(
        r.startswith("broken: ") and "ValueError: the reason it failed" in r for r in reasons
    )
    assert reasons[-1].startswith("run: ")


def test_the_gpu_pool_is_set_up_before_any_run_and_again_harmlessly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its limit row exists once the services start, so no two runs create it at once."""
    with throwaway() as postgres:
        env = service_env(os.environ, postgres.url, tmp_path)
        for key in ("DAGSTER_HOME", PG_URL_ENV):
            monkeypatch.setenv(key, env[key])
        with dg.DagsterInstance.get() as instance:
            assert GPU_POOL not in instance.event_log_storage.get_concurrency_keys()
        for _ in range(2):  # a restart finds the row and leaves it as it is
            initialize_pools(env, tmp_path / "logs", 120)
        with dg.DagsterInstance.get() as instance:
            info = instance.event_log_storage.get_concurrency_info(GPU_POOL)
    assert (info.slot_count, info.limit, info.using_default_limit) == (1, 1, True)
