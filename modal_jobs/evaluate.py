"""Stage `eval_report`: score the held-out eval split with the trained router and the untrained one.

The untrained router is the same model with the adapter disabled (a fresh LoRA is exactly the
base), so the report shows how much routing the training added. Written atomically:
`report.json` (machine-readable), `report.md` and `confusion_matrix.png`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from peft import PeftModel

from modal_jobs import plots
from modal_jobs.atomic import atomic_dir, write_json
from modal_jobs.config import ImageBounds
from modal_jobs.hashing import file_sha256
from modal_jobs.labels import LabelMap
from modal_jobs.metrics import classification_report, markdown_table
from modal_jobs.model import Runtime, load_base, load_processor
from modal_jobs.routing import score
from modal_jobs.shards import load_split, read_index
from modal_jobs.stage import (
    Check,
    StageResult,
    StageSpec,
    json_value,
    md,
    number,
    path_value,
    png_markdown,
)


def run(spec: StageSpec) -> StageResult:
    """Evaluate the run's router checkpoint on the eval split and write the report."""
    started = time.perf_counter()
    index = read_index(spec.layout.shards)
    labels = LabelMap.from_json(index["labels"])
    bounds = ImageBounds(**index["image_bounds"])
    evaluation = load_split(spec.layout.shards, index, "eval")
    processor = load_processor(index["base"])
    base = load_base(index["base"], Runtime.detect())
    model = PeftModel.from_pretrained(base, str(spec.layout.checkpoint)).eval()

    trained = score(model, processor, evaluation.items, bounds, labels.token_ids)
    with model.disable_adapter():
        untrained = score(model, processor, evaluation.items, bounds, labels.token_ids)

    truth = evaluation.classes
    report = classification_report(truth, trained.probabilities.argmax(1), labels.experts)
    baseline = classification_report(truth, untrained.probabilities.argmax(1), labels.experts)
    per_image = sum(trained.batch_seconds) / max(1, len(truth))
    report.update(
        {
            "run": spec.run,
            "untrained": {"accuracy": baseline["accuracy"], "macro_f1": baseline["macro_f1"]},
            "chance_accuracy": 1.0 / len(labels.experts),
            "mean_confidence": float(trained.probabilities.max(1).mean()) if len(truth) else 0.0,
            "latency_ms_per_image": 1000 * per_image,
            "checkpoint_sha256": file_sha256(spec.layout.checkpoint / "adapter_model.safetensors"),
            "shards_version": index["shards_version"],
            "min_accuracy": spec.config.loras.router.min_accuracy,
            "wall_seconds": time.perf_counter() - started,
        }
    )
    write_report(spec, report)
    return _result(spec, report)


def write_report(spec: StageSpec, report: dict[str, Any]) -> None:
    """report.json, report.md and confusion_matrix.png, renamed into place together."""
    with atomic_dir(spec.layout.report) as staging:
        write_json(staging / "report.json", report)
        (staging / "report.md").write_text(render_markdown(report))
        png = plots.confusion_matrix(report["confusion_matrix"], report["labels"])
        (staging / "confusion_matrix.png").write_bytes(png)


def render_markdown(report: dict[str, Any]) -> str:
    """Human-readable report: headline numbers, then the per-class and confusion tables."""
    head = (
        f"# Router eval — run `{report['run']}`\n\n"
        f"- held-out samples: {report['n']}\n"
        f"- accuracy: **{report['accuracy']:.3f}** (untrained router: "
        f"{report['untrained']['accuracy']:.3f}, chance: {report['chance_accuracy']:.3f})\n"
        f"- macro-F1: **{report['macro_f1']:.3f}** (untrained: "
        f"{report['untrained']['macro_f1']:.3f})\n"
        f"- latency: {report['latency_ms_per_image']:.1f} ms per image (batched)\n\n"
    )
    return head + markdown_table(report) + "\n"


def read_report(spec: StageSpec) -> dict[str, Any]:
    """The run's report.json."""
    return dict(json.loads((spec.layout.report / "report.json").read_text()))


def _result(spec: StageSpec, report: dict[str, Any]) -> StageResult:
    png = (spec.layout.report / "confusion_matrix.png").read_bytes()
    metadata = {
        "path": path_value(spec.layout.report),
        "accuracy": number(round(report["accuracy"], 4)),
        "macro_f1": number(round(report["macro_f1"], 4)),
        "untrained_accuracy": number(round(report["untrained"]["accuracy"], 4)),
        "chance_accuracy": number(round(report["chance_accuracy"], 4)),
        "n": number(report["n"]),
        "latency_ms_per_image": number(round(report["latency_ms_per_image"], 2)),
        "per_class": md(markdown_table(report)),
        "confusion_matrix": png_markdown(png, "confusion matrix"),
        "report": json_value({k: report[k] for k in ("accuracy", "macro_f1", "n", "labels")}),
    }
    gate = spec.config.loras.router.min_accuracy
    check = Check(
        "accuracy_gate",
        bool(report["accuracy"] >= gate),
        f"eval accuracy ≥ {gate} (config/loras.json router.min_accuracy) before deployment",
        {"accuracy": number(round(report["accuracy"], 4)), "threshold": number(gate)},
    )
    version = file_sha256(spec.layout.report / "report.json")[:16]
    return StageResult(version, metadata, [check])


if __name__ == "__main__":
    from modal_jobs.pipes import main

    main(run, StageSpec)
