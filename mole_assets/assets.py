"""The router graph: expert sources → routing dataset → shards → checkpoint → report → deployment.

Assets are thin: build the stage spec, launch `modal_jobs.stages.<stage>` through the `mole`
resource, and let Pipes carry metadata, data versions and check results back. Pipes assets store
no Python output; each stage finds its inputs by the run's volume layout.
"""

import warnings
from collections.abc import Iterator
from typing import Any

import dagster as dg

from modal_jobs.config import MoleConfig
from modal_jobs.hashing import expert_version
from modal_jobs.stage import ExpertsOptions, TrainOptions
from mole_assets.partitions import run_names
from mole_assets.resources import MoleResource

# Observable source assets and source selections are marked beta; they are Dagster's documented
# way to version external data such as the expert datasets.
warnings.filterwarnings("ignore", category=dg.BetaWarning)

GROUP = "router"
# The concurrency pool of the steps that need the accelerator (one at a time by default).
GPU_POOL = "gpu"
# Infrastructure failures (a killed worker, a lost machine) are retried; bad input is raised as a
# `dg.Failure(allow_retries=False)` by the launcher and fails once.
RETRY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL)
EXPERTS_PREFIX = "expert_datasets"


def expert_source(name: str) -> dg.SourceAsset:
    """Observable source asset for one expert's dataset; its data version is a content hash."""

    @dg.observable_source_asset(
        key=[EXPERTS_PREFIX, name],
        group_name="experts",
        description=f"Expert dataset `{name}` (JSONL + images); version = content hash.",
    )
    def _expert(mole: MoleResource) -> dg.DataVersion:
        folder = mole.load().experts_dir / name
        if not folder.is_dir():  # would hash to the version of no files at all
            raise dg.Failure(
                description=f"{folder}: expert {name!r} has no dataset folder (experts_dir in "
                "dataset.yaml); fix: create it (e.g. `mole demo-data --out DIR`) or point "
                "experts_dir at your expert datasets",
                allow_retries=False,
            )
        return dg.DataVersion(expert_version(folder)[:16])

    return _expert


def expert_sources(config: MoleConfig) -> list[dg.SourceAsset]:
    """One source asset per configured expert."""
    return [expert_source(name) for name in sorted(config.dataset.experts)]


def _check(name: str, asset: str, description: str, blocking: bool = False) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(name, asset=asset, description=description, blocking=blocking)


def routing_dataset_asset(config: MoleConfig) -> dg.AssetsDefinition:
    """`routing_dataset`, depending on every configured expert source."""

    @dg.asset(
        name="routing_dataset",
        partitions_def=run_names,
        deps=[dg.AssetKey([EXPERTS_PREFIX, n]) for n in sorted(config.dataset.experts)],
        group_name=GROUP,
        retry_policy=RETRY,
        kinds={"python", "jsonl"},
        code_version="1",
        description="Validated, balanced train/val/eval split of the expert datasets.",
        check_specs=[
            _check("class_balance", "routing_dataset", "Every expert present, balanced."),
            _check("split_leakage", "routing_dataset", "No image in two splits.", blocking=True),
            _check("images_decodable", "routing_dataset", "Every image decodes.", blocking=True),
        ],
    )
    def routing_dataset(context: dg.AssetExecutionContext, mole: MoleResource) -> Iterator[Any]:
        yield from mole.launch(context, mole.spec(context.partition_key))

    return routing_dataset


@dg.asset(
    partitions_def=run_names,
    deps=["routing_dataset"],
    group_name=GROUP,
    retry_policy=RETRY,
    kinds={"python", "safetensors"},
    code_version="1",
    description="Qwen3VLProcessor-tokenized shards with answer-only labels and sized pixels.",
    check_specs=[
        _check("splits_nonempty", "tokenized_shards", "Every split holds samples.", blocking=True)
    ],
)
def tokenized_shards(context: dg.AssetExecutionContext, mole: MoleResource) -> Iterator[Any]:
    """Tokenize the run's routing dataset (builds the cached tiny base on first use)."""
    yield from mole.launch(context, mole.spec(context.partition_key))


class TrainConfig(dg.Config, TrainOptions):
    """Router training run config (`modal_jobs.stage.TrainOptions`, editable in the Launchpad)."""


@dg.asset(
    partitions_def=run_names,
    deps=["tokenized_shards"],
    group_name=GROUP,
    retry_policy=RETRY,
    kinds={"pytorch", "safetensors"},
    code_version="1",
    description="Router LoRA (language model only): adapter_config.json + safetensors.",
    pool=GPU_POOL,
)
def router_checkpoint(
    context: dg.AssetExecutionContext, config: TrainConfig, mole: MoleResource
) -> Iterator[Any]:
    """Train the router LoRA (resumes from the newest resume point)."""
    spec = mole.spec(context.partition_key, **config.model_dump(mode="json"))
    yield from mole.launch(context, spec)


class ExpertsConfig(dg.Config, ExpertsOptions):
    """Demo expert-adapter training run config (`modal_jobs.stage.ExpertsOptions`)."""


@dg.asset(
    partitions_def=run_names,
    deps=["routing_dataset", "tokenized_shards"],
    group_name=GROUP,
    kinds={"pytorch", "safetensors"},
    code_version="1",
    description="Demo expert LoRAs registered in loras.json with relative (managed) paths.",
    pool=GPU_POOL,
    retry_policy=RETRY,
)
def expert_adapters(
    context: dg.AssetExecutionContext, config: ExpertsConfig, mole: MoleResource
) -> Iterator[Any]:
    """Train the managed expert adapters on their train rows (user adapters are left alone)."""
    spec = mole.spec(context.partition_key, **config.model_dump(mode="json"))
    yield from mole.launch(context, spec)


@dg.asset(
    partitions_def=run_names,
    deps=["router_checkpoint", "expert_adapters"],
    group_name=GROUP,
    retry_policy=RETRY,
    kinds={"pytorch", "json"},
    code_version="1",
    description="Held-out eval: accuracy, F1, confusion, calibration, latency, end to end.",
    check_specs=[
        _check(
            "accuracy_gate",
            "eval_report",
            "Eval accuracy reaches router.min_accuracy (gates deployment).",
            blocking=True,
        )
    ],
    pool=GPU_POOL,
)
def eval_report(context: dg.AssetExecutionContext, mole: MoleResource) -> Iterator[Any]:
    """Score the eval split with the trained and the untrained router."""
    yield from mole.launch(context, mole.spec(context.partition_key))


@dg.asset(
    partitions_def=run_names,
    deps=["eval_report"],
    group_name=GROUP,
    retry_policy=RETRY,
    kinds={"json"},
    code_version="1",
    description="The router published to the inference volume and made current in the registry.",
    # One deploy at a time per Dagster instance; on Modal the deploy function's
    # max_containers=1 serializes deploys across instances too.
    pool="deploy",
)
def deployed_router(context: dg.AssetExecutionContext, mole: MoleResource) -> Iterator[Any]:
    """Atomically publish the run's router (refused below the accuracy gate)."""
    yield from mole.launch(context, mole.spec(context.partition_key))


def router_assets(config: MoleConfig) -> list[Any]:
    """Every asset of the graph for this config."""
    return [
        *expert_sources(config),
        routing_dataset_asset(config),
        tokenized_shards,
        router_checkpoint,
        expert_adapters,
        eval_report,
        deployed_router,
    ]
