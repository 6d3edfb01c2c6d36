"""What a running mole service did: sensor ticks and runs, the queue, `gpu` pool step spans.

Read from the service's instance (PostgreSQL); `make prod-check` and the service tests share
these readers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import dagster as dg
from dagster._core.events import DagsterEventType
from dagster_graphql import DagsterGraphQLClient

SENSOR = "expert_datasets_sensor"
SENSOR_TAG = "dagster/sensor_name"
# Asset steps in the `gpu` pool (see `mole_assets/assets.py`).
GPU_STEPS = frozenset({"router_checkpoint", "expert_adapters", "eval_report"})
# Train a handful of steps: for checks of the machinery, not of the model.
TEST_MODE_RUN_CONFIG = {
    "ops": {
        "router_checkpoint": {"config": {"mode": "test"}},
        "expert_adapters": {"config": {"mode": "test"}},
    }
}
START_SENSOR = """
mutation Start($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { status } }
    ... on PythonError { message }
  }
}
"""
T = TypeVar("T")


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 420) -> T:
    """Poll `probe` each second until it returns something; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(1)
    raise TimeoutError(f"{what} not seen within {timeout:.0f}s")


def finished(instance: dg.DagsterInstance, run_id: str, timeout: float = 420) -> dg.DagsterRun:
    """The run `run_id` once it has finished (success, failure or cancellation)."""

    def probe() -> dg.DagsterRun | None:
        run = instance.get_run_by_id(run_id)
        return run if run is not None and run.is_finished else None

    return eventually(probe, f"the end of run {run_id}", timeout)


def start_sensor(client: DagsterGraphQLClient) -> None:
    """Start `expert_datasets_sensor` through the webserver (it ships stopped)."""
    selector = {
        "repositoryLocationName": "mole",
        "repositoryName": "__repository__",
        "sensorName": SENSOR,
    }
    answer = client._execute(START_SENSOR, {"selector": selector})  # noqa: SLF001 - raw query
    if answer["startSensor"]["__typename"] != "Sensor":
        raise RuntimeError(f"could not start {SENSOR}: {answer['startSensor']}")


def sensor_ticks(instance: dg.DagsterInstance) -> list[Any]:
    """The sensor's ticks, newest first."""
    states = [s for s in instance.all_instigator_state() if s.instigator_name == SENSOR]
    if not states:
        return []
    return list(instance.get_ticks(states[0].instigator_origin_id, states[0].selector_id))


def sensor_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    """Runs the sensor requested."""
    return list(instance.get_runs(filters=dg.RunsFilter(tags={SENSOR_TAG: SENSOR})))


def events(instance: dg.DagsterInstance, run_id: str, *types: DagsterEventType) -> list[Any]:
    """The run's event log entries of the given types, oldest first."""
    return list(instance.all_logs(run_id, of_type=set(types)))


def failure_reasons(instance: dg.DagsterInstance, run_id: str, limit: int = 800) -> list[str]:
    """Why a run failed: each failed step's error and its causes (or the run's own message)."""
    kinds = (DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE)
    reasons = []
    for entry in events(instance, run_id, *kinds):
        event = entry.dagster_event
        error, said = getattr(event.event_specific_data, "error", None), []
        while error is not None:
            said.append(error.message.strip())
            error = error.cause
        text = " | caused by: ".join(said) or (event.message or "").strip()
        reasons.append(f"{entry.step_key or 'run'}: {text[:limit]}")
    return reasons


def went_through_queue(instance: dg.DagsterInstance, run_id: str) -> bool:
    """Whether the run was enqueued, then launched (by the daemon's queue) once."""
    kinds = (DagsterEventType.RUN_ENQUEUED, DagsterEventType.RUN_STARTING)
    return [e.dagster_event_type for e in events(instance, run_id, *kinds)] == list(kinds)


def gpu_spans(instance: dg.DagsterInstance, run_ids: list[str]) -> list[tuple[float, float, str]]:
    """(start, end, `run:step`) of every finished `gpu`-pool step of the runs, sorted."""
    spans = []
    kinds = (DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS)
    for run_id in run_ids:
        starts: dict[str, float] = {}
        for entry in events(instance, run_id, *kinds, DagsterEventType.STEP_FAILURE):
            if entry.step_key not in GPU_STEPS:
                continue
            if entry.dagster_event_type == DagsterEventType.STEP_START:
                starts[entry.step_key] = entry.timestamp
            elif entry.step_key in starts:
                start = starts.pop(entry.step_key)
                spans.append((start, entry.timestamp, f"{run_id[:8]}:{entry.step_key}"))
    return sorted(spans)


def overlaps(spans: list[tuple[float, float, str]]) -> list[tuple[str, str]]:
    """Pairs of spans (sorted by start) where the later one began before the earlier ended."""
    return [(a[2], b[2]) for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1]]


def pool_waits(instance: dg.DagsterInstance, run_ids: list[str]) -> int:
    """How many times a step of these runs waited for a `gpu` slot."""
    return sum(
        "blocked by limit for pool gpu" in (entry.dagster_event.message or "")
        for run_id in run_ids
        for entry in events(instance, run_id, DagsterEventType.ENGINE_EVENT)
    )
