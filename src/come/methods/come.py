"""CoMe (Wang et al., NeurIPS 2025, arXiv 2510.15304): one stock-shaped layer built from
two by CONCATENATING their most sensitive KV groups / FFN channels (norms folded first,
exact), followed by our closed-form refit of the merged layer's down projection."""

from __future__ import annotations

from .base import MergeMethod, register


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

    def merge(self, pair):
        from ..merge import concat_merge

        c = pair.choice
        return concat_merge(pair.a, pair.b, pair.shape, c.kv_a, c.kv_b, c.ffn_a, c.ffn_b, c.r_a, pair.cfg.norm)

    def merge_window(self, window):
        from ..merge import concat_merge_many

        c = window.choice
        return concat_merge_many(window.layers, window.shape, c.kv, c.ffn, c.shares, window.cfg.norm)
