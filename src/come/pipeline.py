"""The progressive loop: profile -> choose pair -> merge, until the target sparsity.

Calibration hidden states are cached at layer inputs, so after a merge at position l
only layers >= l (l-1 for the all-token pair score) are re-run: the official code
re-runs the whole model at every step.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .adapters import Adapter, get_adapter
from .config import CompressConfig
from .errors import ComeError
from .merge import concat_merge
from .plan import MergeRecord, Plan, library_versions
from .profile import LayerRunner, LayerStats
from .selection import choose_pair, joint_split, skip_scores, split_counts, split_ratio
from .sensitivity import channel_sensitivity, exact_head_sensitivity, head_sensitivity, kv_group_sensitivity, top_units

log = logging.getLogger("come")


def count_params(module: nn.Module) -> int:
    """Parameters of `module`, shared (tied) tensors counted once, as the papers count."""
    return sum(p.numel() for p in module.parameters())


def merges_needed(total: int, per_layer: int, sparsity: float) -> int:
    """Fewest one-layer removals whose removed params reach `sparsity` of `total`."""
    return math.ceil(sparsity * total / per_layer - 1e-9)


def merge_budget(model: nn.Module, sparsity: float) -> tuple[int, int, int]:
    """(total params, params per layer, merges needed); a one-line error if unreachable.

    Works on a model built on the 'meta' device, so the CLI checks before loading weights.
    """
    layers = get_adapter(model.config).decoder_layers(model)
    total, per_layer = count_params(model), count_params(layers[0])
    n_merges = merges_needed(total, per_layer, sparsity)
    if n_merges >= len(layers):
        raise ComeError(
            f"--sparsity {sparsity} needs {n_merges} merges but the model has only {len(layers)} layers "
            f"(max reachable: {(len(layers) - 1) * per_layer / total:.3f}); lower --sparsity"
        )
    return total, per_layer, n_merges


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ComeError("--device cuda requested but CUDA is not available; use --device cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ComeError(f"--device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


def unit_scores(stats: LayerStats, w, shape, head_score: str) -> tuple[Tensor, Tensor]:
    """(KV-group sensitivities, FFN-channel sensitivities) of one layer."""
    if head_score == "exact":
        heads = exact_head_sensitivity(stats.head_out_l1)
    else:
        heads = head_sensitivity(channel_sensitivity(stats.attn_abs_mean, w.o), shape.n_heads)
    return kv_group_sensitivity(heads, shape.n_kv_heads), channel_sensitivity(stats.ffn_abs_mean, w.down)


class _Profiler:
    """Cached layer inputs + per-layer statistics of the CURRENT model."""

    def __init__(self, model, adapter: Adapter, runner: LayerRunner, cfg: CompressConfig, first_inputs: list[Tensor], stride: int):
        self.model, self.adapter, self.runner, self.cfg = model, adapter, runner, cfg
        n = len(adapter.decoder_layers(model))
        self.states: dict[int, list[Tensor]] = {0: first_inputs}
        self.stats: list[LayerStats | None] = [None] * n
        self.last_tok: list[Tensor | None] = [None] * (n + 1)
        self.pair_all: list[float | None] = [None] * max(n - 1, 0)
        self.stride = stride
        self.forwards = 0

    def refresh(self) -> None:
        """Run every layer whose statistics or pair scores are missing, from the nearest cache."""
        layers = self.adapter.decoder_layers(self.model)
        need = [k for k, s in enumerate(self.stats) if s is None]
        need += [k for k, p in enumerate(self.pair_all) if p is None and self.cfg.pair_score == "bi-all-tokens"]
        if not need:
            return
        start = max(k for k in self.states if k <= min(need))
        h, prev = self.states[start], None
        for k in tqdm(range(start, len(layers)), desc="profiling layers", leave=False, unit="layer"):
            out, st = self.runner.run(layers[k], h, self.stats[k] is None, self.cfg.head_score)
            self.forwards += 1
            if st is not None:
                self.stats[k] = st
            self.last_tok[k] = torch.cat([b[:, -1].float() for b in h])
            self.last_tok[k + 1] = torch.cat([b[:, -1].float() for b in out])
            if (k + 1) % self.stride == 0:
                self.states[k + 1] = out
            if prev is not None and self.pair_all[k - 1] is None:
                self.pair_all[k - 1] = _mean_angular_all(prev, out)
            prev, h = h, out

    def pair_scores(self) -> list[float]:
        if self.cfg.pair_score == "bi-all-tokens":
            return list(self.pair_all)
        return skip_scores(self.last_tok)

    def merged(self, position: int) -> None:
        """Layers position, position+1 became one: drop what no longer holds."""
        del self.stats[position + 1]
        del self.last_tok[position + 1]
        if self.pair_all:
            del self.pair_all[position]
        for k in range(position, len(self.stats)):
            self.stats[k] = None
        for k in range(max(position - 1, 0), len(self.pair_all)):
            self.pair_all[k] = None
        for k in [k for k in self.states if k > position]:
            del self.states[k]


def _mean_angular_all(h_in: list[Tensor], h_out: list[Tensor]) -> float:
    """1 - mean over ALL tokens of cos(in, out): the block influence of a layer run."""
    total, n = 0.0, 0
    for a, b in zip(h_in, h_out):
        total += float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).sum())
        n += a.shape[0] * a.shape[1]
    return 1.0 - total / n


def eligible_pairs(groups: list[list[int]], cfg: CompressConfig) -> list[bool]:
    """Pairs (k, k+1) that may merge: `--protect` layers never, `--no-repeat` merged ones never."""
    protect = set(cfg.protect)
    out = []
    for ga, gb in zip(groups, groups[1:]):
        ok = not protect.intersection(ga + gb)
        if cfg.no_repeat:
            ok = ok and len(ga) == 1 and len(gb) == 1
        out.append(ok)
    return out


def compress(model: nn.Module, tokenizer, cfg: CompressConfig, calib: Tensor | None = None, model_name: str = "") -> tuple[nn.Module, Plan]:
    """Compress `model` in place with progressive concatenation merges; return it and its Plan.

    `calib` ([nsamples, seqlen] token ids) overrides `cfg.calib` (tests, benchmarks).
    """
    t0 = time.perf_counter()
    cfg.validate()
    adapter = get_adapter(model.config)
    n_layers = len(adapter.decoder_layers(model))
    total, per_layer, n_merges = merge_budget(model, cfg.sparsity)
    device = resolve_device(cfg.device)
    if calib is None:
        from .data import load_calibration

        calib = load_calibration(cfg.calib, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
    model.eval()
    shape = adapter.attn_shape(model.config)
    runner = LayerRunner(model, adapter, device, torch.device("cpu"))
    first = runner.embed(list(calib.split(cfg.batch_size)))
    bytes_per_boundary = calib.numel() * model.config.hidden_size * first[0].element_size()
    stride = max(1, math.ceil((n_layers + 1) * bytes_per_boundary / (cfg.max_cache_gb * 2**30)))
    prof = _Profiler(model, adapter, runner, cfg, first, stride)
    groups = [[i] for i in range(n_layers)]
    plan = Plan(model=model_name, method="come", settings=cfg.to_dict(), num_layers_before=n_layers,
                params_before=total, target_sparsity=cfg.sparsity, calibration_tokens=calib.numel(),
                versions=library_versions())
    log.info("%s: %d layers, %.1fM params, %.2fM per layer -> %d merges for sparsity %.3f",
             model_name or "model", n_layers, total / 1e6, per_layer / 1e6, n_merges, cfg.sparsity)

    for step in tqdm(range(n_merges), desc="merging", unit="merge"):
        prof.refresh()
        scores = prof.pair_scores()
        eligible = eligible_pairs(groups, cfg)
        if not any(eligible):
            raise ComeError(f"target not reachable: no eligible pair left after {step} merges "
                            "(--no-repeat/--protect too strict); lower --sparsity")
        k = choose_pair(scores, eligible)
        params_before = count_params(model)
        record = _merge_pair(model, adapter, shape, prof.stats[k], prof.stats[k + 1], k, groups, cfg)
        record.step, record.pair_score, record.pair_scores = step, scores[k], scores
        record.params_before, record.params_after = params_before, count_params(model)
        plan.merges.append(record)
        prof.merged(k)
        log.info("merge %d/%d: layers %d+%d (original %s + %s) -> kv %d+%d, ffn %d+%d, r_A=%.3f; params %.2fM -> %.2fM",
                 step + 1, n_merges, k, k + 1, _span(record.group_a), _span(record.group_b), len(record.kv_a),
                 len(record.kv_b), len(record.ffn_a), len(record.ffn_b), record.r_a, params_before / 1e6,
                 record.params_after / 1e6)

    plan.groups = groups
    plan.num_layers_after = len(groups)
    plan.params_after = count_params(model)
    plan.achieved_sparsity = 1.0 - plan.params_after / total
    plan.layer_forwards = prof.forwards
    plan.wall_time_s = time.perf_counter() - t0
    log.info("done: %d -> %d layers, %.2fM -> %.2fM params (%.2f%% removed), %d layer-forwards, %.1fs",
             n_layers, plan.num_layers_after, total / 1e6, plan.params_after / 1e6, 100 * plan.achieved_sparsity,
             plan.layer_forwards, plan.wall_time_s)
    return model, plan


def _span(group: list[int]) -> str:
    return str(group[0]) if len(group) == 1 else f"{group[0]}-{group[-1]}"


def _merge_pair(model, adapter: Adapter, shape, stats_a: LayerStats, stats_b: LayerStats, k: int,
                groups: list[list[int]], cfg: CompressConfig) -> MergeRecord:
    """Concatenation-merge current layers k and k+1 into layer k; remove k+1."""
    layers = adapter.decoder_layers(model)
    a = adapter.read_layer(layers[k]).map(lambda t: t.double())
    b = adapter.read_layer(layers[k + 1]).map(lambda t: t.double())
    kv_sa, ffn_sa = unit_scores(stats_a, a, shape, cfg.head_score)
    kv_sb, ffn_sb = unit_scores(stats_b, b, shape, cfg.head_score)
    ga, gb = groups[k], groups[k + 1]
    r_a = split_ratio(stats_a.bi, stats_b.bi, cfg.skew, cfg.min_max, n_original=len(ga) + len(gb))
    if cfg.split == "joint":
        n_kv = joint_split(kv_sa, kv_sb, shape.n_kv_heads)
        n_ffn = joint_split(ffn_sa, ffn_sb, a.down.shape[1])
    else:
        n_kv = split_counts(shape.n_kv_heads, r_a)
        n_ffn = split_counts(a.down.shape[1], r_a)
    kv_a, kv_b = top_units(kv_sa, n_kv[0]), top_units(kv_sb, n_kv[1])
    ffn_a, ffn_b = top_units(ffn_sa, n_ffn[0]), top_units(ffn_sb, n_ffn[1])
    merged = concat_merge(a, b, shape, kv_a, kv_b, ffn_a, ffn_b, r_a, cfg.norm)
    adapter.write_layer(layers[k], merged)
    adapter.keep_layers(model, [i for i in range(len(layers)) if i != k + 1])
    groups[k:k + 2] = [ga + gb]
    return MergeRecord(step=0, position=k, group_a=ga, group_b=gb, operator="concat", kv_a=kv_a, kv_b=kv_b,
                       ffn_a=ffn_a, ffn_b=ffn_b, r_a=r_a, bi_a=stats_a.bi, bi_b=stats_b.bi, pair_score=0.0,
                       pair_scores=[], params_before=0, params_after=0)
