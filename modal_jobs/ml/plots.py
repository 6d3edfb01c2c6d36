"""PNG figures for asset metadata: loss curve, confusion, reliability, risk-coverage, OOD scores."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def loss_curve(steps: Sequence[int], losses: Sequence[float]) -> bytes:
    """Training loss against step."""
    figure, axis = plt.subplots(figsize=(6, 3.2))
    axis.plot(list(steps), list(losses), linewidth=1.2)
    axis.set_xlabel("step")
    axis.set_ylabel("answer-token loss")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    return _png(figure)


def confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> bytes:
    """Counts of true expert (rows) against routed expert (columns)."""
    size = max(4.0, 0.7 * len(labels) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("routed to")
    axis.set_ylabel("true expert")
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            colour = "white" if peak and count > peak / 2 else "black"
            axis.text(j, i, str(count), ha="center", va="center", color=colour)
    return _png(figure)


def reliability_diagram(tables: dict[str, dict[str, Any]]) -> bytes:
    """Accuracy against confidence per bin, one series per table (e.g. before / after T)."""
    figure, axis = plt.subplots(figsize=(4.6, 4.2))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect")
    for name, table in tables.items():
        points = [
            (c, a)
            for c, a, n in zip(table["confidence"], table["accuracy"], table["count"], strict=True)
            if n
        ]
        axis.plot(
            [c for c, _ in points],
            [a for _, a in points],
            marker="o",
            label=f"{name} (ECE {table['ece']:.3f})",
        )
    axis.set_xlim(0, 1.02)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("confidence (top probability)")
    axis.set_ylabel("accuracy")
    axis.legend(loc="upper left", fontsize=8)
    axis.grid(alpha=0.3)
    return _png(figure)


def risk_coverage(curve: dict[str, Sequence[float]]) -> bytes:
    """Error rate among the routed samples against the share routed (the rest abstain)."""
    figure, axis = plt.subplots(figsize=(4.6, 3.4))
    axis.plot(list(curve["coverage"]), list(curve["risk"]), linewidth=1.5)
    axis.set_xlim(0, 1.02)
    axis.set_xlabel("coverage (share of screenshots routed)")
    axis.set_ylabel("risk (routing error rate)")
    axis.grid(alpha=0.3)
    return _png(figure)


def score_distributions(
    inside: Sequence[float], outside: Sequence[float], threshold: float, name: str
) -> bytes:
    """Histograms of an abstention score on expert screens and on screens of none."""
    figure, axis = plt.subplots(figsize=(5.4, 3.4))
    values = [*inside, *outside]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    bins = [low + (high - low) * i / 40 for i in range(41)] if high > low else 10
    axis.hist(list(inside), bins=bins, alpha=0.6, label=f"experts' screens ({len(inside)})")
    axis.hist(list(outside), bins=bins, alpha=0.6, label=f"screens of none ({len(outside)})")
    axis.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
    axis.set_xlabel(f"{name} (below the threshold: abstain)")
    axis.set_ylabel("screenshots")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _png(figure)
