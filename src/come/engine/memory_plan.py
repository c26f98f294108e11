"""The memory plan of a compression run, from the model's structure (a model built on the 'meta'
device from its config: no weight read) and the settings alone: the host bytes the run holds at
its peak, part by part, and on a CUDA device the device bytes. `come compress` logs it before the
weights load and refuses, in one line, a run whose host peak exceeds --max-memory-gb.

The host holds, all at once at the peak: the weights as loaded (transformers maps the safetensors
file; its pages become resident when the run's first check reads every weight); a second copy
where a method compresses copies (auto's candidates, a drop method's smaller levels) or keeps the
original layers (laco); the calibration cache as `cache.cache_layout` sizes it (the dense
states the refit reads, the current model's layer inputs every `stride` layers with the states a
pass has in flight beside them, and the refit's kept layer pass where it fits), counted for a merge method as if the
re-profiled states never shared a tensor with the dense ones (the worst step of a run;
BENCHMARKS.md "Peak memory of compression"; a drop method profiles once, so they are shared); and the largest of the working sets beside it: a
layer pass (one batch's activations, and on a CPU the refit's float64 normal equations,
runner.collect_refit), a merge (the merged layer it builds in float64, a field at a time from
views of the layers it reads: concat_merge_many), and on a CPU the
refit's solve (refit.ridge_solve). On CUDA the device holds one layer, one batch's activations
and the refit's statistics and solve, never the model. Not in the plan: what the process holds
before the weights load (the interpreter, the libraries, the tokenizer and the calibration:
`check_memory` adds what it measures then), memory the allocator keeps after a free, and a
method's own extras (MKA's per-layer states, --sensitivity taylor's backward pass);
docs/memory.md compares the plan with measured peaks.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import ComeError
from ..models.adapters import ExpertUnits, get_adapter
from ..models.budget import count_params
from ..models.checkpoint import loaded_dtype
from ..settings.config import CompressConfig
from ..settings.registry import get_method
from .cache import cache_layout

log = logging.getLogger("come")
GB = 1e9  # --max-memory-gb counts decimal GB, as distill's does


@dataclass(frozen=True)
class ModelShape:
    """What the plan reads from a model's structure."""

    params: int  # every parameter, tied ones once
    layer_params: int  # the largest decoder layer's
    largest_weight: int  # a decoder layer's largest parameter (a fused one whole: a merge's largest field or more)
    embed_params: int  # what the embedding pass puts on the device
    n_layers: int
    hidden: int
    d_ff: int  # the refit's channel features: the down projection's inputs (MoE: none, the map is hidden wide)
    moe: bool
    ffn_adds: bool  # the FFN output enters the stream as it is (no post-norm, no multiplier): a refit pass can be kept
    q_dim: int
    kv_dim: int
    itemsize: int  # bytes per weight and per cached state, as loaded

    @classmethod
    def of(cls, model: nn.Module, dtype: torch.dtype) -> "ModelShape":
        """The shape of `model` (built on the meta device) loaded in `dtype`."""
        adapter, config = get_adapter(model.config), model.config
        layers = adapter.decoder_layers(model)
        down = adapter.ffn_output_proj(layers[0])
        shape = adapter.attn_shape(config)
        return cls(params=count_params(model), layer_params=max(count_params(layer) for layer in layers),
                   largest_weight=max(p.numel() for layer in layers for p in layer.parameters()),
                   embed_params=sum(count_params(m) for m in adapter.input_modules(model)), n_layers=len(layers),
                   hidden=config.hidden_size, d_ff=down.in_features, moe=isinstance(down, ExpertUnits),
                   ffn_adds=adapter.ffn_output(layers[0], config) is None, q_dim=shape.n_heads * shape.head_dim, kv_dim=shape.n_kv_heads * shape.head_dim,
                   itemsize=dtype.itemsize)


@dataclass
class MemoryPlan:
    """Peak bytes of a run, by part (`host`, and `device` on CUDA: the largest phase), and how
    the cache is laid out (`layout`: said in the log)."""

    host: dict[str, int]
    device: dict[str, int]
    layout: str
    disk: int = 0  # --cache-dir: the most its files hold at once

    @property
    def host_peak(self) -> int:
        return sum(self.host.values())

    @property
    def device_peak(self) -> int:
        return max(self.device.values(), default=0)


def _refit_width(cfg: CompressConfig, shape: ModelShape) -> int:
    """Features of the refit's least squares: d_ff channels, or the hidden-wide map of the FFN
    output (ReplaceMe's; every MoE layer's)."""
    method = get_method(cfg.method)
    return shape.hidden if shape.moe or getattr(method, "refit_features", "channels") == "mlp_out" else shape.d_ff


