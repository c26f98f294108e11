"""SLEB (Song et al., 2024, "SLEB: Streamlining LLMs through Redundancy Verification and
Elimination of Transformer Blocks", ICML; github.com/jiwonsong-dev/SLEB): remove blocks one
at a time; at each step every remaining block is a candidate, the model is scored on the
calibration text with that block skipped, and the block whose removal leaves the lowest
next-token loss goes. The scores are re-computed after every removal, so the choice sees the
blocks already removed (the paper's point against one-shot metrics).

The loss is the mean next-token NLL over every predicted token of ALL calibration batches
(the --nsamples windows of --seqlen tokens whose embeddings `profile.states[0]` holds; nothing
beyond what is cached). The official code sums the per-window NLL, which ranks identically
since every window has the same length; its calibration text is 128 shuffled wikitext-2 train
paragraphs cut into 2048-token windows, ours is --calib. Every block is a candidate, as in the
CoMe authors' re-implementation (github.com/WangFei-2019/CoMe, methods/sleb.py), whose table
this reproduces; the official script's `early_barrier` / `latter_barrier` (default 1: never the
first or the last block) are `--protect 0,L-1` here.

Cheap on come's plumbing: the model is never edited while scoring. The states entering the
candidate at position j are the same for every later candidate, so one phase runs the kept
layers once in order and, from the state entering each candidate, only the kept layers after
it: about K^2/2 layer passes for K kept layers instead of the official K^2 (whole-model runs).
Every layer pass over the calibration batches counts into `profile.forwards` (the Plan's
`layer_forwards`). `--refit ls` refits the layer kept before each removed run as for every
drop method."""

from __future__ import annotations

import logging

from .base import DropMethod, register

log = logging.getLogger("come")


def candidate_losses(profile, kept: list[int], protect=()) -> dict[int, float]:
    """{original layer c: calibration NLL of the model made of `kept` without c}, for every
    unprotected c in `kept`. The model itself is not touched: the kept layers run on the
    cached embeddings, each at its original position (its own attention type)."""
    from tqdm.auto import tqdm

    protect = set(protect)
    losses, h = {}, profile.states[0]
    # a step is K^2/2 layer passes: minutes on a CPU, so it shows its candidates go by
    for j, c in enumerate(tqdm(kept, desc="sleb: scoring removals", leave=False, unit="block")):
        if c not in protect:
            out = h
            for i in kept[j + 1:]:
                out = profile.run_layer(i, out)
            losses[c] = profile.nll(out)
        if j + 1 < len(kept):
            h = profile.run_layer(c, h)
    return losses


def sleb_order(profile, n: int, protect=()) -> list[int]:
    """The n original layers SLEB removes, in the order it removes them: each step drops the
    candidate of lowest loss (the lower index on a tie), then re-scores the rest."""
    kept = list(range(profile.n_layers))
    removed = []
    for step in range(n):
        losses = candidate_losses(profile, kept, protect)
        best = min(losses, key=lambda c: (losses[c], c))
        log.info("sleb step %d/%d: removing layer %d (calibration NLL %.4f)", step + 1, n, best, losses[best])
        removed.append(best)
        kept.remove(best)
    return removed


@register
class SLEB(DropMethod):
    name = "sleb"
    summary = "remove, one at a time, the block whose removal raises calibration NLL least (SLEB)"
    order = 60
    compared_by_default = False

    greedy = True

    def removal_order(self, profile, n, cfg):
        return sleb_order(profile, n, cfg.protect)
