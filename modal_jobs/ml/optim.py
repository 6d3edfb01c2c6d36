"""Optimizer and learning-rate schedule shared by base pre-training and router training."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `floor` at `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw(
    params: Iterable[torch.nn.Parameter], lr: float, warmup: int, total: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW without weight decay, with a warm-up + cosine-decay learning-rate schedule."""
    optimizer = torch.optim.AdamW(list(params), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total)
    )
    return optimizer, scheduler


def optimizer_step(
    loss: torch.Tensor,
    params: Iterable[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_norm: float = 1.0,
) -> None:
    """Backward, clip the gradient norm, step optimizer and schedule, clear the gradients."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
