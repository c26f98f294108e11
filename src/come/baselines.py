"""The peers' operators on come's plumbing: same calibration, sparsity counting, Plan and
output, so a comparison differs only in the operator.

- shortgpt: drop the layers of lowest Block Influence (1 - mean cos(in, out)), one shot,
  as ShortGPT does; `--refit ls` adds our closed-form refit of the layer kept before each
  removed run (drop + refit).
- replaceme: ReplaceMe's least-squares variant: drop, then one hidden x hidden linear map
  per removed run, fitted on the dense model and folded into the preceding layer's down
  projection. `--select angle` (published): one contiguous block of n layers whose input
  and output last-token states are closest in angle; `--select bi`: ShortGPT's layers.
"""

from __future__ import annotations

import logging
import time

from torch import Tensor, nn

from .config import CompressConfig
from .errors import ComeError
from .pipeline import count_params, finish, prepare, write_down_proj
from .plan import MergeRecord, Plan
from .selection import angular_distance

log = logging.getLogger("come")


def lowest_bi_layers(bi: list[float], n: int, protect: list[int]) -> list[int]:
    """ShortGPT: the n layers whose output differs least from their input."""
    order = sorted((b, i) for i, b in enumerate(bi) if i not in set(protect))
    if len(order) < n:
        raise ComeError(f"target not reachable: {n} layers to drop, {len(order)} unprotected; lower --sparsity")
    return sorted(i for _, i in order[:n])


def angle_block(last_tok: list[Tensor], n: int, protect: list[int]) -> list[int]:
    """ReplaceMe/"unreasonable ineffectiveness" selection: the block i..i+n-1 minimizing the
    mean angular distance between the last-token states entering i and leaving i+n-1."""
    best = None
    for i in range(len(last_tok) - n):
        if set(range(i, i + n)) & set(protect):
            continue
        d = float(angular_distance(last_tok[i], last_tok[i + n]).mean())
        if best is None or d < best[0]:
            best = (d, i)
    if best is None:
        raise ComeError(f"target not reachable: no block of {n} unprotected layers; lower --sparsity")
    return list(range(best[1], best[1] + n))


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


def compress_baseline(model: nn.Module, tokenizer, cfg: CompressConfig, calib: Tensor | None,
                      model_name: str) -> tuple[nn.Module, Plan]:
    t0 = time.perf_counter()
    features = "mlp_out" if cfg.method == "replaceme" else "channels"
    refit = cfg.method == "replaceme" or cfg.refit == "ls"
    adapter, prof, plan, n_remove = prepare(model, tokenizer, cfg, calib, model_name, cfg.method, keep_dense=refit)
    prof.refresh()
    n_layers = plan.num_layers_before
    bi = [s.bi for s in prof.stats]
    if cfg.method == "replaceme" and cfg.select == "angle":
        removed = angle_block(prof.last_tok, n_remove, cfg.protect)
    else:
        removed = lowest_bi_layers(bi, n_remove, cfg.protect)
    groups = absorb(removed, n_layers)
    log.info("%s drops original layers %s", cfg.method, removed)
    kept = [next(i for i in g if i not in removed) for g in groups]
    params_before = count_params(model)
    adapter.keep_layers(model, kept)
    prof.layers_removed()
    layers = adapter.decoder_layers(model)
    shape = adapter.attn_shape(model.config)
    for k, (group, keep) in enumerate(zip(groups, kept)):
        if len(group) == 1:
            continue
        record = None
        if refit:
            res = prof.refit(k, group, cfg.refit_input, features)
            if res.kept:
                write_down_proj(adapter, layers[k], res.weight)
                prof.forget_after(k)
            record = res.record()
        plan.merges.append(MergeRecord(
            step=len(plan.merges), position=k, group_a=[keep], group_b=[i for i in group if i != keep],
            operator=f"drop+{features}-refit" if refit else "drop", kv_a=list(range(shape.n_kv_heads)), kv_b=[],
            ffn_a=list(range(adapter.ffn_output_proj(layers[k]).in_features)), ffn_b=[], r_a=1.0, bi_a=bi[keep],
            bi_b=sum(bi[i] for i in group if i != keep), pair_score=sum(bi[i] for i in group if i != keep),
            pair_scores=bi, params_before=params_before, params_after=count_params(model), refit=record))
    return model, finish(model, plan, prof, groups, t0)
