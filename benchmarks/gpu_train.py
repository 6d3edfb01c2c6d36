"""Router-LoRA training throughput on the real Qwen3-VL-2B architecture; prints ONE JSON object.

The model is `Qwen3VLForConditionalGeneration` built from Qwen/Qwen3-VL-2B-Instruct's config.json
values (`TEXT`, `VISION`, `TOKENS` below, with their sources) with random bf16 weights, created on
the GPU itself: nothing is downloaded. The LoRA is production's (`modal_jobs.ml.model.lora_config`
with the `qwen3-vl-2b` preset's settings from config/models.yaml: language-model projections
only), with non-reentrant gradient checkpointing and input gradients enabled, bf16, and
`flash_attention_2` when flash-attn is importable, else `sdpa` (`Runtime.detect`).

Data: synthetic routing samples in the production chat layout (system prompt; user turn with one
screenshot and a 4-40 token instruction; a 1-2 token answer closed by <|im_end|>). Screenshot sizes
are drawn from `SCREENS` (desktop, laptop, app-window and phone resolutions) and resized with
Qwen-VL's `smart_resize` into the preset's pixel bounds (`--max-pixels` overrides the upper one),
so each image has its real patch grid and number of <|image_pad|> tokens; pixels are random.
The loss is on the answer tokens only, as in training.

Variants, timed on the same samples in the same run (each: one untimed FLOP-counting step,
`--warmup` untimed steps, then `--steps` timed ones):
- baseline: what a plain loop does (and mole's training did before): batches right-padded to
  their longest sample, logits over every position and the whole vocabulary,
  `batching.answer_loss`;
- grouped: length-grouped batches as training plans them (`loader.LengthGrouped`) and logits only
  where an answer token is predicted (`logits_to_keep` as a boolean mask, as
  `loss.AnswerLoss` keeps only those positions);
- packed: each batch packed padding-free into one row with per-sample position ids, so
  flash-attention's varlen kernel sees the sample boundaries (under sdpa transformers builds a
  block-diagonal mask instead, which still computes the masked blocks), answer-only logits.
`ours` is `grouped`, what production training (`modal_jobs.stages.train`) does on every device;
`speedup` = its real tokens/s over the baseline's. `packed` is not in production: it is reported
apart (`packed_not_in_production`, its speedup over the baseline) as what padding-free batches
would add. Collation (`padded`, `packed`) is written here because the samples are synthetic
tensors, not shard rows.
A timed step is forward, loss, backward, gradient clipping and the AdamW step
(`optim.optimizer_step`) on a batch already on the device, whose M-RoPE position ids were computed
when it was collated, with the model's own `get_rope_index` (a data loader's job), for every
variant alike.

FLOPs. MFU = useful model FLOP/s / the GPU's dense bf16 peak (`PEAK_BF16_TFLOPS`, or
`--peak-tflops`). With P_lm the language model's projection weights, P_lora the adapter's weights,
P_vt the vision tower's patch-embedding and block weights, P_vm the four mergers' weights, V*h the
(tied, frozen) output head, T_i a sample's real tokens, p_i its image patches (4 per merged
token) and A the answer tokens, one step is
  vision tower, frozen, forward only:  2*P_vt*sum(p_i) + 2*P_vm*sum(p_i)/4 + 4*depth*d_v*sum(p_i^2)
  language model:  (4*P_lm + 6*P_lora)*sum(T_i) + 12*layers*heads*head_dim*sum(T_i^2)
    (frozen weights: forward 2 + input gradient 2, no weight gradient; LoRA: forward 2 +
    backward 4; attention: forward 4 + backward 8, counted in full as in PaLM's MFU)
  output head:  4*V*h*A  (answer positions only: forward + input gradient)
Padding, logits at other positions and the checkpointing recompute are not useful work, so every
variant has the same model FLOPs and its MFU ratio equals its speedup. The formula is checked on
each variant's counted step against `torch.utils.flop_counter.FlopCounterMode`: what the counter
saw outside attention (padding, all logits and recompute included) over the same formula's
executed terms is `flop_check` (about 1.0; a little under because the recompute stops before
each layer's last LoRA product, 0.4% on the smoke config and nothing at scale). Attention stays
out of that check: the counter sees neither flash-attn's kernels nor CPU sdpa.

    python benchmarks/gpu_train.py [--batch-size 8] [--steps 20] [--warmup 3] [--max-pixels N]
    python benchmarks/gpu_train.py --cpu-smoke   # the same code path on CPU, tiny config, seconds
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import peft
import torch
import transformers
from peft import PeftModel, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from modal_jobs.config import ImageBounds, ModelPreset, load_config
from modal_jobs.ml.batching import IGNORE_INDEX, answer_loss
from modal_jobs.ml.loader import LengthGrouped
from modal_jobs.ml.model import Runtime, lora_config, patch_embed_as_matmul
from modal_jobs.ml.optim import adamw, optimizer_step

# Qwen/Qwen3-VL-2B-Instruct's config.json,
# https://huggingface.co/Qwen/Qwen3-VL-2B-Instruct/blob/main/config.json. No hub access here: the
# values were read from public copies of that file found with code search (two test fixtures that
# reproduce the 2B config and a design note that tabulates it); the special token ids, M-RoPE
# sections and vision tower also match Qwen3-VL-4B-Instruct's config. Built from them the model
# has 2,127,532,032 parameters, in line with the checkpoint's 4.26 GB bf16 model.safetensors.
TEXT = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    "tie_word_embeddings": True,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
}
VISION = {
    "depth": 24,
    "hidden_size": 1024,
    "hidden_act": "gelu_pytorch_tanh",
    "intermediate_size": 4096,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 2048,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [5, 11, 17],
}
TOKENS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
REAL_PRESET = "qwen3-vl-2b"
SMOKE_PRESET = "tiny"

# Dense (no sparsity) bf16 tensor-core peaks, TFLOPS, from NVIDIA's datasheets (which quote
# twice these "with sparsity"), matched against torch.cuda.get_device_name() in this order.
# The A10G is left out on purpose: NVIDIA publishes no figure for it and public numbers
# disagree; pass --peak-tflops for it or any GPU not listed.
PEAK_BF16_TFLOPS = (
    (r"H100.*PCIe", 756.5),
    (r"H[12]00 NVL", 835.5),
    (r"H100|H200|GH200", 989.4),
    (r"B200", 2250.0),
    (r"A100", 312.0),
    (r"L40S", 362.05),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)

# (width, height) of the screenshots drawn, uniformly: desktops, laptops, app windows, phones.
SCREENS = (
    (1920, 1080),
    (2560, 1440),
    (1366, 768),
    (1280, 800),
    (1024, 768),
    (800, 600),
    (640, 480),
    (1170, 2532),
    (1080, 2400),
    (390, 844),
    (720, 1280),
)
SYSTEM_TOKENS = 14  # "Answer with the name of the expert that should handle this screenshot."
LEARNING_RATE = 1e-4


@dataclass(frozen=True)
class Specials:
    """Token ids the sample layout needs; ordinary text ids are drawn below `pad`."""

    pad: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image: int


# Qwen's tokenizer: <|endoftext|> (pad) 151643, <|im_start|> 151644, <|im_end|> 151645 (the
# config's eos_token_id); vision markers and image pad as in TOKENS.
QWEN_SPECIALS = Specials(151643, 151644, 151645, 151652, 151653, 151655)


def real_config() -> tuple[Qwen3VLConfig, Specials]:
    """Qwen3-VL-2B-Instruct's architecture."""
    config = Qwen3VLConfig(
        text_config=TEXT, vision_config=VISION, tie_word_embeddings=True, **TOKENS
    )
    return config, QWEN_SPECIALS


