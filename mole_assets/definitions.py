"""Dagster entry point (`mole_assets.definitions:defs`): gathers assets, jobs and resources."""

import dagster as dg

from modal_jobs.config import load_config
from mole_assets.assets import router_assets
from mole_assets.executor import STEP_PROCESSES
from mole_assets.jobs import (
    deploy_router_job,
    observe_experts_job,
    train_and_deploy_job,
    train_router_job,
)
from mole_assets.resources import MoleResource
from mole_assets.sensors import expert_datasets_sensor

defs = dg.Definitions(
    assets=router_assets(load_config()),
    executor=STEP_PROCESSES,
    jobs=[train_router_job, train_and_deploy_job, deploy_router_job, observe_experts_job],
    sensors=[expert_datasets_sensor],
    resources={"mole": MoleResource()},
)
