"""Benchmarks run on CPU: the GPU training benchmark's smoke path and the layouts it compares."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GPU_TRAIN = REPO / "benchmarks" / "gpu_train.py"


def gpu_train(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks/gpu_train.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_train", GPU_TRAIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_train", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gpu_train_smoke() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MOLE_CONFIG_DIR": str(REPO / "config")}
    done = subprocess.run(
        [sys.executable, str(GPU_TRAIN), "--cpu-smoke"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # ONE JSON object
    result = json.loads(lines[0])
    assert result["benchmark"] == "gpu_train" and result["cpu_smoke"] is True
    assert result["device"] == "cpu" and result["gpu"] is None
    assert result["mfu"] is None and result["peak_memory_gib"] is None  # no GPU, no peak
    assert {"torch", "transformers", "peft", "date", "attention"} <= result.keys()
    assert set(result["variants"]) == {"baseline", "grouped", "packed"}
    assert result["ours"] == "grouped"  # what production training does, on any attention
    packed = result["packed_not_in_production"]
    assert packed["speedup"] == result["variants"]["packed"]["speedup"]
    assert packed["vs_ours"] == pytest.approx(
        result["variants"]["packed"]["tokens_per_s"] / result["variants"]["grouped"]["tokens_per_s"]
    )
    for name, figures in result["variants"].items():
        assert figures["tokens_per_s"] > 0 and figures["images_per_s"] > 0, name
        assert figures["step_ms_median"] > 0 and np.isfinite(figures["final_loss"]), name
        assert 0.98 < figures["flop_check"]["ratio"] <= 1.0, (name, figures["flop_check"])
    variants = result["variants"]
    assert variants["baseline"]["speedup"] == 1.0
    assert variants["packed"]["padding_fraction"] == 0.0
    assert variants["baseline"]["padding_fraction"] > 0.0
    # Answer-only logits: a handful of positions per step instead of every one.
    baseline_logits = variants["baseline"]["logit_positions_per_step"]
    assert variants["grouped"]["logit_positions_per_step"] < baseline_logits / 4
    assert result["speedup"] == variants["grouped"]["speedup"] > 0
    model = result["model"]
    assert 0 < model["params_trainable"] < model["params_total"]
    assert model["lora"] == {"r": 16, "alpha": 32, "dropout": 0.0}  # the tiny preset's
    data = result["data"]
    assert data["samples"] == data["batch_size"] * (1 + data["warmup"] + data["steps"])


def test_gpu_train_layouts_compute_the_same_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """Padded + all logits, padded + answer logits and packed agree: only the cost differs."""
    monkeypatch.setenv("MOLE_CONFIG_DIR", str(REPO / "config"))
    bench = gpu_train(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["gpu_train.py", "--cpu-smoke"])
    runtime, preset, config, specials = bench.setup(bench.parse_args())
    model = bench.build_model(config, runtime, preset, seed=0)
    rng = np.random.default_rng(3)
    samples = [
        bench.with_positions(model, bench.make_sample(rng, config, specials, preset.image))
        for _ in range(3)
    ]
    assert len({s.length for s in samples}) > 1  # so the padded rows really are padded
    pixels = torch.randn(sum(s.patches for s in samples), 3 * 2 * 16 * 16)
    losses = []
    for step in (
        bench.padded(samples, False, specials),
        bench.padded(samples, True, specials),
        bench.packed(samples),
    ):
        batch = step.to(runtime.device, runtime.dtype, pixels.shape[1])
        batch.inputs["pixel_values"] = pixels
        with torch.no_grad():
            losses.append(bench.loss_of(model, batch).item())
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-5)
