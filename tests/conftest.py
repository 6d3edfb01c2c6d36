"""Shared fixtures: one MOLE_HOME per test session (the tiny base is built once), demo experts,
and per-test config dirs and Dagster instances in temp folders."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from modal_jobs.demo_data import write_demo_data
from modal_jobs.launch import warm, warm_server

REPO = Path(__file__).resolve().parents[1]
PER_EXPERT = 24
# Screens of no expert per test run (the demo draws 120): two of each kind in each part.
OOD_COUNT = 24


@pytest.fixture(scope="session", autouse=True)
def mole_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A session-wide MOLE_HOME so the cached tiny base is built once.

    Warm stage servers (`modal_jobs/launch/warm.py`) started by the session live in a folder of
    its own (a short path: socket paths are limited) and are stopped at its end.
    """
    home = tmp_path_factory.mktemp("mole_home")
    names = ("MOLE_HOME", "DAGSTER_HOME", "MOLE_CONFIG_DIR", warm.DIR_ENV)
    old = {k: os.environ.get(k) for k in names}
    os.environ["MOLE_HOME"] = str(home)
    servers = Path(tempfile.mkdtemp(prefix="mole-warm-"))
    os.environ[warm.DIR_ENV] = str(servers)
    yield home
    warm_server.stop_servers(servers)
    shutil.rmtree(servers, ignore_errors=True)
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def experts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic expert datasets (PER_EXPERT samples each), shared read-only by tests."""
    out = tmp_path_factory.mktemp("experts")
    write_demo_data(out, PER_EXPERT, seed=5)
    return out


MakeConfig = Callable[..., Path]


def write_config(
    target: Path,
    experts: Path,
    count: int = PER_EXPERT,
    min_accuracy: float | None = None,
    dataset: dict[str, Any] | None = None,
    expert_adapters: bool = True,
) -> Path:
    """Copy config/ to `target`, pointing at `experts` with `count` samples per expert.

    `min_accuracy` overrides the router's gate; without `expert_adapters` loras.json registers
    none (for tests about the router's own artifacts).
    """
    shutil.copytree(REPO / "config", target, dirs_exist_ok=True)
    data = yaml.safe_load((target / "dataset.yaml").read_text())
    data["experts_dir"] = str(experts)
    data["experts"] = {name: {**spec, "count": count} for name, spec in data["experts"].items()}
    data["ood"] = {"count": OOD_COUNT, "val_fraction": 0.5}
    data.update(dataset or {})
    (target / "dataset.yaml").write_text(yaml.safe_dump(data))
    loras = json.loads((target / "loras.json").read_text())
    if min_accuracy is not None:
        loras["router"]["min_accuracy"] = min_accuracy
    if not expert_adapters:
        loras["experts"] = {}
    (target / "loras.json").write_text(json.dumps(loras))
    return target


@pytest.fixture
def make_config(tmp_path: Path, experts_dir: Path) -> MakeConfig:
    """Copy config/ into a temp dir, pointing at `experts` (default: the demo experts)."""

    def make(
        experts: Path | None = None,
        count: int = PER_EXPERT,
        min_accuracy: float = 0.0,
        dataset: dict[str, Any] | None = None,
    ) -> Path:
        return write_config(
            tmp_path / "config", experts or experts_dir, count, min_accuracy, dataset
        )

    return make


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh Dagster instance directory for this test."""
    home = tmp_path / "dagster"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def copy_experts(source: Path, target: Path) -> Path:
    """A private, writable copy of expert datasets (for tests that corrupt them)."""
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="session")
def tiny_base(mole_home: Path) -> str:
    """Build (once per session) and return the cached tiny base the graph runs on.

    `MOLE_TEST_MODELS=<a models volume>` (e.g. `.mole/volumes/moe-lora-hf-cache` after `make
    demo`) seeds the session from bases built before; a base is reused only if its recipe hash
    matches, so a stale one is rebuilt as usual.
    """
    from modal_jobs.config import load_config
    from modal_jobs.layout import Volumes
    from modal_jobs.ml.presets import resolve_base

    config = load_config(REPO / "config")
    models = Volumes.local(mole_home).models
    seed = os.environ.get("MOLE_TEST_MODELS")
    if seed and (Path(seed) / "presets").is_dir() and not (models / "presets").exists():
        shutil.copytree(Path(seed) / "presets", models / "presets")
    return resolve_base(config.loras.base_model, config.preset, models)


