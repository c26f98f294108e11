"""The activation cache: cached calibration hidden states of the CURRENT model, its
per-layer statistics and pair scores, and the DENSE model's states at every original
layer boundary (the refit's targets), within a host-memory budget.

After a merge at position l only layers >= l are re-run from the nearest cached input:
the official code re-runs the whole model at every step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .adapters import Adapter
from .errors import ComeError
from .profile import LayerRunner, LayerStats
from .selection import ALL_TOKEN_SCORES, mean_token_distance, skip_scores


class ActivationCache:
    """Cached layer inputs + per-layer statistics of the current model, and (for the refit
    and the error pair scores) the dense model's hidden state at every original boundary."""

    def __init__(self, model, adapter: Adapter, runner: LayerRunner, cfg, first_inputs: list[Tensor],
                 stride: int, dense_batches: int, token_batches: list[Tensor] | None = None):
        self.model, self.adapter, self.runner, self.cfg = model, adapter, runner, cfg
        # the calibration token ids, batch by batch (what a method scoring by next-token loss reads)
        self.token_batches = token_batches or []
        n = len(adapter.decoder_layers(model))
        self.states: dict[int, list[Tensor]] = {0: first_inputs}
        # the dense states of the first `dense_batches` calibration batches only: the refit's
        # tokens are bounded by the cache budget (zip() in collect_refit stops at the shortest)
        self.dense: dict[int, list[Tensor]] | None = {0: first_inputs[:dense_batches]} if dense_batches else None
        self.stats: list[LayerStats | None] = [None] * n
        self.last_tok: list[Tensor | None] = [None] * (n + 1)
        self.pair_all: list[float | None] = [None] * max(n - 1, 0)
        self.stride = stride
        self.forwards = 0
        n_hold = max(1, round(cfg.refit_holdout * dense_batches))
        self.held_out = [i >= dense_batches - n_hold for i in range(dense_batches)]

    def refresh(self) -> None:
        """Run every layer whose statistics or pair scores are missing, from the nearest cache."""
        layers = self.adapter.decoder_layers(self.model)
        all_tokens = self.cfg.pair_score in ALL_TOKEN_SCORES
        need = [k for k, s in enumerate(self.stats) if s is None]
        # pair (j, j + 1) is scored when layer j + 1 runs, from layer j's input: after a merge
        # at l, layer l - 1 need not re-run when its input is cached
        need += [j + 1 for j, p in enumerate(self.pair_all) if p is None and all_tokens]
        if not need:
            return
        first_pass = all(s is None for s in self.stats)
        start = max(k for k in self.states if k <= min(need))
        if all_tokens and start > 0 and self.pair_all[start - 1] is None and start - 1 not in self.states:
            start = max(k for k in self.states if k < start)  # that input is not cached: run from before it
        h, prev = self.states[start], self.states.get(start - 1)
        for k in tqdm(range(start, len(layers)), desc="profiling layers", leave=False, unit="layer"):
            out, st = self.runner.run(layers[k], h, self.stats[k] is None, self.cfg.head_score, position=k)
            self.forwards += 1
            if st is not None:
                self.stats[k] = st
            self.last_tok[k] = torch.cat([b[:, -1].float() for b in h])
            self.last_tok[k + 1] = torch.cat([b[:, -1].float() for b in out])
            if (k + 1) % self.stride == 0:
                self.states[k + 1] = out
            if first_pass and self.dense is not None:
                self.dense[k + 1] = out[:len(self.dense[0])]
            if all_tokens and prev is not None and self.pair_all[k - 1] is None:  # only that score reads it
                self.pair_all[k - 1] = mean_token_distance(prev, out, ALL_TOKEN_SCORES[self.cfg.pair_score])
            prev, h = h, out

    def inputs_at(self, k: int) -> list[Tensor]:
        """Hidden states entering current layer k (run forward from the nearest cache if needed)."""
        layers = self.adapter.decoder_layers(self.model)
        start = max(j for j in self.states if j <= k)
        h = self.states[start]
        for j in range(start, k):
            h, _ = self.runner.run(layers[j], h, False, position=j)
            self.forwards += 1
        self.states[k] = h
        return h

    def layers_removed(self) -> None:
        """Layers were dropped (one-shot methods): only the embedding cache still holds."""
        n = len(self.adapter.decoder_layers(self.model))
        self.states = {0: self.states[0]}
        self.stats, self.last_tok, self.pair_all = [None] * n, [None] * (n + 1), [None] * max(n - 1, 0)

    def pair_scores(self) -> list[float]:
        if self.cfg.pair_score in ALL_TOKEN_SCORES:
            return list(self.pair_all)
        return skip_scores(self.last_tok)

    def merged(self, position: int) -> None:
        """Layers position, position+1 became one: drop what no longer holds."""
        del self.stats[position + 1]
        del self.last_tok[position + 1]
        if self.pair_all:
            del self.pair_all[position]
        for k in range(position, len(self.stats)):
            self.stats[k] = None
        for k in range(max(position - 1, 0), len(self.pair_all)):
            self.pair_all[k] = None
        self.forget_after(position)

    def forget_after(self, k: int) -> None:
        """Layer k changed: cached inputs of the layers after it no longer hold."""
        self.states = {j: h for j, h in self.states.items() if j <= k}


def refit_batches(n_batches: int, batch_bytes: int, n_layers: int, max_cache_gb: float) -> int:
    """How many calibration batches keep their dense state at every layer boundary (the
    refit's targets): all of them if that fits in half of --max-cache-gb, else fewer, so
    host memory stays bounded (a 7B at 128 x 2048 tokens would need 66 GiB for all)."""
    fit = int(max_cache_gb * 2**30 / 2 // ((n_layers + 1) * batch_bytes))
    if min(fit, n_batches) < 2:
        raise ComeError(f"the refit needs the dense states of at least 2 calibration batches (one held out); "
                        f"{n_batches} batch(es) exist and --max-cache-gb {max_cache_gb} holds {fit}: raise --nsamples "
                        "or --max-cache-gb, lower --batch-size, or use --refit none")
    return min(fit, n_batches)


def cache_layout(n_layers: int, n_batches: int, batch_bytes: int, max_cache_gb: float,
                 keep_dense: bool) -> tuple[int, int]:
    """(dense batches kept for the refit, stride of the cached layer inputs) within
    --max-cache-gb: the dense states first (refit_batches), the layer inputs in the rest."""
    dense_batches = refit_batches(n_batches, batch_bytes, n_layers, max_cache_gb) if keep_dense else 0
    boundary = (n_layers + 1) * batch_bytes
    budget = max_cache_gb * 2**30 - boundary * dense_batches
    return dense_batches, max(1, math.ceil(boundary * n_batches / max(budget, 1.0)))
