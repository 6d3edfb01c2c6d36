"""Stage `eval_report`: score the held-out eval split with the trained router and the untrained one.

The untrained router is the same model with the adapter disabled (a fresh LoRA is exactly the
base), so the report shows how much routing the training added. Written atomically:
`report.json` (machine-readable), `report.md`, `predictions.csv` (one row per screenshot and
prompt condition), `confusion_matrix.png`, `reliability.png`, `risk_coverage.png`,
`ood_scores.png` and, when abstention uses a distance score, `ood_prototypes.safetensors`.

The same held-out screenshots are scored with their own instruction, a generic one and none
(modal_jobs/ml/conditions.py). The router is also a calibrated classifier: a temperature fitted
on the val split, all conditions together (modal_jobs/ml/calibration.py), is reported with ECE
before and after. Abstention (modal_jobs/ml/ood.py): candidate scores are compared on the screens
of no expert; the threshold keeps `router.coverage` of val screens, the score is chosen on
`ood_val`, and `ood_eval` with the eval screens only report. The stacked system is compared end to
end on the eval answers: routed expert (the base when abstaining) vs oracle expert vs the base.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from modal_jobs.artifacts import OOD_SPLITS, read_index, read_split, require_adapters
from modal_jobs.atomic import atomic_dir, write_json
from modal_jobs.config import ImageBounds
from modal_jobs.hashing import file_sha256
from modal_jobs.ml import plots
from modal_jobs.ml.batching import Encoded, encode
from modal_jobs.ml.calibration import ECE_BINS, fit_temperature, reliability, risk_coverage, softmax
from modal_jobs.ml.conditions import CONDITIONS, eval_instruction
from modal_jobs.ml.dropout import reprompt
from modal_jobs.ml.labels import LabelMap
from modal_jobs.ml.metrics import classification_report, markdown_table
from modal_jobs.ml.model import Runtime
from modal_jobs.ml.ood import (
    PROTOTYPE_FEATURES,
    Abstention,
    Prototypes,
    SlotFeatures,
    candidates,
    choose,
    ood_scores,
    slot_features,
)
from modal_jobs.ml.routing import Scores, score
from modal_jobs.ml.shard_files import Split, load_split
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
    table,
    text,
)

LATENCY_IMAGES = 20
PREDICTIONS_FILE = "predictions.csv"


@dataclass(frozen=True)
class Scored:
    """The trained router's answer-slot features on every part the report needs."""

    eval: dict[str, SlotFeatures]
    val: dict[str, SlotFeatures]
    train: SlotFeatures
    ood: dict[str, SlotFeatures]


def run(spec: StageSpec) -> StageResult:
    """Evaluate the run's router checkpoint on the eval split and write the report."""
    started = time.perf_counter()
    index = read_index(spec.layout.shards)
    labels = LabelMap.from_json(index["labels"])
    splits = {name: load_split(spec.layout.shards, index, name) for name in index["splits"]}
    router = RouterInfo(
        folder=spec.layout.checkpoint,
        base=index["base"],
        labels=labels,
        system_prompt=index["system_prompt"],
        bounds=ImageBounds(**index["image_bounds"]),
        temperature=1.0,
        abstention=None,
    )
    stack = Stack(router, require_adapters(spec.config, spec.volumes), Runtime.detect())
    scored = score_parts(spec, stack, splits)
    untrained = _score(stack, splits["eval"].items, None)
    val_truth = np.tile(splits["val"].classes, len(CONDITIONS))
    temperature = fit_temperature(_pooled(scored.val).logits, val_truth)
    prototypes = fit_prototypes(scored.train, splits["train"].classes, len(labels.experts))

    truth = splits["eval"].classes
    trained = scored.eval["instruction"]
    report = classification_report(truth, trained.logits.argmax(1), labels.experts)
    baseline = classification_report(truth, untrained.probabilities.argmax(1), labels.experts)
    calibrated = softmax(trained.logits, temperature)
    ood = ood_section(spec, scored, truth, temperature, prototypes)
    per_image = sum(trained.batch_seconds) / max(1, len(truth))
    report.update(
        {
            "run": spec.run,
            "untrained": {"accuracy": baseline["accuracy"], "macro_f1": baseline["macro_f1"]},
            "chance_accuracy": 1.0 / len(labels.experts),
            "mean_confidence": float(calibrated.max(1).mean()) if len(truth) else 0.0,
            "calibration": calibration_section(
                softmax(trained.logits), calibrated, truth, temperature, len(val_truth)
            ),
            "conditions": conditions_section(scored.eval, truth, temperature, labels.experts),
            "ood": ood,
            "latency_ms_per_image": 1000 * per_image,
            "latency_batch1": latency_batch1(stack, splits["eval"].items),
            "end_to_end": end_to_end(spec, stack, calibrated, _abstained(ood, "instruction")),
            "checkpoint_sha256": file_sha256(spec.layout.checkpoint / "adapter_model.safetensors"),
            "shards_version": index["shards_version"],
            "min_accuracy": spec.config.loras.router.min_accuracy,
            "wall_seconds": time.perf_counter() - started,
        }
    )
    frame = predictions(spec, scored, labels.experts, temperature, ood)
    write_report(spec, report, frame, prototypes)
    return _result(spec, report, frame)


