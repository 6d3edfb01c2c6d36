"""Stage `eval_report`: score the held-out eval split with the trained router and the untrained one.

The untrained router is the same model with the adapter disabled (a fresh LoRA is exactly the
base), so the report shows how much routing the training added. Written atomically:
`report.json` (machine-readable), `report.md`, `confusion_matrix.png`, `reliability.png` and
`risk_coverage.png`.

The router is also a calibrated classifier: a temperature fitted on the val split (see
modal_jobs/ml/calibration.py) is reported with ECE before and after, and the stacked system is
compared end to end on the eval answers: routed expert vs oracle expert vs the bare base.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from modal_jobs.artifacts import read_index, read_split, require_adapters
from modal_jobs.atomic import atomic_dir, write_json
from modal_jobs.config import ImageBounds
from modal_jobs.hashing import file_sha256
from modal_jobs.ml import plots
from modal_jobs.ml.batching import Encoded, encode
from modal_jobs.ml.calibration import ECE_BINS, fit_temperature, reliability, risk_coverage, softmax
from modal_jobs.ml.labels import LabelMap
from modal_jobs.ml.metrics import classification_report, markdown_table
from modal_jobs.ml.model import Runtime
from modal_jobs.ml.routing import Scores, score
from modal_jobs.ml.shard_files import load_split
from modal_jobs.serving.inference import ROUTER_ADAPTER, RouterInfo, Stack
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

LATENCY_IMAGES = 20


def run(spec: StageSpec) -> StageResult:
    """Evaluate the run's router checkpoint on the eval split and write the report."""
    started = time.perf_counter()
    index = read_index(spec.layout.shards)
    labels = LabelMap.from_json(index["labels"])
    evaluation = load_split(spec.layout.shards, index, "eval")
    validation = load_split(spec.layout.shards, index, "val")
    router = RouterInfo(
        folder=spec.layout.checkpoint,
        base=index["base"],
        labels=labels,
        system_prompt=index["system_prompt"],
        bounds=ImageBounds(**index["image_bounds"]),
        abstain_below=spec.config.loras.router.abstain_below,
        temperature=1.0,
    )
    stack = Stack(router, require_adapters(spec.config, spec.volumes), Runtime.detect())

    trained = _score(stack, evaluation.items, ROUTER_ADAPTER)
    untrained = _score(stack, evaluation.items, None)
    temperature = fit_temperature(
        _score(stack, validation.items, ROUTER_ADAPTER).logits, validation.classes
    )

    truth = evaluation.classes
    report = classification_report(truth, trained.probabilities.argmax(1), labels.experts)
    baseline = classification_report(truth, untrained.probabilities.argmax(1), labels.experts)
    calibrated = softmax(trained.logits, temperature)
    per_image = sum(trained.batch_seconds) / max(1, len(truth))
    report.update(
        {
            "run": spec.run,
            "untrained": {"accuracy": baseline["accuracy"], "macro_f1": baseline["macro_f1"]},
            "chance_accuracy": 1.0 / len(labels.experts),
            "mean_confidence": float(calibrated.max(1).mean()) if len(truth) else 0.0,
            "calibration": calibration_section(
                trained.probabilities, calibrated, truth, temperature, len(validation.classes)
            ),
            "abstain_below": router.abstain_below,
            "abstained": float((calibrated.max(1) < router.abstain_below).mean())
            if len(truth)
            else 0.0,
            "latency_ms_per_image": 1000 * per_image,
            "latency_batch1": latency_batch1(stack, evaluation.items),
            "end_to_end": end_to_end(spec, stack, calibrated),
            "checkpoint_sha256": file_sha256(spec.layout.checkpoint / "adapter_model.safetensors"),
            "shards_version": index["shards_version"],
            "min_accuracy": spec.config.loras.router.min_accuracy,
            "wall_seconds": time.perf_counter() - started,
        }
    )
    write_report(spec, report)
    return _result(spec, report)


def _score(
    stack: Stack, items: Sequence[Encoded], adapter: str | None, batch_size: int = 32
) -> Scores:
    router = stack.router
    with stack.adapter(adapter):
        return score(
            stack.model, stack.processor, items, router.bounds, router.labels.token_ids, batch_size
        )


def calibration_section(
    raw: np.ndarray, calibrated: np.ndarray, truth: np.ndarray, temperature: float, n_val: int
) -> dict[str, Any]:
    """Temperature (fitted on val), ECE before/after with reliability tables, risk-coverage."""
    before = reliability(raw, truth)
    after = reliability(calibrated, truth)
    return {
        "temperature": temperature,
        "fitted_on": {"split": "val", "n": n_val},
        "ece_bins": ECE_BINS,
        "ece_before": before.ece,
        "ece_after": after.ece,
        "reliability_before": before.to_json(),
        "reliability_after": after.to_json(),
        "risk_coverage": risk_coverage(calibrated, truth),
    }


def latency_batch1(stack: Stack, items: Sequence[Encoded]) -> dict[str, Any]:
    """Routing latency per image at batch size 1 (collate + forward) over a fixed image count."""
    sample = items[:LATENCY_IMAGES]
    _score(stack, sample[:1], ROUTER_ADAPTER, batch_size=1)  # warm-up: first call pays set-up
    seconds = np.array(_score(stack, sample, ROUTER_ADAPTER, batch_size=1).batch_seconds) * 1000
    if not len(seconds):
        return {"images": 0, "p50_ms": 0.0, "p95_ms": 0.0}
    return {
        "images": len(seconds),
        "p50_ms": float(np.percentile(seconds, 50)),
        "p95_ms": float(np.percentile(seconds, 95)),
    }


