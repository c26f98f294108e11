"""Which pair to merge and which units to keep: unit scores, the split into per-side
counts, eligibility (`--protect`, `--no-repeat`) and the pair scores that build each
candidate merge: the error scores (measured against the dense group) and the posterior
(`nll`: the whole model's calibration loss with the merge in place)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor
from tqdm.auto import tqdm

from ..merging.layer_refit import refit_layer
from ..merging.merge import concat_merge
from ..models.adapters import Adapter, AttnShape, LayerWeights
from ..settings.config import ERROR_SCORES, CompressConfig
from .lm_loss import nll_with_merge
from .selection import joint_counts, joint_split, share_counts, split_counts, split_ratio, split_shares
from .sensitivity import (attn_path_norm, channel_sensitivity, exact_head_sensitivity, ffn_path_norm, head_sensitivity,
                          kv_group_sensitivity, taylor_unit_sensitivity, top_units)

if TYPE_CHECKING:
    from ..engine.cache import ActivationCache
    from ..engine.runner import LayerStats



def unit_scores(stats: LayerStats, w: LayerWeights, shape: AttnShape, head_score: str,
                sensitivity: str = "l1") -> tuple[Tensor, Tensor]:
    """(KV-group sensitivities, FFN-unit sensitivities) of one layer by `--sensitivity`: FFN
    channels, or in an MoE layer its experts (l1: their routed contributions, measured whole by
    engine/runner.py)."""
    if sensitivity == "magnitude":
        return (attn_path_norm(w.v, w.o, shape.n_heads, shape.n_kv_heads, w.gain(w.attn_norm),
                               w.gain(w.attn_post_norm)),
                ffn_path_norm(w.gate, w.up, w.down, w.gain(w.ffn_norm), w.gain(w.ffn_post_norm)))
    if sensitivity == "taylor":
        return (taylor_unit_sensitivity(stats.attn_taylor, shape.n_kv_heads),
                taylor_unit_sensitivity(stats.ffn_taylor, w.ffn_units))
    if head_score == "exact":
        heads = exact_head_sensitivity(stats.head_out_l1)
    else:
        heads = head_sensitivity(channel_sensitivity(stats.attn_abs_mean, w.o, w.gain(w.attn_post_norm)), shape.n_heads)
    ffn = (stats.expert_out_l1.double() if w.router is not None
           else channel_sensitivity(stats.ffn_abs_mean, w.down, w.gain(w.ffn_post_norm)))
    return kv_group_sensitivity(heads, shape.n_kv_heads), ffn


def eligible_pairs(groups: list[list[int]], cfg: CompressConfig, span: int = 2) -> list[bool]:
    """Pairs (k, k+1), or windows k..k+span-1 (`--merge-item`), that may merge: `--protect`
    layers never, `--no-repeat` merged ones never."""
    protect = set(cfg.protect)
    out = []
    for k in range(len(groups) - span + 1):
        window = groups[k:k + span]
        ok = not protect.intersection(i for g in window for i in g)
        if cfg.no_repeat:
            ok = ok and all(len(g) == 1 for g in window)
        out.append(ok)
    return out


@dataclass
class Choice:
    """Which units a merge keeps from each side, and side A's share."""

    kv_a: list[int]
    kv_b: list[int]
    ffn_a: list[int]
    ffn_b: list[int]
    r_a: float


def no_units() -> Choice:
    """What a weight-space operator keeps: no units of either side."""
    return Choice([], [], [], [], 0.5)


@dataclass
class PairToMerge:
    """What a merge operator may read: the two current layers (`read_pair`: in the model's
    dtype, to convert per tensor), the original layers they stand for, the units chosen, the
    attention shape and the settings."""

    a: LayerWeights
    b: LayerWeights
    group_a: list[int]
    group_b: list[int]
    choice: Choice
    shape: AttnShape
    cfg: CompressConfig
    originals: list[LayerWeights] | None  # the original layers of group_a + group_b (method.needs_originals)


