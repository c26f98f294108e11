"""Models in and out: the architecture adapters, loading and writing checkpoints, the model card,
the pre-flight checks, calibration data and the parameter budget."""
