"""PNG figures for asset metadata: the training loss curve and the confusion matrix."""

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
