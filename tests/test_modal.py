"""The Modal backend, offline: the app's declarations, `--dry`, the GPU image, and the whole graph
on the emulated cloud (`tests/modal_emulator`, a stand-in for Modal's) through the real
`dagster_modal.ModalClient`, compared with the local backend."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import modal
import pytest
import torch
from safetensors.torch import load_file

from modal_jobs.config import load_config
from modal_jobs.launch import cloud, compute, warm
from modal_jobs.launch.modal_cli import ENV_BIN, modal_env
from modal_jobs.launch.table import STAGES
from modal_jobs.layout import DATA_VOLUME, HF_CACHE_VOLUME, INFERENCE_VOLUME, Volumes
from modal_jobs.stage import StageSpec
from modal_jobs.stages.train import TrainSpec
from mole_assets.assets import router_assets
from mole_assets.cli import main
from mole_assets.partitions import RUN_NAMES
from mole_assets.resources import MoleResource

from . import modal_emulated
from .conftest import REPO, MakeConfig, copy_experts, write_config
from .modal_emulator import Cloud, unavailable
from .modal_emulator.cli import client_methods, load_app
from .modal_emulator.cloud import Declared
from .modal_emulator.image import ImageDefinition
from .test_serve import _call, _metrics

NO_CONTAINERS = unavailable()
# Rows of the resource table that are web endpoints, not `@app.function`s of the stages.
WEB_ENDPOINTS = {"tensorboard", "serve"}
# The first test that uses `graphs` runs the whole graph twice (emulated Modal, local); on a
# loaded machine that outlasts the suite's per-test timeout.
on_the_graphs = pytest.mark.timeout(3600)
needs_containers = pytest.mark.skipif(
    NO_CONTAINERS is not None, reason=f"emulated Modal containers: {NO_CONTAINERS}"
)


# --- the app's functions: built from the one resource table ----------------------------------


def restore_app_decorators(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo, after the test, the emulator's recording of `app.function` / `app.cls`."""
    monkeypatch.setattr(modal.App, "function", modal.App.function)
    monkeypatch.setattr(modal.App, "cls", modal.App.cls)


def _load_app(monkeypatch: pytest.MonkeyPatch, gpu: str) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Import mole_app afresh under `MOLE_MODAL_GPU=gpu`, recording every decorator's kwargs."""
    monkeypatch.setenv(compute.GPU_ENV, gpu)
    recorded: dict[str, dict[str, Any]] = {}
    original = modal.App.function

    def recording(self: modal.App, *args: Any, **kwargs: Any) -> Any:
        decorate = original(self, *args, **kwargs)

        def wrapper(raw: Any) -> Any:
            recorded[getattr(raw, "__name__", "?")] = kwargs
            return decorate(raw)

        return wrapper

    monkeypatch.setattr(modal.App, "function", recording)
    import modal_jobs.mole_app as mole_app

    return importlib.reload(mole_app), recorded


@pytest.mark.parametrize("gpu", ["H100", "A100-80GB:4"])
def test_modal_functions_match_resource_table(monkeypatch: pytest.MonkeyPatch, gpu: str) -> None:
    app, recorded = _load_app(monkeypatch, gpu)
    table = compute.functions()
    assert set(recorded) == set(table) - WEB_ENDPOINTS
    for name, kwargs in recorded.items():
        spec = table[name]
        function = getattr(app, name)
        assert isinstance(function, modal.Function)
        real = function._spec_  # what Modal itself stores for `modal shell` (offline-readable)
        assert real.gpus == kwargs["gpu"] == (str(spec.gpu) if spec.gpu else None), name
        assert real.cpu == kwargs["cpu"] == spec.cpu and real.memory == spec.memory_mib, name
        assert {str(m): v.name for m, v in real.volumes.items()} == {
            f"/vol/{v}": v for v in spec.volumes
        }, name
        assert [s.name for s in real.secrets] == list(spec.secrets), name
        assert kwargs["timeout"] == spec.timeout_s > 300, name  # Modal's default must never apply
        assert kwargs["retries"].max_retries == spec.retries >= 1, name
        assert kwargs["max_containers"] == spec.max_containers, name
        assert kwargs["image"] is app.IMAGES[spec.image], name
    assert recorded["train_router"]["gpu"] == gpu
    assert recorded["deploy_router"]["max_containers"] == 1  # deploys never interleave
    assert {v.name for v in app.VOLUMES.values()} == {
        DATA_VOLUME,
        INFERENCE_VOLUME,
        HF_CACHE_VOLUME,
    }


