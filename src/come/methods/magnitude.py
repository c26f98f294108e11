"""Magnitude+ (Kim et al., 2024, "Shortened LLaMA: Depth Pruning for Large Language Models
with Comparison of Retraining Methods"; github.com/Nota-NetsPresso/shortened-llm): a block's
importance is the L1 norm of its weights, sum over every weight tensor of the block (the
projections and the norm weights; no biases, no normalization) of sum |W|: their
`src/anal_block_sensitivity_magnitude.py` with its defaults norm_power=1,
weight_reduction=sum, block_reduction=sum. The n least important blocks go in one shot.

The "+" (their `src/block_prune.py`, on unless `--no_plus_heuristic`): the first four and the
last two blocks (0, 1, 2, 3, L-2, L-1) are kept out of the pruning order, since removing them
hurts most (the paper's Taylor+ / Magnitude+). DECISION: on a model too shallow for that
(fewer blocks outside them than the target removes; their code would then index past its
list) the spared blocks become candidates of last resort, least important first, with a
warning. `--protect` layers are never removed. The calibration text is not read."""

from __future__ import annotations

import logging

from .base import DropMethod, register

log = logging.getLogger("come")

SPARED_FIRST, SPARED_LAST = 4, 2  # Kim et al.'s "+": blocks 0..3 and the last two stay


def spared_blocks(n_layers: int) -> set[int]:
    """The blocks the "+" rule keeps out of the pruning order."""
    return set(range(min(SPARED_FIRST, n_layers))) | set(range(max(n_layers - SPARED_LAST, 0), n_layers))


def least_important_plus(importance: list[float], n: int, protect=()) -> list[int]:
    """The n blocks to drop: the least important outside the "+" exclusions and `protect`;
    spared blocks only when the others run out (least important first)."""
    spared, protect = spared_blocks(len(importance)), set(protect)
    free = [i for i in range(len(importance)) if i not in protect]
    ranked = sorted(free, key=lambda i: (i in spared, importance[i], i))
    chosen = ranked[:n]
    if any(i in spared for i in chosen):
        log.warning("only %d blocks lie outside the first %d and last %d that the \"+\" rule spares; dropping "
                    "spared blocks %s too", sum(i not in spared for i in free), SPARED_FIRST, SPARED_LAST,
                    sorted(i for i in chosen if i in spared))
    return sorted(chosen)


def block_weights(layer) -> list:
    """The weight tensors a block's importance sums over: every parameter named `*weight`
    (projections, norms, q/k norms) and every matrix (MoE experts stored as fused 3-D
    `gate_up_proj` / `down_proj`), biases left out, as Kim et al. do."""
    return [p for name, p in layer.named_parameters() if name.endswith("weight") or p.ndim >= 2]


def magnitude_importance(layers) -> list[float]:
    """Per block, sum over its weight tensors of sum |W| (accumulated in float64)."""
    import torch

    return [float(sum(p.detach().abs().sum(dtype=torch.float64) for p in block_weights(layer))) for layer in layers]


@register
class Magnitude(DropMethod):
    name = "magnitude"
    summary = "drop the blocks of smallest weight L1 norm, first 4 and last 2 spared (Magnitude+, one shot)"
    order = 80
    compared_by_default = False

    def select(self, profile, n, cfg):
        importance = magnitude_importance(profile.adapter.decoder_layers(profile.model))
        log.info("magnitude+ block importance: %s", ", ".join(f"{v:.4g}" for v in importance))
        return least_important_plus(importance, n, cfg.protect)

