"""The activation cache: cached calibration hidden states of the CURRENT model, its
per-layer statistics and pair scores, and the DENSE model's states at every original
layer boundary (the refit's targets), within a host-memory budget.

After a merge at position l only layers >= l are re-run from the nearest cached input:
the official code re-runs the whole model at every step. `--reprofile window` re-runs only
layers l..l+W (W = `--reprofile-window`) and keeps the later layers' statistics and pair
scores as they were (stale, consistently: each computed on the states of the model it last
ran in), unless the hidden state leaving the window has moved, relative to the state those
stale statistics were computed from, by `--reprofile-drift` or more: then every later layer
re-runs, as in `full`. Only TRUE states of the current model are ever cached in `states`
(what `inputs_at`, so the refit, reads): the states a stale layer's statistics came from are
kept apart in `ref`, for the drift check alone. After a merge, the refit's pass over the
merged layer may be kept (runner.KeptPass, when it fits in the budget): the re-profiling
then takes that layer's outputs and statistics from it instead of running the layer again.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import ComeError
from ..scoring.backprop import unit_taylor
from ..scoring.selection import ALL_TOKEN_SCORES, mean_token_distance, skip_scores
from .disk_cache import DiskStates

if TYPE_CHECKING:
    from ..models.adapters import Adapter
    from ..settings.config import CompressConfig
    from .runner import KeptPass, LayerRunner, LayerStats

log = logging.getLogger("come")


class ActivationCache:
    """Cached layer inputs + per-layer statistics of the current model, and (for the refit
    and the error pair scores) the dense model's hidden state at every original boundary.
    With `disk` (--cache-dir) every state it keeps lives in a memory-mapped file."""

    def __init__(self, model, adapter: Adapter, runner: LayerRunner, cfg: CompressConfig, first_inputs: list[Tensor],
                 stride: int, dense_batches: int, token_batches: list[Tensor] | None = None,
                 disk: DiskStates | None = None):
        self.model, self.adapter, self.runner, self.cfg = model, adapter, runner, cfg
        self.disk = disk
        first_inputs = self.keep_states(first_inputs)
        # the calibration token ids, batch by batch (what a method scoring by next-token loss reads)
        self.token_batches = token_batches or []
        n = len(adapter.decoder_layers(model))
        self.states: dict[int, list[Tensor]] = {0: first_inputs}
        # the dense states of the first `dense_batches` calibration batches only: the refit's
        # tokens are bounded by the cache budget (zip() in collect_refit stops at the shortest)
        self.dense: dict[int, list[Tensor]] | None = {0: first_inputs[:dense_batches]} if dense_batches else None
        self.stats: list[LayerStats | None] = [None] * n
        # whether the dense model has run once (its states are the refit's targets): after a
        # merge at position 0 every statistic is missing too, but the model is not dense then
        self.profiled = False
        self.last_tok: list[Tensor | None] = [None] * (n + 1)
        self.pair_all: list[float | None] = [None] * max(n - 1, 0)
        self.span = 2  # layers per scored window: pairs, or `--merge-item` (set_span)
        self.stride = stride
        self.forwards = 0
        # --reprofile window (cfg without the field: full): `ref[k]` is the input current layer
        # k's statistics were computed from (every `stride`-th layer), `drifts` one
        # (position, exit boundary, drift, re-ran all) per windowed refresh
        self.window = getattr(cfg, "reprofile", "full") == "window"
        self.ref: dict[int, list[Tensor]] = {}
        self.drifts: list[tuple[int, int, float, bool]] = []
        # a refit pass over the layer just merged, standing in for its re-profiling (runner.KeptPass)
        self.kept_pass: KeptPass | None = None
        n_hold = max(1, round(cfg.refit_holdout * dense_batches))
        self.held_out = [i >= dense_batches - n_hold for i in range(dense_batches)]

    def refresh(self) -> None:
        """Run every layer whose statistics or pair scores are missing, from the nearest cache;
        on to the last layer, except in window mode when the state leaving them moved less than
        --reprofile-drift from the one the later layers' statistics were computed from."""
        layers = self.adapter.decoder_layers(self.model)
        all_tokens = self.cfg.pair_score in ALL_TOKEN_SCORES
        need = [k for k, s in enumerate(self.stats) if s is None]
        # pair (j, j + 1) is scored when layer j + 1 runs, from layer j's input: after a merge
        # at l, layer l - 1 need not re-run when its input is cached (a window j..j+span-1 alike)
        need += [j + self.span - 1 for j, p in enumerate(self.pair_all) if p is None and all_tokens]
        if not need:
            return
        first_pass = not self.profiled
        self.profiled = True
        start = max(k for k in self.states if k <= min(need))
        scored_before = range(max(start - self.span + 1, 0), min(start, len(self.pair_all)))
        open_before = [j for j in scored_before if all_tokens and self.pair_all[j] is None]
        if any(j not in self.states for j in open_before):
            start = max(k for k in self.states if k <= open_before[0])  # an input not cached: run from before it
        h = self.states[start]
        back = {j: self.states[j] for j in range(max(start - self.span + 1, 0), start) if j in self.states}
        window = self.window and not first_pass
        rerun = False  # window mode: the state leaving the window moved too far, every later layer re-runs
        for k in tqdm(range(start, len(layers)), desc="profiling layers", leave=False, unit="layer"):
            want = self.stats[k] is None or rerun
            if self.kept_pass is not None and self.kept_pass.holds_for(k, h):  # the refit pass over layer k
                (out, st), self.kept_pass = self.kept_pass.finish(self.runner, layers[k]), None
                st = st if want else None
            else:
                out, st = self.runner.run(layers[k], h, want, self.cfg.head_score, position=k)
                self.forwards += 1
            if st is not None:
                self.stats[k] = st
                self.ref.pop(k, None)
                if self.window and k % self.stride == 0:
                    self.ref[k] = self.keep_states(h)
            self.last_tok[k] = torch.cat([b[:, -1].float() for b in h])
            self.last_tok[k + 1] = torch.cat([b[:, -1].float() for b in out])
            if (k + 1) % self.stride == 0 or (first_pass and self.dense is not None):
                out = self.keep_states(out)
            if (k + 1) % self.stride == 0:
                self.states[k + 1] = out
            if first_pass and self.dense is not None:
                self.dense[k + 1] = out[:len(self.dense[0])]
            j = k - self.span + 1  # the window ending at layer k, scored from its first layer's input
            if all_tokens and j in back and (self.pair_all[j] is None or rerun):  # only that score reads it
                self.pair_all[j] = mean_token_distance(back[j], out, ALL_TOKEN_SCORES[self.cfg.pair_score])
            back.pop(j, None)
            back[k], h = h, out
            if window and not rerun and k >= max(need) and k + 1 < len(layers):
                ref = self.ref.get(k + 1)
                if ref is None:  # no state to compare with (strided cache): the window grows by one layer
                    self.stats[k + 1] = None
                    if 0 <= k + 2 - self.span < len(self.pair_all):  # and scores the window layer k + 1 ends
                        self.pair_all[k + 2 - self.span] = None
                    continue
                drift = relative_change(out, ref)
                rerun = not drift < self.cfg.reprofile_drift
                self.drifts.append((min(need), k + 1, drift, rerun))
                log.debug("reprofile window: layers %d..%d re-ran; the state leaving them moved %.4f (relative) since "
                          "the later layers were profiled%s", min(need), k, drift,
                          ": re-running those too" if rerun else "")
                if not rerun:
                    return

    def inputs_at(self, k: int) -> list[Tensor]:
        """Hidden states entering current layer k (run forward from the nearest cache if needed).
        Window mode also keeps the states it passes at cached boundaries, and those entering
        k - span + 1..k - 1 (the pair or window ending at k, scored next, reads them): past a
        window the nearest cache can be far."""
        layers = self.adapter.decoder_layers(self.model)
        start = max(j for j in self.states if j <= k)
        h = self.states[start]
        for j in range(start, k):
            h, _ = self.runner.run(layers[j], h, False, position=j)
            self.forwards += 1
            if self.window and ((j + 1) % self.stride == 0 or j + 1 > k - self.span):
                self.states[j + 1] = h = self.keep_states(h)
        self.states[k] = h = self.keep_states(h)
        return h

    def keep_states(self, batches: list[Tensor]) -> list[Tensor]:
        """`batches` as the cache keeps them: in memory, or in mapped files with --cache-dir."""
        return self.disk.keep(batches) if self.disk else batches

    def unit_gradients(self) -> None:
        """`--sensitivity taylor`: every layer's `attn_taylor` / `ffn_taylor` from one backward
        over the current model (backprop.unit_taylor: about three forward passes), after each
        refresh: a layer's gradient reads every layer above it, so after a merge all are stale."""
        for st, (attn, ffn) in zip(self.stats, unit_taylor(self)):
            st.attn_taylor, st.ffn_taylor = attn, ffn

    def layers_removed(self) -> None:
        """Layers were dropped (one-shot methods): only the embedding cache still holds."""
        n = len(self.adapter.decoder_layers(self.model))
        self.states, self.ref, self.kept_pass = {0: self.states[0]}, {}, None
        self.stats, self.last_tok, self.pair_all = [None] * n, [None] * (n + 1), [None] * max(n - 1, 0)

    def pair_scores(self) -> list[float]:
        """The score of every pair (every window of `span` layers) of the current model."""
        if self.cfg.pair_score in ALL_TOKEN_SCORES:
            return list(self.pair_all)
        return skip_scores(self.last_tok, self.span)

    def set_span(self, span: int) -> None:
        """Score windows of `span` adjacent layers from now on (`--merge-item`); every
        all-token window score is computed anew."""
        if span != self.span:
            self.span = span
            self.pair_all = [None] * max(len(self.stats) - span + 1, 0)

    def merged(self, position: int) -> None:
        """Layers position, position+1 became one: drop what no longer holds (window mode:
        what the window re-runs; the later layers' statistics stay, as stale)."""
        del self.stats[position + 1]
        del self.last_tok[position + 1]
        if self.pair_all:  # one window fewer (the scores from position - span + 1 on are reset below)
            del self.pair_all[min(position, len(self.pair_all) - 1)]
        end = len(self.stats)
        if self.window:  # layers position..position + W re-run, and the pairs they own: (j - 1, j)
            end = min(position + self.cfg.reprofile_window + 1, end)
            self.ref = {j - (j > position): h for j, h in self.ref.items() if j != position + 1}
        for k in range(position, end):
            self.stats[k] = None
        for k in range(max(position - self.span + 1, 0), min(end - self.span + 1, len(self.pair_all))):
            self.pair_all[k] = None
        self.forget_after(position)

    def forget_after(self, k: int) -> None:
        """Layer k changed: cached inputs of the layers after it, and a kept pass over it, no
        longer hold."""
        self.states = {j: h for j, h in self.states.items() if j <= k}
        self.kept_pass = None

    def has_room(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit in --max-cache-gb beside the states cached now (with
        --cache-dir they go to its files: always)."""
        if self.disk:
            return True
        held = {id(t): t.numel() * t.element_size()
                for part in (self.states, self.dense or {}, self.ref) for batches in part.values() for t in batches}
        return sum(held.values()) + nbytes <= getattr(self.cfg, "max_cache_gb", 0.0) * 2**30


def relative_change(new: list[Tensor], old: list[Tensor]) -> float:
    """||new - old|| / ||old|| (Frobenius, over every batch's tokens, float64 sums)."""
    num = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(new, old))
    den = sum(float(b.double().pow(2).sum()) for b in old)
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


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
                 keep_dense: bool, disk: bool = False) -> tuple[int, int]:
    """(dense batches kept for the refit, stride of the cached layer inputs) within
    --max-cache-gb: the dense states first (refit_batches), the layer inputs in the rest.
    On disk (--cache-dir) everything: every batch, every layer input."""
    if disk:
        return (n_batches if keep_dense else 0), 1
    dense_batches = refit_batches(n_batches, batch_bytes, n_layers, max_cache_gb) if keep_dense else 0
    boundary = (n_layers + 1) * batch_bytes
    budget = max_cache_gb * 2**30 - boundary * dense_batches
    return dense_batches, max(1, math.ceil(boundary * n_batches / max(budget, 1.0)))