def test_every_asset_has_a_local_module_and_a_modal_launch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    restore_app_decorators(monkeypatch)
    app, declared = load_app(str(REPO / compute.APP_FILE))
    assets = {
        a.key.to_user_string(): a
        for a in router_assets(load_config(REPO / "config"))
        if isinstance(a, dg.AssetsDefinition)
    }
    assert set(STAGES) == set(assets)
    table = compute.functions()
    for asset, stage in STAGES.items():
        spec = importlib.util.find_spec(f"modal_jobs.stages.{stage.module}")
        assert spec is not None and spec.origin, asset
        assert 'if __name__ == "__main__":' in Path(spec.origin).read_text(), asset
        assert type(getattr(app, stage.entrypoint)).__name__ == "LocalEntrypoint", asset
        assert set(stage.functions) <= set(table) & set(declared), asset
        assert cloud.DRIVERS[asset], asset
        hints = typing.get_type_hints(assets[asset].op.compute_fn.decorated_fn)
        if stage.options is None:
            assert "config" not in hints, asset
        else:  # the Launchpad's config is the options model
            assert issubclass(hints["config"], stage.options), asset


def test_dry_with_modal_backend_lists_all_six_stages(
    tmp_path: Path,
    dagster_home: Path,
    make_config: MakeConfig,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MOLE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MOLE_CONFIG_DIR", str(make_config()))
    monkeypatch.setenv("MOLE_BACKEND", "modal")
    _, recorded = _load_app(monkeypatch, "H100:8")
    assert main(["materialize", "dry-modal", "--dry"]) == 0
    plans = {
        asset: json.loads(plan)
        for asset, plan in (line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    }
    assert sorted(plans) == sorted(STAGES)
    assert [a for a, p in plans.items() if not p["selected"]] == ["deployed_router"]
    table = compute.functions()
    for asset, plan in plans.items():
        assert plan["launcher"] == "dagster_modal.ModalClient", asset
        assert plan["command"] == f"modal run modal_jobs/mole_app.py::{STAGES[asset].entrypoint}"
        assert plan["run_root"] == "/vol/moe-lora-data/runs/dry-modal"
        for described in plan["functions"]:
            kwargs = recorded[described["function"]]
            assert described == table[described["function"]].describe()
            assert described["gpu"] == kwargs["gpu"] and described["timeout_s"] == kwargs["timeout"]
            assert described["volumes"] == {v.name: str(m) for m, v in kwargs["volumes"].items()}
    assert plans["router_checkpoint"]["functions"][0]["gpu"] == "H100:8"
    assert plans["expert_adapters"]["functions"][0]["function"] == "train_experts"
    assert not (tmp_path / "home").exists()


def test_gpu_parse_rejects_nonsense() -> None:
    assert str(compute.Gpu.parse("h100:8")) == "H100:8"
    for bad in ("", "H100:x", "H100:0"):
        with pytest.raises(ValueError, match="MOLE_MODAL_GPU"):
            compute.Gpu.parse(bad)


# --- the images --------------------------------------------------------------------------------


def test_gpu_image_torch_cuda_matches_toolkit_and_flash_attn_sees_max_jobs() -> None:
    import torch

    import modal_jobs.mole_app as mole_app

    image = ImageDefinition.of(mole_app.gpu_image)
    toolkit = image.base_cuda_major()
    assert toolkit is not None and image.torch_cuda_major() == toolkit
    assert int(image.env_before("flash-attn")["MAX_JOBS"]) >= 1
    image.check_builds()  # what the emulator's `modal run` refuses otherwise
    # The tests' own torch is the pinned build from that index: its CUDA is the image's.
    if f"torch=={torch.__version__.split('+')[0]}" in mole_app.TORCH and torch.version.cuda:
        assert int(torch.version.cuda.split(".")[0]) == toolkit


IMPORT_MODULES = """
import importlib, json, pkgutil, sys
import modal_jobs
names = sys.argv[1:] or [
    info.name
    for info in pkgutil.walk_packages(modal_jobs.__path__, "modal_jobs.")
    if not info.name.endswith("__main__")
]
missing = {}
for name in names:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing[name] = exc.name
print(json.dumps(missing))
"""


def _import_modules(packages: Path, sources: Path, *names: str) -> dict[str, str]:
    """Import `names` (default: every `modal_jobs` module) as a container would: `/root` and
    the image's site folder only. Returns each module that failed and the module it lacked."""
    done = subprocess.run(
        [sys.executable, "-P", "-S", "-c", IMPORT_MODULES, *names],
        env={
            "PATH": os.environ["PATH"],
            "HOME": str(sources),
            "PYTHONPATH": f"{sources}:{packages}",
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout))


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_every_module_of_the_project_imports_in_each_image(kind: str, tmp_path: Path) -> None:
    """A container has only what its image pip-installs (the emulator's site folder), as on
    Modal: the evaluation stage's `pandas` and the serving app's `starlette` must be there."""
    import modal_jobs.mole_app as mole_app

    from .modal_emulator.image import site_folder

    image = ImageDefinition.of(mole_app.IMAGES[kind])
    assert "modal_jobs" in image.python_sources
    shutil.copytree(REPO / "modal_jobs", tmp_path / "root" / "modal_jobs")  # `/root`'s copy
    packages = site_folder(image, tmp_path / "images")
    assert (packages / "torch").is_dir() and not (packages / "dagster").exists()
    assert _import_modules(packages, tmp_path / "root") == {}
    # The check can fail: an image without pandas cannot import the eval stage.
    (packages / "pandas").unlink()
    evaluate = "modal_jobs.stages.evaluate"
    assert _import_modules(packages, tmp_path / "root", evaluate) == {evaluate: "pandas"}


def test_container_sees_the_training_gpu_count_without_the_callers_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, _ = _load_app(monkeypatch, "H100:8")
    env = ImageDefinition.of(app.gpu_image).env()
    # A container imports the app again with only the image's environment.
    seen = subprocess.run(
        [sys.executable, "-c", "import modal_jobs.mole_app as a; print(a.TRAIN.gpu)"],
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert seen.stdout.strip() == "H100:8"


def test_modal_cli_found_when_the_venv_is_not_on_path() -> None:
    env = modal_env({"PATH": "/usr/bin:/bin"})
    assert shutil.which("modal", path=env["PATH"]) == str(Path(ENV_BIN) / "modal")
    assert modal_env({"PATH": f"/first:{ENV_BIN}"})["PATH"] == f"/first:{ENV_BIN}"


# --- the emulated cloud -----------------------------------------------------------------------


def _client(monkeypatch: pytest.MonkeyPatch, emulated: Cloud) -> None:
    for cls, attribute, replacement in client_methods(emulated):
        monkeypatch.setattr(cls, attribute, replacement)


def test_first_upload_to_a_fresh_volume_then_unchanged_files_skipped_emulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulated = Cloud(tmp_path / "cloud")
    _client(monkeypatch, emulated)
    volume = modal.Volume.from_name(DATA_VOLUME, create_if_missing=True)
    with pytest.raises(FileNotFoundError):  # what the real client raises for a missing file
        b"".join(volume.read_file("runs/r/routing_dataset/.uploaded.json"))
    local = tmp_path / "dataset"
    (local / "images").mkdir(parents=True)
    (local / "train.jsonl").write_text("a\n")
    (local / "images" / "1.png").write_bytes(b"png1")
    (local / "images" / "2.png").write_bytes(b"png2")
    assert cloud.upload_tree(volume, local, "runs/r/routing_dataset") == (3, 0)
    assert cloud.upload_tree(volume, local, "runs/r/routing_dataset") == (0, 3)
    (local / "train.jsonl").write_text("b\n")
    (local / "images" / "2.png").unlink()
    assert cloud.upload_tree(volume, local, "runs/r/routing_dataset") == (1, 1)
    remote = emulated.volume(DATA_VOLUME) / "runs/r/routing_dataset"
    assert (remote / "train.jsonl").read_text() == "b\n"
    assert not (remote / "images" / "2.png").exists()


@needs_containers
def test_tensorboard_app_imports_and_serves_in_an_emulated_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.request

    restore_app_decorators(monkeypatch)
    monkeypatch.syspath_prepend(str(REPO))
    _, declared = load_app(str(REPO / compute.TENSORBOARD_APP_FILE))
    board = declared["tensorboard"]
    assert board.volumes() == {"/vol/moe-lora-data": DATA_VOLUME}
    with (
        Cloud(tmp_path / "cloud").serve(board) as url,
        urllib.request.urlopen(f"{url}/data/environment", timeout=30) as response,
    ):
        assert response.status == 200
        assert json.loads(response.read())["data_location"] == "/vol/moe-lora-data/runs"


@needs_containers
def test_tensorboard_app_shows_a_run_committed_after_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time
    import urllib.request

    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.setenv(compute.WEB_RELOAD_ENV, "1")
    restore_app_decorators(monkeypatch)
    monkeypatch.syspath_prepend(str(REPO))
    _, declared = load_app(str(REPO / compute.TENSORBOARD_APP_FILE))
    emulated = Cloud(tmp_path / "cloud")

    def runs(url: str) -> list[str]:
        with urllib.request.urlopen(f"{url}/data/runs", timeout=30) as response:
            return list(json.loads(response.read()))

    with emulated.serve(declared["tensorboard"]) as url:
        assert runs(url) == []
        with SummaryWriter(str(tmp_path / "events")) as writer:
            writer.add_scalar("train/loss", 1.0, 1)
        (events,) = (tmp_path / "events").iterdir()
        # A training container's commit, as far as the board can tell: the volume changes
        # under it, and it sees the change only once it reloads.
        emulated.store.apply_upload(
            DATA_VOLUME, {f"runs/later/tensorboard/{events.name}": events.read_bytes()}, False
        )
        deadline = time.monotonic() + 120
        while runs(url) != ["later/tensorboard"]:
            assert time.monotonic() < deadline, "the board never showed the new run"
            time.sleep(0.5)


# --- the whole graph on the emulated cloud, and on the local backend ------------------------


@dataclass
class Graph:
    """One run of the whole graph: its root, the JSON line and the metadata/check details."""

    root: Path
    line: dict[str, Any]
    details: dict[str, Any]

    @property
    def cloud(self) -> Cloud:
        return Cloud(self.root / "cloud")

    def data(self, backend: str) -> Path:
        if backend == "modal":
            return self.cloud.volume(DATA_VOLUME)
        return Volumes.local(self.root / "home").data


def _start_graph(root: Path, backend: str, models: Path, experts: Path) -> subprocess.Popen[str]:
    """`python -m tests.modal_emulated` for `backend` under `root`, started, not waited for."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.modal_emulated",
            "--root",
            str(root),
            "--backend",
            backend,
            "--models",
            str(models),
            "--details",
            str(root / "details.json"),
            "--experts",
            str(experts),
        ],
        cwd=REPO,
        env={
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MOLE_", "DAGSTER_")) or k == warm.DIR_ENV  # its servers
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _graph(root: Path, process: subprocess.Popen[str]) -> Graph:
    stdout, stderr = process.communicate(timeout=1800)
    assert process.returncode == 0, stderr[-6000:]
    (line,) = stdout.splitlines()  # one JSON line, nothing else
    return Graph(root, json.loads(line), json.loads((root / "details.json").read_text()))


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory, tiny_base: str) -> dict[str, Graph]:
    """`make modal-emulated`'s run, and the same graph on the local backend, side by side."""
    if NO_CONTAINERS:
        pytest.skip(f"emulated Modal containers: {NO_CONTAINERS}")
    from modal_jobs.demo_data import write_demo_data

    models = Path(tiny_base).parents[1]  # the session's HF cache volume, tiny base built
    experts = tmp_path_factory.mktemp("experts")  # one copy: the dataset records its paths
    write_demo_data(experts, modal_emulated.PER_EXPERT, seed=5)
    roots = {backend: tmp_path_factory.mktemp(backend) for backend in ("modal", "local")}
    # Two processes at once: each waits on its own subprocesses much of the time.
    started = {b: _start_graph(root, b, models, experts) for b, root in roots.items()}
    try:
        return {b: _graph(roots[b], process) for b, process in started.items()}
    finally:
        for process in started.values():
            process.kill()
            process.wait()


@on_the_graphs
def test_modal_emulated_prints_one_json_line_with_every_asset_ok(graphs: dict[str, Graph]) -> None:
    line = graphs["modal"].line
    assert line["run"] == "emulated"
    assert line["assets"] == {a: "ok" for a in modal_emulated.ASSETS}
    assert 0.0 <= line["accuracy"] <= 1.0
    assert line["registry_current"].startswith("emulated-")
    # Every stage ran in containers, expert adapters and evaluation included.
    started = {s["function"] for s in graphs["modal"].cloud.starts()}
    assert started == set(compute.functions()) - WEB_ENDPOINTS


@on_the_graphs
def test_modal_training_committed_mid_run_and_tensorboard_kept_every_step(
    graphs: dict[str, Graph],
) -> None:
    """The graph trains with resume points at steps 3 and 6: each commits the data volume while
    training goes on, which the emulated volume (as Modal's) refuses while an event file is open."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = graphs["modal"].data("modal") / "runs" / "emulated" / "tensorboard"
    assert len(list(board.glob("events.out.tfevents.*"))) == 3  # one per stretch of steps
    events = EventAccumulator(str(board))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert len(graphs["modal"].cloud.starts("train_router")) == 1  # no retry was needed


@on_the_graphs
def test_modal_graph_reports_the_local_backends_metadata_and_checks(
    graphs: dict[str, Graph],
) -> None:
    local, remote = graphs["local"].details, graphs["modal"].details
    assert remote["checks"] == local["checks"] and local["checks"]
    assert sorted(remote["metadata"]) == sorted(local["metadata"]) == sorted(STAGES)
    for asset, fields in local["metadata"].items():
        assert {k: t for k, (t, _) in fields.items()} == {
            k: t for k, (t, _) in remote["metadata"][asset].items()
        }, asset
        assert fields["compute_backend"][1] == "local", asset
        assert remote["metadata"][asset]["compute_backend"][1] == "modal", asset
    assert graphs["modal"].line["accuracy"] == graphs["local"].line["accuracy"]


@on_the_graphs
def test_screens_of_none_are_trained_on_and_the_reserved_answer_is_a_candidate(
    graphs: dict[str, Graph],
) -> None:
    """The emulated graph trains with `negatives`: rows, label token, score and router.json."""
    run = graphs["modal"].data("modal") / "runs" / modal_emulated.RUN
    train = [json.loads(line) for line in (run / "routing_dataset" / "train.jsonl").open()]
    negatives = [row for row in train if "expert" not in row]
    assert len(negatives) == modal_emulated.NEGATIVES
    assert {row["label"] for row in negatives} == {"none"}
    index = json.loads((run / "tokenized_shards" / "index.json").read_text())
    assert index["labels"]["none_label"] == "none"
    assert index["labels"]["none_token_id"] not in index["labels"]["token_ids"]
    report = json.loads((run / "eval_report" / "report.json").read_text())
    assert "none_answer" in report["ood"]["candidates"]
    inference = graphs["modal"].cloud.volume(INFERENCE_VOLUME)
    current = json.loads((inference / "registry.json").read_text())["current"]
    router = inference / "routers" / current
    deployed = json.loads((router / "router.json").read_text())
    assert deployed["labels"]["none_token_id"] == index["labels"]["none_token_id"]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@on_the_graphs
def test_modal_graph_data_byte_identical_and_weights_equal_to_local(
    graphs: dict[str, Graph],
) -> None:
    local = Volumes(graphs["local"].data("local"), Path(), Path()).run("emulated")
    remote = Volumes(graphs["modal"].data("modal"), Path(), Path()).run("emulated")
    dataset = _files(remote.dataset)
    assert dataset.pop(cloud.UPLOADED)  # the upload's own hash list
    assert dataset == _files(local.dataset)
    shards = [f for f in _files(local.shards) if f.endswith(".safetensors")]
    assert shards and all(
        (remote.shards / f).read_bytes() == (local.shards / f).read_bytes() for f in shards
    )
    # Trained weights agree to float32 noise, not always bit for bit: CPU training of identical
    # inputs (plain processes and emulated containers alike) took another rounding path in 2 of
    # 25 fresh processes measured on a 2-core machine, from the first step that reuses
    # cached vision outputs; the weights then differed by at most 1.8e-6 (largest |w| ≈ 0.14).
    weights = "adapter_model.safetensors"
    ours, theirs = (load_file(str(v.checkpoint / weights)) for v in (remote, local))
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-4, atol=1e-5, msg=name)
    curves = [json.loads((v.checkpoint / "loss_curve.json").read_text()) for v in (remote, local)]
    assert [s for s, _ in curves[0]] == [s for s, _ in curves[1]] == list(range(1, 9))
    assert [x for _, x in curves[0]] == pytest.approx([x for _, x in curves[1]], rel=1e-5)
    assert (
        json.loads((remote.report / "report.json").read_text())["confusion_matrix"]
        == (json.loads((local.report / "report.json").read_text())["confusion_matrix"])
    )
    registry = json.loads(
        (graphs["modal"].cloud.volume(INFERENCE_VOLUME) / "registry.json").read_text()
    )
    # A router's name carries its weights' hash: the same run, each backend's own weights.
    assert registry["current"] == graphs["modal"].line["registry_current"]
    sha = json.loads((remote.checkpoint / "training_summary.json").read_text())["adapter_sha256"]
    assert registry["current"] == f"emulated-{sha[:12]}"
    assert not list(remote.root.glob(".*parts*"))


# --- bad input fails once, wherever it is found ----------------------------------------------


def _materialize_on(
    emulated: Cloud,
    config_dir: Path,
    home: Path,
    run: str,
    selection: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> dg.ExecuteInProcessResult:
    """`selection` for `run` with MOLE_BACKEND=modal on `emulated`, in this process."""
    monkeypatch.setenv("PATH", f"{emulated.shim()}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(RUN_NAMES, [run])
    return dg.materialize(
        router_assets(load_config(config_dir)),
        instance=instance,
        partition_key=run,
        selection=selection,
        resources={
            "mole": MoleResource(config_dir=str(config_dir), home=str(home), backend="modal")
        },
        raise_on_error=False,
    )


def _attempts(result: dg.ExecuteInProcessResult) -> int:
    return sum(1 for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_START)


def _failure(result: dg.ExecuteInProcessResult) -> str:
    (event,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    return str(event.event_specific_data.error.message)  # type: ignore[union-attr]


@needs_containers
def test_bad_expert_dataset_on_modal_fails_once_with_file_and_line(
    tmp_path: Path, experts_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experts = copy_experts(experts_dir, tmp_path / "experts")
    broken = sorted(experts.rglob("*.jsonl"))[0]
    lines = broken.read_text().splitlines()
    broken.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    emulated = Cloud(tmp_path / "cloud")
    emulated.set_secret("huggingface", {"HF_TOKEN": "emulated-token"})  # else `modal run` stops
    config_dir = write_config(tmp_path / "config", experts)
    result = _materialize_on(
        emulated, config_dir, tmp_path / "home", "bad", ["routing_dataset"], monkeypatch
    )
    assert not result.success
    assert f"{broken}:2" in _failure(result)
    assert _attempts(result) == 1  # no Dagster retry
    assert emulated.starts() == []  # built in the entrypoint: no container


@needs_containers
@on_the_graphs
def test_damaged_split_on_the_volume_fails_once_in_one_container(
    graphs: dict[str, Graph], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulated = graphs["modal"].cloud
    runs = emulated.volume(DATA_VOLUME) / "runs"
    shutil.copytree(runs / "emulated" / "routing_dataset", runs / "damaged" / "routing_dataset")
    train = runs / "damaged" / "routing_dataset" / "train.jsonl"
    rows = train.read_text().splitlines()
    train.write_text("\n".join([*rows[:2], rows[2][:-7], *rows[3:]]) + "\n")
    before = len(emulated.starts("shards_plan"))
    result = _materialize_on(
        emulated,
        graphs["modal"].root / "config",
        tmp_path / "home",
        "damaged",
        ["tokenized_shards"],
        monkeypatch,
    )
    assert not result.success
    assert "/vol/moe-lora-data/runs/damaged/routing_dataset/train.jsonl:3" in _failure(result)
    assert _attempts(result) == 1
    assert len(emulated.starts("shards_plan")) == before + 1  # no modal.Retries either


# --- deployments: serialized across callers, rollback on the volume --------------------------


@needs_containers
@on_the_graphs
def test_two_concurrent_deploys_both_kept_and_rollback_on_emulated_modal(
    graphs: dict[str, Graph], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulated, root = graphs["modal"].cloud, graphs["modal"].root
    runs = emulated.volume(DATA_VOLUME) / "runs"
    config = load_config(root / "config")
    specs = []
    for twin in ("twin-a", "twin-b"):
        shutil.copytree(runs / "emulated", runs / twin)
        spec = StageSpec(run=twin, config=config, volumes=Volumes.local(tmp_path))
        specs.append(tmp_path / f"{twin}.json")
        specs[-1].write_text(spec.model_dump_json())
    env = {**os.environ, "PATH": f"{emulated.shim()}{os.pathsep}{os.environ['PATH']}"}
    # Make the two deploys' reload-to-commit windows overlap whenever both containers run at
    # once (without max_containers=1 one registry entry is then lost, every time).
    emulated.hold_commits("deploy_router", containers=2, seconds=20)
    # Two callers at once (two machines, as far as Modal is concerned).
    deploys = [
        subprocess.Popen(
            ["modal", "run", f"{compute.APP_FILE}::deploy", "--spec", str(spec)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for spec in specs
    ]
    for deploy in deploys:
        assert deploy.wait(600) == 0, deploy.stderr.read() if deploy.stderr else ""
    registry_file = emulated.volume(INFERENCE_VOLUME) / "registry.json"
    history = json.loads(registry_file.read_text())["history"]
    deployed = [entry["run"] for entry in history if "run" in entry]
    assert {"twin-a", "twin-b"} <= set(deployed) and deployed[0] == "emulated"
    last, before_last = deployed[-1], deployed[-2]
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("MOLE_BACKEND", "modal")
    assert main(["deploy", "--rollback"]) == 0  # `mole deploy --rollback`, on Modal
    current = json.loads(registry_file.read_text())["current"]
    assert current.startswith(f"{before_last}-") and not current.startswith(f"{last}-")


# --- serving: the Modal class mounts the same ASGI app as `mole serve` -------------------------


def _serving_class(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Declared]:
    """The app file imported as `modal run` does, and its serving class's declaration."""
    restore_app_decorators(monkeypatch)
    monkeypatch.syspath_prepend(str(REPO))
    app, declared = load_app(str(REPO / compute.APP_FILE))
    return app, declared["Server"]


def test_serving_class_is_declared_from_the_resource_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(compute.WEB_RELOAD_ENV, "7")
    mole_app, server = _serving_class(monkeypatch)
    row, options = compute.functions()["serve"], server.options
    assert options["gpu"] == str(row.gpu) and row.gpu is not None
    assert (options["cpu"], options["memory"], options["timeout"]) == (
        row.cpu,
        row.memory_mib,
        row.timeout_s,
    )
    assert server.volumes() == {
        "/vol/moe-lora-hf-cache": HF_CACHE_VOLUME,
        "/vol/moe-lora-inference": INFERENCE_VOLUME,
    }
    assert [s.name for s in options["secrets"]] == list(row.secrets)
    assert "retries" not in options  # Modal refuses retries on web endpoints
    image, gpu = ImageDefinition.of(options["image"]), ImageDefinition.of(mole_app.gpu_image)
    assert image.commands[: len(gpu.commands)] == gpu.commands  # the GPU image, one layer more
    assert image.env()[compute.WEB_RELOAD_ENV] == "7.0"  # travels to the container


@needs_containers
@on_the_graphs
def test_serving_class_on_emulated_modal_answers_and_swaps_in_a_newer_router(
    graphs: dict[str, Graph], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64
    import time

    import pandas as pd

    from modal_jobs.artifacts import read_split

    emulated, root = graphs["modal"].cloud, graphs["modal"].root
    monkeypatch.setenv(compute.WEB_RELOAD_ENV, "1")
    _, server = _serving_class(monkeypatch)
    runs = emulated.volume(DATA_VOLUME) / "runs"
    dataset = runs / "emulated" / "routing_dataset"
    registry_file = emulated.volume(INFERENCE_VOLUME) / "registry.json"
    serving = json.loads(registry_file.read_text())["current"]
    sample = read_split(dataset, "eval")[0]
    frame = pd.read_csv(runs / "emulated" / "eval_report" / "predictions.csv")
    (expected,) = frame[
        (frame["id"] == sample["id"]) & (frame["condition"] == "instruction")
    ].itertuples()
    image = base64.b64encode((dataset / sample["image"]).read_bytes()).decode()
    body = json.dumps({"image": image, "prompt": sample["instruction"]}).encode()
    with emulated.serve(server, startup_s=600) as url:
        assert _call(url, "GET", "/health")[1]["router"] == serving
        status, route = _call(url, "POST", "/route", body)
        assert status == 200, route
        # The eval stage scored the same screenshot and instruction in its own batches.
        assert route["expert"] == expected.routed
        assert route["probabilities"] == pytest.approx(json.loads(expected.probabilities), abs=2e-3)
        assert route["abstained"] == bool(expected.abstained)
        status, answer = _call(url, "POST", "/infer", body)
        assert status == 200 and answer["route"]["expert"] == route["expert"], answer
        assert isinstance(answer["answer"], str)
        assert _call(url, "POST", "/route", b"{not json")[0] == 400
        # Another run is deployed by the deploy function, in its own container.
        shutil.copytree(runs / "emulated", runs / "served-next")
        spec = StageSpec(
            run="served-next", config=load_config(root / "config"), volumes=Volumes.local(tmp_path)
        )
        (tmp_path / "spec.json").write_text(spec.model_dump_json())
        env = {**os.environ, "PATH": f"{emulated.shim()}{os.pathsep}{os.environ['PATH']}"}
        deploy = subprocess.run(
            ["modal", "run", f"{compute.APP_FILE}::deploy", "--spec", str(tmp_path / "spec.json")],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert deploy.returncode == 0, deploy.stderr[-3000:]
        newer = json.loads(registry_file.read_text())["current"]
        assert newer.startswith("served-next-") and newer != serving
        deadline = time.monotonic() + 300
        while _call(url, "GET", "/health")[1]["router"] != newer:
            assert time.monotonic() < deadline, "the server never swapped in the newer router"
            time.sleep(0.5)
        status, again = _call(url, "POST", "/route", body)
        assert status == 200 and again["expert"] == route["expert"]  # same weights, new folder
        metrics = _metrics(url)
        assert (metrics["mole_router_swaps"], metrics["mole_router_load_failures"]) == (1.0, 0.0)


# --- training commits each resume point ---------------------------------------------------------


@on_the_graphs
def test_modal_training_commits_volume_after_each_resume_point(
    graphs: dict[str, Graph], monkeypatch: pytest.MonkeyPatch
) -> None:
    import modal_jobs.mole_app as mole_app

    local = graphs["local"]
    layout = Volumes.local(local.root / "home").run("emulated")
    commits: list[list[str]] = []

    class CountingVolume:
        def reload(self) -> None:
            pass

        def commit(self) -> None:
            commits.append(sorted(p.name for p in layout.resume.glob("step-*")))

    monkeypatch.delenv(compute.GPU_ENV, raising=False)
    mole_app = importlib.reload(mole_app)  # earlier tests imported it under other GPU settings
    monkeypatch.setattr(mole_app, "_in_container", lambda: True)
    monkeypatch.setattr(mole_app, "data_volume", CountingVolume())
    monkeypatch.setattr(mole_app, "hf_cache_volume", CountingVolume())
    spec = TrainSpec(
        run="emulated",
        config=load_config(local.root / "config"),
        volumes=Volumes.local(local.root / "home"),
        mode="test",
        checkpoint_every=2,
    )
    result = mole_app.train_router.local(spec.model_dump(mode="json"))
    # test mode trains 8 steps: resume points after 2, 4 and 6, each committed, then the end.
    assert commits == [
        ["step-0000002"],
        ["step-0000002", "step-0000004"],
        ["step-0000004", "step-0000006"],
        [],
    ]
    assert result["metadata"]["steps"]["raw_value"] == 8
