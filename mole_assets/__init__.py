"""mole's Dagster definitions: assets, partitions, checks, resources, jobs and the CLI."""
