"""Classification metrics for the router: accuracy, macro-F1, per-class P/R/F1, confusion, AUROC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def classification_report(
    truth: np.ndarray, predicted: np.ndarray, labels: Sequence[str]
) -> dict[str, Any]:
    """Metrics of predicted vs true class indices over `labels` (index order)."""
    k = len(labels)
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    per_class: dict[str, dict[str, float]] = {}
    for i, label in enumerate(labels):
        tp = float(matrix[i, i])
        precision = tp / matrix[:, i].sum() if matrix[:, i].sum() else 0.0
        recall = tp / matrix[i, :].sum() if matrix[i, :].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(matrix[i, :].sum()),
        }
    n = int(matrix.sum())
    return {
        "n": n,
        "accuracy": float(np.trace(matrix) / n) if n else 0.0,
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])) if k else 0.0,
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "labels": list(labels),
    }


def markdown_table(report: dict[str, Any]) -> str:
    """Per-class table and confusion matrix as markdown."""
    lines = ["| expert | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for label, row in report["per_class"].items():
        lines.append(
            f"| {label} | {row['precision']:.3f} | {row['recall']:.3f} | "
            f"{row['f1']:.3f} | {row['support']} |"
        )
    labels = report["labels"]
    lines += ["", "| true \\ routed | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for label, row in zip(labels, report["confusion_matrix"], strict=True):
        lines.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Chance that a random `positive` score exceeds a random `negative` one (ties count half).

    The Mann-Whitney U statistic over the pooled ranks (average ranks for ties), divided by the
    number of pairs; 0.5 when either side is empty.
    """
    if not len(positive) or not len(negative):
        return 0.5
    pooled = np.concatenate([positive, negative]).astype(np.float64)
    order = np.argsort(pooled, kind="stable")
    ranks = np.empty(len(pooled))
    ranks[order] = np.arange(1, len(pooled) + 1)
    _, inverse, counts = np.unique(pooled, return_inverse=True, return_counts=True)
    sums = np.zeros(len(counts))
    np.add.at(sums, inverse, ranks)
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = len(positive), len(negative)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))
