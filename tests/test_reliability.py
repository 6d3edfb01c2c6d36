"""Fault injection: kill -9 during stages, a full disk, damaged files, decompression bombs.

Each case asserts what a reader then sees: the previous complete artifact or the new complete
one, never a partial one, and that the next run recovers.
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


def stage_process(stage: str, spec: dict[str, Any], spec_file: Path) -> subprocess.Popen[str]:
    spec_file.write_text(json.dumps(spec))
    return subprocess.Popen(
        [sys.executable, "-m", f"modal_jobs.stages.{stage}", "--spec", str(spec_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(predicate: Any, process: subprocess.Popen[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, "stage finished before the fault could be injected"
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_kill_during_training_resumes_from_newest_point(prepared: Prepared) -> None:
    layout = prepared.spec.layout
    spec = {**prepared.spec.model_dump(mode="json"), "steps": 40, "checkpoint_every": 10}
    process = stage_process("train", spec, prepared.spec_file.with_name("train.json"))
    wait_for(
        lambda: any((p / "state.json").is_file() for p in layout.resume.glob("step-*")), process
    )
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (layout.checkpoint / "adapter_model.safetensors").exists()
    points = sorted(p.name for p in layout.resume.glob("step-*"))
    newest = int(points[-1].split("-")[1])
    finished = stage_process("train", spec, prepared.spec_file.with_name("train.json"))
    output, _ = finished.communicate(timeout=600)
    assert finished.returncode == 0, output[-3000:]
    assert re.search(rf"resumed from .*step-0*{newest} \(step {newest}\)", output)
    summary = json.loads((layout.checkpoint / "training_summary.json").read_text())
    assert summary["resumed_from"] == newest and summary["steps"] == 40
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
    optimizer, scheduler = adamw([p for p in model.parameters() if p.requires_grad], 1e-3, 0, 10)
    root = prepared.spec.layout.root / "damaged_state"
    save_state(root, 3, model, optimizer, scheduler)
    save_state(root, 6, model, optimizer, scheduler)
    newest = root / "step-0000006" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    assert resume(root, model, optimizer, scheduler) == 3
    assert torch.is_tensor(next(iter(model.parameters())))


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
    began = time.monotonic()
    clean = _seeded_inference(tmp_path / "seed", tmp_path / "clean", prepared.spec)
    process = stage_process("deploy", clean.model_dump(mode="json"), tmp_path / "deploy.json")
    assert process.wait(timeout=300) == 0
    duration = time.monotonic() - began
    assert deployments.read_registry(clean.volumes)["current"] == version
    for step, fraction in enumerate((0.6, 0.8, 0.9, 0.95, 0.98)):
        spec = _seeded_inference(tmp_path / "seed", tmp_path / f"kill{step}", prepared.spec)
        process = stage_process("deploy", spec.model_dump(mode="json"), tmp_path / "deploy.json")
        time.sleep(duration * fraction)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert deployments.read_registry(spec.volumes)["current"] in ("previous-000", version)
        _registry_is_consistent(spec.volumes)
    assert deployments.rollback(clean.volumes) == "previous-000"
    _registry_is_consistent(clean.volumes)


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
    before = sorted(p.name for p in artifact.iterdir())
    for delay in (1.5, 3.0, 4.5, 6.0):
        process = stage_process(stage, prepared.spec.model_dump(mode="json"), tmp_path / "s.json")
        time.sleep(delay)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        json.loads((artifact / index).read_text())  # complete and parseable
        assert sorted(p.name for p in artifact.iterdir()) == before
        # Hidden siblings: staging folders (swept by the next write) and the shards' chunk parts.
        leftovers = [
            p
            for p in artifact.parent.iterdir()
            if p.name.startswith(f".{artifact.name}") and not p.name.endswith(".parts")
        ]
        assert all(".tmp-" in p.name for p in leftovers), leftovers
        assert len(leftovers) <= 1  # the next write sweeps the ones left by killed processes


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
