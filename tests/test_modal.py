"""The Modal backend, offline: the real Modal app objects and their resources, `--dry`, and the
entrypoints run with Modal's cloud substituted (function bodies run here via `Function.local`,
the data volume is a folder) through real `dg.materialize`, compared with the local backend."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import modal
import pytest
from dagster_modal import ModalClient

from modal_jobs.config import load_config
from modal_jobs.launch import cloud, compute
from modal_jobs.layout import DATA_VOLUME, HF_CACHE_VOLUME, INFERENCE_VOLUME, Volumes
from modal_jobs.stages.train import TrainSpec
from mole_assets.assets import router_assets
from mole_assets.cli import main
from mole_assets.partitions import RUN_NAMES
from mole_assets.resources import MoleResource

from .conftest import REPO, MakeConfig, write_config
from .modal_substituted import FolderVolume, remap

HARNESS = Path(__file__).with_name("modal_substituted.py")


# --- the app's functions: built from the one resource table ----------------------------------


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
    assert set(recorded) == set(table) - {"tensorboard"}
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
        assert kwargs["image"] is app.IMAGES[spec.image], name
    assert recorded["train_router"]["timeout"] >= 3600
    assert recorded["train_router"]["gpu"] == gpu
    assert app.gpu_image is not app.cpu_image
    assert [s.name for s in app.SECRETS.values()] == ["huggingface"]
    assert {v.name for v in app.VOLUMES.values()} == {
        DATA_VOLUME,
        INFERENCE_VOLUME,
        HF_CACHE_VOLUME,
    }
    for launch in compute.STAGE_LAUNCHES.values():
        assert type(getattr(app, launch.entrypoint)).__name__ == "LocalEntrypoint"


def test_tensorboard_endpoint_mounts_data_volume() -> None:
    import modal_jobs.tensorboard_app as board

    spec = board.tensorboard._spec_
    assert {str(m): v.name for m, v in spec.volumes.items()} == {"/vol/moe-lora-data": DATA_VOLUME}
    assert board.tensorboard._is_web_endpoint()


def test_gpu_parse_rejects_nonsense() -> None:
    assert str(compute.Gpu.parse("h100:8")) == "H100:8"
    for bad in ("", "H100:x", "H100:0"):
        with pytest.raises(ValueError, match="MOLE_MODAL_GPU"):
            compute.Gpu.parse(bad)


def test_dry_with_modal_backend_prints_the_table(
    tmp_path: Path,
    dagster_home: Path,
    make_config: MakeConfig,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MOLE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MOLE_CONFIG_DIR", str(make_config()))
    monkeypatch.setenv("MOLE_BACKEND", "modal")
    monkeypatch.setenv(compute.GPU_ENV, "H100:8")
    app, recorded = _load_app(monkeypatch, "H100:8")
    assert main(["materialize", "dry-modal", "--dry"]) == 0
    plans = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    # The demo expert adapters have no Modal function: they are trained by the local launcher.
    assert json.loads(plans.pop("expert_adapters"))["backend"] == "local"
    assert list(plans) == [a for a in compute.STAGE_LAUNCHES if a != "deployed_router"]
    table = compute.functions()
    for asset, launch in compute.STAGE_LAUNCHES.items():
        if asset not in plans:
            continue
        plan = json.loads(plans[asset])
        assert plan["launcher"] == "dagster_modal.ModalClient"
        assert plan["command"] == f"modal run modal_jobs/mole_app.py::{launch.entrypoint}"
        assert plan["run_root"] == "/vol/moe-lora-data/runs/dry-modal"
        for described in plan["functions"]:
            kwargs = recorded[described["function"]]
            assert described == table[described["function"]].describe()
            assert described["gpu"] == kwargs["gpu"] and described["timeout_s"] == kwargs["timeout"]
            assert described["retries"] == kwargs["retries"].max_retries
            assert described["volumes"] == {v.name: str(m) for m, v in kwargs["volumes"].items()}
    assert len(plans) == 4  # the Modal stages up to eval_report
    assert json.loads(plans["router_checkpoint"])["functions"][0]["gpu"] == "H100:8"
    assert not (tmp_path / "home").exists()


# --- uploads -----------------------------------------------------------------------------------


def test_upload_skips_unchanged_files_with_volume_substituted(tmp_path: Path) -> None:
    local = tmp_path / "dataset"
    (local / "images").mkdir(parents=True)
    (local / "train.jsonl").write_text("a\n")
    (local / "images" / "1.png").write_bytes(b"png1")
    (local / "images" / "2.png").write_bytes(b"png2")
    volume = FolderVolume(tmp_path / "volume")
    assert cloud.upload_tree(volume, local, "runs/r/routing_dataset") == (3, 0)
    volume.uploaded.clear()
    assert cloud.upload_tree(volume, local, "runs/r/routing_dataset") == (0, 3)
    assert volume.uploaded == ["runs/r/routing_dataset/.uploaded.json"]
    (local / "train.jsonl").write_text("b\n")
    (local / "images" / "2.png").unlink()
    volume.uploaded.clear()
    assert cloud.upload_tree(volume, local, "runs/r/routing_dataset") == (1, 1)
    remote = tmp_path / "volume" / "runs/r/routing_dataset"
    assert (remote / "train.jsonl").read_text() == "b\n"
    assert not (remote / "images" / "2.png").exists()


# --- entrypoints with the cloud substituted, through dg.materialize ------------------------------


class SubstitutedModalClient(ModalClient):
    """`dagster_modal.ModalClient`, with `modal run` replaced by tests/modal_substituted.py."""

    def run(self, *, func_ref: str, context: Any, extras: Any = None, env: Any = None) -> Any:
        return dg.PipesSubprocessClient.run(
            self,
            command=[sys.executable, str(HARNESS), func_ref],
            context=context,
            extras=extras,
            env=env,
        )


@dataclass
class Compared:
    local: dg.ExecuteInProcessResult
    modal: dg.ExecuteInProcessResult
    local_layout: Any
    cloud_layout: Any
    calls: Path


def _materialize(instance: dg.DagsterInstance, config_dir: Path, run: str, backend: str) -> Any:
    return dg.materialize(
        router_assets(load_config(config_dir)),
        instance=instance,
        partition_key=run,
        selection=dg.AssetSelection.assets("tokenized_shards"),
        resources={"mole": MoleResource(config_dir=str(config_dir), backend=backend)},
        raise_on_error=False,
    )


def _routing_dataset(config_dir: Path, local: Volumes, cloud_data: Path) -> None:
    """Both runs' routing dataset: built once, and `cmp-modal`'s copy put where the cloud is."""
    from modal_jobs.stage import StageSpec
    from modal_jobs.stages import dataset

    spec = StageSpec(run="cmp-local", config=load_config(config_dir), volumes=local)
    dataset.run(spec)
    shutil.copytree(
        spec.layout.dataset,
        Volumes(cloud_data, local.inference, local.models).run("cmp-modal").dataset,
    )


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory, experts_dir: Path) -> Iterator[Compared]:
    """`tokenized_shards` materialized by the local backend and by the substituted Modal one."""
    root = tmp_path_factory.mktemp("modal")
    config_dir = write_config(root / "config", experts_dir)
    local = Volumes.local()
    mounts = {
        f"/vol/{DATA_VOLUME}": str(root / "cloud-data"),
        f"/vol/{INFERENCE_VOLUME}": str(root / "cloud-inference"),
        f"/vol/{HF_CACHE_VOLUME}": str(local.models),  # the tiny base, built once per session
    }
    _routing_dataset(config_dir, local, root / "cloud-data")
    (root / "calls").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAGSTER_HOME", str(root / "dagster"))
        patch.setenv("MOLE_TEST_MOUNTS", json.dumps(mounts))
        patch.setenv("MOLE_TEST_CALLS", str(root / "calls"))
        patch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        patch.delenv(compute.GPU_ENV, raising=False)
        patch.setattr(MoleResource, "modal_client", lambda self: SubstitutedModalClient(REPO))
        (root / "dagster").mkdir()
        instance = dg.DagsterInstance.get()
        instance.add_dynamic_partitions(RUN_NAMES, ["cmp-local", "cmp-modal"])
        on_local = _materialize(instance, config_dir, "cmp-local", "local")
        on_modal = _materialize(instance, config_dir, "cmp-modal", "modal")
        yield Compared(
            on_local,
            on_modal,
            local.run("cmp-local"),
            Volumes(root / "cloud-data", root / "cloud-inference", local.models).run("cmp-modal"),
            root / "calls",
        )


def _metadata(result: dg.ExecuteInProcessResult, key: str) -> dict[str, Any]:
    events = [
        e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(key)
    ]
    assert len(events) == 1, f"{key} materialized {len(events)} times"
    return dict(events[0].event_specific_data.materialization.metadata)  # type: ignore[union-attr]


def _checks(result: dg.ExecuteInProcessResult) -> set[tuple[str, str, bool]]:
    return {
        (e.asset_key.to_user_string(), e.check_name, e.passed)
        for e in (
            ev.event_specific_data
            for ev in result.all_events
            if ev.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
        )
    }


def test_modal_entrypoint_with_cloud_substituted_reports_local_metadata(
    compared: Compared,
) -> None:
    assert compared.local.success and compared.modal.success
    local = _metadata(compared.local, "tokenized_shards")
    remote = _metadata(compared.modal, "tokenized_shards")
    assert sorted(local) == sorted(remote)
    assert {k: type(v) for k, v in local.items()} == {k: type(v) for k, v in remote.items()}
    assert local["compute_backend"].value == "local" and remote["compute_backend"].value == "modal"
    assert local["estimated_cost_usd"].value == 0.0
    assert remote["gpu"].value == "none" and remote["estimated_cost_usd"].value > 0
    assert (
        _checks(compared.local)
        == _checks(compared.modal)
        == {("tokenized_shards", "splits_nonempty", True)}
    )


def test_modal_shards_from_map_fan_out_identical_to_local(compared: Compared) -> None:
    local = json.loads((compared.local_layout.shards / "index.json").read_text())
    remote = json.loads((compared.cloud_layout.shards / "index.json").read_text())
    assert remote["shards_version"] == local["shards_version"]
    assert remote["splits"] == local["splits"]
    for split in local["splits"].values():
        for shard in split["files"]:
            assert (compared.cloud_layout.shards / shard["name"]).read_bytes() == (
                compared.local_layout.shards / shard["name"]
            ).read_bytes()
    calls = json.loads((compared.calls / "shards.json").read_text())
    chunks = [f for s in local["splits"].values() for f in s["files"]]
    assert len(calls) == 2 + len(chunks)  # plan, one .map() call per chunk, finish
    assert all(call[0]["volumes"]["data"] == "/vol/moe-lora-data" for call in calls)
    assert not list(compared.cloud_layout.root.glob(".*parts*"))


class RecordingTrain:
    """`train_router` with the cloud substituted: records what the entrypoint sends."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def remote(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.sent.append(spec)
        return {"data_version": "0" * 16, "metadata": {}, "checks": []}