def choose_units(a: LayerWeights, b: LayerWeights, stats_a: LayerStats, stats_b: LayerStats, shape: AttnShape,
                 cfg: CompressConfig,
                 n_original: int, r_a: float | None = None) -> Choice:
    """The top units of each side (KV groups; FFN channels, or experts: the number per layer is
    fixed, so the same joint top-N rule); counts from the split rule, or from `r_a` when forced
    (r_a = 1.0 keeps A whole: dropping B). `--split search` forces every r_a of its grid
    (split_search.py); unforced, as the error pair scores' guess of a pair's split, it is joint."""
    kv_sa, ffn_sa = unit_scores(stats_a, a, shape, cfg.head_score, cfg.sensitivity)
    kv_sb, ffn_sb = unit_scores(stats_b, b, shape, cfg.head_score, cfg.sensitivity)
    d_ff = a.ffn_units
    if r_a is None and cfg.split in ("joint", "search", "refit"):  # refit: joint's KV groups (channel_selection.py)
        n_kv, n_ffn = joint_split(kv_sa, kv_sb, shape.n_kv_heads), joint_split(ffn_sa, ffn_sb, d_ff)
        r_a = n_ffn[0] / d_ff
    else:
        if r_a is None:
            r_a = split_ratio(stats_a.bi, stats_b.bi, cfg.skew, cfg.min_max, n_original=n_original)
        n_kv, n_ffn = split_counts(shape.n_kv_heads, r_a), split_counts(d_ff, r_a)
    return Choice(top_units(kv_sa, n_kv[0]), top_units(kv_sb, n_kv[1]), top_units(ffn_sa, n_ffn[0]),
                  top_units(ffn_sb, n_ffn[1]), r_a)


def read_pair(adapter: Adapter, model, k: int) -> tuple[LayerWeights, LayerWeights]:
    """Current layers k and k + 1: views of their weights in the model's dtype (a 7B pair is
    0.8 GB in bf16, 3.2 GB in float64). Merges and scores convert one tensor at a time to
    float64 (exact from bf16 / fp16 / fp32), so they compute what they would on whole float64
    copies; the views must be used before layer k is written."""
    a, b = read_window(adapter, model, k, 2)
    return a, b


def read_window(adapter: Adapter, model, k: int, span: int) -> list[LayerWeights]:
    """Current layers k .. k + span - 1, as `read_pair` reads them."""
    layers = adapter.decoder_layers(model)
    return [adapter.read_layer(layers[j], copy=False) for j in range(k, k + span)]


@dataclass
class WindowChoice:
    """Which units a merge of several layers (`--merge-item` > 2) keeps from each, and each
    side's share of the merged layer's units (its FFN share)."""

    kv: list[list[int]]
    ffn: list[list[int]]
    shares: list[float]


def no_window_units(span: int) -> WindowChoice:
    """`no_units` for a window of `span` layers: equal shares."""
    return WindowChoice([[] for _ in range(span)], [[] for _ in range(span)], [1.0 / span] * span)


@dataclass
class WindowToMerge:
    """`PairToMerge` for m > 2 adjacent layers (`--merge-item m`): the current layers in
    order (`read_window`), the original layers each stands for, the units chosen from each."""

    layers: list[LayerWeights]
    groups: list[list[int]]
    choice: WindowChoice
    shape: AttnShape
    cfg: CompressConfig
    originals: list[LayerWeights] | None  # the original layers of every group, in order (method.needs_originals)


def choose_window_units(layers: list[LayerWeights], stats: list[LayerStats], shape: AttnShape, cfg: CompressConfig,
                        n_original: int) -> WindowChoice:
    """`choose_units` for a window: `--split joint` keeps the top units of all its layers
    ranked together; `--split bi` gives side i the share normalize(normalize(BI)^p)_i and its
    top units by that count (the authors' block_ratio)."""
    scores = [unit_scores(st, w, shape, cfg.head_score, cfg.sensitivity) for st, w in zip(stats, layers)]
    d_ff = layers[0].ffn_units
    if cfg.split == "joint":
        n_kv = joint_counts([kv for kv, _ in scores], shape.n_kv_heads)
        n_ffn = joint_counts([ffn for _, ffn in scores], d_ff)
        shares = [n / d_ff for n in n_ffn]
    else:
        shares = split_shares([st.bi for st in stats], cfg.skew, cfg.min_max, n_original)
        n_kv, n_ffn = share_counts(shape.n_kv_heads, shares), share_counts(d_ff, shares)
    return WindowChoice([top_units(kv, n) for (kv, _), n in zip(scores, n_kv)],
                        [top_units(ffn, n) for (_, ffn), n in zip(scores, n_ffn)], shares)


def write_candidate(adapter: Adapter, scratch, a: LayerWeights, b: LayerWeights, shape: AttnShape, choice: Choice,
                    cfg: CompressConfig) -> None:
    """Write the concatenation merge of `a` and `b` keeping `choice`'s units into the scratch layer."""
    adapter.write_layer(scratch, concat_merge(a, b, shape, choice.kv_a, choice.kv_b, choice.ffn_a, choice.ffn_b,
                                              choice.r_a, cfg.norm))


