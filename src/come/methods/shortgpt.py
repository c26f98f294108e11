"""ShortGPT (Men et al., 2024, "ShortGPT: Layers in Large Language Models are More
Redundant Than You Expect"): drop, in one shot, the n layers of lowest Block Influence,
BI = 1 - mean over all tokens of cos(in, out). `--refit ls` adds our closed-form refit of
the layer kept before each removed run (drop + refit)."""

from __future__ import annotations

from .base import DropMethod, register


def lowest_bi_layers(bi: list[float], n: int, protect: list[int]) -> list[int]:
    """The n layers whose output differs least from their input."""
    order = sorted((b, i) for i, b in enumerate(bi) if i not in set(protect))
    return sorted(i for _, i in order[:n])


@register
class ShortGPT(DropMethod):
    name = "shortgpt"
    summary = "drop the layers of lowest Block Influence (one shot)"
    order = 10

    def select(self, profile, n, cfg):
        return lowest_bi_layers(profile.bi, n, cfg.protect)
