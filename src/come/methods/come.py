"""CoMe (Wang et al., NeurIPS 2025, arXiv 2510.15304): one stock-shaped layer built from
two by CONCATENATING their most sensitive KV groups / FFN channels (norms folded first,
exact), followed by our closed-form refit of the merged layer's down projection.

What only CoMe measures lives here, in its steps (`ComeSteps`), which the progressive loop
calls: taylor unit gradients once per step (`--sensitivity taylor`), the pair scores that
build each candidate merge (`--pair-score error / merge-error / nll`, pair_scoring.py), and
the units each merge keeps: by the split rule (`--split bi / joint`, pair_scoring.choose_units),
the error pair score's pick, or the paper's posterior search (`--split search`, split_search.py)."""

from __future__ import annotations

from dataclasses import replace

from ..errors import ComeError
from .base import MergeMethod, MergeSteps, register


class ComeSteps(MergeSteps):
    """A CoMe run's steps: its pair scorer (None for the cache's angle scores) and what it
    picked for each pair at the last step (the units its candidate merge kept)."""

    def __init__(self, method, run, cfg):
        from ..scoring.pair_scoring import built_scores

        super().__init__(method, run, cfg)
        self.shape = run.adapter.attn_shape(run.model.config)
        self.scorer = built_scores(run.cache, self.shape, cfg)
        self.picks = None

    def pair_scores(self, groups, eligible):
        cache = self.run.cache
        if self.cfg.sensitivity == "taylor":  # every layer's, after every merge: one backward per step
            cache.unit_gradients()
        if self.scorer is None:
            return cache.pair_scores()
        scores, self.picks = self.scorer.scores(groups, eligible)
        return scores

    def merge_pair(self, k, pair):
        from ..scoring.pair_scoring import choose_units
        from ..scoring.split_search import search_split

        cfg, cache = self.cfg, self.run.cache
        stats_a, stats_b = cache.stats[k], cache.stats[k + 1]
        group = pair.group_a + pair.group_b

        def units(r_a: float | None = None):
            return choose_units(pair.a, pair.b, stats_a, stats_b, pair.shape, cfg, len(group), r_a)

        if cfg.split == "refit":
            from ..scoring.channel_selection import refit_channels

            choice = refit_channels(cache, k, group, units(), pair.a, pair.b,
                                    lambda c: self.method.merge(replace(pair, choice=c)), cfg)
            return self.method.merge(replace(pair, choice=choice)), choice, {}
        if cfg.split == "search":
            choice, searched = search_split(cache, k, group, units,
                                            lambda c: self.method.merge(replace(pair, choice=c)), cfg)
            return self.method.merge(replace(pair, choice=choice)), choice, {"split_search": searched}
        choice = self.picks[k] if self.picks else units()
        return self.method.merge(replace(pair, choice=choice)), choice, {}

    def merge_window(self, k, window):
        from ..scoring.pair_scoring import choose_window_units

        stats = self.run.cache.stats[k:k + len(window.layers)]
        choice = choose_window_units(window.layers, stats, window.shape, self.cfg, sum(len(g) for g in window.groups))
        return self.method.merge_window(replace(window, choice=choice)), choice


@register
class Come(MergeMethod):
    name = "come"
    summary = "concatenation merge of the most sensitive units (the paper), + closed-form refit"
    order = 0
    default_refit = "ls"  # DECISION, ours (BENCHMARKS.md); --refit none = the paper
    default_pair_score = "bi-all-tokens"  # DECISION, chosen on held-out documents (BENCHMARKS.md)
    default_reprofile = "window"  # DECISION, measured against full on three splits (BENCHMARKS.md)
    operator = "concat"
    keeps_units = True
    merges_windows = True
    # how the units are chosen and shared (pair_scoring.py, split_search.py) and the norms folded
    options = MergeMethod.options | {"split", "granularity", "split_score", "skew", "min_max", "norm", "head_score",
                                     "sensitivity"}

    def check(self, cfg):
        """--split-score refit scores each candidate after its refit: there must be one."""
        super().check(cfg)
        if cfg.split_score == "refit" and cfg.refit != "ls":
            raise ComeError("--split-score refit scores each candidate after its refit; drop --refit none, or use "
                            "--split-score nll / error")
        if cfg.split == "refit" and cfg.refit != "ls":
            raise ComeError("--split refit keeps the FFN channels the refit needs most; drop --refit none, or use "
                            "--split joint")
        if cfg.split == "refit" and cfg.merge_item > 2:
            raise ComeError(f"--split refit chooses the channels of a pair; drop --merge-item {cfg.merge_item}, "
                            "or use --split joint")

    def needs_dense(self, cfg):
        """Also for `--split search --split-score error`: it scores each candidate against the dense group."""
        return super().needs_dense(cfg) or (cfg.split == "search" and cfg.split_score == "error")

    def steps(self, run, cfg):
        return ComeSteps(self, run, cfg)

    def merge(self, pair):
        from ..merging.merge import concat_merge

        c = pair.choice
        return concat_merge(pair.a, pair.b, pair.shape, c.kv_a, c.kv_b, c.ffn_a, c.ffn_b, c.r_a, pair.cfg.norm)

    def merge_window(self, window):
        from ..merging.merge import concat_merge_many

        c = window.choice
        return concat_merge_many(window.layers, window.shape, c.kv, c.ffn, c.shares, window.cfg.norm)
