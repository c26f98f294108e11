"""The closed-form refit of one layer of the current model, run from the activation cache:
its down projection re-solved so the layer reproduces its group's DENSE output.

An MoE layer has one down projection per expert, and the channel refit's features (every
expert's routed activations) would be E x ff wide: instead it refits a hidden x hidden map
M of the FFN's output (ReplaceMe's map, whatever `features` says), folded into every
expert's down projection and the shared expert's (M sum_e w_e D_e a_e = sum_e w_e (M D_e)
a_e: exact, the routing reads the FFN's input, which M leaves alone)."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..models.adapters import Adapter, ExpertUnits
from .refit import RefitResult, fit, fit_map

if TYPE_CHECKING:
    from ..engine.cache import ActivationCache

log = logging.getLogger("come")


def refit_layer(cache: ActivationCache, k: int, group: list[int], inputs: str, features: str = "channels",
                layer: nn.Module | None = None, solve: bool = True, keep: bool = False) -> RefitResult:
    """Refit current layer k's down projection to reproduce the dense output of `group`.

    inputs="compressed": the states entering layer k in the current model (corrects the
    error accumulated upstream); "dense": the dense model's states entering the group.
    Returns the RefitResult (its `seconds`: this whole step, so a run can report what the
    refit cost it); the caller decides what to write. solve=False: only the held-out
    error of the layer as it is (no solves). `layer` (default: current layer k) runs as the
    model runs position k: with k's attention type, whatever layer it is.
    keep=True (a merge loop that will re-profile layer k next): where the pass can stand in
    for that re-profiling (runner.KeptPass) and its activations fit in the cache budget, it
    keeps them in the cache, which then skips one layer pass.
    """
    t0 = time.perf_counter()
    keep = keep and layer is None and inputs == "compressed"
    layer = layer if layer is not None else cache.adapter.decoder_layers(cache.model)[k]
    proj = cache.adapter.ffn_output_proj(layer)
    moe = isinstance(proj, ExpertUnits)
    features = "mlp_out" if moe else features
    x = cache.inputs_at(k) if inputs == "compressed" else cache.dense[group[0]]
    targets = cache.dense[group[-1] + 1]
    block = cache.adapter.ffn_output(layer, cache.model.config)
    keep = keep and features == "channels" and block is None and _room_to_keep(cache, proj, x, targets)
    train, hold, kept = cache.runner.collect_refit(layer, x, targets, cache.held_out, features, position=k,
                                                   keep=keep, head_score=cache.cfg.head_score,
                                                   store=cache.keep_states)
    cache.forwards += 1
    if kept is not None:
        cache.kept_pass = kept
    # MoE: the weight is the map M itself (fit_map returns M @ I); write_down_proj folds it into the experts
    w0 = torch.eye(proj.out_features, dtype=torch.float64) if moe else proj.weight.detach()
    if moe and solve:
        log.info("layer %d is MoE: the refit fits one hidden x hidden map of its FFN output, folded into every "
                 "expert's down projection", k)
    gain = None if block is None else block.gain.to(w0.device).reshape(-1, 1)
    w_fit = w0 if gain is None else gain * w0.double()  # collect_refit poses the fit for gain * W
    if not solve:
        res = fit(train, hold, w_fit, lambdas=())
    else:
        res = fit(train, hold, w_fit) if features == "channels" else fit_map(train, hold, w_fit)
    if gain is not None and not res.kept:
        res.weight = w0
    elif gain is not None:  # back to W; a channel the gain silences keeps its row (nothing fits it)
        res.weight = torch.where(gain != 0, res.weight.to(w0.device) / gain, w0.double())
        if block.eps is not None:
            res = _checked(cache, k, group, inputs, layer, res, w0)
    res.seconds = time.perf_counter() - t0
    return res


def refit_step(cache: ActivationCache, k: int, group: list[int], inputs: str, features: str = "channels",
               attention: bool = False, keep: bool = False) -> dict:
    """Both loops' refit of current layer k (a merged or a kept layer), written into the model:
    its down projection re-solved (`refit_layer`); with `attention` (`--refit-attn`) also its
    attention output projection first (`refit_attention`), kept only where the pair beats the
    down projection alone on held-out error. Returns the Plan's refit record."""
    layer = cache.adapter.decoder_layers(cache.model)[k]
    res = refit_layer(cache, k, group, inputs, features, keep=keep and not attention)
    record = None
    if attention:
        o_weight, res, record = refit_attention(cache, k, group, inputs, features, res)
        if o_weight is not None:
            with torch.no_grad():
                cache.adapter.attn_output_proj(layer).weight.copy_(o_weight)
    if res.kept:
        write_down_proj(cache.adapter, layer, res.weight)
    return res.record() if record is None else {**res.record(), "attn": record}


