"""What every method's run shares: the set-up (budget, device, calibration, embedding,
the activation cache, the Plan), the finish (the Plan's totals and the log line), and the
hand-over of the smaller levels a multi-level run passes on its way (`Levels`, `reached`)."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..models.adapters import Adapter, get_adapter
from ..models.budget import count_params, merge_budget, merges_needed
from ..models.preflight import check_finite
from ..settings.device import resolve_device
from ..settings.plan import Plan, library_versions
from .cache import ActivationCache, cache_layout
from .disk_cache import DiskStates
from .runner import LayerRunner

log = logging.getLogger("come")


@dataclass
class Levels:
    """The smaller targets of a multi-level run (`--sparsity 0.1,0.2,0.3`), what receives each
    (the model as it is there, and its Plan), and which were handed over."""

    sparsities: list[float]
    receive: Callable[[nn.Module, Plan], None]
    handed: list[float] = field(default_factory=list)


@dataclass
class Run:
    """One compression in progress: the model, its adapter, the cache, the Plan, how many
    one-layer removals the target needs, and the smaller levels to hand over on the way
    (by the number of removals that reaches each)."""

    model: nn.Module
    adapter: Adapter
    cache: ActivationCache
    plan: Plan
    n_remove: int
    t0: float
    levels: Levels | None = None
    stops: dict[int, list[float]] = field(default_factory=dict)


def prepare(model: nn.Module, tokenizer, cfg, calib: Tensor, model_name: str, keep_dense: bool,
            levels: Levels | None = None) -> Run:
    """Shared set-up of every method (`cfg` already resolved): budget, calibration,
    embedding, the activation cache, the Plan; `levels`: the smaller targets a progressive
    run hands over on its way (`reached`)."""
    t0 = time.perf_counter()
    check_finite(model, "input model", "fix or re-export the model: compressing it would write a broken checkpoint")
    adapter = get_adapter(model.config)
    n_layers = len(adapter.decoder_layers(model))
    total, per_layer, n_remove = merge_budget(model, cfg.sparsity)
    device = resolve_device(cfg.device)
    n_batches = math.ceil(calib.shape[0] / cfg.batch_size)
    batch_bytes = cfg.batch_size * calib.shape[1] * model.config.hidden_size * model.dtype.itemsize
    disk = DiskStates(cfg.cache_dir) if cfg.cache_dir else None
    dense_batches, stride = cache_layout(n_layers, n_batches, batch_bytes, cfg.max_cache_gb, keep_dense, bool(disk))
    model.eval()
    runner = LayerRunner(model, adapter, device, torch.device("cpu"))
    batches = list(calib.split(cfg.batch_size))
    first = runner.embed(batches)
    log.info("cache: layer inputs every %d layer(s)%s%s", stride,
             f"; dense states of {dense_batches}/{n_batches} calibration batches for the refit "
             f"({(n_layers + 1) * batch_bytes * dense_batches / 2**30:.2f} GiB)" if keep_dense else "",
             f"; in memory-mapped files under {cfg.cache_dir}" if disk else "")
    cache = ActivationCache(model, adapter, runner, cfg, first, stride, dense_batches, batches, disk)
    plan = Plan(model=model_name, method=cfg.method, settings=cfg.to_dict(), num_layers_before=n_layers,
                params_before=total, target_sparsity=cfg.sparsity, calibration_tokens=calib.numel(),
                versions=library_versions())
    log.info("%s: %d layers, %.1fM params, %.2fM per layer -> %d layers to remove for sparsity %.3f (%s)",
             model_name or "model", n_layers, total / 1e6, per_layer / 1e6, n_remove, cfg.sparsity, cfg.method)
    stops: dict[int, list[float]] = {}
    for sparsity in levels.sparsities if levels else ():
        stops.setdefault(merges_needed(total, per_layer, sparsity), []).append(sparsity)
    return Run(model, adapter, cache, plan, n_remove, t0, levels, stops)


def reached(run: Run, groups: list[list[int]]) -> None:
    """After each removal: hand over every smaller level this many removals reach, with the
    Plan a run at that level alone writes (the model moves on once `receive` returns)."""
    for sparsity in run.stops.get(run.plan.num_layers_before - len(groups), ()):  # layers removed so far
        plan = copy.deepcopy(run.plan)
        plan.settings["sparsity"] = plan.target_sparsity = sparsity
        run.levels.receive(run.model, finish(run, groups, plan))
        run.levels.handed.append(sparsity)


def finish(run: Run, groups: list[list[int]], plan: Plan | None = None) -> Plan:
    """Fill the Plan's totals (the run's, or `plan`: a smaller level's) once the model has
    that level's layers."""
    plan = plan or run.plan
    check_finite(run.model, "compressed model", "nothing was written; report this with the command line")
    plan.groups = [list(g) for g in groups]  # a copy: a smaller level's Plan outlives the loop's groups
    plan.num_layers_after = len(groups)
    plan.params_after = count_params(run.model)
    plan.achieved_sparsity = 1.0 - plan.params_after / plan.params_before
    plan.layer_forwards = run.cache.forwards
    plan.wall_time_s = time.perf_counter() - run.t0
    log.info("done: %d -> %d layers, %.2fM -> %.2fM params (%.2f%% removed), %d layer-forwards, %.1fs",
             plan.num_layers_before, plan.num_layers_after, plan.params_before / 1e6, plan.params_after / 1e6,
             100 * plan.achieved_sparsity, plan.layer_forwards, plan.wall_time_s)
    return plan
