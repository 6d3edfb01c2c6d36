"""Routing in one forward pass: softmax over the experts' first label tokens at the answer slot."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from modal_jobs.batching import Encoded, collate
from modal_jobs.calibration import softmax
from modal_jobs.config import ImageBounds


@dataclass(frozen=True)
class Scores:
    """Per-sample label-token logits, expert probabilities (T = 1) and seconds per batch."""

    logits: np.ndarray
    probabilities: np.ndarray
    batch_seconds: list[float]


@torch.no_grad()
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
        # Routing reads one position and never decodes further: no KV cache to build.
        logits = model(**batch, use_cache=False).logits
        # The logits at the last prompt token predict the answer's first token.
        rows = torch.arange(len(group), device=device)
        slots = torch.tensor([item.prompt_len - 1 for item in group], device=device)
        chosen = logits[rows, slots][:, label_ids].float()
        chunks.append(chosen.cpu().numpy())
        seconds.append(time.perf_counter() - began)
    logits = np.concatenate(chunks) if chunks else np.zeros((0, len(token_ids)))
    return Scores(logits, softmax(logits), seconds)
