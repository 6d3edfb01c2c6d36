"""Training memory, estimated from the batch plan before any weight is loaded.

A plan that cannot fit should fail in a second with the numbers and the fix, not after minutes of
loading a multi-GB base and an out-of-memory crash (or a GPU retried on Modal). The estimate
reads the base's `config.json` only (parameters counted on the meta device, nothing allocated):

- weights: every parameter in the runtime's dtype (the base is frozen: no gradient, no optimizer);
- adapter: LoRA parameters in fp32 (peft keeps adapters in fp32) with gradient and AdamW's two
  moments, 16 bytes each;
- activations kept for the backward pass, per padded position of the largest step: per decoder
  layer about 4·hidden + 4·intermediate + 5·(heads · head_dim) + (kv heads · head_dim) + 7·r +
  4·head_dim elements, plus the LoRA dropout's copies and masks when dropout is on. These
  coefficients were fitted to the tensors autograd saves (`torch.autograd.graph
  .saved_tensors_hooks`) on small Qwen3-VL shapes, and tests/test_memory.py holds the estimate
  to that measurement on shapes it was not fitted on. With gradient checkpointing only each
  layer's input is kept, and one layer is recomputed at a time;
- the answer-only head (`ml/loss.py`): answer positions × vocabulary in fp32, kept and its
  gradient;
- the frozen vision tower, run without autograd: one block's transient per patch, and the
  DeepStack features handed to the language model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Qwen3VLForConditionalGeneration

from modal_jobs.config import ConfigError, LoraSpec
from modal_jobs.ml.model import load_config

log = logging.getLogger(__name__)

GIB = 2**30
# Refuse above this share of what the device has free: allocator fragmentation, the CUDA
# context and the norms' fp32 copies under bf16 are not in the estimate.
HEADROOM = 0.9
# Answer tokens a router sample labels: the label's tokens and `<|im_end|>` (a few at most).
ANSWER_TOKENS_PER_ROW = 8
LORA_TARGETS_PER_LAYER = 7
ADAPTER_BYTES_PER_PARAMETER = 16  # fp32 weight, gradient, AdamW exp_avg and exp_avg_sq


@dataclass(frozen=True)
class Shapes:
    """What the estimate needs of a Qwen3-VL config."""

    parameters: int
    layers: int
    hidden: int
    intermediate: int
    query: int  # heads × head_dim
    key_value: int  # kv heads × head_dim
    head_dim: int
    vocab: int
    vision_hidden: int
    vision_intermediate: int
    merge: int
    deepstack: int

    @classmethod
    def of(cls, config: Any) -> Shapes:
        """Shapes of a `Qwen3VLConfig`; parameters counted on the meta device (no memory)."""
        with torch.device("meta"):
            parameters = sum(
                p.numel() for p in Qwen3VLForConditionalGeneration(config).parameters()
            )
        text, vision = config.text_config, config.vision_config
        return cls(
            parameters=parameters,
            layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            query=text.num_attention_heads * text.head_dim,
            key_value=text.num_key_value_heads * text.head_dim,
            head_dim=text.head_dim,
            vocab=text.vocab_size,
            vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size,
            merge=vision.spatial_merge_size,
            deepstack=len(vision.deepstack_visual_indexes),
        )

    def lora_parameters(self, rank: int) -> int:
        """Router LoRA parameters: r × (in + out) for q, k, v, o, gate, up, down of each layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.query, self.key_value
        per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
        return self.layers * rank * per_layer

    def layer_elements(self, lora: LoraSpec, dtype_bytes: int) -> float:
        """Bytes one decoder layer keeps for the backward pass, per padded position."""
        h, i, q, kv = self.hidden, self.intermediate, self.query, self.key_value
        kept = 4 * h + 4 * i + 5 * q + kv + LORA_TARGETS_PER_LAYER * lora.r + 4 * self.head_dim
        bytes_ = kept * dtype_bytes
        if lora.dropout > 0:
            # Each target's dropped-out input (5 take the hidden state, o the attention output,
            # down the MLP's) and its boolean mask.
            bytes_ += (5 * h + q + i) * (dtype_bytes + 1)
        return float(bytes_)


