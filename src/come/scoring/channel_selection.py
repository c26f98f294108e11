"""`--split refit` (issue 41 item 1): the FFN channels a merge keeps, chosen by the refit's own
objective instead of by sensitivity.

The merged layer's attention is built first (KV groups as `--split joint` picks them); on its
output x1 BOTH layers' whole FFNs run side by side (a "union" layer of 2 x d_ff channels, the
norms folded as in the merge, so each channel computes exactly what it computes once kept), and
the refit's statistics are accumulated over those 2 x d_ff channels on the train windows
(F^T F, F^T T with T = dense group output - x1, as the loop's refit poses them). Of them, d_ff
are kept by backward elimination on the ridge problem the refit solves,

    min_W ||F_S W^T - T||^2 + lam' ||W - W0_S||^2,

W0 the union's down projection: removing channel j raises the optimum by
||W_j||^2 / (A^-1)_jj - lam' ||W0_j||^2 (A = F^T F + lam' I, W the current solution; the
augmented least-squares form of the ridge), and the inverse and solution are downdated in
closed form (a Schur complement), a block of channels at a time. The refit the loop applies
after the merge then solves for the kept channels (its ridge on the held-out windows).
One union layer pass and one 2 d_ff x 2 d_ff inverse per merge.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..merging.refit import NormalEquations
from ..models.adapters import _get, _out_dim

if TYPE_CHECKING:
    from ..engine.cache import ActivationCache
    from ..models.adapters import Adapter, LayerWeights
    from .pair_scoring import Choice

LAM = 0.1  # the ridge of the selection (the middle of refit.LAMBDAS); the loop's refit picks its own
BLOCK = 32  # channels removed per downdate


def refit_channels(cache: ActivationCache, k: int, group: list[int], joint: Choice, a: LayerWeights,
                   b: LayerWeights, build, cfg) -> Choice:
    """`joint`'s KV groups, and the d_ff channels of layers k, k + 1 (weights `a`, `b`) the
    refit needs most (module docstring). `build(choice)` makes merged weights."""
    d_ff = a.ffn_units
    union = build(replace(joint, ffn_a=list(range(d_ff)), ffn_b=list(range(d_ff))))
    layer = copy.deepcopy(cache.adapter.decoder_layers(cache.model)[k])
    _widen(cache.adapter, layer, union)
    cache.adapter.write_layer(layer, union)
    x = cache.inputs_at(k) if cfg.refit_input == "compressed" else cache.dense[group[0]]
    train, _, _ = cache.runner.collect_refit(layer, x, cache.dense[group[-1] + 1], cache.held_out, position=k)
    cache.forwards += 1
    w0 = cache.adapter.ffn_output_proj(layer).weight.detach()
    kept = eliminate(train, w0, d_ff)
    ffn_a = [j for j in kept if j < d_ff]
    return replace(joint, ffn_a=ffn_a, ffn_b=[j - d_ff for j in kept if j >= d_ff], r_a=len(ffn_a) / d_ff)


def _widen(adapter: Adapter, layer: nn.Module, w: LayerWeights) -> None:
    """Give `layer`'s FFN parameters the shapes of `w`'s (the union's 2 x d_ff channels), so
    write_layer can fill them; the module code reads no channel count from its config."""
    for path, names in adapter.tensors.items():
        param = _get(layer, path)
        if param is None or not set(names) & {"gate", "up", "down"}:
            continue
        shape = torch.cat([getattr(w, n) for n in names], dim=_out_dim(param)).shape
        owner_path, attr = path.rsplit(".", 1)
        owner = layer.get_submodule(owner_path)
        setattr(owner, attr, nn.Parameter(param.new_empty(shape), requires_grad=False))
        if isinstance(owner, nn.Linear):
            owner.out_features, owner.in_features = shape[0], shape[1]


def eliminate(eq: NormalEquations, w0: Tensor, keep: int, lam: float = LAM, block: int = BLOCK) -> list[int]:
    """The `keep` features (ascending) left by backward elimination on the ridge problem
    min ||F W^T - T||^2 + lam' ||W - W0||^2 (lam' = lam * mean(diag(F^T F)), as refit.py)."""
    w0 = w0.to(eq.ff.device, torch.float64)
    scale = lam * float(eq.ff.diagonal().mean().clamp_min(1e-12))
    a = eq.ff.clone()
    a.diagonal().add_(scale)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(a))
    w = inv @ (eq.ft + scale * w0.T)  # [features, out]
    prior = scale * (w0 ** 2).sum(0)
    alive = torch.arange(a.shape[0], device=a.device)
    while len(alive) > keep:
        cost = (w ** 2).sum(1) / inv.diagonal() - prior[alive]
        drop = torch.zeros(len(alive), dtype=torch.bool, device=a.device)
        drop[cost.topk(min(block, len(alive) - keep), largest=False).indices] = True
        rest, gone = (~drop).nonzero().squeeze(1), drop.nonzero().squeeze(1)
        inv_rj = inv[rest][:, gone]
        solve_jj = torch.linalg.inv(inv[gone][:, gone])
        w = w[rest] - inv_rj @ (solve_jj @ w[gone])
        inv = inv[rest][:, rest] - inv_rj @ solve_jj @ inv_rj.T
        alive = alive[rest]
    return sorted(alive.tolist())