def fit_prototypes(train: SlotFeatures, classes: np.ndarray, experts: int) -> dict[str, Prototypes]:
    """Per distance score, the experts' prototypes of its features on the train split."""
    out = {}
    for name, field in PROTOTYPE_FEATURES.items():
        rows = getattr(train, field)
        if rows is not None:
            out[name] = Prototypes.fit(rows, classes, experts)
    return out


def score_parts(spec: StageSpec, stack: Stack, splits: dict[str, Split]) -> Scored:
    """Eval and val under every prompt condition, train (prototypes) and the screens of none."""
    conditioned = {
        part: {c: _conditioned(spec, stack, splits[part].items, part, c) for c in CONDITIONS}
        for part in ("eval", "val")
    }
    return Scored(
        eval={c: _features(stack, items) for c, items in conditioned["eval"].items()},
        val={c: _features(stack, items) for c, items in conditioned["val"].items()},
        train=_features(stack, splits["train"].items),
        ood={s: _features(stack, splits[s].items) for s in OOD_SPLITS if s in splits},
    )


def _conditioned(
    spec: StageSpec, stack: Stack, items: Sequence[Encoded], part: str, condition: str
) -> Sequence[Encoded]:
    """`items` with the instruction `condition` gives them (their own: unchanged)."""
    if condition == "instruction":
        return items
    router = stack.router
    rows = read_split(spec.layout.dataset, part)
    return [
        reprompt(
            stack.processor,
            item,
            router.bounds,
            router.system_prompt,
            eval_instruction(condition, row["instruction"], row["id"]),
            None,
        )
        for item, row in zip(items, rows, strict=True)
    ]


def _features(stack: Stack, items: Sequence[Encoded]) -> SlotFeatures:
    router = stack.router
    with stack.adapter(ROUTER_ADAPTER):
        return slot_features(stack.model, stack.processor, items, router.bounds, router.labels)


def _pooled(parts: dict[str, SlotFeatures]) -> SlotFeatures:
    return SlotFeatures.concat([parts[c] for c in CONDITIONS])


def _score(
    stack: Stack, items: Sequence[Encoded], adapter: str | None, batch_size: int = 32
) -> Scores:
    router = stack.router
    with stack.adapter(adapter):
        return score(
            stack.model, stack.processor, items, router.bounds, router.labels.token_ids, batch_size
        )


