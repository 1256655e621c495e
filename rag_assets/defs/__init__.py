"""Dagster glue only: assets, checks, sensors, schedules and resources over the core stages."""
