"""Routing in one forward pass: softmax over the experts' first label tokens at the answer slot."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modal_jobs.config import ImageBounds
from modal_jobs.ml.batching import Encoded, collate
from modal_jobs.ml.calibration import softmax
from modal_jobs.ml.model import causal_lm


@dataclass(frozen=True)
class Scores:
    """Per-sample label-token logits, expert probabilities (T = 1) and seconds per batch."""

    logits: np.ndarray
    probabilities: np.ndarray
    batch_seconds: list[float]


@torch.inference_mode()
def score(
    model: Any,
    processor: Any,
    items: Sequence[Encoded],
    bounds: ImageBounds,
    token_ids: Sequence[int],
    batch_size: int = 32,
) -> Scores:
    """Probabilities over experts for each item (prompt or prompt + answer), one forward a batch."""
    device = next(model.parameters()).device
    label_ids = torch.tensor(list(token_ids), device=device)
    chunks, seconds = [], []
    for start in range(0, len(items), batch_size):
        group = list(items[start : start + batch_size])
        began = time.perf_counter()
        batch = {k: v.to(device) for k, v in collate(processor, group, bounds).items()}
        batch.pop("labels")
        slots = [item.prompt_len - 1 for item in group]
        chosen = slot_logits(model, batch, slots, label_ids).float()
        chunks.append(chosen.cpu().numpy())
        seconds.append(time.perf_counter() - began)
    logits = np.concatenate(chunks) if chunks else np.zeros((0, len(token_ids)))
    return Scores(logits, softmax(logits), seconds)


def slot_logits(
    model: Any, batch: dict[str, torch.Tensor], slots: Sequence[int], label_ids: torch.Tensor
) -> torch.Tensor:
    """Logits of `label_ids` at one position per row: the only ones routing needs.

    The body runs without a KV cache (nothing decodes after it), and only the experts' rows of
    the vocabulary head are applied, at the slot: the full head over every position is skipped.
    """
    lm = causal_lm(model)
    hidden = lm.model(**batch, use_cache=False).last_hidden_state
    at = torch.tensor(list(slots), device=hidden.device)
    rows = hidden[torch.arange(len(slots), device=hidden.device), at]
    head = lm.lm_head
    bias = None if head.bias is None else head.bias[label_ids]
    return torch.nn.functional.linear(rows, head.weight[label_ids], bias)
