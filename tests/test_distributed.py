"""Data-parallel training: `torchrun --nproc_per_node 2` on CPU (gloo) against one process.

The same run (tiny preset, `test` mode: 8 steps of global batch 16) trains once as a plain
process and as two ranks that each take half of every batch. Both normalise the loss by the
global batch's answer tokens, so they follow the same curve up to float rounding: each rank pads
its half to its own longest sample and sums its half's loss apart, and the two halves' gradients
are added by an all-reduce. Measured on this machine: losses agree to a relative 1e-7 at every
step and the adapters to 1e-5 of each tensor's largest weight (Adam's normalised updates amplify
rounding where gradients are near zero). The tolerances below leave a 100x margin for other
CPUs' kernels, and are still far below what a wrongly averaged gradient produces.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from modal_jobs.config import ConfigError, load_config
from modal_jobs.layout import Volumes
from modal_jobs.stage import StageSpec
from modal_jobs.stages import dataset, shards, train
from mole_assets.assets import router_checkpoint
from mole_assets.resources import MoleResource

from .conftest import REPO, fresh_instance, write_config

LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-3
TRAIN = {"mode": "test", "checkpoint_every": 2}


@pytest.fixture(scope="module")
def prepared(
    tmp_path_factory: pytest.TempPathFactory, experts_dir: Path, tiny_base: str
) -> tuple[StageSpec, Path]:
    """Dataset and shards of one run, copied to the runs the tests train."""
    root = tmp_path_factory.mktemp("distributed")
    config_dir = write_config(root / "config", experts_dir, count=16)
    spec = StageSpec(run="one", config=load_config(config_dir), volumes=Volumes.local())
    dataset.run(spec)
    shards.run(spec)
    for run in ("two", "dagster"):
        shutil.copytree(spec.layout.shards, spec.volumes.run(run).shards, dirs_exist_ok=True)
    return spec, root


def train_by_hand(spec: StageSpec, root: Path, command: list[str], env: dict[str, str]) -> Path:
    """Run the train stage with `--spec` (as `mole_app._torchrun` does); its checkpoint folder."""
    spec_file = root / f"{spec.run}.json"
    spec_file.write_text(json.dumps({**spec.model_dump(mode="json"), **TRAIN}))
    done = subprocess.run(
        [*command, "--spec", str(spec_file), "--result", str(root / f"{spec.run}-result.json")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return spec.layout.checkpoint


def curve(checkpoint: Path) -> list[tuple[int, float]]:
    return [
        (int(step), loss) for step, loss in json.loads((checkpoint / "loss_curve.json").read_text())
    ]


def assert_same_curve(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 9))
    for (step, loss), (_, reference) in zip(got, expected, strict=True):
        assert loss == pytest.approx(reference, rel=LOSS_RTOL), f"step {step}"


@pytest.fixture(scope="module")
def single(prepared: tuple[StageSpec, Path]) -> Path:
    """The reference: the same run trained by one process (this test process)."""
    spec, _ = prepared
    train.run(train.TrainSpec(**spec.model_dump(), **TRAIN))
    return spec.layout.checkpoint


def test_two_ranks_match_one_process_and_only_rank_0_writes(
    prepared: tuple[StageSpec, Path], single: Path
) -> None:
    """Writes are recorded by tests/train_writes_recorded.py around the real functions."""
    spec, root = prepared
    two = spec.model_copy(update={"run": "two"})
    writes = root / "writes"
    writes.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*torchrun, "-m", "tests.train_writes_recorded"]
    checkpoint = train_by_hand(two, root, command, {**os.environ, "MOLE_TEST_WRITES": str(writes)})

    assert_same_curve(curve(checkpoint), curve(single))
    adapter, reference = (
        load_file(str(c / "adapter_model.safetensors")) for c in (checkpoint, single)
    )
    assert adapter.keys() == reference.keys()
    for name, weight in reference.items():
        assert (adapter[name] - weight).abs().max() <= WEIGHT_RTOL * weight.abs().max(), name

    calls = [json.loads(line) for line in (writes / "rank-0.jsonl").read_text().splitlines()]
    assert [c["step"] for c in calls if c["call"] == "save_state"] == [2, 4, 6]
    assert [c["target"] for c in calls if c["call"] == "publish"] == [str(checkpoint)]
    assert not (writes / "rank-1.jsonl").exists()  # rank 1 wrote no resume point, no adapter
    layout = two.layout
    assert not layout.resume.exists()
    # One process wrote TensorBoard: a new event file after each of the 3 resume points, each
    # step logged once (events.out.tfevents.<time>.<host>.<pid>.<n>).
    events = sorted(layout.tensorboard.glob("events.out.tfevents.*"))
    assert len(events) == 4 and len({e.name.split(".")[-2] for e in events}) == 1
    board = EventAccumulator(str(layout.tensorboard))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == list(range(1, 9))
    assert not [p.name for p in layout.root.iterdir() if p.name.startswith(".")]
    summary = json.loads((checkpoint / "training_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 8
    result = json.loads((root / "two-result.json").read_text())
    assert result["metadata"]["processes"]["raw_value"] == 2


def test_dagster_launches_torchrun_and_rank_0_alone_reports(
    prepared: tuple[StageSpec, Path], single: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, root = prepared
    monkeypatch.setenv("MOLE_TRAIN_PROCS", "2")
    instance = fresh_instance(root, "dagster")
    config_dir = root / "config"
    result = dg.materialize(
        [router_checkpoint],
        instance=instance,
        partition_key="dagster",
        resources={"mole": MoleResource(config_dir=str(config_dir))},
        run_config={"ops": {"router_checkpoint": {"config": TRAIN}}},
    )
    assert result.success
    events = result.get_asset_materialization_events()
    assert len(events) == 1  # rank 1 ran the stage without opening Pipes
    metadata = events[0].event_specific_data.materialization.metadata  # type: ignore[union-attr]
    assert metadata["processes"].value == 2
    values: Any = metadata["loss_curve_values"].value
    checkpoint = spec.volumes.run("dagster").checkpoint
    assert [tuple(v) for v in values] == [(s, round(loss, 5)) for s, loss in curve(checkpoint)]
    assert_same_curve(curve(checkpoint), curve(single))


def test_local_backend_plans_torchrun_for_training_only(monkeypatch: pytest.MonkeyPatch) -> None:
    resource = MoleResource(config_dir=str(REPO / "config"), backend="local")
    monkeypatch.setenv("MOLE_TRAIN_PROCS", "2")
    torchrun = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2"
    assert resource.plan("router_checkpoint", "x")["command"] == (
        f"{torchrun} -m modal_jobs.stages.train"
    )
    evaluate = resource.plan("eval_report", "x")["command"]
    assert evaluate == f"{sys.executable} -m modal_jobs.launch.warm modal_jobs.stages.evaluate"
    monkeypatch.setenv("MOLE_WARM_STAGES", "0")
    evaluate = resource.plan("eval_report", "x")["command"]
    assert evaluate == f"{sys.executable} -m modal_jobs.stages.evaluate"
    monkeypatch.setenv("MOLE_TRAIN_PROCS", "two")
    with pytest.raises(ConfigError, match="MOLE_TRAIN_PROCS='two' is not a process count"):
        resource.plan("router_checkpoint", "x")
