"""mole's Dagster definitions: assets, partitions, checks, resources, jobs and the CLI."""

import warnings

import dagster as dg

# Observable source assets and source selections are marked beta; they are Dagster's documented way
# to version external data such as the expert datasets.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
