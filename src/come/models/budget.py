"""The parameter budget: how many one-layer removals reach a target sparsity."""

from __future__ import annotations

import math

from torch import nn

from ..errors import ComeError
from .adapters import get_adapter


def count_params(module: nn.Module) -> int:
    """Parameters of `module`, shared (tied) tensors counted once, as the papers count."""
    return sum(p.numel() for p in module.parameters())


def merges_needed(total: int, per_layer: int, sparsity: float) -> int:
    """Fewest one-layer removals whose removed params reach `sparsity` of `total`."""
    return math.ceil(sparsity * total / per_layer - 1e-9)


def merge_windows(n_remove: int, merge_item: int) -> list[int]:
    """Layers merged at each step to remove `n_remove` layers, `merge_item` at a time (each
    such merge removes merge_item - 1); the last merge takes only the layers still to go
    (the authors' rule), so every --merge-item reaches the same layer count: [2] * n for pairs."""
    out = []
    while n_remove > 0:
        out.append(min(merge_item, n_remove + 1))
        n_remove -= out[-1] - 1
    return out


def merge_budget(model: nn.Module, sparsity: float) -> tuple[int, int, int]:
    """(total params, params per layer, merges needed); a one-line error if unreachable.

    Works on a model built on the 'meta' device, so the CLI checks before loading weights.
    """
    layers = get_adapter(model.config).decoder_layers(model)
    total, per_layer = count_params(model), count_params(layers[0])
    n_merges = merges_needed(total, per_layer, sparsity)
    if n_merges >= len(layers):
        raise ComeError(
            f"--sparsity {sparsity} needs {n_merges} merges but the model has only {len(layers)} layers "
            f"(max reachable: {(len(layers) - 1) * per_layer / total:.3f}); lower --sparsity"
        )
    return total, per_layer, n_merges