def test_modal_train_entrypoint_passes_volume_resume_location_with_cloud_substituted(
    tmp_path: Path, make_config: MakeConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = TrainSpec(run="r7", config=load_config(make_config()), volumes=Volumes.local(tmp_path))
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    train = RecordingTrain()
    cloud.launch("router_checkpoint", str(spec_file), {"train_router": train})
    (sent,) = train.sent
    assert TrainSpec.model_validate(sent).layout.resume == Path(
        "/vol/moe-lora-data/runs/r7/train_state"
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["metadata"]["compute_backend"]["raw_value"] == "modal"


def test_modal_training_commits_volume_after_each_resume_point_with_cloud_substituted(
    compared: Compared, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modal_jobs.mole_app as mole_app

    commits: list[list[str]] = []

    class CountingVolume:
        def reload(self) -> None:
            pass

        def commit(self) -> None:
            commits.append(sorted(p.name for p in compared.cloud_layout.resume.glob("step-*")))

    monkeypatch.delenv(compute.GPU_ENV, raising=False)
    mole_app = importlib.reload(mole_app)  # earlier tests imported it under other GPU settings
    monkeypatch.setattr(mole_app, "_in_container", lambda: True)
    monkeypatch.setattr(mole_app, "data_volume", CountingVolume())
    monkeypatch.setattr(mole_app, "hf_cache_volume", CountingVolume())
    (plan_call, *_) = json.loads((compared.calls / "shards.json").read_text())
    sent = cloud.container_spec({**plan_call[0], "mode": "test", "checkpoint_every": 2})
    mounts = json.loads(os.environ["MOLE_TEST_MOUNTS"])  # set by the `compared` fixture
    result = mole_app.train_router.local(remap(sent, mounts))
    # test mode trains 8 steps: resume points after 2, 4 and 6, each committed, then the end.
    assert commits == [
        ["step-0000002"],
        ["step-0000002", "step-0000004"],
        ["step-0000004", "step-0000006"],
        [],
    ]
    assert result["metadata"]["steps"]["raw_value"] == 8
