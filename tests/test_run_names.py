"""Run names become folders: a partition name that is not plain fails every stage, whoever added
it (here: the Dagster instance, as the UI's "Add partition" and GraphQL do), and writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from modal_jobs.config import load_config
from modal_jobs.layout import BadName, Volumes, check_name
from modal_jobs.stage import StageSpec
from mole_assets.assets import router_assets
from mole_assets.resources import STAGES, MoleResource

from .conftest import REPO, fresh_instance, write_config

BAD = ("..", "../x", "a/../../x", "../../../escaped", ".hidden", "a b", "", "x" * 81)


def _tree(root: Path, skip: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in root.rglob("*")
        if not p.is_relative_to(skip)
    }


@pytest.mark.parametrize("name", BAD)
def test_gate_refuses(name: str) -> None:
    with pytest.raises(BadName, match="invalid run name"):
        Volumes.local().run(name)


@pytest.mark.parametrize("name", ["demo", "exp-1.2_b", "A" * 80, "auto-20261201T000000Z-abc123"])
def test_gate_passes_plain_names(name: str) -> None:
    assert check_name(name) == name
    assert Volumes.local().run(name).root.name == name


def test_partition_added_through_instance_fails_every_stage_and_writes_nothing(
    tmp_path: Path, experts_dir: Path
) -> None:
    names = ["..", "../x", "a/../../x"]
    instance = fresh_instance(tmp_path, "ok")
    instance.add_dynamic_partitions("run_names", names)
    config_dir = write_config(tmp_path / "config", experts_dir)
    # Everything a stage could write: MOLE_HOME (the volumes) and all of the temp folder above it
    # (where `..` would land), minus the Dagster instance's own run storage.
    watched = Path(os.environ["MOLE_HOME"]).parent
    before = _tree(watched, tmp_path / "dagster")
    # Every name on the first stage (the one the UI user hit), and every stage with some name.
    cases = [(name, "routing_dataset") for name in names]
    cases += [(names[i % len(names)], asset) for i, asset in enumerate(STAGES) if i]
    assets = router_assets(load_config(config_dir))
    for name, asset in cases:
        result = dg.materialize(
            assets,
            instance=instance,
            partition_key=name,
            selection=[asset],
            resources={"mole": MoleResource(config_dir=str(config_dir))},
            raise_on_error=False,
        )
        assert not result.success, (name, asset)
        failures = [e for e in result.all_events if e.is_step_failure]
        assert len(failures) == 1, (name, asset)
        error = failures[0].step_failure_data.error
        assert error is not None and f"invalid run name {name!r}" in error.message
        # Bad input: failed once, no retry.
        assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert _tree(watched, tmp_path / "dagster") == before


def test_stage_run_by_hand_refuses_the_name(tmp_path: Path, experts_dir: Path) -> None:
    config = load_config(write_config(tmp_path / "config", experts_dir))
    volumes = Volumes.local(tmp_path / "home")
    spec = StageSpec(run="ok", config=config, volumes=volumes).model_dump(mode="json")
    spec["run"] = "../x"
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    out = subprocess.run(
        [sys.executable, "-m", "modal_jobs.stages.dataset", "--spec", str(spec_file)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 3, out.stderr
    assert "error: invalid run name '../x'" in out.stderr
    assert not (tmp_path / "home").exists()
