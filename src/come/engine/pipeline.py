"""The progressive loop: profile -> score pairs -> merge, until the target sparsity.

Every merge method (methods/) runs through it, and the loop knows none of them: it profiles
the current model (cache.py), asks the method's per-run steps
(`MergeMethod.steps`: methods/base.py `MergeSteps`) for the pair scores, picks the lowest
eligible pair, asks the steps for the merged layer (and the units it keeps, recorded in the
Plan), writes it, refits it and re-profiles. What a method measures for its scores or units
(CoMe's split search, taylor sensitivities, the joint split; MKA's similarities) lives in
its own module. With `--merge-item m` a step merges a window of m adjacent layers
(budget.merge_windows: the last merge takes only the layers still to go). Calibration states
are cached at layer inputs, so after a merge at position l only layers >= l re-run. No step
depends on the target, only the number of steps does: a multi-level run hands over each
smaller level on its way (preparation.reached), the model a run at that level alone makes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import ComeError
from ..merging.layer_refit import refit_step
from ..models.adapters import AttnShape, LayerWeights
from ..models.budget import count_params, merge_windows
from ..models.mapped import LayerSpill, file_mapped
from ..models.preflight import check_finite
from ..scoring.pair_scoring import (PairToMerge, WindowToMerge, eligible_pairs, no_units, no_window_units, read_pair,
                                    read_window)
from ..scoring.selection import choose_pair
from ..settings.config import CompressConfig
from ..settings.plan import MergeRecord, Plan
from .preparation import Levels, Run, finish, prepare, reached

if TYPE_CHECKING:
    from ..methods.base import MergeMethod, MergeSteps

log = logging.getLogger("come")


def merge_progressively(method: MergeMethod, model: nn.Module, tokenizer, cfg: CompressConfig, calib: Tensor | None,
                        model_name: str, levels: Levels | None = None) -> tuple[nn.Module, Plan]:
    """Merge adjacent pairs with `method` until `cfg.sparsity` (cfg resolved), handing each
    of `levels` over as the loop reaches it."""
    run = prepare(model, tokenizer, cfg, calib, model_name, method.needs_dense(cfg), levels)
    adapter = run.adapter
    groups = [[i] for i in range(run.plan.num_layers_before)]
    originals = ([adapter.read_layer(layer) for layer in adapter.decoder_layers(model)]
                 if method.needs_originals else None)
    steps = method.steps(run, cfg)
    spill = LayerSpill(cfg.cache_dir) if all(file_mapped(list(adapter.decoder_layers(model)[0].parameters()))) else None
    try:
        _merge_steps(method, steps, run, cfg, groups, originals, spill)
    finally:
        if spill is not None:
            spill.close()
    return model, finish(run, groups)


def _merge_steps(method: MergeMethod, steps: MergeSteps, run: Run, cfg: CompressConfig, groups: list[list[int]],
                 originals: list[LayerWeights] | None, spill: LayerSpill | None) -> None:
    """The merges, each written in place of its layers; with `spill` (a checkpoint mapped from
    its files) every merged layer is mapped from a file again once its step is done."""
    adapter, cache, plan, model = run.adapter, run.cache, run.plan, run.model
    shape = adapter.attn_shape(model.config)
    windows = merge_windows(run.n_remove, cfg.merge_item)  # layers merged at each step: [2] * n_remove for pairs
    for step, span in enumerate(tqdm(windows, desc="merging", unit="merge")):
        cache.set_span(span)
        cache.refresh()
        eligible = eligible_pairs(groups, cfg, span)
        if not any(eligible):
            what = "pair" if span == 2 else f"window of {span} layers"
            raise ComeError(f"target not reachable: no eligible {what} left after {step} merges "
                            "(--no-repeat/--protect too strict); lower --sparsity")
        scores = steps.pair_scores(groups, eligible)
        k = choose_pair(scores, eligible)
        window = groups[k:k + span]
        params_before = count_params(model)
        if span == 2:
            merged, record = _merge_pair(steps, adapter, cache, model, k, shape, cfg, window, originals)
        else:
            merged, record = _merge_window(steps, adapter, cache, model, k, shape, cfg, window, originals)
        layers = adapter.decoder_layers(model)
        adapter.write_layer(layers[k], merged)
        del merged  # float64, 8 bytes a parameter: not held through the refit and the next step's scores
        adapter.keep_layers(model, [i for i in range(len(layers)) if not k < i < k + span])
        groups[k:k + span] = [[i for g in window for i in g]]
        for _ in range(span - 1):
            cache.merged(k)
        refit = None
        if cfg.refit == "ls":
            refit = refit_step(cache, k, groups[k], cfg.refit_input, attention=cfg.refit_attn,
                               keep=step + 1 < len(windows))
        originals_note = " + ".join(_span(g) for g in window)
        check_finite(adapter.decoder_layers(model)[k], f"merge {step + 1} (original layers {originals_note})",
                     "try --dtype fp32, or --refit none if the refit produced it")
        if spill is not None:
            spill.remap(adapter.decoder_layers(model)[k])
        record = MergeRecord(step=step, position=k, operator=method.operator, pair_score=scores[k], pair_scores=scores,
                             params_before=params_before, params_after=count_params(model), refit=refit, **record)
        plan.merges.append(record)
        sides = record.sides or [{"kv": record.kv_a, "ffn": record.ffn_a}, {"kv": record.kv_b, "ffn": record.ffn_b}]
        log.info("merge %d/%d: layers %d-%d (original %s) -> kv %s, ffn %s, r_A=%.3f%s; params %.2fM -> %.2fM",
                 step + 1, len(windows), k, k + span - 1, originals_note, "+".join(str(len(d["kv"])) for d in sides),
                 "+".join(str(len(d["ffn"])) for d in sides), record.r_a, _refit_note(refit), params_before / 1e6,
                 record.params_after / 1e6)
        reached(run, groups)


def _merge_pair(steps: MergeSteps, adapter, cache, model, k: int, shape: AttnShape, cfg: CompressConfig,
                window: list[list[int]], originals: list[LayerWeights] | None) -> tuple[LayerWeights, dict]:
    """The merged weights of current layers k, k + 1 (the method's steps build them), and the
    Plan record's fields saying how."""
    ga, gb = window
    a, b = read_pair(adapter, model, k)
    sa, sb = cache.stats[k], cache.stats[k + 1]
    pair = PairToMerge(a, b, ga, gb, no_units(), shape, cfg, [originals[i] for i in ga + gb] if originals else None)
    merged, choice, extra = steps.merge_pair(k, pair)
    return merged, dict(group_a=ga, group_b=gb, kv_a=choice.kv_a, kv_b=choice.kv_b, ffn_a=choice.ffn_a,
                        ffn_b=choice.ffn_b, r_a=choice.r_a, bi_a=sa.bi, bi_b=sb.bi, **extra)


def _merge_window(steps: MergeSteps, adapter, cache, model, k: int, shape: AttnShape, cfg: CompressConfig,
                  window: list[list[int]], originals: list[LayerWeights] | None) -> tuple[LayerWeights, dict]:
    """`_merge_pair` for current layers k .. k + m - 1 (`--merge-item m`, m > 2)."""
    span = len(window)
    stats = cache.stats[k:k + span]
    originals_of = [originals[i] for g in window for i in g] if originals else None
    merged, choice = steps.merge_window(k, WindowToMerge(read_window(adapter, model, k, span), window,
                                                         no_window_units(span), shape, cfg, originals_of))
    sides = [{"group": g, "kv": kv, "ffn": ffn, "share": sh, "bi": st.bi}
             for g, kv, ffn, sh, st in zip(window, choice.kv, choice.ffn, choice.shares, stats)]
    rest = sides[1:]
    return merged, dict(group_a=window[0], group_b=[i for d in rest for i in d["group"]], kv_a=choice.kv[0],
                        kv_b=[u for d in rest for u in d["kv"]], ffn_a=choice.ffn[0],
                        ffn_b=[u for d in rest for u in d["ffn"]], r_a=choice.shares[0], bi_a=stats[0].bi,
                        bi_b=sum(d["bi"] for d in rest), sides=sides)


def _refit_note(refit: dict | None) -> str:
    if refit is None:
        return ""
    if not refit["kept"]:
        return f"; refit vetoed (held-out err {refit['heldout_err_before']:.4f})"
    return f"; refit lam={refit['lam']:g} held-out err {refit['heldout_err_before']:.4f} -> {refit['heldout_err_after']:.4f}"


def _span(group: list[int]) -> str:
    return str(group[0]) if len(group) == 1 else f"{group[0]}-{group[-1]}"