def refit_attention(cache: ActivationCache, k: int, group: list[int], inputs: str, features: str,
                    down_only: RefitResult) -> tuple[Tensor | None, RefitResult, dict]:
    """Issue 41 item 2: re-solve current layer k's attention output projection W_o in closed form
    too. With the FFN's output u held as it is, y = h + z W_o^T + u is linear in W_o (z: the
    heads' outputs), so W_o is a ridge least squares toward the dense group's output; then the
    down projection is re-solved on the layer with the new W_o (its FFN input x1 moved), exactly
    as `refit_layer` does. Kept only when that pair's held-out error beats `down_only` (the down
    projection refit alone); returns (W_o to write or None, the down refit to write, a record).
    A post-norm family's attention output is normalized before it adds (not linear in W_o): not
    refit there (a log line says so). Two more layer passes."""
    layer = cache.adapter.decoder_layers(cache.model)[k]
    if cache.adapter.attn_output(layer, cache.model.config) is not None:
        log.info("layer %d: --refit-attn skipped (its attention output is normalized before it adds)", k)
        return None, down_only, {"kept": False, "reason": "post-norm"}
    o_proj = cache.adapter.attn_output_proj(layer)
    x = cache.inputs_at(k) if inputs == "compressed" else cache.dense[group[0]]
    train, hold = cache.runner.collect_attn_refit(layer, x, cache.dense[group[-1] + 1], cache.held_out, position=k)
    cache.forwards += 1
    res_o = fit(train, hold, o_proj.weight.detach())
    record = {"kept": False, "lam": res_o.lam, "heldout_err_down_only": down_only.err_after}
    if not res_o.kept:
        return None, down_only, record
    trial = copy.deepcopy(layer)
    with torch.no_grad():
        cache.adapter.attn_output_proj(trial).weight.copy_(res_o.weight.to(o_proj.weight.dtype))
    res = refit_layer(cache, k, group, inputs, features, layer=trial)  # vetoed: err_after is W_o's alone
    record["heldout_err_with_attn"] = res.err_after
    if res.err_after >= down_only.err_after:
        return None, down_only, record
    record["kept"] = True
    return res_o.weight.to(o_proj.weight.dtype), res, record


def _room_to_keep(cache: ActivationCache, proj: nn.Linear, x: list[Tensor], targets: list[Tensor]) -> bool:
    """Whether a KeptPass of this refit covers every calibration batch (its targets may be
    fewer: the cache budget) and its x1 and FFN activations fit in the cache budget."""
    if len(targets) != len(x):
        return False
    tokens = sum(h[..., 0].numel() for h in x)
    return cache.has_room(tokens * (proj.in_features + proj.out_features) * x[0].element_size())


def _checked(cache: ActivationCache, k: int, group: list[int], inputs: str, layer: nn.Module, res: RefitResult,
             w0: Tensor) -> RefitResult:
    """A post-norm family's refit, its held-out error measured on the layer's TRUE output
    (the fit held each token's post-norm scale fixed): vetoed unless it beats the layer as it
    was, so the refit never raises held-out error here either. One more layer pass."""
    trial = copy.deepcopy(layer)
    write_down_proj(cache.adapter, trial, res.weight)
    err = refit_layer(cache, k, group, inputs, layer=trial, solve=False).err_before
    if err < res.err_before:
        return replace(res, err_after=err)
    return replace(res, weight=w0, kept=False, lam=None, err_after=res.err_before)


def write_down_proj(adapter: Adapter, layer: nn.Module, weight: Tensor) -> None:
    """Write a refit's weight: the down projection, or an MoE layer's map M folded into
    every expert's down projection and the shared expert's (module docstring)."""
    proj = adapter.ffn_output_proj(layer)
    if isinstance(proj, ExpertUnits):
        w, m = adapter.read_layer(layer), weight.double()
        shared = None if w.shared_down is None else m @ w.shared_down.double()
        adapter.write_layer(layer, replace(w, down=m @ w.down.double(), shared_down=shared))
        return
    with torch.no_grad():
        proj.weight.copy_(weight.to(proj.weight.dtype))
