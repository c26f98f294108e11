"""LaCo (Yang et al., 2024, "LaCo: Large Language Model Pruning via Layer Collapse"):
Reserving-Differences-while-Seeking-Common, theta_0 + sum_{i>0} (theta_i - theta_0) over
the ORIGINAL layers the pair stands for; a weight-space merge the CoMe paper argues against."""

from __future__ import annotations

from .base import MergeMethod, register


@register
class LaCo(MergeMethod):
    name = "laco"
    summary = "LaCo's RDSC weight-space merge of the original layers"
    order = 30
    operator = "rdsc"
    needs_originals = True
    merges_windows = True  # RDSC combines however many original layers the merge stands for

    def merge(self, pair):
        from ..merging.merge import linear_combination, rdsc_coefficients

        return linear_combination(pair.originals, rdsc_coefficients(len(pair.originals)))

    def merge_window(self, window):
        return self.merge(window)
