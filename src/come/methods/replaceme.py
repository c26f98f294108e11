"""ReplaceMe (Shopkhoev et al., 2025, "ReplaceMe: Network Simplification via Depth Pruning
and Transformer Block Linearization"), its least-squares variant: drop a block, then fit one
hidden x hidden linear map per removed run on the dense model and fold it into the
preceding layer's down projection. `--select angle` (published): the contiguous block of n
layers whose input and output last-token states are closest in angle (Gromov et al. 2024);
`--select bi`: ShortGPT's layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from ..settings.options import option
from .base import DropMethod, register, unprotected_runs
from .shortgpt import lowest_bi_layers

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class ReplaceMeOptions:
    """Which block ReplaceMe drops."""

    cli_panel: ClassVar[str] = "ReplaceMe"

    select: Literal["angle", "bi"] = option("angle", "replaceme: angle (published block) | bi (ShortGPT's layers).",
                                            choices=("angle", "bi"))


def angle_block(last_tok: list[Tensor], n: int, protect: list[int]) -> list[int]:
    """The block i..i+n-1 minimizing the mean angular distance between the last-token
    states entering i and leaving i+n-1 (none when no block of n is unprotected: the target
    was checked against `ReplaceMe.removable` before any work)."""
    from ..scoring.selection import angular_distance

    best = None
    for i in range(len(last_tok) - n):
        if set(range(i, i + n)) & set(protect):
            continue
        d = float(angular_distance(last_tok[i], last_tok[i + n]).mean())
        if best is None or d < best[0]:
            best = (d, i)
    return list(range(best[1], best[1] + n)) if best is not None else []


@register
class ReplaceMe(DropMethod):
    name = "replaceme"
    summary = "drop a block, fold a least-squares hidden x hidden map into the layer before"
    order = 20
    compared_by_default = False
    refit_features = "mlp_out"
    always_refits = True
    own_options = ReplaceMeOptions
    shared_options = frozenset()  # not --refit: its own map is its refit, always
    ignored_hint = " (replaceme always fits its own map)"

    def removable(self, n_layers, cfg):
        """--select angle drops one contiguous block: the longest run of unprotected layers."""
        if cfg.select != "angle":
            return super().removable(n_layers, cfg)
        return max(unprotected_runs(n_layers, cfg.protect), default=0)

    def select(self, profile, n, cfg):
        if cfg.select == "angle":
            return angle_block(profile.last_tok, n, cfg.protect)
        return lowest_bi_layers(profile.bi, n, cfg.protect)
