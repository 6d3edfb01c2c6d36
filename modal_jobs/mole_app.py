"""The mole graph's compute on Modal: CPU fan-out for tokenization, GPUs for training and eval.

Run one stage by hand (`--spec`: a JSON stage spec, as `mole materialize --dry` describes):

    modal run modal_jobs/mole_app.py::train --spec spec.json

Under Dagster (`MOLE_BACKEND=modal`), `dagster_modal.ModalClient` runs the same entrypoints with
the Pipes environment. Resources come from `modal_jobs/launch/compute.py` (what `--dry` prints);
the training GPU from `MOLE_MODAL_GPU` (e.g. `H100:8`), read when this file is imported and
carried into the GPU image's environment.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import modal

from modal_jobs.errors import MoleError
from modal_jobs.launch import cloud, compute
from modal_jobs.layout import (
    DATA_VOLUME,
    HF_CACHE_VOLUME,
    INFERENCE_VOLUME,
    MODAL_MOUNT_ROOT,
    Volumes,
)

log = logging.getLogger(__name__)

# --- resources (one table: modal_jobs/launch/compute.py) -------------------------------------
RESOURCES = compute.functions()
SHARDS_PLAN = RESOURCES["shards_plan"]
SHARDS_CHUNK = RESOURCES["shards_chunk"]
SHARDS_FINISH = RESOURCES["shards_finish"]
TRAIN = RESOURCES["train_router"]
EXPERTS = RESOURCES["train_experts"]
EVALUATE = RESOURCES["evaluate_router"]
DEPLOY = RESOURCES["deploy_router"]
SERVE = RESOURCES["serve"]
# Multi-GPU training commits the data volume this often (the torchrun workers cannot call back).
COMMIT_EVERY_S = 60

# --- image -------------------------------------------------------------------------------------
# Pinned to what the tests run locally (pyproject.toml's ranges). torch 2.9.x is avoided on
# purpose: its Conv3d regression slows the Qwen3-VL vision tower 10-20x.
PYTHON = "3.11"
# flash-attn compiles against the installed torch with the image's nvcc, and torch's
# cpp_extension refuses a CUDA major other than its own: torch comes from the index of the
# base image's CUDA major (tests/test_modal.py checks the two agree).
CUDA_IMAGE = "nvidia/cuda:13.0.1-devel-ubuntu22.04"
TORCH_INDEX = "https://download.pytorch.org/whl/cu130"
TORCH = ("torch==2.14.1", "torchvision==0.29.1")
PACKAGES = (
    "transformers==5.23.0",
    "peft==0.21.2",
    "accelerate==1.15.0",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "huggingface_hub==2.4.0",
    "hf-xet==1.8.0",
    "pydantic==2.14.4",
    "pyyaml==6.0.4",
    "pillow==13.0.0",
    "pyspng==0.1.4",
    "numpy==2.4.6",
    "matplotlib==3.11.2",
    "pandas==3.1.1",
    "tensorboard==2.21.0",
    "dagster-pipes==1.13.28",
    # The serving class mounts the same ASGI app as `mole serve` (Modal's runtime serves it).
    "starlette==1.10.0",
    "prometheus-client==0.26.0",
)
# flash-attn has no wheel on PyPI; its setup.py fetches a prebuilt wheel matching torch/CUDA/
# Python when one exists and otherwise compiles (long, once: Modal caches the image layer).
# Hence a CUDA *devel* base image, `--no-build-isolation` (the build must see our torch) and
# `MAX_JOBS` set in an earlier layer (the compile runs one nvcc per job; unbounded, it runs
# out of memory).
FLASH_ATTN = "flash-attn==2.8.3"
ENV = {
    "HF_HOME": str(MODAL_MOUNT_ROOT / HF_CACHE_VOLUME / "hf"),
    "PYTHONUNBUFFERED": "1",
}

cpu_image = (
    modal.Image.debian_slim(python_version=PYTHON)
    .pip_install(*TORCH, index_url=TORCH_INDEX)
    .pip_install(*PACKAGES)
    .env(ENV)
    .add_local_python_source("modal_jobs")
)
gpu_image = (
    modal.Image.from_registry(CUDA_IMAGE, add_python=PYTHON)
    .pip_install(*TORCH, index_url=TORCH_INDEX)
    .pip_install(*PACKAGES)
    .pip_install("ninja", "packaging", "wheel")
    .env({"MAX_JOBS": "8"})
    .pip_install(FLASH_ATTN, extra_options="--no-build-isolation")
    # The container imports this file again without the caller's environment: the training
    # GPU travels in the image, so `TRAIN.gpu` there is the one the function was created with.
    .env({**ENV, compute.GPU_ENV: str(TRAIN.gpu)})
    .add_local_python_source("modal_jobs")
)
IMAGES = {"cpu": cpu_image, "gpu": gpu_image}
# The serving containers import this file again too: the registry check interval travels in
# their image, as the training GPU does.
serve_image = gpu_image.env({compute.WEB_RELOAD_ENV: str(compute.web_reload_s())})

# --- volumes and secrets -----------------------------------------------------------------------
data_volume = modal.Volume.from_name(DATA_VOLUME, create_if_missing=True)
inference_volume = modal.Volume.from_name(INFERENCE_VOLUME, create_if_missing=True)
hf_cache_volume = modal.Volume.from_name(HF_CACHE_VOLUME, create_if_missing=True)
VOLUMES = {
    DATA_VOLUME: data_volume,
    INFERENCE_VOLUME: inference_volume,
    HF_CACHE_VOLUME: hf_cache_volume,
}
SECRETS = {compute.HF_SECRET: modal.Secret.from_name(compute.HF_SECRET)}  # provides HF_TOKEN

app = modal.App(compute.APP_NAME)


def gpu(r: compute.FunctionResources) -> str | None:
    """Modal's GPU string for `r` (`H100`, `H100:8`), or None for CPU functions."""
    return str(r.gpu) if r.gpu else None


