"""What each Modal function asks for and what it costs.

The one table of Modal resources: `modal_jobs/mole_app.py` builds every `@app.function` from
`functions()`, and `mole materialize --dry` prints the same entries (via `launch/table.py`), so
the two cannot drift. This module imports nothing from `modal`, so planning and cost reporting
work without it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Literal

from modal_jobs.config import ConfigError
from modal_jobs.launch.warm import command as warm_command
from modal_jobs.layout import DATA_VOLUME, HF_CACHE_VOLUME, INFERENCE_VOLUME, MODAL_MOUNT_ROOT
from modal_jobs.stage import MetadataValue, number, text

# `MOLE_MODAL_GPU`: the training GPU, Modal's syntax `TYPE` or `TYPE:COUNT` (e.g. `H100:8`).
# Read at import, like Modal reads its decorators: set it before `modal run` / `mole materialize`.
# The GPU image carries the same value in its environment, so the container, which imports the
# app again without the caller's environment, sees the count it was given.
GPU_ENV = "MOLE_MODAL_GPU"
DEFAULT_GPU = "H100"
# `MOLE_TRAIN_PROCS`: training processes on the local backend (default 1). Above 1 the stage runs
# under `torchrun`, one process per GPU (NCCL) or, without CUDA, gloo processes on the CPU.
TRAIN_PROCS_ENV = "MOLE_TRAIN_PROCS"
# `MOLE_MODAL_RELOAD_S`: how often Modal's long-running web containers reload their volume (the
# serving class, for a newly deployed router; TensorBoard, for new runs). Read at import like
# `MOLE_MODAL_GPU` and carried in their images' environment.
WEB_RELOAD_ENV = "MOLE_MODAL_RELOAD_S"
# Requests one serving container takes at once (`@modal.concurrent`): enough to fill batches
# of `ServeOptions.max_batch` while the previous batch runs; more start another container.
SERVE_CONCURRENT_INPUTS = 32
# The Modal Secret holding `HF_TOKEN` (create it with `modal secret create huggingface HF_TOKEN=…`).
HF_SECRET = "huggingface"
APP_NAME = "mole"
APP_FILE = "modal_jobs/mole_app.py"
TENSORBOARD_APP_FILE = "modal_jobs/tensorboard_app.py"

HOUR = 3600
MINUTE = 60

# USD per second. Source: modal.com/pricing (H100, A100-80GB, L40S, L4, T4 and the CPU core rate as
# quoted from it on 2026-05-07; the other GPUs as listed there in 2025). Base region, preemptible
# functions; region and non-preemptible multipliers are not included. Estimates, not invoices.
PRICES_AS_OF = "2026-05-07"
GPU_USD_PER_SECOND = {
    "T4": 0.000164,
    "L4": 0.000222,
    "A10G": 0.000306,
    "L40S": 0.000542,
    "A100": 0.000583,
    "A100-40GB": 0.000583,
    "A100-80GB": 0.000694,
    "H100": 0.001097,
    "H200": 0.001261,
    "B200": 0.001736,
}
CPU_CORE_USD_PER_SECOND = 0.0000131


@dataclass(frozen=True)
class Gpu:
    """A Modal GPU request: type and count per container."""

    type: str
    count: int = 1

    @classmethod
    def parse(cls, value: str) -> Gpu:
        """`H100` or `H100:8` (Modal's string syntax)."""
        kind, _, count = value.strip().partition(":")
        if not kind or (count and not count.isdigit()) or count == "0":
            raise ValueError(f"{GPU_ENV}={value!r}: expected TYPE or TYPE:COUNT, e.g. H100:8")
        return cls(kind.upper(), int(count or 1))

    def __str__(self) -> str:
        return self.type if self.count == 1 else f"{self.type}:{self.count}"


def training_gpu() -> Gpu:
    """The training GPU from `MOLE_MODAL_GPU` (default H100)."""
    return Gpu.parse(os.environ.get(GPU_ENV, DEFAULT_GPU))


def train_procs() -> int:
    """Local training processes from `MOLE_TRAIN_PROCS` (default 1)."""
    value = os.environ.get(TRAIN_PROCS_ENV, "1").strip()
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(
            f"{TRAIN_PROCS_ENV}={value!r} is not a process count; fix: set a whole number >= 1"
        )
    return int(value)


def web_reload_s() -> float:
    """The web containers' volume reload interval from `MOLE_MODAL_RELOAD_S` (default 30 s)."""
    from modal_jobs.serving.serve import RELOAD_EVERY_S

    value = os.environ.get(WEB_RELOAD_ENV, str(RELOAD_EVERY_S)).strip()
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds < 0:
        raise ConfigError(
            f"{WEB_RELOAD_ENV}={value!r} is not a number of seconds; fix: set e.g. 30 (0: never)"
        )
    return seconds


def stage_command(module: str, procs: int = 1, warm: bool = False) -> list[str]:
    """The command running `modal_jobs.stages.<module>`: Python, or `torchrun` for `procs` > 1.

    `warm`: one process forked from the warm stage server (`launch/warm.py`; the local
    backend's default). `--standalone` lets torchrun pick a free rendezvous port, so concurrent
    jobs on one machine do not collide on the default one.
    """
    if procs == 1 and warm:
        return warm_command(f"modal_jobs.stages.{module}")
    if procs == 1:
        return [sys.executable, "-m", f"modal_jobs.stages.{module}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*torchrun, f"--nproc_per_node={procs}", "-m", f"modal_jobs.stages.{module}"]


@dataclass(frozen=True)
class FunctionResources:
    """Everything one `@app.function` requests; `mole_app.py` passes these straight to Modal.

    `max_containers=1` makes Modal run the function's inputs one at a time, whoever calls it
    (the limit is enforced by Modal's scheduler, not by the caller's machine).
    """

    name: str
    image: Literal["cpu", "gpu"]
    gpu: Gpu | None
    cpu: float
    memory_mib: int
    timeout_s: int
    retries: int
    volumes: tuple[str, ...]
    secrets: tuple[str, ...] = ()
    max_containers: int | None = None

    def mounts(self) -> dict[str, str]:
        """Volume name → mount path inside the container."""
        return {name: str(MODAL_MOUNT_ROOT / name) for name in self.volumes}

    def describe(self) -> dict[str, Any]:
        """JSON-safe summary (for `--dry`)."""
        return {
            "function": self.name,
            "image": self.image,
            "gpu": str(self.gpu) if self.gpu else None,
            "cpu": self.cpu,
            "memory_mib": self.memory_mib,
            "timeout_s": self.timeout_s,
            "retries": self.retries,
            "max_containers": self.max_containers,
            "volumes": self.mounts(),
            "secrets": list(self.secrets),
        }


def functions(gpu: Gpu | None = None) -> dict[str, FunctionResources]:
    """Every Modal function of the app with its resources (training on `gpu`, default the env's)."""
    train_gpu = gpu or training_gpu()
    # The base model (built `tiny`, or the HF download) lives on the HF cache volume: every
    # function that loads the processor or the model mounts it.
    weights = (DATA_VOLUME, HF_CACHE_VOLUME)
    # Expert adapters are trained onto, and read back from, the inference volume.
    stack = (DATA_VOLUME, HF_CACHE_VOLUME, INFERENCE_VOLUME)
    hf = (HF_SECRET,)
    eval_gpu = Gpu(train_gpu.type)
    table = [
        # Resolves the base once (builds `tiny`, or fills the HF cache) and plans the chunks.
        FunctionResources("shards_plan", "cpu", None, 2, 8192, 45 * MINUTE, 2, weights, hf),
        FunctionResources("shards_chunk", "cpu", None, 4, 8192, 30 * MINUTE, 3, weights, hf),
        FunctionResources("shards_finish", "cpu", None, 1, 2048, 15 * MINUTE, 2, weights, hf),
        # Preemptible GPUs: retries resume from the newest resume point on the data volume.
        FunctionResources(
            "train_router", "gpu", train_gpu, 8 * train_gpu.count, 65536, 12 * HOUR, 4, weights, hf
        ),
        FunctionResources("train_experts", "gpu", eval_gpu, 4, 32768, 2 * HOUR, 2, stack, hf),
        FunctionResources("evaluate_router", "gpu", eval_gpu, 4, 32768, 2 * HOUR, 2, stack, hf),
        # One container at a time: registry updates (deploys, rollbacks) never interleave.
        FunctionResources(
            "deploy_router",
            "cpu",
            None,
            1,
            2048,
            15 * MINUTE,
            1,
            (DATA_VOLUME, INFERENCE_VOLUME),
            max_containers=1,
        ),
        # Web endpoints take no retries (Modal refuses them); a failed request is simply retried.
        FunctionResources("tensorboard", "cpu", None, 1, 2048, 1 * HOUR, 0, (DATA_VOLUME,)),
        # The serving class (`Server`): the deployed router and its experts on one GPU; the
        # timeout bounds one request.
        FunctionResources(
            "serve",
            "gpu",
            eval_gpu,
            4,
            32768,
            10 * MINUTE,
            0,
            (HF_CACHE_VOLUME, INFERENCE_VOLUME),
            hf,
        ),
    ]
    return {resources.name: resources for resources in table}


def cost_metadata(
    backend: str, gpu: Gpu | None, wall_seconds: float, cpu_cores: float = 0.0
) -> dict[str, MetadataValue]:
    """What a materialization cost: GPU type, GPU-seconds and an estimated USD figure.

    Local runs report the same keys (GPU seconds on a local CUDA device, cost 0), so both
    backends' metadata have one shape.
    """
    gpu_seconds = wall_seconds * gpu.count if gpu else 0.0
    usd = 0.0
    if backend == "modal":
        usd = gpu_seconds * GPU_USD_PER_SECOND.get(gpu.type, 0.0) if gpu else 0.0
        usd += wall_seconds * cpu_cores * CPU_CORE_USD_PER_SECOND
    return {
        "compute_backend": text(backend),
        "gpu": text(str(gpu) if gpu else "none"),
        "gpu_seconds": number(round(float(gpu_seconds), 1)),
        "estimated_cost_usd": number(round(float(usd), 4)),
        "prices_as_of": text(PRICES_AS_OF),
    }
