"""The closed-form refit of one layer of the current model, run from the activation cache:
its down projection re-solved so the layer reproduces its group's DENSE output."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from .activation_cache import ActivationCache
from .adapters import Adapter
from .refit import RefitResult, fit, fit_map


def refit_layer(cache: ActivationCache, k: int, group: list[int], inputs: str, features: str = "channels",
                layer: nn.Module | None = None, solve: bool = True) -> RefitResult:
    """Refit current layer k's down projection to reproduce the dense output of `group`.

    inputs="compressed": the states entering layer k in the current model (corrects the
    error accumulated upstream); "dense": the dense model's states entering the group.
    Returns the RefitResult (its `seconds`: this whole step, so a run can report what the
    refit cost it); the caller decides what to write. solve=False: only the held-out
    error of the layer as it is (no solves). `layer` (default: current layer k) runs as the
    model runs position k: with k's attention type, whatever layer it is.
    """
    t0 = time.perf_counter()
    layer = layer if layer is not None else cache.adapter.decoder_layers(cache.model)[k]
    x = cache.inputs_at(k) if inputs == "compressed" else cache.dense[group[0]]
    train, hold = cache.runner.collect_refit(layer, x, cache.dense[group[-1] + 1], cache.held_out, features,
                                              position=k)
    cache.forwards += 1
    w0 = cache.adapter.ffn_output_proj(layer).weight.detach()
    if not solve:
        res = fit(train, hold, w0, lambdas=())
    else:
        res = fit(train, hold, w0) if features == "channels" else fit_map(train, hold, w0)
    res.seconds = time.perf_counter() - t0
    return res


def write_down_proj(adapter: Adapter, layer: nn.Module, weight: Tensor) -> None:
    proj = adapter.ffn_output_proj(layer)
    with torch.no_grad():
        proj.weight.copy_(weight.to(proj.weight.dtype))
