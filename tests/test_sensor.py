"""`expert_datasets_sensor` against a real Dagster instance: baseline, skip, change, debounce,
restart."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from mole_assets.definitions import defs
from mole_assets.resources import MoleResource
from mole_assets.sensors import QUIET_SECONDS_ENV, scan_experts

from .conftest import MakeConfig, copy_experts


@pytest.fixture
def setup(
    tmp_path: Path, experts_dir: Path, make_config: MakeConfig, dagster_home: Path
) -> tuple[MoleResource, Path, dg.DagsterInstance]:
    experts = copy_experts(experts_dir, tmp_path / "experts")
    past = time.time() - 3600
    for path in experts.rglob("*"):
        os.utime(path, (past, past))
    config = make_config(experts=experts)
    mole = MoleResource(config_dir=str(config), home=str(tmp_path / "home"))
    return mole, experts, dg.DagsterInstance.get()


def tick(mole: MoleResource, instance: dg.DagsterInstance, cursor: str | None) -> Any:
    sensor = defs.resolve_sensor_def("expert_datasets_sensor")
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"mole": mole})
    return sensor(context)


def touch_change(path: Path, when: float) -> None:
    path.write_text(path.read_text() + "\n")
    os.utime(path, (when, when))


def test_baseline_then_no_change_skips(
    setup: tuple[MoleResource, Path, dg.DagsterInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    mole, _, instance = setup
    monkeypatch.setenv(QUIET_SECONDS_ENV, "0")
    first = tick(mole, instance, None)
    assert first.run_requests == [] and first.skip_reason.skip_message == "baseline recorded"
    assert set(json.loads(first.cursor)) == {
        "calendar",
        "code_editor",
        "email",
        "map",
        "spreadsheet",
        "terminal",
    }
    second = tick(mole, instance, first.cursor)
    assert second.run_requests == []
    assert second.skip_reason.skip_message == "no settled expert dataset changed"
    assert second.cursor == first.cursor


def test_one_changed_file_requests_exactly_one_run(
    setup: tuple[MoleResource, Path, dg.DagsterInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    mole, experts, instance = setup
    monkeypatch.setenv(QUIET_SECONDS_ENV, "0")
    baseline = tick(mole, instance, None)
    touch_change(experts / "map" / "datasets" / "demo.jsonl", time.time() - 120)
    assert scan_experts(mole, 0, time.time()).rehashed == 1  # only the changed file is re-read
    result = tick(mole, instance, baseline.cursor)
    assert len(result.run_requests) == 1
    request = result.run_requests[0]
    assert request.partition_key.startswith("auto-") and request.job_name == "train_router"
    assert request.tags["mole/changed_experts"] == "map"
    [added] = result.dynamic_partitions_requests
    assert list(added.partition_keys) == [request.partition_key]
    assert [e.asset_key for e in result.asset_events] == [dg.AssetKey(["expert_datasets", "map"])]
    assert json.loads(result.cursor)["map"] != json.loads(baseline.cursor)["map"]


def test_dataset_still_being_written_waits_until_it_settles(
    setup: tuple[MoleResource, Path, dg.DagsterInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    mole, experts, instance = setup
    monkeypatch.setenv(QUIET_SECONDS_ENV, "600")
    baseline = tick(mole, instance, None)
    jsonl = experts / "email" / "datasets" / "demo.jsonl"
    touch_change(jsonl, time.time())  # written just now
    waiting = tick(mole, instance, baseline.cursor)
    assert waiting.run_requests == []
    assert json.loads(waiting.cursor)["email"] == json.loads(baseline.cursor)["email"]
    settled_at = time.time() - 601
    os.utime(jsonl, (settled_at, settled_at))
    settled = tick(mole, instance, waiting.cursor)
    assert len(settled.run_requests) == 1
    assert settled.run_requests[0].tags["mole/changed_experts"] == "email"


def test_cursor_and_index_survive_a_restart(
    setup: tuple[MoleResource, Path, dg.DagsterInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    mole, _, instance = setup
    monkeypatch.setenv(QUIET_SECONDS_ENV, "0")
    baseline = tick(mole, instance, None)
    index = Path(mole.home) / "sensors" / "expert_file_index.json"
    assert index.is_file()
    restarted = MoleResource(config_dir=mole.config_dir, home=mole.home)
    assert scan_experts(restarted, 0, time.time()).rehashed == 0
    again = tick(restarted, instance, baseline.cursor)
    assert again.run_requests == [] and again.cursor == baseline.cursor


def test_auto_deploy_requests_the_deploying_job(
    setup: tuple[MoleResource, Path, dg.DagsterInstance], monkeypatch: pytest.MonkeyPatch
) -> None:
    mole, experts, instance = setup
    monkeypatch.setenv(QUIET_SECONDS_ENV, "0")
    loras = Path(mole.config_dir) / "loras.json"
    data = json.loads(loras.read_text())
    data["router"]["auto_deploy"] = True
    loras.write_text(json.dumps(data))
    baseline = tick(mole, instance, None)
    touch_change(experts / "terminal" / "datasets" / "demo.jsonl", time.time() - 120)
    result = tick(mole, instance, baseline.cursor)
    assert result.run_requests[0].job_name == "train_and_deploy_router"
