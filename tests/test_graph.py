"""The whole router graph, materialized with `dg.materialize` against a real Dagster instance in
a temp dir, on the tiny preset, through the local Pipes backend."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from modal_jobs.hashing import expert_version
from modal_jobs.layout import RunLayout, Volumes

from .conftest import PER_EXPERT, fresh_instance, materialize, observe_experts, write_config

RUN = "graph-test"
TEST_MODE = {
    "ops": {
        "router_checkpoint": {"config": {"mode": "test"}},
        "expert_adapters": {"config": {"mode": "test"}},
    }
}


@dataclass
class Materialized:
    instance: dg.DagsterInstance
    config_dir: Path
    layout: RunLayout
    volumes: Volumes
    result: dg.ExecuteInProcessResult


@pytest.fixture(scope="module")
def materialized(
    tmp_path_factory: pytest.TempPathFactory, experts_dir: Path, tiny_base: str
) -> Materialized:
    root = tmp_path_factory.mktemp("graph")
    instance = fresh_instance(root, RUN)
    config_dir = write_config(root / "config", experts_dir, min_accuracy=0.0)
    selection = dg.AssetSelection.assets("deployed_router").upstream()
    result = materialize(instance, config_dir, selection, RUN, TEST_MODE)
    volumes = Volumes.local()
    return Materialized(instance, config_dir, volumes.run(RUN), volumes, result)


def _metadata(result: dg.ExecuteInProcessResult, key: str) -> dict[str, Any]:
    events = [
        e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(key)
    ]
    assert len(events) == 1, f"{key} materialized {len(events)} times"
    materialization = events[0].event_specific_data.materialization  # type: ignore[union-attr]
    return {k: v.value for k, v in materialization.metadata.items()}


def _check_evaluations(result: dg.ExecuteInProcessResult) -> list[Any]:
    return [
        e.event_specific_data
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
    ]


def test_every_asset_materializes_with_metadata(materialized: Materialized) -> None:
    result = materialized.result
    assert result.success
    dataset = _metadata(result, "routing_dataset")
    assert dataset["num_samples"] == 6 * PER_EXPERT
    shards = _metadata(result, "tokenized_shards")
    assert shards["tokens"] > 0
    checkpoint = _metadata(result, "router_checkpoint")
    assert checkpoint["steps"] == 8 and checkpoint["tokens_per_second"] > 0
    assert "data:image/png;base64" in checkpoint["loss_curve"]
    report = _metadata(result, "eval_report")
    assert 0.0 <= report["accuracy"] <= 1.0 and report["n"] > 0
    assert "data:image/png;base64" in report["confusion_matrix"]
    assert "| calendar |" in report["per_class"]
    assert _metadata(result, "deployed_router")["version"].startswith(RUN)


def test_checks_pass_and_are_recorded(materialized: Materialized) -> None:
    evaluations = {
        (check.asset_key.to_user_string(), check.check_name): check.passed
        for check in _check_evaluations(materialized.result)
    }
    assert evaluations == {
        ("routing_dataset", "class_balance"): True,
        ("routing_dataset", "split_leakage"): True,
        ("routing_dataset", "images_decodable"): True,
        ("tokenized_shards", "splits_nonempty"): True,
        ("eval_report", "accuracy_gate"): True,
    }


def test_artifacts_on_the_run_volume(materialized: Materialized) -> None:
    layout = materialized.layout
    assert {p.name for p in layout.dataset.glob("*.jsonl")} == {
        "train.jsonl",
        "val.jsonl",
        "eval.jsonl",
        "ood_val.jsonl",
        "ood_eval.jsonl",
    }
    assert (layout.checkpoint / "adapter_config.json").is_file()
    assert (layout.checkpoint / "adapter_model.safetensors").is_file()
    assert list(layout.tensorboard.glob("events.out.tfevents.*"))
    report = json.loads((layout.report / "report.json").read_text())
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "labels", "n"):
        assert key in report
    assert "accuracy" in report["untrained"]
    registry = json.loads(materialized.volumes.registry.read_text())
    assert registry["current"].startswith(RUN)
    assert (materialized.volumes.routers / registry["current"] / "router.json").is_file()
    assert not list(layout.root.glob(".*tmp*"))


def test_adapter_loads_with_vanilla_peft_in_fresh_process(materialized: Materialized) -> None:
    summary = json.loads((materialized.layout.checkpoint / "training_summary.json").read_text())
    script = textwrap.dedent(f"""
        import torch
        from peft import PeftModel
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
        base = Qwen3VLForConditionalGeneration.from_pretrained({summary["base"]!r})
        AutoProcessor.from_pretrained({summary["base"]!r})
        model = PeftModel.from_pretrained(base, {str(materialized.layout.checkpoint)!r})
        names = [n for n, _ in model.named_parameters() if "lora_" in n]
        assert names and all("language_model" in n for n in names), names
        assert not any("visual" in n for n in names)
        ids = torch.tensor([[1, 2, 3]])
        print("ok", len(names), tuple(model(input_ids=ids).logits.shape))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok 28 ")  # 2 layers × 7 projections × (A, B)


def test_expert_sources_have_content_hash_versions(
    materialized: Materialized, experts_dir: Path
) -> None:
    assert observe_experts(materialized.instance, materialized.config_dir).success
    records = materialized.instance.fetch_observations(
        dg.AssetKey(["expert_datasets", "map"]), limit=1
    ).records
    assert records, "no observation recorded"
    observation = records[0].event_log_entry.asset_observation
    assert observation is not None
    # The hash of the files the config names (an empty folder would hash to e3b0c442…).
    assert observation.data_version == expert_version(experts_dir / "map")[:16]


def test_accuracy_gate_blocks_deployment(
    materialized: Materialized, tmp_path: Path, experts_dir: Path
) -> None:
    measured = json.loads((materialized.layout.report / "report.json").read_text())
    assert measured["accuracy"] < 1.0, "test-mode router unexpectedly perfect"
    # Thresholds from the measured accuracy: one more right answer than measured is refused;
    # exactly the measured accuracy passes (the gate is "at least").
    above = (round(measured["accuracy"] * measured["n"]) + 1) / measured["n"]
    selection = dg.AssetSelection.assets("eval_report", "deployed_router")
    for threshold, passes in ((above, False), (measured["accuracy"], True)):
        config = write_config(tmp_path / f"gate-{passes}", experts_dir, min_accuracy=threshold)
        before = materialized.volumes.registry.read_text()
        result = materialize(materialized.instance, config, selection, RUN)
        report = json.loads((materialized.layout.report / "report.json").read_text())
        assert report["accuracy"] == measured["accuracy"]  # the same router, re-evaluated
        gate = _check_evaluations(result)
        assert [(g.check_name, g.passed) for g in gate] == [("accuracy_gate", passes)]
        assert gate[0].metadata["threshold"].value == threshold
        deployed = [
            e
            for e in result.get_asset_materialization_events()
            if e.asset_key == dg.AssetKey("deployed_router")
        ]
        assert len(deployed) == int(passes)
        assert (materialized.volumes.registry.read_text() != before) == passes
