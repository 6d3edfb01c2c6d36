"""The `run_names` dynamic partitions: one partition per router training run."""

import dagster as dg

RUN_NAMES = "run_names"
run_names = dg.DynamicPartitionsDefinition(name=RUN_NAMES)
