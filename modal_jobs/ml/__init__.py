"""The model-side library the stages use.

Model loading and presets, encoding and batching, shard files, losses, optimizer, loader and
distributed helpers, the vision cache, routing, calibration, metrics and plots.
"""
