"""Launching stages: Dagster Pipes locally, Modal functions in the cloud.

`compute` is the table of what each Modal function requests; `pipes` runs a stage module under
Pipes or by hand; `cloud` is what the Modal entrypoints do on the Dagster machine.
"""