def conditions_section(
    parts: dict[str, SlotFeatures], truth: np.ndarray, temperature: float, experts: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, confusion and calibrated ECE per prompt condition, same screenshots."""
    out = {}
    for condition, features in parts.items():
        probabilities = softmax(features.logits, temperature)
        metrics = classification_report(truth, probabilities.argmax(1), experts)
        out[condition] = {
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "ece": reliability(probabilities, truth).ece,
            "confusion_matrix": metrics["confusion_matrix"],
            "n": metrics["n"],
        }
    return out


def ood_section(
    spec: StageSpec,
    scored: Scored,
    truth: np.ndarray,
    temperature: float,
    prototypes: dict[str, Prototypes],
) -> dict[str, Any] | None:
    """Candidate abstention scores side by side, the chosen one and its held-out figures.

    The threshold keeps `router.coverage` of the val screens (every condition); the score is
    chosen on the val part of the screens of none. The held-out parts (eval screens, `ood_eval`)
    only report. None without screens of none (the router then never abstains).
    """
    if not len(scored.ood.get("ood_val", _EMPTY).logits):
        return None
    coverage = spec.config.loras.router.coverage
    scores = {
        "val_in": ood_scores(_pooled(scored.val), temperature, prototypes),
        "val_out": ood_scores(scored.ood["ood_val"], temperature, prototypes),
        "held_in": ood_scores(_pooled(scored.eval), temperature, prototypes),
        "held_out": ood_scores(scored.ood["ood_eval"], temperature, prototypes),
    }
    table = candidates(**scores, coverage=coverage)
    chosen = choose(table)
    threshold = table[chosen]["threshold"]
    kept = scores["held_in"][chosen] >= threshold
    eval_truth = np.tile(truth, len(CONDITIONS))
    right = _pooled(scored.eval).logits.argmax(1) == eval_truth
    abstention = Abstention(chosen, threshold, prototypes.get(chosen))
    kinds = [row["kind"] for row in read_split(spec.layout.dataset, "ood_eval")]
    out_abstains = scores["held_out"][chosen] < threshold
    return {
        "score": chosen,
        "coverage_target": coverage,
        "threshold": threshold,
        "auroc": table[chosen]["auroc"],
        "abstain_rate": table[chosen]["abstain_rate"],
        "coverage": table[chosen]["coverage"],
        "selective_accuracy": float(right[kept].mean()) if kept.any() else 0.0,
        "n": len(out_abstains),
        "n_val": len(scores["val_out"][chosen]),
        "abstain_rate_by_kind": {
            kind: float(np.mean([a for a, k in zip(out_abstains, kinds, strict=True) if k == kind]))
            for kind in sorted(set(kinds))
        },
        "candidates": table,
        "router": abstention.to_json(),
        "scores": {
            "in": scores["held_in"][chosen].tolist(),
            "out": scores["held_out"][chosen].tolist(),
        },
    }


def _abstained(ood: dict[str, Any] | None, condition: str) -> np.ndarray | None:
    """Which eval screens the chosen score abstains on under `condition` (None: never)."""
    if ood is None:
        return None
    n = len(ood["scores"]["in"]) // len(CONDITIONS)
    at = CONDITIONS.index(condition) * n
    scores = np.array(ood["scores"]["in"][at : at + n])
    return np.asarray(scores < ood["threshold"])


def predictions(
    spec: StageSpec,
    scored: Scored,
    experts: Sequence[str],
    temperature: float,
    ood: dict[str, Any] | None,
) -> pd.DataFrame:
    """One row per held-out eval screenshot and condition, and per held-out screen of none."""
    parts = [(c, read_split(spec.layout.dataset, "eval"), scored.eval[c]) for c in CONDITIONS]
    if "ood_eval" in scored.ood:
        parts.append(("ood", read_split(spec.layout.dataset, "ood_eval"), scored.ood["ood_eval"]))
    scores = np.array(ood["scores"]["in"] + ood["scores"]["out"]) if ood else None
    records = []
    for condition, rows, features in parts:
        probabilities = softmax(features.logits, temperature)
        for row, probs in zip(rows, probabilities, strict=True):
            said = condition if "expert" in row else ("generic" if row["instruction"] else "none")
            records.append(
                {
                    "id": row["id"],
                    "condition": said,
                    "expert": row.get("expert", ""),
                    "kind": row.get("kind", "expert"),
                    "routed": experts[int(probs.argmax())],
                    "probabilities": json.dumps(
                        {e: round(float(p), 4) for e, p in zip(experts, probs, strict=True)}
                    ),
                }
            )
    frame = pd.DataFrame.from_records(records)
    frame["score"] = scores if scores is not None else np.nan
    frame["abstained"] = frame["score"] < ood["threshold"] if ood else False
    return frame


_EMPTY = SlotFeatures(np.zeros((0, 1)), np.zeros(0), np.zeros((0, 1)), [])


def calibration_section(
    raw: np.ndarray, calibrated: np.ndarray, truth: np.ndarray, temperature: float, n_val: int
) -> dict[str, Any]:
    """Temperature (fitted on val), ECE before/after with reliability tables, risk-coverage."""
    before = reliability(raw, truth)
    after = reliability(calibrated, truth)
    return {
        "temperature": temperature,
        "fitted_on": {"split": "val", "n": n_val, "objective": "brier"},
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


def end_to_end(
    spec: StageSpec, stack: Stack, calibrated: np.ndarray, abstained: np.ndarray | None
) -> dict[str, Any] | None:
    """Answer NLL per token on the eval split: routed expert vs oracle expert vs bare base.

    An abstained screen is answered by the bare base. None when no expert adapter is
    registered in loras.json (nothing to stack).
    """
    if not stack.experts:
        return None
    rows = read_split(spec.layout.dataset, "eval")
    experts = stack.router.labels.experts
    items = [_answer_item(stack, spec.layout.dataset, row) for row in rows]
    adapters: list[str | None] = [None, *stack.experts]
    nll = {name: stack.answer_nll(items, name) for name in adapters}
    confident = ~abstained if abstained is not None else np.ones(len(rows), dtype=bool)
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


def write_report(
    spec: StageSpec,
    report: dict[str, Any],
    frame: pd.DataFrame,
    prototypes: dict[str, Prototypes],
) -> None:
    """report.json, report.md, predictions.csv, the PNG figures and the prototypes, together."""
    with atomic_dir(spec.layout.report) as staging:
        write_json(staging / "report.json", report)
        frame.to_csv(staging / PREDICTIONS_FILE, index=False)
        ood = report["ood"]
        if ood is not None:
            if "prototypes" in ood["router"]:
                prototypes[ood["score"]].save(staging / ood["router"]["prototypes"])
            png = plots.score_distributions(
                ood["scores"]["in"], ood["scores"]["out"], ood["threshold"], ood["score"]
            )
            (staging / "ood_scores.png").write_bytes(png)
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
        f"**{calibration['ece_after']:.3f}**\n"
        f"- end to end: {_end_to_end_line(report['end_to_end'])}\n\n"
    )
    return (
        head
        + conditions_markdown(report["conditions"])
        + ood_markdown(report["ood"])
        + markdown_table(report)
        + "\n"
    )


def conditions_markdown(conditions: dict[str, Any]) -> str:
    """One row per prompt condition, on the same held-out screenshots."""
    lines = [
        "## By prompt condition (same held-out screenshots)",
        "",
        "| instruction | accuracy | macro-F1 | ECE (calibrated) |",
        "|---|---|---|---|",
    ]
    for name, row in conditions.items():
        lines.append(
            f"| {name} | {row['accuracy']:.3f} | {row['macro_f1']:.3f} | {row['ece']:.3f} |"
        )
    return "\n".join(lines) + "\n\n"


def ood_markdown(ood: dict[str, Any] | None) -> str:
    """The chosen abstention score's held-out figures and every candidate side by side."""
    if ood is None:
        return (
            "## Abstention\n\nno screens of none (dataset.yaml `ood.count: 0`): never abstains\n\n"
        )
    lines = [
        "## Abstention on screens of no expert",
        "",
        f"- score: **{ood['score']}** (chosen on {ood['n_val']} val screens of none), threshold "
        f"{ood['threshold']:.4g} keeps {ood['coverage_target']:.0%} of val expert screens",
        f"- held out ({ood['n']} screens of none): AUROC **{ood['auroc']:.3f}**, abstained on "
        f"**{ood['abstain_rate']:.1%}**; expert screens kept {ood['coverage']:.1%}, routed "
        f"correctly among those {ood['selective_accuracy']:.1%}",
        "- abstained by kind: "
        + ", ".join(f"{k} {v:.0%}" for k, v in ood["abstain_rate_by_kind"].items()),
        "",
        "| score | val AUROC | val abstain | held-out AUROC | held-out abstain | coverage |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in ood["candidates"].items():
        lines.append(
            f"| {name} | {row['val_auroc']:.3f} | {row['val_abstain_rate']:.1%} | "
            f"{row['auroc']:.3f} | {row['abstain_rate']:.1%} | {row['coverage']:.1%} |"
        )
    return "\n".join(lines) + "\n\n"


def _end_to_end_line(section: dict[str, Any] | None) -> str:
    if section is None:
        return "no expert adapters registered in config/loras.json"
    return (
        f"{section['metric']}: routed {section['routed']:.3f}, oracle {section['oracle']:.3f}, "
        f"base without adapter {section['base']:.3f} ({section['n']} answers)"
    )


def _result(spec: StageSpec, report: dict[str, Any], frame: pd.DataFrame) -> StageResult:
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
        "conditions": md(conditions_markdown(report["conditions"])),
        **{
            f"{name}_accuracy": number(round(row["accuracy"], 4))
            for name, row in report["conditions"].items()
        },
        **_ood_metadata(spec, report["ood"]),
        "predictions": table(
            [{str(k): v for k, v in row.items()} for row in frame.round(4).to_dict("records")],
            PREDICTION_COLUMNS,
        ),
        "predictions_file": path_value(spec.layout.report / PREDICTIONS_FILE),
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


PREDICTION_COLUMNS = {
    "id": "text",
    "condition": "text",
    "expert": "text",
    "kind": "text",
    "routed": "text",
    "probabilities": "text",
    "score": "float",
    "abstained": "bool",
}


def _ood_metadata(spec: StageSpec, ood: dict[str, Any] | None) -> dict[str, Any]:
    if ood is None:
        return {}
    png = (spec.layout.report / "ood_scores.png").read_bytes()
    return {
        "ood_score": text(ood["score"]),
        "ood_auroc": number(round(ood["auroc"], 4)),
        "ood_abstain_rate": number(round(ood["abstain_rate"], 4)),
        "ood_coverage": number(round(ood["coverage"], 4)),
        "ood_selective_accuracy": number(round(ood["selective_accuracy"], 4)),
        "ood_candidates": md(ood_markdown(ood)),
        "ood_scores": png_markdown(png, "abstention score: experts' screens vs screens of none"),
    }


if __name__ == "__main__":
    from modal_jobs.launch.pipes import main

    main(run, StageSpec)
