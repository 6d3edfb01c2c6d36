"""Fault injection: kill -9 during stages, a full disk, damaged files, decompression bombs.

Each case asserts what a reader then sees: the previous complete artifact or the new complete
one, never a partial one, and that the next run recovers. Kills land at a known point: the
stage runs with `MOLE_TEST_PAUSE_AT` (modal_jobs/atomic.py), writes a marker there and pauses,
and the marker says where it was when it died.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from modal_jobs.atomic import PAUSE_AT
from modal_jobs.config import load_config
from modal_jobs.layout import Volumes
from modal_jobs.serving import registry as deployments
from modal_jobs.stage import StageSpec
from modal_jobs.stages import dataset, deploy, evaluate, shards, train

from .conftest import REPO, MakeConfig, copy_experts, write_config

RUN = "reliability"


@dataclass
class Prepared:
    spec: StageSpec
    spec_file: Path


@pytest.fixture(scope="module")
def prepared(
    tmp_path_factory: pytest.TempPathFactory, experts_dir: Path, tiny_base: str
) -> Prepared:
    """A run with dataset and shards written (in-process), ready for the later stages."""
    root = tmp_path_factory.mktemp("reliability")
    # No expert adapters: these tests are about the router's artifacts.
    config_dir = write_config(
        root / "config", experts_dir, count=24, min_accuracy=0.0, expert_adapters=False
    )
    volumes = Volumes.local()  # the session MOLE_HOME, where the tiny base is cached
    spec = StageSpec(run=RUN, config=load_config(config_dir), volumes=volumes)
    dataset.run(spec)
    shards.run(spec)
    spec_file = root / "spec.json"
    spec_file.write_text(json.dumps(spec.model_dump(mode="json")))
    return Prepared(spec, spec_file)


def stage_process(
    stage: str, spec: dict[str, Any], spec_file: Path, pause: tuple[str, Path] | None = None
) -> subprocess.Popen[str]:
    """The stage in a subprocess; with `pause=(point, marker)` it stops at that point."""
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ)
    if pause is not None:
        env[PAUSE_AT] = f"{pause[0]}@{pause[1]}"
    return subprocess.Popen(
        [sys.executable, "-m", f"modal_jobs.stages.{stage}", "--spec", str(spec_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def kill_at_marker(process: subprocess.Popen[str], point: str, marker: Path) -> dict[str, Any]:
    """Wait until the stage pauses at `point`, kill -9 it there; return what its marker says."""
    try:
        wait_for(marker.is_file, process)
        where: dict[str, Any] = json.loads(marker.read_text())
        # Still alive after writing the marker: it is sleeping at that point when killed.
        assert process.poll() is None, "stage went on past its pause"
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert where["point"] == point and where["pid"] == process.pid
    marker.unlink()
    return where


def finish(stage: str, spec: dict[str, Any], spec_file: Path) -> str:
    """Run the stage to the end (no pause); its output."""
    process = stage_process(stage, spec, spec_file)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def wait_for(predicate: Any, process: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, "stage finished before the fault could be injected"
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_kill_during_training_resumes_from_newest_point(prepared: Prepared, tmp_path: Path) -> None:
    layout = prepared.spec.layout
    spec = {**prepared.spec.model_dump(mode="json"), "steps": 40, "checkpoint_every": 10}
    spec_file = tmp_path / "train.json"
    marker = tmp_path / "marker.json"
    process = stage_process("train", spec, spec_file, ("resume-point", marker))
    where = kill_at_marker(process, "resume-point", marker)
    # Killed right after the first resume point (step 10), before step 11 finished.
    assert where["step"] == 10 and Path(where["path"]) == layout.resume / "step-0000010"
    assert not (layout.checkpoint / "adapter_model.safetensors").exists()
    assert [p.name for p in layout.resume.iterdir()] == ["step-0000010"]
    state = json.loads((layout.resume / "step-0000010" / "state.json").read_text())
    assert [s for s, _ in state["curve"]] == list(range(1, 11))

    output = finish("train", spec, spec_file)
    assert re.search(r"resumed from .*step-0000010 \(step 10\)", output)
    summary = json.loads((layout.checkpoint / "training_summary.json").read_text())
    assert summary["resumed_from"] == 10 and summary["steps"] == 40
    curve = json.loads((layout.checkpoint / "loss_curve.json").read_text())
    assert [s for s, _ in curve] == list(range(1, 41))  # the whole run, not only steps 11-40
    assert curve[:10] == state["curve"]
    assert not layout.resume.exists()  # resume points are dropped once the adapter is published
    evaluate.run(prepared.spec)  # the published adapter loads and evaluates


def test_damaged_resume_point_falls_back_to_the_one_before(prepared: Prepared) -> None:
    import torch
    from peft import get_peft_model

    from modal_jobs.artifacts import read_index
    from modal_jobs.ml.model import Runtime, load_base, lora_config
    from modal_jobs.ml.optim import adamw
    from modal_jobs.stages.train import resume, save_state

    base = read_index(prepared.spec.layout.shards)["base"]
    model = get_peft_model(
        load_base(base, Runtime.detect()), lora_config(prepared.spec.config.preset.lora)
    )
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer, scheduler = adamw(list(trainable.values()), 1e-3, 0, 10)

    def train_steps(n: int) -> None:
        for _ in range(n):
            loss = sum((p * torch.randn_like(p)).sum() for p in trainable.values())
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

    def snapshot() -> dict[str, Any]:
        moments = [optimizer.state[p]["exp_avg"].clone() for p in trainable.values()]
        weights = {n: p.detach().clone() for n, p in trainable.items()}
        return {"weights": weights, "moments": moments, "rng": torch.get_rng_state()}

    root = prepared.spec.layout.root / "damaged_state"
    train_steps(3)
    save_state(root, 3, model, optimizer, scheduler)
    at_3 = snapshot()
    train_steps(3)
    save_state(root, 6, model, optimizer, scheduler)
    at_6 = snapshot()
    for name, weight in at_3["weights"].items():  # the two points really differ
        assert not torch.equal(weight, at_6["weights"][name]), name
    newest = root / "step-0000006" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    assert resume(root, model, optimizer, scheduler).step == 3
    assert scheduler.last_epoch == 3
    for name, param in trainable.items():
        assert torch.equal(param.detach(), at_3["weights"][name]), name
    for param, moment in zip(trainable.values(), at_3["moments"], strict=True):
        assert torch.equal(optimizer.state[param]["exp_avg"], moment)
        assert int(optimizer.state[param]["step"]) == 3
    assert torch.equal(torch.get_rng_state(), at_3["rng"])


def _registry_is_consistent(volumes: Volumes) -> None:
    registry = deployments.read_registry(volumes)
    if registry["current"] is None:
        return
    folder = volumes.routers / registry["current"]
    for name in (*deploy.ADAPTER_FILES, "router.json", "report.json"):
        assert (folder / name).is_file(), f"current router lacks {name}"
    visible = [p.name for p in volumes.routers.iterdir() if not p.name.startswith(".")]
    for name in visible:
        assert (volumes.routers / name / "router.json").is_file(), f"partial router {name}"


def _seeded_inference(seed: Path, target: Path, spec: StageSpec) -> StageSpec:
    import shutil

    shutil.copytree(seed, target)
    volumes = Volumes(spec.volumes.data, target, spec.volumes.models)
    return spec.model_copy(update={"volumes": volumes})


def test_kill_during_deploy_never_serves_a_mix_and_rollback_restores(
    prepared: Prepared, tmp_path: Path
) -> None:
    _ensure_report(prepared)
    # Seed: an inference volume whose current router is "previous-000" (a complete copy).
    seed_spec = _seeded_inference_empty(tmp_path / "seed", prepared.spec)
    deploy.run(seed_spec)
    version = deployments.read_registry(seed_spec.volumes)["current"]
    (seed_spec.volumes.routers / version).rename(seed_spec.volumes.routers / "previous-000")
    seed_spec.volumes.registry.write_text(
        json.dumps(
            {
                "current": "previous-000",
                "history": [{"version": "previous-000", "deployed_at": "x"}],
            }
        )
    )
    marker = tmp_path / "marker.json"
    # Killed with the new router staged whole (before its rename), then with it in place but
    # the registry's new text staged (before that rename): both times the old one is served.
    points = (f"rename:{version}", f"rename:{seed_spec.volumes.registry.name}")
    for n, point in enumerate(points):
        spec = _seeded_inference(tmp_path / "seed", tmp_path / f"kill{n}", prepared.spec)
        payload = spec.model_dump(mode="json")
        process = stage_process("deploy", payload, tmp_path / "deploy.json", (point, marker))
        where = kill_at_marker(process, point, marker)
        assert Path(where["staging"]).parent == (
            spec.volumes.routers if n == 0 else spec.volumes.inference
        )
        assert deployments.read_registry(spec.volumes)["current"] == "previous-000"
        assert (spec.volumes.routers / version / "router.json").is_file() == (n == 1)
        _registry_is_consistent(spec.volumes)
        finish("deploy", payload, tmp_path / "deploy.json")  # the re-run deploys
        assert deployments.read_registry(spec.volumes)["current"] == version
        _registry_is_consistent(spec.volumes)
        assert not Path(where["staging"]).exists()
    assert deployments.rollback(spec.volumes) == "previous-000"
    _registry_is_consistent(spec.volumes)


def _seeded_inference_empty(target: Path, spec: StageSpec) -> StageSpec:
    volumes = Volumes(spec.volumes.data, target, spec.volumes.models)
    return spec.model_copy(update={"volumes": volumes})


def _ensure_report(prepared: Prepared) -> None:
    if not (prepared.spec.layout.checkpoint / "adapter_model.safetensors").is_file():
        train.run(train.TrainSpec(**prepared.spec.model_dump(), mode="test"))
    if not (prepared.spec.layout.report / "report.json").is_file():
        evaluate.run(prepared.spec)


# (stage module, artifact folder attribute, the file that lists a complete artifact's parts)
KILLABLE = [
    ("dataset", "dataset", "manifest.json"),
    ("shards", "shards", "index.json"),
    ("evaluate", "report", "report.json"),
]


@pytest.mark.parametrize(("stage", "folder", "index"), KILLABLE)
def test_kill_during_stage_leaves_a_whole_artifact(
    prepared: Prepared, tmp_path: Path, stage: str, folder: str, index: str
) -> None:
    _ensure_report(prepared)
    artifact: Path = getattr(prepared.spec.layout, folder)
    before = {p.name: p.stat().st_mtime_ns for p in artifact.iterdir()}
    listed = (artifact / index).read_text()
    spec, spec_file = prepared.spec.model_dump(mode="json"), tmp_path / "s.json"
    marker = tmp_path / "marker.json"
    point = f"rename:{artifact.name}"
    where = kill_at_marker(stage_process(stage, spec, spec_file, (point, marker)), point, marker)
    staging = Path(where["staging"])
    # It died with the new artifact staged whole beside the old one, which is untouched.
    json.loads((staging / index).read_text())
    assert {p.name: p.stat().st_mtime_ns for p in artifact.iterdir()} == before
    assert (artifact / index).read_text() == listed
    assert hidden_siblings(artifact) == [staging]

    finish(stage, spec, spec_file)
    json.loads((artifact / index).read_text())  # complete and parseable
    assert sorted(p.name for p in artifact.iterdir()) == sorted(before)
    assert hidden_siblings(artifact) == []  # the re-run swept what the killed one left


def hidden_siblings(artifact: Path) -> list[Path]:
    """Staging folders beside `artifact` (not the shards' chunk parts, kept for reuse)."""
    return [
        p
        for p in artifact.parent.iterdir()
        if p.name.startswith(f".{artifact.name}") and not p.name.endswith(".parts")
    ]


def test_full_disk_leaves_nothing_partial(
    tmp_path: Path, experts_dir: Path, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    experts = copy_experts(experts_dir, tmp_path / "experts")
    spec = StageSpec(
        run="disk",
        config=load_config(make_config(experts=experts, count=6)),
        volumes=Volumes.local(tmp_path / "home"),
    )
    calls = {"n": 0}
    real_copy = dataset.shutil.copyfile

    def copy_until_full(source: Any, target: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(source, target)

    monkeypatch.setattr(dataset.shutil, "copyfile", copy_until_full)
    with pytest.raises(OSError, match="No space left"):
        dataset.run(spec)
    parent = spec.layout.dataset.parent
    assert not parent.exists() or list(parent.iterdir()) == []


def test_decompression_bomb_is_rejected_without_decoding(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(bomb)  # tiny file, 144 megapixels
    problem = dataset.decode_problem(bomb)
    assert problem is not None and "exceeds" in problem


def test_no_pickle_loading_anywhere() -> None:
    sources = [p for folder in ("modal_jobs", "mole_assets") for p in (REPO / folder).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        assert "import pickle" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
