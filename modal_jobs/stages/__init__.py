"""The stages: what one materialization of each asset runs.

One module per asset (`python -m modal_jobs.stages.<stage>`), each a plain `run(spec)` function
over the library folders (`ml/`, `serving/`) and the contracts at the package root.
"""
