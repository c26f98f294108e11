"""What a drop method reads of the dense model: one profiling pass, read-only.

A `DropMethod` chooses layers from the dense model's profile: per-layer Block Influence, the
last-token states at every boundary, the calibration token ids and the states the cache holds,
and, for the methods that score removals by loss (SLEB) or by gradient (Taylor+), a layer runner
and the calibration NLL. It gets this narrow view instead of the activation cache, whose
refit targets, pair scores and re-profiling stay the engine's: a method cannot change what the
loop reads after it. The layer passes a method runs are counted here and added to the Plan's
`layer_forwards` by the loop (dropping.py)."""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

from torch import Tensor

from ..scoring.lm_loss import next_token_nll

if TYPE_CHECKING:
    from .cache import ActivationCache


class DenseProfile:
    """The dense model's profile, as the one-shot loop hands it to `DropMethod.select`.

    bi[l]: Block Influence of layer l (1 - cos of its input and output, all tokens);
    last_tok[l]: the state entering layer l at each window's last token (l = L: leaving the last);
    states: {l: the cached states entering layer l} (a read-only view; 0: the embeddings);
    model / adapter: the dense model and its family's adapter (its weights: Magnitude+);
    runner / token_batches: what the scoring helpers (scoring/lm_loss.py, backprop.py) run with.
    """

    def __init__(self, cache: ActivationCache) -> None:
        self.model, self.adapter, self.runner = cache.model, cache.adapter, cache.runner
        self.bi = tuple(s.bi for s in cache.stats)
        self.last_tok = tuple(cache.last_tok)
        self.states = MappingProxyType(cache.states)
        self.token_batches = cache.token_batches
        self.forwards = 0  # layer passes run through this profile (the loop adds them to the Plan's count)

    @property
    def n_layers(self) -> int:
        return len(self.bi)

    def run_layer(self, i: int, h: list[Tensor]) -> list[Tensor]:
        """Original layer i on the states `h` (batches), at its own position; one counted pass."""
        self.forwards += 1
        return self.runner.run(self.adapter.decoder_layers(self.model)[i], h, False, position=i)[0]

    def nll(self, final_states: list[Tensor]) -> float:
        """Mean next-token NLL of the calibration batches from their final hidden states."""
        return next_token_nll(self, final_states)
