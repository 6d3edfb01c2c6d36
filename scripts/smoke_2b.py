"""`make smoke-2b`: the whole graph on the Qwen3-VL-2B architecture, on CPU, in a throwaway home.

routing dataset → shards → 2 training steps → eval on a dozen screens → deploy → `mole route`,
on the `qwen3-vl-2b-local` preset (published 2B shapes, Qwen3's real tokenizer, random bf16
weights), then the published adapter is loaded with vanilla `peft` onto that base. Prints one
JSON line: parameters, trainable parameters, peak RSS, seconds per step, tokens per screenshot
at the preset's bounds, the routed expert. Progress goes to stderr.

The run lives in a temporary MOLE_HOME; only the built base (several GB, built once) and the
fetched tokenizer are shared with the real MOLE_HOME, by symlink. The demo screens kept are each
expert's smallest, and only 6 screens of none are drawn, so the eval stage's ~90 forward passes
of a 2B model stay affordable on two cores; the tokens they take, and the cap at the preset's
bounds, are both reported.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PRESET = "qwen3-vl-2b-local"
RUN = "smoke-2b"
EXPERTS = ("calendar", "map", "terminal")
GENERATED, KEPT = 30, 10  # per expert: 10 each → 12 eval, 3 val, 15 train screens
STEPS, BATCH = 2, 2
OOD = 6  # screens of none: 3 choose the abstention score, 3 are held out


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the result line."""
    print(f"[smoke-2b {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main() -> int:
    """Run the smoke in a temporary home and print its JSON line."""
    from modal_jobs.layout import mole_home

    real_home = mole_home()
    with tempfile.TemporaryDirectory(prefix="mole-smoke-2b-") as scratch:
        work = Path(scratch)
        env = environment(work, real_home)
        started = time.perf_counter()
        experts = smallest_screens(work / "experts")
        write_config(work / "config", experts)
        mole(env, "materialize", RUN)
        mole(env, "deploy", RUN)
        route = json.loads(mole(env, "route", str(route_image(experts)), "--json"))
        stages_rss = peak_rss_bytes(resource.RUSAGE_CHILDREN)
        pipeline_seconds = time.perf_counter() - started
        result = {
            "preset": PRESET,
            **measure(Path(env["MOLE_HOME"]), work / "config"),
            "routed_expert": route["expert"],
            "route_probabilities": route["probabilities"],
            "peak_rss_gib": round(stages_rss / 2**30, 2),
            "peak_rss_gib_peft_check": round(peak_rss_bytes(resource.RUSAGE_SELF) / 2**30, 2),
            "pipeline_seconds": round(pipeline_seconds, 1),
        }
    print(json.dumps(result, sort_keys=True))
    return 0


def environment(work: Path, real_home: Path) -> dict[str, str]:
    """MOLE_HOME, DAGSTER_HOME and MOLE_CONFIG_DIR in `work`, the model caches linked in."""
    home = work / "home"
    for shared in ("volumes/moe-lora-hf-cache/presets", "cache"):
        (real_home / shared).mkdir(parents=True, exist_ok=True)
        (home / shared).parent.mkdir(parents=True, exist_ok=True)
        (home / shared).symlink_to(real_home / shared, target_is_directory=True)
    return {
        **os.environ,
        "MOLE_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "MOLE_CONFIG_DIR": str(work / "config"),
    }


def smallest_screens(out: Path) -> Path:
    """Demo expert datasets, each cut down to its `KEPT` smallest screenshots."""
    from modal_jobs.demo_data import write_demo_data

    write_demo_data(out, GENERATED, seed=0, experts=EXPERTS)
    for expert in EXPERTS:
        jsonl = out / expert / "datasets" / "demo.jsonl"
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]

        def area(row: dict[str, Any], folder: Path = jsonl.parent) -> int:
            with Image.open(folder / row["image"]) as image:
                return int(image.width * image.height)

        kept = sorted(rows, key=area)[:KEPT]
        jsonl.write_text("".join(json.dumps(row) + "\n" for row in kept))
    return out


def write_config(target: Path, experts: Path) -> None:
    """The repository's config with the 2B preset, three experts and a two-step training."""
    shutil.copytree(REPO / "config", target)
    dataset = yaml.safe_load((target / "dataset.yaml").read_text())
    dataset["experts_dir"] = str(experts)
    dataset["experts"] = {name: {"count": KEPT} for name in EXPERTS}
    dataset["splits"] = {"train": 0.5, "val": 0.1, "eval": 0.4}
    dataset.pop("image", None)  # the preset's pixel bounds, not the tiny demo's
    # Screens of none are full-size screenshots (up to the 784-token cap): a handful still
    # exercises abstention end to end; the demo's 120 would be most of the eval stage's forwards.
    dataset["ood"] = {"count": OOD, "val_fraction": 0.5}
    (target / "dataset.yaml").write_text(yaml.safe_dump(dataset))
    models = yaml.safe_load((target / "models.yaml").read_text())
    models[PRESET]["train"].update(steps=STEPS, batch_size=BATCH, warmup_steps=0)
    (target / "models.yaml").write_text(yaml.safe_dump(models))
    loras = json.loads((target / "loras.json").read_text())
    loras.update(base_model=PRESET, experts={})
    loras["router"]["min_accuracy"] = 0.0  # random weights: the gate is not what is tested
    (target / "loras.json").write_text(json.dumps(loras))