def built_scores(cache: ActivationCache, shape: AttnShape, cfg: CompressConfig) -> ErrorScores | PosteriorScores | None:
    """The scorer of a `--pair-score` that builds each candidate merge, or None for the
    angle scores the cache computes while profiling."""
    if cfg.pair_score in ERROR_SCORES:
        return ErrorScores(cache, shape, cfg)
    return PosteriorScores(cache, shape, cfg) if cfg.pair_score == "nll" else None


class ErrorScores:
    """`--pair-score error` (DECISION): a pair's cost is the held-out error, relative to the
    dense stream, of its ACTUAL merged layer (refit if --refit ls) against the dense group's
    output, on the dense group's input. Degenerate splits (all units of one side = drop the
    other) compete, so come can only match or beat drop + refit on the same layers.
    `--pair-score merge-error`: the same error of the merge itself, before any refit (the
    refit still follows the choice): a refit fitted on the calibration can make a merge look
    cheap on calibration-domain text only, the unfitted merge cannot.
    Dense inputs and targets make a pair's cost independent of merges elsewhere: only pairs
    touching the newly merged layer are re-scored."""

    def __init__(self, cache: ActivationCache, shape: AttnShape, cfg: CompressConfig):
        self.cache, self.shape, self.cfg = cache, shape, cfg
        self.scored: dict[tuple, tuple[float, Choice]] = {}

    def scores(self, groups: list[list[int]], eligible: list[bool]) -> tuple[list[float], list[Choice | None]]:
        out_s, out_c = [], []
        todo = [k for k, ok in enumerate(eligible) if ok and self._key(groups, k) not in self.scored]
        for k in tqdm(todo, desc="scoring pairs", leave=False, unit="pair"):
            self.scored[self._key(groups, k)] = self._score(groups, k)
        for k, ok in enumerate(eligible):
            score, choice = self.scored[self._key(groups, k)] if ok else (math.inf, None)
            out_s.append(score)
            out_c.append(choice)
        return out_s, out_c

    @staticmethod
    def _key(groups, k) -> tuple:
        return tuple(groups[k]), tuple(groups[k + 1])

    def _score(self, groups, k: int) -> tuple[float, Choice]:
        cache, cfg = self.cache, self.cfg
        a, b = read_pair(cache.adapter, cache.model, k)
        sa, sb = cache.stats[k], cache.stats[k + 1]
        group = groups[k] + groups[k + 1]
        scratch = copy.deepcopy(cache.adapter.decoder_layers(cache.model)[k])
        best = None
        fitted = cfg.refit == "ls" and cfg.pair_score == "error"
        for r_a in (None, 1.0, 0.0):
            choice = choose_units(a, b, sa, sb, self.shape, cfg, len(group), r_a)
            write_candidate(cache.adapter, scratch, a, b, self.shape, choice, cfg)
            res = refit_layer(cache, k, group, "dense", layer=scratch, solve=fitted)
            err = res.err_after if fitted else res.err_before
            if best is None or err < best[0]:
                best = (err, choice)
        return best


class PosteriorScores:
    """`--pair-score nll` (issue 19 item 5): a pair's cost is the calibration next-token NLL
    of the CURRENT model with that pair's merge (as merged, before any refit; units by the
    split rule, as `--split joint` / `bi` would keep them) in place: the posterior CoMe-P
    scores its splits by (split_search.py), and SLEB its removals by, applied to the choice
    of pair. It sees what the angle scores cannot: what the concatenation keeps, and the
    effect on the model's output rather than on one layer's. Every eligible pair is re-scored
    after every merge (the layers after it changed): L - k - 1 layer passes and the head per
    pair, about L^2 / 2 layer passes and L heads per merge."""

    def __init__(self, cache: ActivationCache, shape: AttnShape, cfg: CompressConfig):
        self.cache, self.shape, self.cfg = cache, shape, cfg

    def scores(self, groups: list[list[int]], eligible: list[bool]) -> tuple[list[float], list[Choice | None]]:
        cache, out_s, out_c = self.cache, [], []
        for k, ok in enumerate(tqdm(eligible, desc="scoring pairs (nll)", leave=False, unit="pair")):
            if not ok:
                out_s.append(math.inf)
                out_c.append(None)
                continue
            a, b = read_pair(cache.adapter, cache.model, k)
            choice = choose_units(a, b, cache.stats[k], cache.stats[k + 1], self.shape, self.cfg,
                                  len(groups[k]) + len(groups[k + 1]))
            scratch = copy.deepcopy(cache.adapter.decoder_layers(cache.model)[k])
            write_candidate(cache.adapter, scratch, a, b, self.shape, choice, self.cfg)
            out_s.append(nll_with_merge(cache, k, scratch, cache.inputs_at(k)))
            out_c.append(choice)
        return out_s, out_c