def retries(r: compute.FunctionResources) -> modal.Retries:
    """Exponential back-off retries (preemption and transient failures; never bad input)."""
    return modal.Retries(max_retries=r.retries, initial_delay=10.0, backoff_coefficient=2.0)


def volumes(r: compute.FunctionResources) -> dict[str | Any, Any]:
    """Mount path → `modal.Volume` for every volume `r` names."""
    return {mount: VOLUMES[name] for name, mount in r.mounts().items()}


def secrets(r: compute.FunctionResources) -> list[Any]:
    """The `modal.Secret`s `r` names."""
    return [SECRETS[name] for name in r.secrets]


def options(r: compute.FunctionResources) -> dict[str, Any]:
    """`app.function` arguments for a stage, all from its row in `compute.py`'s table."""
    return {
        "image": IMAGES[r.image],
        "gpu": gpu(r),
        "cpu": r.cpu,
        "memory": r.memory_mib,
        "timeout": r.timeout_s,
        "retries": retries(r),
        "volumes": volumes(r),
        "secrets": secrets(r),
        "max_containers": r.max_containers,
    }


F = TypeVar("F", bound=Callable[..., dict[str, Any]])


def returns_bad_input(body: F) -> F:
    """Return bad input as a value instead of raising it.

    Modal retries every exception a function raises (`modal.Retries`); a `MoleError` is the
    data's fault and must fail once, so it comes back as `{"bad_input": message}` and the
    entrypoint raises it on the caller's side (`cloud.unwrap`).
    """

    @functools.wraps(body)
    def run(*args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return body(*args, **kwargs)
        except MoleError as exc:
            log.error("bad input: %s", exc)
            return cloud.bad_input(exc)

    return run  # type: ignore[return-value]


def _in_container() -> bool:
    # `.local()` calls (tests, debugging) have no mounted volume to reload or commit.
    return not modal.is_local()


def _reload(*mounted: Any) -> None:
    if _in_container():
        for volume in mounted:
            volume.reload()


def _commit(*mounted: Any) -> None:
    if _in_container():
        for volume in mounted:
            volume.commit()


# --- tokenization: plan, .map() over chunks, merge ---------------------------------------------
@app.function(**options(SHARDS_PLAN))
@returns_bad_input
def shards_plan(spec: dict[str, Any]) -> dict[str, Any]:
    """Resolve the base model once (filling the HF cache volume) and cut the splits into chunks."""
    from dataclasses import asdict

    from modal_jobs.stage import StageSpec
    from modal_jobs.stages import shards

    _reload(data_volume, hf_cache_volume)
    stage = StageSpec.model_validate(spec)
    base = shards.prepare(stage)
    chunks = [asdict(chunk) for chunk in shards.plan(stage)]
    _commit(data_volume, hf_cache_volume)
    return {"base": base, "chunks": chunks}


@app.function(**options(SHARDS_CHUNK))
@returns_bad_input
def shards_chunk(spec: dict[str, Any], base: str, chunk: dict[str, Any]) -> dict[str, Any]:
    """Tokenize one chunk into the parts folder on the data volume; return its index entry."""
    from modal_jobs.stage import StageSpec
    from modal_jobs.stages import shards

    _reload(data_volume, hf_cache_volume)
    entry = shards.tokenize_chunk(StageSpec.model_validate(spec), base, shards.Chunk(**chunk))
    _commit(data_volume)
    return entry


@app.function(**options(SHARDS_FINISH))
@returns_bad_input
def shards_finish(
    spec: dict[str, Any], base: str, entries: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    """Rename every chunk into `tokenized_shards/` with index.json; return the StageResult."""
    from modal_jobs.stage import StageSpec
    from modal_jobs.stages import shards

    _reload(data_volume, hf_cache_volume)
    result = shards.finish(StageSpec.model_validate(spec), base, entries, seconds)
    _commit(data_volume)
    return result.to_json()


# --- training: resumable on preemptible GPUs ---------------------------------------------------
@app.function(**options(TRAIN))
@returns_bad_input
def train_router(spec: dict[str, Any]) -> dict[str, Any]:
    """Train (resuming from the newest `train_state/step-N` a preempted attempt committed)."""
    from modal_jobs.stages import train

    _reload(data_volume, hf_cache_volume)
    count = TRAIN.gpu.count if TRAIN.gpu else 1
    if count > 1:
        return _torchrun(spec, count)
    result = train.run(
        train.TrainSpec.model_validate(spec), on_resume_point=lambda _: _commit(data_volume)
    )
    _commit(data_volume)
    return result.to_json()


def _torchrun(spec: dict[str, Any], count: int) -> dict[str, Any]:
    """Run `torchrun -m modal_jobs.stages.train` on every GPU, committing the volume meanwhile."""
    import json

    run_dir = Volumes.modal().run(spec["run"]).root
    spec_file, result_file = run_dir / "train_spec.json", run_dir / "train_result.json"
    spec_file.write_text(json.dumps(spec))
    done = threading.Event()

    def commit_periodically() -> None:
        while not done.wait(COMMIT_EVERY_S):
            _commit(data_volume)

    committer = threading.Thread(target=commit_periodically, daemon=True)
    committer.start()
    try:
        subprocess.run(
            compute.stage_command("train", count)
            + ["--spec", str(spec_file), "--result", str(result_file)],
            check=True,
        )
    finally:
        done.set()
        committer.join()
    _commit(data_volume)
    result: dict[str, Any] = json.loads(result_file.read_text())
    return result


@app.function(**options(EXPERTS))
@returns_bad_input
def train_experts(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the managed expert adapters onto the inference volume."""
    from modal_jobs.stages import experts

    _reload(data_volume, hf_cache_volume, inference_volume)
    result = experts.run(experts.ExpertsSpec.model_validate(spec))
    _commit(inference_volume)
    return result.to_json()


# --- evaluation and deployment -----------------------------------------------------------------
@app.function(**options(EVALUATE))
@returns_bad_input
def evaluate_router(spec: dict[str, Any]) -> dict[str, Any]:
    """Score the held-out eval split (router, then stacked with the experts); write the report."""
    from modal_jobs.stage import StageSpec
    from modal_jobs.stages import evaluate

    _reload(data_volume, hf_cache_volume, inference_volume)
    result = evaluate.run(StageSpec.model_validate(spec))
    _commit(data_volume)
    return result.to_json()


@app.function(**options(DEPLOY))
@returns_bad_input
def deploy_router(spec: dict[str, Any] | None, rollback: bool = False) -> dict[str, Any]:
    """Publish the run's router (gated by the eval report), or roll back when `rollback`.

    `max_containers=1`: every registry change runs here, one at a time, and each sees the last
    one's commit (reload first, commit last), so no history entry is ever lost.
    """
    from modal_jobs.layout import Volumes
    from modal_jobs.serving import registry
    from modal_jobs.stage import StageSpec
    from modal_jobs.stages import deploy

    _reload(data_volume, inference_volume)
    if rollback:
        outcome = {"current": registry.rollback(Volumes.modal())}
    else:
        outcome = deploy.run(StageSpec.model_validate(spec)).to_json()
    _commit(inference_volume)
    return outcome


# --- serving: the same ASGI app as `mole serve`, on a GPU -------------------------------------
@app.cls(
    image=serve_image,
    gpu=gpu(SERVE),
    cpu=SERVE.cpu,
    memory=SERVE.memory_mib,
    timeout=SERVE.timeout_s,
    volumes=volumes(SERVE),
    secrets=secrets(SERVE),
    scaledown_window=15 * compute.MINUTE,
)
@modal.concurrent(max_inputs=compute.SERVE_CONCURRENT_INPUTS)
class Server:
    """`POST /route`, `POST /infer`, `GET /health`, `GET /metrics` of the deployed router.

    `modal deploy modal_jobs/mole_app.py` prints the endpoint's URL. Each container loads the
    stack once (`load`), then checks the registry every `MOLE_MODAL_RELOAD_S` seconds, reloading
    the inference volume first so that it sees the deploy function's commits, and swaps in a
    newly deployed (or rolled back) router without a restart.
    """

    @modal.enter()
    def load(self) -> None:
        """Load the base model, the current router and its experts from the volumes."""
        from modal_jobs.serving.live import Deployment, Live

        deployment = Deployment(Volumes.modal(), before_check=inference_volume.reload)
        self.live = Live.deployed(deployment, compute.web_reload_s())

    @modal.asgi_app()
    def web(self) -> Any:
        """The ASGI app Modal serves (`modal_jobs/serving/app.py`)."""
        from modal_jobs.serving.app import create_app

        return create_app(self.live)


# --- entrypoints: `modal run modal_jobs/mole_app.py::<name> [--spec spec.json]` -----------------
REMOTES: dict[str, Any] = {
    "shards_plan": shards_plan,
    "shards_chunk": shards_chunk,
    "shards_finish": shards_finish,
    "train_router": train_router,
    "train_experts": train_experts,
    "evaluate_router": evaluate_router,
    "deploy_router": deploy_router,
    "data_volume": data_volume,
}


@app.local_entrypoint()
def dataset(spec: str = "") -> None:
    """`routing_dataset`: built here (where the expert data is), uploaded to the data volume."""
    cloud.launch("routing_dataset", spec, REMOTES)


@app.local_entrypoint()
def shards(spec: str = "") -> None:
    """`tokenized_shards`: one container per chunk of 512 samples."""
    cloud.launch("tokenized_shards", spec, REMOTES)


@app.local_entrypoint()
def train(spec: str = "") -> None:
    """`router_checkpoint`: LoRA training on `MOLE_MODAL_GPU`."""
    cloud.launch("router_checkpoint", spec, REMOTES)


@app.local_entrypoint()
def experts(spec: str = "") -> None:
    """`expert_adapters`: the demo expert LoRAs, onto the inference volume."""
    cloud.launch("expert_adapters", spec, REMOTES)


@app.local_entrypoint()
def evaluate(spec: str = "") -> None:
    """`eval_report`: held-out evaluation."""
    cloud.launch("eval_report", spec, REMOTES)


@app.local_entrypoint()
def deploy(spec: str = "") -> None:
    """`deployed_router`: publish to the inference volume."""
    cloud.launch("deployed_router", spec, REMOTES)


@app.local_entrypoint()
def rollback() -> None:
    """`mole deploy --rollback` on Modal: make the previous router current again."""
    print(f"rolled back: current router is {cloud.rollback(REMOTES)}")