def merge_bytes(shape: ModelShape) -> int:
    """A merge's working set: the merged layer in float64, and beside it, while its largest field
    is built, that field's kept rows of every side in float64 and the last side's also in the
    model's dtype, or their concatenation (merging/merge.py: the layers read are views)."""
    return 8 * shape.layer_params + (8 + shape.itemsize) * shape.largest_weight


def _layer_pass(shape: ModelShape, tokens: int) -> int:
    """One batch of `tokens` through a decoder layer in the weights' dtype: the state in, its
    norm, the queries, keys, values and attention output, the state after attention and its
    norm, gate, up, their product and the state out; plus the float32 per-token cosines of the
    statistics (runner._UnitStats)."""
    h, e = shape.hidden, shape.itemsize
    return tokens * (e * (5 * h + 2 * shape.q_dim + 2 * shape.kv_dim + 3 * shape.d_ff) + 4 * 2 * h)


def _normal_equations(f: int, d: int) -> int:
    """The refit's train and held-out statistics, float64: F^T F and F^T T each."""
    return 2 * 8 * (f * f + f * d)


def _solve(f: int, d: int) -> int:
    """refit.ridge_solve beside the statistics: A and its Cholesky factor (f x f), the
    right-hand side, W0 and the solution (f x d), float64."""
    return 8 * (2 * f * f + 3 * f * d)


def _accumulate(f: int, d: int, tokens: int) -> int:
    """One batch's refit products (NormalEquations.add): the features and targets in float32,
    F^T F in float32 and float64."""
    return 4 * tokens * (f + d) + 12 * f * f


def plan_memory(shape: ModelShape, cfg: CompressConfig, device: str) -> MemoryPlan:
    """The plan of a compression of a model of `shape` with `cfg` (resolved) on `device` ('cpu' or
    'cuda'). A one-line ComeError where `cache.cache_layout` refuses the settings."""
    method = get_method(cfg.method)
    n, e, h = shape.n_layers, shape.itemsize, shape.hidden
    dense = method.needs_dense(cfg)
    n_batches = math.ceil(cfg.nsamples / cfg.batch_size)
    batch_tokens = cfg.batch_size * cfg.seqlen
    on_disk = cfg.cache_dir is not None
    dense_batches, stride = cache_layout(n, n_batches, batch_tokens * h * e, cfg.max_cache_gb, dense, on_disk)
    all_tokens = cfg.nsamples * cfg.seqlen
    boundary = all_tokens * h * e  # one layer boundary's states, every calibration window
    dense_boundary = min(dense_batches * batch_tokens, all_tokens) * h * e  # the refit's targets at one boundary
    strided = n // stride + 1  # boundaries whose layer inputs are cached
    # beside the strided inputs, the states a pass has in flight (entering and leaving a layer; the
    # merged layer's input, cache.inputs_at): with stride 1 they are cached ones
    in_flight = 2 * boundary * (stride > 1)
    if method.loop == "one-shot":  # one profiling pass (its states ARE the dense ones), then only the refits' re-runs
        cache = max(strided * boundary + (n + 1 - strided) * dense_boundary + in_flight,
                    (n + 1) * dense_boundary + 2 * boundary)
    else:  # re-profiled after every merge: in the end none of the current states is a dense one
        cache = (n + 1) * dense_boundary + strided * boundary + in_flight
    disk = 0
    if on_disk:  # the cached states live in mapped files; a pass's states are made in memory, then copied there
        disk, cache = cache, 2 * boundary
    # whether layers are refit: --refit ls, a method's own refit (ReplaceMe), or maybe (auto's candidates)
    refit = cfg.refit == "ls" or getattr(method, "always_refits", False) or method.loop is None
    kept = all_tokens * (shape.d_ff + h) * e  # a merge's refit pass kept (layer_refit._room_to_keep)
    if (refit and method.loop == "progressive" and cfg.refit_input == "compressed" and shape.ffn_adds
            and not shape.moe and dense_batches == n_batches and cache + kept <= cfg.max_cache_gb * 2**30):
        cache += kept
    else:
        kept = 0
    f = _refit_width(cfg, shape)
    on_cpu = device == "cpu"
    work = {"a layer pass": _layer_pass(shape, batch_tokens)
            + (_normal_equations(f, h) + _accumulate(f, h, batch_tokens) if refit and on_cpu else 0)}
    if method.loop == "progressive":
        work["a merge"] = merge_bytes(shape)
    if refit and on_cpu:
        work["the refit's solve"] = _normal_equations(f, h) + _solve(f, h)
    phase = max(work, key=work.get)
    copy = method.loop is None or (method.loop == "one-shot" and len(cfg.levels()) > 1)
    host = {"weights": shape.params * e, "weights copy": shape.params * e * copy,
            "original layers": n * shape.layer_params * e * getattr(method, "needs_originals", False),
            "calibration cache": cache, f"working set ({phase})": work[phase]}
    layout = (f"layer inputs every {stride} layer(s)" + (f", dense states of {dense_batches}/{n_batches} batches"
                                                         if dense else "") + (", the refit's pass kept" if kept else "")
              + (f", {disk / GB:.3g} GB of them in files under {cfg.cache_dir}" if on_disk else ""))
    return MemoryPlan({k: v for k, v in host.items() if v}, _device_plan(shape, batch_tokens, f, refit)
                      if device == "cuda" else {}, layout, disk)


