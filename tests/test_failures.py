"""Failures as Dagster reports them: bad data fails once with file and line, never retried."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg

from modal_jobs.config import load_config
from mole_assets.assets import router_assets
from mole_assets.partitions import RUN_NAMES
from mole_assets.resources import MoleResource

from .conftest import MakeConfig, copy_experts, observe_experts


def test_bad_data_fails_once_with_file_and_line(
    tmp_path: Path, experts_dir: Path, make_config: MakeConfig, dagster_home: Path
) -> None:
    experts = copy_experts(experts_dir, tmp_path / "experts")
    jsonl = experts / "map" / "datasets" / "demo.jsonl"
    lines = jsonl.read_text().splitlines()
    lines[4] = '{"id": "broken", "image": '
    jsonl.write_text("\n".join(lines) + "\n")
    config = make_config(experts=experts)
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(RUN_NAMES, ["bad"])
    home = tmp_path / "home"
    result = dg.materialize(
        router_assets(load_config(config)),
        instance=instance,
        partition_key="bad",
        selection=["routing_dataset"],
        resources={"mole": MoleResource(config_dir=str(config), home=str(home))},
        raise_on_error=False,
    )
    assert not result.success
    failures = [e for e in result.all_events if e.is_step_failure]
    assert len(failures) == 1
    message = failures[0].step_failure_data.error.message
    assert f"{jsonl}:5: malformed JSON" in message
    retries = [
        e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    ]
    assert retries == []
    assert not (home / "volumes" / "moe-lora-data" / "runs" / "bad" / "routing_dataset").exists()


def test_observing_a_missing_expert_folder_fails_naming_it(
    tmp_path: Path, experts_dir: Path, make_config: MakeConfig, dagster_home: Path
) -> None:
    experts = copy_experts(experts_dir, tmp_path / "experts")
    shutil.rmtree(experts / "map")
    instance = dg.DagsterInstance.get()
    result = observe_experts(instance, make_config(experts=experts))
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert f"{experts / 'map'}: expert 'map' has no dataset folder" in (
        failure.step_failure_data.error.message
    )
    # The experts still there were observed; the missing one has no version at all.
    observed = {
        key.to_user_string()
        for key in instance.get_asset_keys()
        if instance.fetch_observations(key, limit=1).records
    }
    assert "expert_datasets/calendar" in observed and "expert_datasets/map" not in observed
