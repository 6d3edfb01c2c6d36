"""Jobs: train a router run end to end (up to its eval report), and deploy a run."""

import dagster as dg

from mole_assets.partitions import run_names

TRAIN_SELECTION = dg.AssetSelection.assets("eval_report").upstream().materializable()
DEPLOY_SELECTION = dg.AssetSelection.assets("deployed_router")

train_router_job = dg.define_asset_job(
    "train_router",
    selection=TRAIN_SELECTION,
    partitions_def=run_names,
    description="Dataset → shards → router checkpoint → eval report for one run.",
)

train_and_deploy_job = dg.define_asset_job(
    "train_and_deploy_router",
    selection=TRAIN_SELECTION | DEPLOY_SELECTION,
    partitions_def=run_names,
    description="The whole chain; deployment still waits for the blocking accuracy check.",
)

deploy_router_job = dg.define_asset_job(
    "deploy_router",
    selection=DEPLOY_SELECTION,
    partitions_def=run_names,
    description="Publish a run's router to the inference volume (gated by eval accuracy).",
)

observe_experts_job = dg.define_asset_job(
    "observe_expert_datasets",
    selection=dg.AssetSelection.key_prefixes("expert_datasets", include_sources=True),
    description="Record the current content hash of every expert dataset.",
)