def _device_plan(shape: ModelShape, batch_tokens: int, f: int, refit: bool) -> dict[str, int]:
    """Device bytes of each phase: the embedding pass, a layer pass (one layer, one batch, the
    refit's statistics while they are collected) and the refit's solve."""
    h, e = shape.hidden, shape.itemsize
    phases = {"embedding pass": shape.embed_params * e + batch_tokens * h * e,
              "layer pass": shape.layer_params * e + _layer_pass(shape, batch_tokens)}
    if refit:
        phases["layer pass"] += _normal_equations(f, h) + _accumulate(f, h, batch_tokens)
        phases["refit solve"] = _normal_equations(f, h) + _solve(f, h)
    return phases


def resident_bytes() -> int:
    """What this process holds now (resident set; Linux), else the most it has held."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def check_run(meta: nn.Module, cfg: CompressConfig, dtype: str) -> MemoryPlan:
    """`check_memory` for a run of `cfg` (resolved) on the model `meta` (built on the meta
    device) loaded with `--dtype dtype`, on the device `cfg.device` names here."""
    from ..settings.device import resolve_device

    shape = ModelShape.of(meta, loaded_dtype(meta.config, dtype))
    return check_memory(shape, cfg, resolve_device(cfg.device).type, resident_bytes())


def check_memory(shape: ModelShape, cfg: CompressConfig, device: str, held_now: int) -> MemoryPlan:
    """Refuse the plan in one line when its host peak plus what the process holds now
    (`held_now`: the interpreter and libraries) exceeds --max-memory-gb; else log it as one block."""
    plan = plan_memory(shape, cfg, device)
    if plan.disk and plan.disk > (free := shutil.disk_usage(cfg.cache_dir).free):
        raise ComeError(f"--cache-dir {cfg.cache_dir} has {free / GB:.3g} GB free; the calibration states need about "
                        f"{plan.disk / GB:.3g} GB there: free space, give another folder, or lower --nsamples / --seqlen")
    parts = ", ".join(f"{k} {v / GB:.3g} GB" for k, v in plan.host.items())
    total = plan.host_peak + held_now
    cap = cfg.max_memory_gb
    if cap is not None and total > cap * GB:
        raise ComeError(f"the run needs about {total / GB:.3g} GB of host memory ({parts}, this process now "
                        f"{held_now / GB:.3g} GB), more than --max-memory-gb {cap:g}: "
                        f"{_what_to_lower(plan, shape, cfg, device, cap * GB - held_now)}")
    on_device = (f"; device peak {plan.device_peak / GB:.3g} GB, the largest of " +
                 ", ".join(f"{k} {v / GB:.3g} GB" for k, v in plan.device.items()) if plan.device else "")
    log.info("memory plan (%s; %s): host peak %.3g GB = %s + this process now %.3g GB%s", device, plan.layout,
             total / GB, parts, held_now / GB, on_device)
    return plan


def _what_to_lower(plan: MemoryPlan, shape: ModelShape, cfg: CompressConfig, device: str, room: float) -> str:
    """The fix of a plan over `room` bytes: a smaller dtype or a bigger cap where the weights
    alone do not fit; else the largest --max-cache-gb whose plan fits (a geometric grid down
    from the one given), when one does; else fewer calibration tokens a batch or in all."""
    smaller = "load with --dtype bf16, or " if shape.itemsize > 2 else ""
    weights = sum(v for k, v in plan.host.items() if k in ("weights", "weights copy", "original layers"))
    if weights >= room:
        return f"the weights alone take {weights / GB:.3g} GB: {smaller}raise --max-memory-gb"
    tokens = "lower --nsamples, --seqlen or --batch-size"
    for step in range(1, 120):
        budget = float(f"{cfg.max_cache_gb * 0.9 ** step:.3g}")
        try:
            fits = plan_memory(shape, replace(cfg, max_cache_gb=budget), device).host_peak <= room
        except ComeError:  # too small for the refit's dense states: smaller ones will not do either
            break
        if fits:
            return f"lower --max-cache-gb to {budget:g} (the plan then fits), or {tokens}"
    return f"{tokens} (no --max-cache-gb fits), or {smaller}raise --max-memory-gb"