def mole(env: dict[str, str], *args: str) -> str:
    """Run the `mole` CLI; its stdout, or exit with its output when it fails."""
    log(f"mole {' '.join(args)}")
    began = time.perf_counter()
    done = subprocess.run(
        [str(Path(sys.executable).with_name("mole")), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    log(f"  {time.perf_counter() - began:.0f}s, exit {done.returncode}")
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"smoke-2b: `mole {' '.join(args)}` failed")
    return done.stdout


def route_image(experts: Path) -> Path:
    """A screenshot to route: the first kept calendar screen."""
    jsonl = experts / "calendar" / "datasets" / "demo.jsonl"
    first = json.loads(jsonl.read_text().splitlines()[0])
    return jsonl.parent / first["image"]


def measure(home: Path, config_dir: Path) -> dict[str, Any]:
    """Sizes, timings and token counts of the run, and the vanilla-peft load of its adapter."""
    from modal_jobs.config import load_config
    from modal_jobs.layout import Volumes
    from modal_jobs.ml.model import Runtime
    from modal_jobs.ml.model import load_config as load_model_config

    config = load_config(config_dir)
    layout = Volumes.local(home).run(RUN)
    summary = json.loads((layout.checkpoint / "training_summary.json").read_text())
    report = json.loads((layout.report / "report.json").read_text())
    return {
        **vanilla_peft_load(summary["base"], layout.checkpoint),
        "seconds_per_step": step_seconds(layout.tensorboard),
        "train_wall_seconds": round(summary["wall_seconds"], 1),
        "device": summary["device"],
        "dtype": str(Runtime.detect().weights_dtype(load_model_config(summary["base"]))),
        "eval_n": report["n"],
        "eval_latency_ms_per_image": round(report["latency_ms_per_image"], 1),
        **screenshot_tokens(config, layout.dataset),
    }


def vanilla_peft_load(base: str, adapter: Path) -> dict[str, Any]:
    """Load the adapter with plain `PeftModel.from_pretrained`; its weights must be the file's."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import Qwen3VLForConditionalGeneration

    log("vanilla peft load of the published adapter")
    model = Qwen3VLForConditionalGeneration.from_pretrained(base, dtype=torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    peft = PeftModel.from_pretrained(model, str(adapter))
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    # peft names the loaded tensors after the adapter (`lora_A.default.weight`); the file does not.
    loaded = {n.replace(".default", ""): p for n, p in peft.named_parameters() if "lora_" in n}
    if not saved or loaded.keys() != saved.keys():
        raise SystemExit(
            f"smoke-2b: peft loaded {len(loaded)} LoRA tensors, the file has {len(saved)}"
        )
    for name, tensor in saved.items():
        if not torch.equal(loaded[name].detach().to(tensor.dtype), tensor):
            raise SystemExit(f"smoke-2b: {name} differs from the adapter file after loading")
    return {
        "parameters": parameters,
        "trainable_parameters": sum(p.numel() for p in saved.values()),
        "adapter_tensors": len(saved),
        "vanilla_peft_load": "ok",
    }


def step_seconds(events: Path) -> float:
    """Seconds of training step 2: the wall-clock gap between steps 1 and 2's loss events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    times = {event.step: event.wall_time for event in accumulator.Scalars("train/loss")}
    return round(times[2] - times[1], 1)


def screenshot_tokens(config: Any, dataset: Path) -> dict[str, Any]:
    """Image tokens of the screens used (min, max) and the cap at the preset's pixel bounds."""
    from modal_jobs.ml.batching import fitted_size

    bounds = config.image_bounds
    factor = 32  # patch 16 × merge 2: one image token per 32 × 32 pixels
    counts = []
    for image in sorted((dataset / "images").glob("*.png")):
        with Image.open(image) as screen:
            height, width = fitted_size(screen.height, screen.width, bounds, factor)
        counts.append(height * width // factor**2)
    return {
        "pixel_bounds": [bounds.min_pixels, bounds.max_pixels],
        "tokens_per_screenshot": {"min": min(counts), "max": max(counts), "screens": len(counts)},
        "tokens_per_screenshot_cap": bounds.max_pixels // factor**2,
    }


def peak_rss_bytes(who: int) -> int:
    """Peak resident set of this process or of its largest finished descendant (Linux: KiB).

    Every stage runs in a Pipes subprocess of a `mole` command, so `RUSAGE_CHILDREN` is the
    largest stage's peak.
    """
    return resource.getrusage(who).ru_maxrss * 1024


if __name__ == "__main__":
    sys.exit(main())
