"""One-shot removal on come's plumbing, the loop that runs a `DropMethod` (its `loop`, which
compression.run_method reads): the method (methods/) chooses the layers from one profiling
pass; they are dropped, and the layer kept before each removed run may be refit to reproduce the dense output of its whole
group (drop + refit, ReplaceMe's map)."""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Callable

from torch import Tensor, nn

from ..errors import ComeError
from ..merging.layer_refit import refit_step
from ..models.budget import count_params, merge_budget
from ..settings.config import CompressConfig
from ..settings.plan import MergeRecord, Plan
from .dense_profile import DenseProfile
from .preparation import Levels, finish, prepare

if TYPE_CHECKING:
    from ..methods.base import DropMethod

log = logging.getLogger("come")


def absorb(removed: list[int], n_layers: int) -> list[list[int]]:
    """Groups after dropping `removed`: each removed layer joins the kept layer before it
    (a run at the very start joins the first kept layer after it)."""
    drop = set(removed)
    kept = [i for i in range(n_layers) if i not in drop]
    if not kept:
        raise ComeError("cannot drop every layer; lower --sparsity")
    groups = [[i] for i in kept]
    for i in sorted(drop):
        before = [g for g in groups if g[-1] < i]
        target = before[-1] if before else groups[0]
        target.append(i)
        target.sort()
    return groups


def compress_by_dropping(method: DropMethod, model: nn.Module, tokenizer, cfg: CompressConfig, calib: Tensor | None,
                         model_name: str, levels: Levels | None = None) -> tuple[nn.Module, Plan]:
    """Remove the layers `method.select` chooses (cfg resolved), refitting where it asks;
    hand each of `levels` over first. Which layers go, and the refit of the ones kept, depend
    on the level: each smaller level drops (and refits) on its own copy of the dense model;
    only a greedy method's removal order is computed once, for the largest, and cut."""
    select = method.select
    if levels is not None and method.greedy:
        n_largest, order = merge_budget(model, cfg.sparsity)[2], []

        def select(profile: DenseProfile, n: int, level_cfg: CompressConfig) -> list[int]:
            if not order:  # every level profiles the same dense model: one order serves all
                order.extend(method.removal_order(profile, n_largest, cfg))
            return sorted(order[:n])

    for sparsity in levels.sparsities if levels is not None else ():
        levels.receive(*_drop(method, copy.deepcopy(model), tokenizer, cfg.at(sparsity), calib, model_name, select))
        levels.handed.append(sparsity)
    return _drop(method, model, tokenizer, cfg, calib, model_name, select)


def _drop(method: DropMethod, model: nn.Module, tokenizer, cfg: CompressConfig, calib: Tensor | None, model_name: str,
          select: Callable[[DenseProfile, int, CompressConfig], list[int]]) -> tuple[nn.Module, Plan]:
    """Remove the layers `select(profile, n, cfg)` chooses (`method.select`, or a greedy order
    shared by several levels) from the dense model's profile; refit where `method` asks."""
    features = method.refit_features
    refit = method.needs_dense(cfg)
    run = prepare(model, tokenizer, cfg, calib, model_name, keep_dense=refit)
    adapter, cache, plan = run.adapter, run.cache, run.plan
    cache.refresh()
    profile = DenseProfile(cache)
    bi = list(profile.bi)
    removed = method.checked(select(profile, run.n_remove, cfg), run.n_remove, profile.n_layers, cfg)
    cache.forwards += profile.forwards
    groups = absorb(removed, plan.num_layers_before)
    log.info("%s drops original layers %s", cfg.method, removed)
    kept = [next(i for i in g if i not in removed) for g in groups]
    params_before = count_params(model)
    adapter.keep_layers(model, kept)
    cache.layers_removed()
    layers = adapter.decoder_layers(model)
    shape = adapter.attn_shape(model.config)
    for k, (group, keep) in enumerate(zip(groups, kept)):
        if len(group) == 1:
            continue
        record = None
        if refit:
            record = refit_step(cache, k, group, cfg.refit_input, features, attention=cfg.refit_attn)
            if record["kept"] or record.get("attn", {}).get("kept"):
                cache.forget_after(k)
        plan.merges.append(MergeRecord(
            step=len(plan.merges), position=k, group_a=[keep], group_b=[i for i in group if i != keep],
            operator=f"drop+{features}-refit" if refit else "drop", kv_a=list(range(shape.n_kv_heads)), kv_b=[],
            ffn_a=list(range(adapter.ffn_output_proj(layers[k]).in_features)), ffn_b=[], r_a=1.0, bi_a=bi[keep],
            bi_b=sum(bi[i] for i in group if i != keep), pair_score=sum(bi[i] for i in group if i != keep),
            pair_scores=bi, params_before=params_before, params_after=count_params(model), refit=record))
    return model, finish(run, groups)