def end_to_end(spec: StageSpec, stack: Stack, calibrated: np.ndarray) -> dict[str, Any] | None:
    """Answer NLL per token on the eval split: routed expert vs oracle expert vs bare base.

    None when no expert adapter is registered in loras.json (nothing to stack).
    """
    if not stack.experts:
        return None
    rows = read_split(spec.layout.dataset, "eval")
    experts = stack.router.labels.experts
    items = [_answer_item(stack, spec.layout.dataset, row) for row in rows]
    adapters: list[str | None] = [None, *stack.experts]
    nll = {name: stack.answer_nll(items, name) for name in adapters}
    confident = calibrated.max(1) >= stack.router.abstain_below
    routed = [
        experts[int(best)] if ok and experts[int(best)] in stack.experts else None
        for best, ok in zip(calibrated.argmax(1), confident, strict=True)
    ]
    oracle = [row["expert"] if row["expert"] in stack.experts else None for row in rows]

    def per_token(choice: list[str | None]) -> float:
        picked = np.array([nll[name][i] for i, name in enumerate(choice)])
        return float(picked[:, 0].sum() / max(1.0, picked[:, 1].sum()))

    return {
        "metric": "answer NLL per token (lower is better)",
        "n": len(rows),
        "routed": per_token(routed),
        "oracle": per_token(oracle),
        "base": per_token([None] * len(rows)),
        "routed_matches_oracle": float(
            np.mean([a == b for a, b in zip(routed, oracle, strict=True)])
        ),
    }


def _answer_item(stack: Stack, dataset_dir: Path, row: dict[str, Any]) -> Encoded:
    with Image.open(dataset_dir / row["image"]) as image:
        return encode(
            stack.processor, image, stack.router.bounds, None, row["instruction"], row["answer"]
        )


def write_report(spec: StageSpec, report: dict[str, Any]) -> None:
    """report.json, report.md and the PNG figures, renamed into place together."""
    with atomic_dir(spec.layout.report) as staging:
        write_json(staging / "report.json", report)
        (staging / "report.md").write_text(render_markdown(report))
        png = plots.confusion_matrix(report["confusion_matrix"], report["labels"])
        (staging / "confusion_matrix.png").write_bytes(png)
        calibration = report["calibration"]
        tables = {
            "raw (T = 1)": calibration["reliability_before"],
            f"calibrated (T = {calibration['temperature']:.2f})": calibration["reliability_after"],
        }
        (staging / "reliability.png").write_bytes(plots.reliability_diagram(tables))
        (staging / "risk_coverage.png").write_bytes(
            plots.risk_coverage(calibration["risk_coverage"])
        )


def render_markdown(report: dict[str, Any]) -> str:
    """Human-readable report: headline numbers, then the per-class and confusion tables."""
    latency, calibration = report["latency_batch1"], report["calibration"]
    head = (
        f"# Router eval — run `{report['run']}`\n\n"
        f"- held-out samples: {report['n']}\n"
        f"- accuracy: **{report['accuracy']:.3f}** (untrained router: "
        f"{report['untrained']['accuracy']:.3f}, chance: {report['chance_accuracy']:.3f})\n"
        f"- macro-F1: **{report['macro_f1']:.3f}** (untrained: "
        f"{report['untrained']['macro_f1']:.3f})\n"
        f"- latency: {report['latency_ms_per_image']:.1f} ms per image (batched); batch size 1: "
        f"p50 {latency['p50_ms']:.1f} ms, p95 {latency['p95_ms']:.1f} ms "
        f"({latency['images']} images)\n"
        f"- calibration: temperature {calibration['temperature']:.3f} (fitted on val), "
        f"ECE ({calibration['ece_bins']} bins) {calibration['ece_before']:.3f} → "
        f"**{calibration['ece_after']:.3f}**; abstained below {report['abstain_below']}: "
        f"{report['abstained']:.1%}\n"
        f"- end to end: {_end_to_end_line(report['end_to_end'])}\n\n"
    )
    return head + markdown_table(report) + "\n"


def _end_to_end_line(section: dict[str, Any] | None) -> str:
    if section is None:
        return "no expert adapters registered in config/loras.json"
    return (
        f"{section['metric']}: routed {section['routed']:.3f}, oracle {section['oracle']:.3f}, "
        f"base without adapter {section['base']:.3f} ({section['n']} answers)"
    )


def _result(spec: StageSpec, report: dict[str, Any]) -> StageResult:
    png = (spec.layout.report / "confusion_matrix.png").read_bytes()
    calibration, latency = report["calibration"], report["latency_batch1"]
    figures = {
        name: png_markdown(
            (spec.layout.report / f"{name}.png").read_bytes(), name.replace("_", " ")
        )
        for name in ("reliability", "risk_coverage")
    }
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
        **figures,
        "temperature": number(round(calibration["temperature"], 4)),
        "ece_before": number(round(calibration["ece_before"], 4)),
        "ece_after": number(round(calibration["ece_after"], 4)),
        "latency_p50_ms": number(round(latency["p50_ms"], 2)),
        "latency_p95_ms": number(round(latency["p95_ms"], 2)),
        "end_to_end": json_value(report["end_to_end"]),
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
    from modal_jobs.launch.pipes import main

    main(run, StageSpec)
