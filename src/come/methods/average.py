"""Plain averaging of the two current layers' weights (every tensor, norms and biases
included): the simplest weight-space merge, the paper's WSLP-style baseline."""

from __future__ import annotations

from ..merge import linear_combination
from .base import MergeMethod, register


@register
class Average(MergeMethod):
    name = "average"
    summary = "the mean of the two layers' weights"
    order = 40
    operator = "average"

    def merge(self, pair):
        return linear_combination([pair.a, pair.b], [0.5, 0.5])