def smoke_config(preset: ModelPreset) -> tuple[Qwen3VLConfig, Specials]:
    """A drastically scaled-down Qwen3-VL with the tiny preset's dimensions, for the CPU smoke."""
    assert preset.text is not None and preset.vision is not None and preset.vocab_size
    text = preset.text.model_dump()
    head = text["head_dim"]
    third = head // 6  # M-RoPE sections (temporal, height, width) must sum to head_dim / 2
    top = preset.vocab_size - 8
    specials = Specials(top, top + 1, top + 2, top + 3, top + 4, top + 5)
    config = Qwen3VLConfig(
        text_config={
            **TEXT,
            **text,
            "vocab_size": preset.vocab_size,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                **TEXT["rope_parameters"],
                "mrope_section": [head // 2 - 2 * third, third, third],
            },
        },
        vision_config={
            **VISION,
            **preset.vision.model_dump(),
            "out_hidden_size": text["hidden_size"],
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [preset.vision.depth - 1],
        },
        image_token_id=specials.image,
        video_token_id=top + 6,
        vision_start_token_id=specials.vision_start,
        vision_end_token_id=specials.vision_end,
        tie_word_embeddings=True,
    )
    return config, specials


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class Sample:
    """One tokenized routing sample: ids, answer span, image grid and M-RoPE positions (3, L)."""

    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    prompt_len: int
    answer_end: int
    grid_thw: tuple[int, int, int]
    positions: torch.Tensor

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def patches(self) -> int:
        return int(np.prod(self.grid_thw))


