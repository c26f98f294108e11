"""Reverse-order pruning: drop the n blocks just before the final one, with no calibration
signal at all. Gromov et al. (2024, "The Unreasonable Ineffectiveness of the Deeper
Layers") and Lu et al. (2024, "Reassessing Layer Pruning in LLMs") found this a strong
baseline; the CoMe authors' code carries it as `reverse`. `--refit ls` adds our refit of
the layer kept before the removed run."""

from __future__ import annotations

from .base import DropMethod, register


def candidates(n_layers: int, protect: list[int]) -> list[int]:
    """The layers this method may drop, highest first: unprotected, the final layer excluded."""
    return [i for i in range(n_layers - 2, -1, -1) if i not in set(protect)]


def last_layers_before_final(n_layers: int, n: int, protect: list[int]) -> list[int]:
    """The n highest unprotected layers, the final layer excluded."""
    return sorted(candidates(n_layers, protect)[:n])


@register
class ReverseOrder(DropMethod):
    name = "reverse-order"
    summary = "drop the last blocks before the final one (no calibration signal)"
    order = 50
    compared_by_default = False

    def removable(self, n_layers, cfg):
        return len(candidates(n_layers, cfg.protect))

    def select(self, profile, n, cfg):
        return last_layers_before_final(profile.n_layers, n, cfg.protect)
