"""What every method's run shares: the set-up (budget, device, calibration, embedding,
the activation cache, the Plan) and the finish (the Plan's totals and the log line)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .activation_cache import ActivationCache, cache_layout
from .adapters import Adapter, get_adapter
from .budget import count_params, merge_budget
from .plan import Plan, library_versions
from .preflight import check_finite
from .profile import LayerRunner, resolve_device

log = logging.getLogger("come")


@dataclass
class Run:
    """One compression in progress: the model, its adapter, the cache, the Plan, and how
    many one-layer removals the target needs."""

    model: nn.Module
    adapter: Adapter
    cache: ActivationCache
    plan: Plan
    n_remove: int
    t0: float


def prepare(model: nn.Module, tokenizer, cfg, calib: Tensor | None, model_name: str, keep_dense: bool) -> Run:
    """Shared set-up of every method (`cfg` already resolved): budget, calibration,
    embedding, the activation cache, the Plan."""
    t0 = time.perf_counter()
    check_finite(model, "input model", "fix or re-export the model: compressing it would write a broken checkpoint")
    adapter = get_adapter(model.config)
    n_layers = len(adapter.decoder_layers(model))
    total, per_layer, n_remove = merge_budget(model, cfg.sparsity)
    device = resolve_device(cfg.device)
    if calib is None:
        from .data import load_calibration

        calib = load_calibration(cfg.calib, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
    n_batches = math.ceil(calib.shape[0] / cfg.batch_size)
    batch_bytes = cfg.batch_size * calib.shape[1] * model.config.hidden_size * model.dtype.itemsize
    dense_batches, stride = cache_layout(n_layers, n_batches, batch_bytes, cfg.max_cache_gb, keep_dense)
    model.eval()
    runner = LayerRunner(model, adapter, device, torch.device("cpu"))
    batches = list(calib.split(cfg.batch_size))
    first = runner.embed(batches)
    log.info("cache: layer inputs every %d layer(s)%s", stride,
             f"; dense states of {dense_batches}/{n_batches} calibration batches for the refit "
             f"({(n_layers + 1) * batch_bytes * dense_batches / 2**30:.2f} GiB)" if keep_dense else "")
    cache = ActivationCache(model, adapter, runner, cfg, first, stride, dense_batches, batches)
    plan = Plan(model=model_name, method=cfg.method, settings=cfg.to_dict(), num_layers_before=n_layers,
                params_before=total, target_sparsity=cfg.sparsity, calibration_tokens=calib.numel(),
                versions=library_versions())
    log.info("%s: %d layers, %.1fM params, %.2fM per layer -> %d layers to remove for sparsity %.3f (%s)",
             model_name or "model", n_layers, total / 1e6, per_layer / 1e6, n_remove, cfg.sparsity, cfg.method)
    return Run(model, adapter, cache, plan, n_remove, t0)


def finish(run: Run, groups: list[list[int]]) -> Plan:
    """Fill the Plan's totals once the model has its final layers."""
    plan = run.plan
    check_finite(run.model, "compressed model", "nothing was written; report this with the command line")
    plan.groups = groups
    plan.num_layers_after = len(groups)
    plan.params_after = count_params(run.model)
    plan.achieved_sparsity = 1.0 - plan.params_after / plan.params_before
    plan.layer_forwards = run.cache.forwards
    plan.wall_time_s = time.perf_counter() - run.t0
    log.info("done: %d -> %d layers, %.2fM -> %.2fM params (%.2f%% removed), %d layer-forwards, %.1fs",
             plan.num_layers_before, plan.num_layers_after, plan.params_before / 1e6, plan.params_after / 1e6,
             100 * plan.achieved_sparsity, plan.layer_forwards, plan.wall_time_s)
    return plan