def make_sample(
    rng: np.random.Generator, config: Qwen3VLConfig, specials: Specials, bounds: ImageBounds
) -> Sample:
    """A routing sample around a screenshot of a random size, in the production chat layout."""
    vision = config.vision_config
    width, height = SCREENS[rng.integers(len(SCREENS))]
    patch, merge = vision.patch_size, vision.spatial_merge_size
    h, w = smart_resize(height, width, patch * merge, bounds.min_pixels, bounds.max_pixels)
    grid = (1, h // patch, w // patch)

    def text(n: int) -> list[int]:
        return rng.integers(0, specials.pad, n).tolist()

    s = specials
    image = [s.vision_start] + [s.image] * (h * w // (patch * merge) ** 2) + [s.vision_end]
    system = [s.im_start, *text(2 + SYSTEM_TOKENS), s.im_end, *text(1)]
    instruction = text(int(rng.integers(4, 41)))
    user = [s.im_start, *text(2), *image, *instruction, s.im_end, *text(1)]
    prompt = system + user + [s.im_start, *text(2)]
    answer = [*text(int(rng.integers(1, 3))), s.im_end]
    ids = torch.tensor([*prompt, *answer, *text(1)], dtype=torch.long)
    return Sample(
        input_ids=ids,
        mm_token_type_ids=(ids == s.image).long(),
        prompt_len=len(prompt),
        answer_end=len(prompt) + len(answer),
        grid_thw=grid,
        positions=torch.empty(0),
    )


def with_positions(model: PeftModel, sample: Sample) -> Sample:
    """The sample with its M-RoPE position ids from the model's own `get_rope_index`."""
    positions, _ = model.get_base_model().model.get_rope_index(
        sample.input_ids[None],
        sample.mm_token_type_ids[None],
        image_grid_thw=torch.tensor([sample.grid_thw]),
    )
    return replace(sample, positions=positions[:, 0])


def random_batches(samples: Sequence[Sample], batch_size: int) -> list[list[Sample]]:
    """Consecutive batches of i.i.d. samples: a shuffled loader's batches."""
    return [list(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


def length_grouped(samples: Sequence[Sample], batch_size: int, seed: int) -> list[list[Sample]]:
    """One epoch of batches as router training plans them (`loader.LengthGrouped`)."""
    plan = LengthGrouped([s.length for s in samples], batch_size, seed)
    return [[samples[i] for i in batch] for batch in plan.epoch(0)]


@dataclass
class Step:
    """A collated batch: model inputs, what the loss needs, and the figures FLOPs are made of."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None  # baseline: (rows, width) labels for `answer_loss`
    keep: torch.Tensor | None  # otherwise: positions whose logits are kept (bool)
    targets: torch.Tensor | None  # and the answer tokens they predict
    samples: list[Sample]
    processed: int  # token positions the language model runs on, padding included

    def to(self, device: torch.device, dtype: torch.dtype, pixel_dim: int) -> Step:
        """On the device, with random pixels made there (their values do not matter)."""
        inputs = {key: value.to(device) for key, value in self.inputs.items()}
        patches = sum(s.patches for s in self.samples)
        inputs["pixel_values"] = torch.randn(patches, pixel_dim, device=device, dtype=dtype)
        moved = [t.to(device) if t is not None else None for t in (self.labels, self.keep)]
        targets = self.targets.to(device) if self.targets is not None else None
        return replace(self, inputs=inputs, labels=moved[0], keep=moved[1], targets=targets)

    @property
    def logit_positions(self) -> int:
        return self.processed if self.keep is None else int(self.keep.sum())


def answer_positions(sample: Sample) -> torch.Tensor:
    """Positions whose next token is an answer token (where the loss is)."""
    return torch.arange(sample.prompt_len - 1, sample.answer_end - 1)


def padded(samples: list[Sample], answer_only: bool, specials: Specials) -> Step:
    """Right-padded rows, as `batching.collate` makes them; answer-only logits if asked."""
    width = max(s.length for s in samples)
    rows = len(samples)
    ids = torch.full((rows, width), specials.pad, dtype=torch.long)
    mask, mm = torch.zeros_like(ids), torch.zeros_like(ids)
    positions = torch.zeros((3, rows, width), dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    keep = torch.zeros((rows, width), dtype=torch.bool)
    for row, s in enumerate(samples):
        ids[row, : s.length], mask[row, : s.length] = s.input_ids, 1
        mm[row, : s.length], positions[:, row, : s.length] = s.mm_token_type_ids, s.positions
        span = slice(s.prompt_len, s.answer_end)
        labels[row, span] = s.input_ids[span]
        keep[row, answer_positions(s)] = True
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": mm,
        "position_ids": positions,
        "image_grid_thw": torch.tensor([s.grid_thw for s in samples]),
    }
    if not answer_only:
        return Step(inputs, labels, None, None, samples, rows * width)
    targets = torch.cat([s.input_ids[answer_positions(s) + 1] for s in samples])
    return Step(inputs, None, keep, targets, samples, rows * width)


def packed(samples: list[Sample]) -> Step:
    """All samples in one row, no padding; text positions restart per sample (the boundaries)."""
    text = torch.cat([torch.arange(s.length) for s in samples])
    positions = torch.cat([s.positions for s in samples], dim=1)
    offsets = np.cumsum([0] + [s.length for s in samples[:-1]])
    keep = torch.zeros(sum(s.length for s in samples), dtype=torch.bool)
    for offset, s in zip(offsets, samples, strict=True):
        keep[answer_positions(s) + int(offset)] = True
    inputs = {
        "input_ids": torch.cat([s.input_ids for s in samples])[None],
        "mm_token_type_ids": torch.cat([s.mm_token_type_ids for s in samples])[None],
        "position_ids": torch.cat([text[None], positions])[:, None],
        "image_grid_thw": torch.tensor([s.grid_thw for s in samples]),
    }
    targets = torch.cat([s.input_ids[answer_positions(s) + 1] for s in samples])
    return Step(inputs, None, keep[None], targets, samples, len(keep))


def loss_of(model: PeftModel, step: Step) -> torch.Tensor:
    """Baseline: production's loss over all logits; otherwise logits at answer positions only."""
    # No KV cache: with one, transformers would not read packed rows' restarting positions.
    if step.keep is None:
        assert step.labels is not None
        return answer_loss(model(**step.inputs, use_cache=False).logits, step.labels)
    logits = model(**step.inputs, use_cache=False, logits_to_keep=step.keep).logits
    return torch.nn.functional.cross_entropy(logits.float(), step.targets)


# ---------------------------------------------------------------- model and FLOPs


def build_model(
    config: Qwen3VLConfig, runtime: Runtime, preset: ModelPreset, seed: int
) -> PeftModel:
    """Random-init base created on the device itself, frozen, with the production router LoRA."""
    torch.manual_seed(seed)
    with runtime.device:
        base = Qwen3VLForConditionalGeneration._from_config(
            config, dtype=runtime.dtype, attn_implementation=runtime.attention
        )
    base.requires_grad_(False)
    patch_embed_as_matmul(base)  # as `load_base` does in production
    # transformers 5's name for gradient_checkpointing_enable (now its deprecated alias)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    model = get_peft_model(base, lora_config(preset.lora))
    model.train()
    return model


@dataclass(frozen=True)
class Flops:
    """Weight counts by where they apply, and the FLOPs of a step from them (module docstring)."""

    vision_tower: int  # per patch
    vision_merge: int  # per merged token
    lm: int  # per language-model token position
    lora: int
    head: int  # per logit position
    vision_attention: int  # depth * vision hidden size
    lm_attention: int  # layers * heads * head_dim
    merge: int  # patches per merged token

    @classmethod
    def of(cls, model: PeftModel, config: Qwen3VLConfig) -> Flops:
        """Sum the model's projection weights (Linear and the Conv3d patch embedding) by group."""
        groups = dict.fromkeys(("lora", "merge", "vision", "lm", "head"), 0)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv3d):
                groups[_group(name)] += module.weight.numel()
        text, vision = config.text_config, config.vision_config
        return cls(
            vision_tower=groups["vision"],
            vision_merge=groups["merge"],
            lm=groups["lm"],
            lora=groups["lora"],
            head=groups["head"],
            vision_attention=vision.depth * vision.hidden_size,
            lm_attention=text.num_hidden_layers * text.num_attention_heads * text.head_dim,
            merge=vision.spatial_merge_size**2,
        )

    def _vision_weights(self, step: Step) -> int:
        patches = sum(s.patches for s in step.samples)
        return 2 * self.vision_tower * patches + 2 * self.vision_merge * patches // self.merge

    def useful(self, step: Step) -> int:
        """Model FLOPs of the step: real tokens, answer logits, no recompute (MFU's numerator)."""
        tokens = sum(s.length for s in step.samples)
        answers = sum(s.answer_end - s.prompt_len for s in step.samples)
        vision_attention = 4 * self.vision_attention * sum(s.patches**2 for s in step.samples)
        lm_attention = 12 * self.lm_attention * sum(s.length**2 for s in step.samples)
        lm = (4 * self.lm + 6 * self.lora) * tokens
        return (
            self._vision_weights(step)
            + vision_attention
            + lm
            + lm_attention
            + 4 * self.head * answers
        )

    def executed_outside_attention(self, step: Step, recompute: bool) -> int:
        """What the step multiplies outside attention: padding, all kept logits, recompute."""
        per_position = 4 * self.lm + 6 * self.lora + (2 * self.lm + 2 * self.lora) * recompute
        head = 4 * self.head * step.logit_positions
        return self._vision_weights(step) + per_position * step.processed + head


def _group(name: str) -> str:
    if "lora_" in name:
        return "lora"
    if ".visual.merger" in name or ".visual.deepstack_merger_list" in name:
        return "merge"
    for key, group in ((".visual.", "vision"), (".language_model.", "lm"), ("lm_head", "head")):
        if key in name:
            return group
    raise ValueError(f"{name}: projection outside the known groups; extend Flops.of")


def peak_tflops(device_name: str | None, override: float | None) -> tuple[float | None, str]:
    """The dense bf16 peak and where it came from."""
    if override is not None:
        return override, "--peak-tflops"
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if device_name and re.search(pattern, device_name):
            return tflops, f"table: {pattern}"
    return None, "unknown device: pass --peak-tflops"


# ---------------------------------------------------------------- the timed loop


@dataclass(frozen=True)
class Bench:
    """What every variant shares: model, device, FLOP model and run settings."""

    model: PeftModel
    runtime: Runtime
    flops: Flops
    pixel_dim: int
    warmup: int
    peak: float | None

    def sync(self) -> None:
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize()


@dataclass(frozen=True)
class Timed:
    """One step's figures (its tensors are gone: holding them would inflate peak memory)."""

    seconds: float
    loss: float
    tokens: int  # real ones: text and image, no padding
    images: int
    processed: int  # token positions the language model ran on
    logit_positions: int
    useful_flops: int
    executed_flops: int  # outside attention, as FlopCounterMode sees them


def run_variant(
    bench: Bench, batches: list[list[Sample]], collate: Callable[[list[Sample]], Step]
) -> dict[str, Any]:
    """One FLOP-counted step, the warm-up, then the timed steps; their figures."""
    trainable = [p for p in bench.model.parameters() if p.requires_grad]
    optimizer, scheduler = adamw(trainable, LEARNING_RATE, 0, len(batches))
    _release(bench.runtime)

    def step(samples: list[Sample]) -> Timed:
        batch = collate(samples)
        on_device = batch.to(bench.runtime.device, bench.runtime.dtype, bench.pixel_dim)
        bench.sync()
        began = time.perf_counter()
        loss = loss_of(bench.model, on_device)
        optimizer_step(loss, trainable, optimizer, scheduler)
        value = loss.item()  # waits for the step, as a logging loop does
        bench.sync()
        return Timed(
            seconds=time.perf_counter() - began,
            loss=value,
            tokens=sum(s.length for s in samples),
            images=len(samples),
            processed=batch.processed,
            logit_positions=batch.logit_positions,
            useful_flops=bench.flops.useful(batch),
            executed_flops=bench.flops.executed_outside_attention(batch, recompute=True),
        )

    with FlopCounterMode(display=False) as counter:
        counted = step(batches[0])
    timed = [step(samples) for samples in batches[1:]][bench.warmup :]
    seconds = sum(t.seconds for t in timed)
    tokens = sum(t.tokens for t in timed)
    useful = sum(t.useful_flops for t in timed)
    return {
        "tokens_per_s": tokens / seconds,
        "images_per_s": sum(t.images for t in timed) / seconds,
        "step_ms_median": 1000 * statistics.median(t.seconds for t in timed),
        "peak_memory_gib": _peak_memory(bench.runtime),
        "model_tflops": useful / seconds / 1e12,
        "mfu": useful / seconds / (bench.peak * 1e12) if bench.peak else None,
        "padding_fraction": 1 - tokens / sum(t.processed for t in timed),
        "logit_positions_per_step": statistics.mean(t.logit_positions for t in timed),
        "final_loss": timed[-1].loss,
        "flop_check": _flop_check(counter, counted),
    }


def _flop_check(counter: FlopCounterMode, step: Timed) -> dict[str, float]:
    counts = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in counts.items() if "attention" in str(op))
    outside = sum(counts.values()) - attention
    return {
        "counted": float(outside),
        "formula": float(step.executed_flops),
        "ratio": outside / step.executed_flops,
        "counted_attention": float(attention),
    }


def _release(runtime: Runtime) -> None:
    gc.collect()
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(runtime: Runtime) -> float | None:
    if runtime.device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated() / 2**30


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, help="default: the preset's (smoke: 2)")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default 20, smoke 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant (default 3, smoke 0)")
    parser.add_argument("--max-pixels", type=int, help="upper image bound (default: the preset's)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny config on CPU, to test the code path"
    )
    args = parser.parse_args()
    smoke = args.cpu_smoke
    args.steps = args.steps or (2 if smoke else 20)
    args.warmup = (0 if smoke else 3) if args.warmup is None else args.warmup
    return args


def setup(args: argparse.Namespace) -> tuple[Runtime, ModelPreset, Qwen3VLConfig, Specials]:
    """Runtime, preset and architecture for this run (the smoke: tiny, fp32, CPU)."""
    models = load_config().models
    if args.cpu_smoke:
        preset = models[SMOKE_PRESET]
        return (Runtime(torch.device("cpu"), torch.float32, "sdpa"), preset, *smoke_config(preset))
    return (Runtime.detect(), models[REAL_PRESET], *real_config())


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Build, run the three variants on the same samples, and summarise."""
    began = time.perf_counter()
    runtime, preset, config, specials = setup(args)
    bounds = preset.image
    if args.max_pixels:
        bounds = ImageBounds(
            min_pixels=min(bounds.min_pixels, args.max_pixels), max_pixels=args.max_pixels
        )
    batch_size = args.batch_size or (2 if args.cpu_smoke else preset.train.batch_size)
    model = build_model(config, runtime, preset, args.seed)
    built = time.perf_counter() - began

    rng = np.random.default_rng(args.seed)
    n = batch_size * (1 + args.warmup + args.steps)
    samples = [with_positions(model, make_sample(rng, config, specials, bounds)) for _ in range(n)]
    device_name = torch.cuda.get_device_name() if runtime.device.type == "cuda" else None
    peak, peak_source = peak_tflops(device_name, args.peak_tflops)
    vision = config.vision_config
    pixel_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    bench = Bench(model, runtime, Flops.of(model, config), pixel_dim, args.warmup, peak)
    variants = {
        "baseline": run_variant(
            bench, random_batches(samples, batch_size), lambda b: padded(b, False, specials)
        ),
        "grouped": run_variant(
            bench,
            length_grouped(samples, batch_size, args.seed),
            lambda b: padded(b, True, specials),
        ),
        "packed": run_variant(bench, random_batches(samples, batch_size), packed),
    }
    ours = "grouped"  # what modal_jobs.stages.train runs; packing is not in production
    for figures in variants.values():
        figures["speedup"] = figures["tokens_per_s"] / variants["baseline"]["tokens_per_s"]
    return {
        **headline(variants, ours),
        "ours": ours,
        "packed_not_in_production": {
            "speedup": variants["packed"]["speedup"],
            "vs_ours": variants["packed"]["tokens_per_s"] / variants[ours]["tokens_per_s"],
        },
        "variants": variants,
        "device": str(runtime.device),
        "gpu": device_name,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "attention": runtime.attention,
        "dtype": str(runtime.dtype).removeprefix("torch."),
        "model": model_summary(model, config, preset, args.cpu_smoke),
        "data": data_summary(samples, batch_size, args, bounds),
        "build_s": built,
        "wall_s": time.perf_counter() - began,
    }


def headline(variants: dict[str, dict[str, Any]], ours: str) -> dict[str, Any]:
    keys = ("tokens_per_s", "images_per_s", "step_ms_median", "peak_memory_gib", "mfu")
    return {
        **{key: variants[ours][key] for key in keys},
        "baseline_tokens_per_s": variants["baseline"]["tokens_per_s"],
        "speedup": variants[ours]["speedup"],
    }


def model_summary(
    model: PeftModel, config: Qwen3VLConfig, preset: ModelPreset, smoke: bool
) -> dict[str, Any]:
    text, vision = config.text_config, config.vision_config
    return {
        "architecture": "scaled-down smoke config" if smoke else "Qwen/Qwen3-VL-2B-Instruct",
        "weights": "random init",
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "text": {
            key: getattr(text, key)
            for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
        },
        "vision": {key: getattr(vision, key) for key in ("hidden_size", "depth", "patch_size")},
        "lora": preset.lora.model_dump(),
        "gradient_checkpointing": True,
    }


def data_summary(
    samples: list[Sample], batch_size: int, args: argparse.Namespace, bounds: ImageBounds
) -> dict[str, Any]:
    image_tokens = [int(s.mm_token_type_ids.sum()) for s in samples]
    lengths = [s.length for s in samples]
    return {
        "batch_size": batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "samples": len(samples),
        "image_bounds": bounds.model_dump(),
        "image_tokens": {
            "min": min(image_tokens),
            "median": statistics.median(image_tokens),
            "max": max(image_tokens),
        },
        "sample_tokens": {
            "min": min(lengths),
            "median": statistics.median(lengths),
            "max": max(lengths),
        },
        "seed": args.seed,
    }


def versions() -> dict[str, Any]:
    try:
        flash: str | None = importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        flash = None
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "flash_attn": flash,
    }


def main() -> int:
    """Run the benchmark and print its JSON (an `error` key and exit 2 when it cannot run)."""
    args = parse_args()
    stamp = {
        "benchmark": "gpu_train",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_smoke": args.cpu_smoke,
        **versions(),
    }
    if not args.cpu_smoke and not torch.cuda.is_available():
        error = "no CUDA device: this benchmark needs a GPU (--cpu-smoke runs the code path on CPU)"
        print(json.dumps({**stamp, "error": error}))
        return 2
    try:
        result = benchmark(args)
    except torch.cuda.OutOfMemoryError as exc:
        print(json.dumps({**stamp, "error": f"out of GPU memory ({exc}); lower --batch-size"}))
        return 2
    print(json.dumps({**stamp, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
