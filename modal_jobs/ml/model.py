"""Loading the base Qwen3-VL model and attaching the router LoRA (language model only)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from transformers import AutoConfig, AutoProcessor, Qwen3VLForConditionalGeneration

from modal_jobs.config import LoraSpec

# Only the language model's projections: the vision tower and merger stay frozen, and adapters of
# this shape load in vLLM and in PEFT mixed-adapter batches (`all-linear` would hit the vision
# tower).
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision the model runs."""

    device: torch.device
    dtype: torch.dtype
    attention: str

    @classmethod
    def detect(cls) -> Runtime:
        """bf16 + flash-attn (when importable) on CUDA, fp32 + sdpa on CPU (see `weights_dtype`)."""
        if torch.cuda.is_available():
            flash = importlib.util.find_spec("flash_attn") is not None
            attention = "flash_attention_2" if flash else "sdpa"
            return cls(torch.device("cuda"), torch.bfloat16, attention)
        return cls(torch.device("cpu"), torch.float32, "sdpa")

    def weights_dtype(self, config: Any) -> torch.dtype:
        """The dtype a base with this config runs in here.

        On CUDA the runtime's. On CPU, a checkpoint saved in bf16 (the hub's Qwen3-VL, the
        `qwen3-vl-2b-local` preset) stays bf16 where the CPU multiplies bf16 natively (AVX-512
        BF16 or AMX: ~3× fp32's matmul throughput on the 2-core CI machine, at half the memory);
        everything else runs in fp32.
        """
        if self.device.type != "cpu":
            return self.dtype
        saved = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None)
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        if saved in (torch.bfloat16, "bfloat16") and native:
            return torch.bfloat16
        return self.dtype


def load_processor(base: str) -> Any:
    """The base model's `Qwen3VLProcessor` (a local folder or a hub repo id)."""
    return AutoProcessor.from_pretrained(base)


def load_config(base: str) -> Any:
    """The base's `Qwen3VLConfig` (only `config.json` is read: no weights)."""
    return AutoConfig.from_pretrained(base)


def load_base(base: str, runtime: Runtime) -> Qwen3VLForConditionalGeneration:
    """The base `Qwen3VLForConditionalGeneration`, frozen, on the runtime's device."""
    dtype = runtime.weights_dtype(load_config(base))
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        base, dtype=dtype, attn_implementation=runtime.attention
    )
    model.requires_grad_(False)
    patch_embed_as_matmul(model)
    # transformers wraps `.to` in a decorator whose annotation drops the device argument.
    model.to(runtime.device)  # type: ignore[arg-type]
    return model


def lora_config(spec: LoraSpec) -> LoraConfig:
    """The router adapter's LoRA config: language-model projections only."""
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )


class PatchMatmul(torch.nn.Conv3d):
    """A Conv3d whose kernel equals its stride, fed exactly one kernel-sized patch per row.

    That is a matrix product of the flattened patch with the flattened kernel: same parameters,
    same result up to float summation order. The vision tower's patch embedding is such a conv,
    and on CPU mkldnn runs it ~8× slower than the matmul (1.6 ms of a 8 ms routing forward).
    """

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, C, T, P, P) patches → (N, out_channels, 1, 1, 1), like the conv."""
        flat = patches.reshape(patches.shape[0], -1)
        kernel = self.weight.reshape(self.out_channels, -1)
        out = torch.nn.functional.linear(flat, kernel, self.bias)
        return out.view(patches.shape[0], self.out_channels, 1, 1, 1)


def patch_embed_as_matmul(model: Qwen3VLForConditionalGeneration) -> None:
    """Run the vision patch embedding as `PatchMatmul`, in place.

    Weights and state dict keys are unchanged, so saved models and adapters are unaffected.
    """
    conv = model.model.visual.patch_embed.proj
    exact = (
        type(conv) is torch.nn.Conv3d
        and conv.kernel_size == conv.stride
        and conv.padding == (0, 0, 0)
        and conv.dilation == (1, 1, 1)
        and conv.groups == 1
    )
    if exact:
        conv.__class__ = PatchMatmul


def causal_lm(model: Any) -> Any:
    """The `Qwen3VLForConditionalGeneration` inside `model` (LoRA layers stay in place).

    Its `.model` (`Qwen3VLModel`: vision tower, merger, language model) returns hidden states;
    its `.lm_head` projects them onto the vocabulary. Through a PEFT wrapper the active adapter's
    LoRA layers live inside `.model`, so calling it directly still runs them.
    """
    return model.get_base_model() if isinstance(model, PeftModel) else model