@dataclass(frozen=True)
class Step:
    """The largest step of a plan on one device: rows, padded width, image patches."""

    rows: int
    width: int
    patches: int

    @classmethod
    def largest(
        cls, batches: Iterable[Sequence[int]], lengths: np.ndarray, grids: np.ndarray
    ) -> Step:
        """The step with the most padded positions (right-padded to its longest sample)."""
        best = cls(0, 0, 0)
        for batch in batches:
            rows = list(batch)
            width = int(lengths[rows].max())
            if len(rows) * width > best.rows * best.width:
                best = cls(len(rows), width, int(grids[rows].prod(axis=1).sum()))
        return best


@dataclass(frozen=True)
class Estimate:
    """Bytes by kind, for the largest step of a plan."""

    weights: int
    adapter: int
    activations: int
    head: int
    vision: int
    step: Step

    @property
    def total(self) -> int:
        """Everything together."""
        return self.weights + self.adapter + self.activations + self.head + self.vision

    def describe(self) -> str:
        """One line of GiB figures."""
        parts = {
            "weights": self.weights,
            "adapter + optimizer": self.adapter,
            "activations": self.activations,
            "answer head": self.head,
            "vision tower": self.vision,
        }
        listed = ", ".join(f"{name} {value / GIB:.2f}" for name, value in parts.items())
        return f"~{self.total / GIB:.2f} GiB ({listed})"


def estimate(
    shapes: Shapes, lora: LoraSpec, step: Step, dtype: torch.dtype, checkpointing: bool
) -> Estimate:
    """Training memory of `step` on one device (see the module docstring for each term)."""
    size = torch.empty(0, dtype=dtype).element_size()
    positions = step.rows * step.width
    per_layer = shapes.layer_elements(lora, size)
    if checkpointing:
        kept = shapes.layers * shapes.hidden * size + per_layer  # inputs + one recomputed layer
    else:
        kept = shapes.layers * per_layer
    answers = step.rows * ANSWER_TOKENS_PER_ROW
    tokens = step.patches // shapes.merge**2
    vision_block = step.patches * (shapes.vision_intermediate + 4 * shapes.vision_hidden)
    deepstack = shapes.deepstack * tokens * shapes.hidden
    return Estimate(
        weights=shapes.parameters * size,
        adapter=shapes.lora_parameters(lora.r) * ADAPTER_BYTES_PER_PARAMETER,
        activations=int(positions * kept),
        head=answers * shapes.vocab * 4 * 2,
        vision=(vision_block + deepstack) * size,
        step=step,
    )


def free_bytes(device: torch.device) -> int:
    """Memory free for this process on `device`: CUDA's free memory, else Linux MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        meminfo = ""
    available = [
        line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:")
    ]
    if available:
        return int(available[0]) * 1024
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_fits(estimated: Estimate, available: int, batch_size: int) -> None:
    """Refuse, with the numbers and the fix, a plan whose largest step cannot fit `available`."""
    budget = HEADROOM * available
    if estimated.total <= budget:
        return
    fixed = estimated.weights + estimated.adapter
    per_row = (estimated.total - fixed) / max(1, estimated.step.rows)
    fits = int((budget - fixed) // per_row) if per_row > 0 and budget > fixed else 0
    advice = (
        f"set batch_size to {fits} or less"
        if 0 < fits < batch_size
        else "use a device with more memory (the weights alone do not fit)"
        if fits == 0
        else "lower max_pixels"
    )
    raise ConfigError(
        f"training plan needs {estimated.describe()} for its largest step "
        f"({estimated.step.rows} rows × {estimated.step.width} positions, "
        f"{estimated.step.patches} image patches), but the device has "
        f"{available / GIB:.2f} GiB free ({HEADROOM:.0%} usable); fix: {advice}, lower "
        "max_pixels in config/dataset.yaml (fewer image tokens per screenshot), or turn "
        "gradient_checkpointing on"
    )


def check_plan(
    base: str,
    lora: LoraSpec,
    runtime: Any,
    checkpointing: bool,
    batches: Iterable[Sequence[int]],
    split: Any,
) -> Estimate:
    """Estimate a training plan on `runtime`'s device from the base's config; refuse if too big.

    `batches` are this process's share of every step; `split` has their `lengths` and `grids`.
    """
    config = load_config(base)
    step = Step.largest(batches, split.lengths, split.grids)
    dtype = runtime.weights_dtype(config)
    estimated = estimate(Shapes.of(config), lora, step, dtype, checkpointing)
    log.info("training memory estimate: %s", estimated.describe())
    check_fits(estimated, free_bytes(runtime.device), step.rows)
    return estimated