def fresh_instance(root: Path, run: str) -> Any:
    """A Dagster instance in `root/dagster` (made the process's DAGSTER_HOME) holding `run`."""
    import dagster as dg

    from mole_assets.partitions import RUN_NAMES

    os.environ["DAGSTER_HOME"] = str(root / "dagster")
    (root / "dagster").mkdir()
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(RUN_NAMES, [run])
    return instance


def materialize(
    instance: Any,
    config_dir: Path,
    selection: Any,
    run: str,
    run_config: dict[str, Any] | None = None,
) -> Any:
    """`dg.materialize` of `selection` for partition `run` with the config in `config_dir`."""
    import dagster as dg

    from modal_jobs.config import load_config
    from mole_assets.assets import router_assets
    from mole_assets.resources import MoleResource

    return dg.materialize(
        router_assets(load_config(config_dir)),
        instance=instance,
        partition_key=run,
        selection=selection,
        resources={"mole": MoleResource(config_dir=str(config_dir))},
        run_config=run_config or {},
        raise_on_error=False,
    )


def observe_experts(instance: Any, config_dir: Path) -> Any:
    """The `observe_expert_datasets` job, in process, over the experts `config_dir` names.

    A failure is returned in the result, not raised.
    """
    import dagster as dg

    from modal_jobs.config import load_config
    from mole_assets.assets import router_assets
    from mole_assets.jobs import observe_experts_job
    from mole_assets.resources import MoleResource

    defs = dg.Definitions(
        assets=router_assets(load_config(config_dir)),
        jobs=[observe_experts_job],
        resources={"mole": MoleResource(config_dir=str(config_dir))},
    )
    job = defs.resolve_job_def(observe_experts_job.name)
    return job.execute_in_process(instance=instance, raise_on_error=False)


TRAINED_RUN = "serve-test"
# Enough router steps on the small test data to route held-out screens reliably (test mode's
# 8 steps on 48 samples is near chance); the demo experts only need to exist here.
TRAINED_RUN_CONFIG = {
    "ops": {
        "router_checkpoint": {"config": {"mode": "full", "steps": 240}},
        "expert_adapters": {"config": {"mode": "test"}},
    }
}


@dataclass
class TrainedRun:
    """Run `TRAINED_RUN` of the whole graph, trained to route and deployed, in its own instance."""

    root: Path
    config_dir: Path

    @property
    def dagster_home(self) -> Path:
        """The run's Dagster instance folder (`fresh_instance` made it)."""
        return self.root / "dagster"


@pytest.fixture(scope="session")
def trained_run(
    tmp_path_factory: pytest.TempPathFactory, experts_dir: Path, tiny_base: str
) -> TrainedRun:
    """The run `tests/test_serve.py` serves and `tests/test_ui.py` shows in a browser.

    The expert datasets are observed first, so that their data versions chain to the report.
    """
    import dagster as dg

    root = tmp_path_factory.mktemp("trained")
    instance = fresh_instance(root, TRAINED_RUN)
    config_dir = write_config(root / "config", experts_dir, min_accuracy=0.0)
    assert observe_experts(instance, config_dir).success
    selection = dg.AssetSelection.assets("deployed_router").upstream()
    result = materialize(instance, config_dir, selection, TRAINED_RUN, TRAINED_RUN_CONFIG)
    assert result.success
    return TrainedRun(root, config_dir)
