"""Plain averaging of the two current layers' weights (every tensor, norms and biases
included; of m with `--merge-item m`): the simplest weight-space merge, the paper's
WSLP-style baseline."""

from __future__ import annotations

from .base import MergeMethod, register


@register
class Average(MergeMethod):
    name = "average"
    summary = "the mean of the two layers' weights"
    order = 40
    operator = "average"
    merges_windows = True

    def merge(self, pair):
        from ..merging.merge import linear_combination

        return linear_combination([pair.a, pair.b], [0.5, 0.5])

    def merge_window(self, window):
        """The mean of the m layers' weights (`--merge-item m`)."""
        from ..merging.merge import linear_combination

        return linear_combination(window.layers, [1.0 / len(window.layers)] * len(window.layers))
