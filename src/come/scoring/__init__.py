"""What to remove and what to keep: unit sensitivities, layer similarities, the pair scores and
the split search, the calibration loss and its gradients, fidelity to the dense model."""
