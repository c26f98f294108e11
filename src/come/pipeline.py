"""The progressive loop: profile -> choose pair -> merge, until the target sparsity.

Calibration hidden states are cached at layer inputs, so after a merge at position l
only layers >= l are re-run: the official code re-runs the whole model at every step.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .adapters import Adapter, get_adapter
from .config import CompressConfig
from .errors import ComeError
from .merge import concat_merge, linear_combination, rdsc_coefficients
from .plan import MergeRecord, Plan, library_versions
from .profile import LayerRunner, LayerStats
from .refit import fit, fit_map
from .selection import choose_pair, joint_split, skip_scores, split_counts, split_ratio, token_cosines
from .sensitivity import channel_sensitivity, exact_head_sensitivity, head_sensitivity, kv_group_sensitivity, top_units

log = logging.getLogger("come")

OPERATORS = {"come": "concat", "laco": "rdsc", "average": "average"}


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


class Profiler:
    """Cached layer inputs + per-layer statistics of the CURRENT model, and (for the refit
    and the error pair score) the DENSE model's hidden state at every original layer boundary."""

    def __init__(self, model, adapter: Adapter, runner: LayerRunner, cfg: CompressConfig, first_inputs: list[Tensor],
                 stride: int, dense_batches: int):
        self.model, self.adapter, self.runner, self.cfg = model, adapter, runner, cfg
        n = len(adapter.decoder_layers(model))
        self.states: dict[int, list[Tensor]] = {0: first_inputs}
        # the dense states of the first `dense_batches` calibration batches only: the refit's
        # tokens are bounded by the cache budget (zip() in collect_refit stops at the shortest)
        self.dense: dict[int, list[Tensor]] | None = {0: first_inputs[:dense_batches]} if dense_batches else None
        self.stats: list[LayerStats | None] = [None] * n
        self.last_tok: list[Tensor | None] = [None] * (n + 1)
        self.pair_all: list[float | None] = [None] * max(n - 1, 0)
        self.stride = stride
        self.forwards = 0
        n_hold = max(1, round(cfg.refit_holdout * dense_batches))
        self.held_out = [i >= dense_batches - n_hold for i in range(dense_batches)]

    def refresh(self) -> None:
        """Run every layer whose statistics or pair scores are missing, from the nearest cache."""
        layers = self.adapter.decoder_layers(self.model)
        all_tokens = self.cfg.pair_score == "bi-all-tokens"
        need = [k for k, s in enumerate(self.stats) if s is None]
        # pair (j, j + 1) is scored when layer j + 1 runs, from layer j's input: after a merge
        # at l, layer l - 1 need not re-run when its input is cached
        need += [j + 1 for j, p in enumerate(self.pair_all) if p is None and all_tokens]
        if not need:
            return
        first_pass = all(s is None for s in self.stats)
        start = max(k for k in self.states if k <= min(need))
        if all_tokens and start > 0 and self.pair_all[start - 1] is None and start - 1 not in self.states:
            start = max(k for k in self.states if k < start)  # that input is not cached: run from before it
        h, prev = self.states[start], self.states.get(start - 1)
        for k in tqdm(range(start, len(layers)), desc="profiling layers", leave=False, unit="layer"):
            out, st = self.runner.run(layers[k], h, self.stats[k] is None, self.cfg.head_score)
            self.forwards += 1
            if st is not None:
                self.stats[k] = st
            self.last_tok[k] = torch.cat([b[:, -1].float() for b in h])
            self.last_tok[k + 1] = torch.cat([b[:, -1].float() for b in out])
            if (k + 1) % self.stride == 0:
                self.states[k + 1] = out
            if first_pass and self.dense is not None:
                self.dense[k + 1] = out[:len(self.dense[0])]
            if all_tokens and prev is not None and self.pair_all[k - 1] is None:  # only that score reads it
                self.pair_all[k - 1] = _mean_angular_all(prev, out)
            prev, h = h, out

    def inputs_at(self, k: int) -> list[Tensor]:
        """Hidden states entering current layer k (run forward from the nearest cache if needed)."""
        layers = self.adapter.decoder_layers(self.model)
        start = max(j for j in self.states if j <= k)
        h = self.states[start]
        for j in range(start, k):
            h, _ = self.runner.run(layers[j], h, False)
            self.forwards += 1
        self.states[k] = h
        return h

    def layers_removed(self) -> None:
        """Layers were dropped (baselines): only the embedding cache still holds."""
        n = len(self.adapter.decoder_layers(self.model))
        self.states = {0: self.states[0]}
        self.stats, self.last_tok, self.pair_all = [None] * n, [None] * (n + 1), [None] * max(n - 1, 0)

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
        self.forget_after(position)

    def forget_after(self, k: int) -> None:
        """Layer k changed: cached inputs of the layers after it no longer hold."""
        self.states = {j: h for j, h in self.states.items() if j <= k}

    def refit(self, k: int, group: list[int], inputs: str, features: str = "channels", layer: nn.Module | None = None,
              solve: bool = True):
        """Refit current layer k's down projection to reproduce the dense output of `group`.

        inputs="compressed": the states entering layer k in the current model (corrects the
        error accumulated upstream); "dense": the dense model's states entering the group.
        Returns the RefitResult (its `seconds`: this whole step, so a run can report what the
        refit cost it); the caller decides what to write. solve=False: only the held-out
        error of the layer as it is (no solves).
        """
        t0 = time.perf_counter()
        layer = layer if layer is not None else self.adapter.decoder_layers(self.model)[k]
        x = self.inputs_at(k) if inputs == "compressed" else self.dense[group[0]]
        train, hold = self.runner.collect_refit(layer, x, self.dense[group[-1] + 1], self.held_out, features)
        self.forwards += 1
        w0 = self.adapter.ffn_output_proj(layer).weight.detach()
        if not solve:
            res = fit(train, hold, w0, lambdas=())
        else:
            res = fit(train, hold, w0) if features == "channels" else fit_map(train, hold, w0)
        res.seconds = time.perf_counter() - t0
        return res


def _mean_angular_all(h_in: list[Tensor], h_out: list[Tensor]) -> float:
    """1 - mean over ALL tokens of cos(in, out): the block influence of a layer run."""
    total, n = 0.0, 0
    for a, b in zip(h_in, h_out):
        total += float(token_cosines(a, b).sum(dtype=torch.float64))
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


@dataclass
class Choice:
    """Which units a merge keeps from each side, and side A's share."""

    kv_a: list[int]
    kv_b: list[int]
    ffn_a: list[int]
    ffn_b: list[int]
    r_a: float


def choose_units(a, b, stats_a: LayerStats, stats_b: LayerStats, shape, cfg: CompressConfig, n_original: int,
                 r_a: float | None = None) -> Choice:
    """The top units of each side; counts from the split rule, or from `r_a` when forced
    (r_a = 1.0 keeps A whole: dropping B)."""
    kv_sa, ffn_sa = unit_scores(stats_a, a, shape, cfg.head_score)
    kv_sb, ffn_sb = unit_scores(stats_b, b, shape, cfg.head_score)
    d_ff = a.down.shape[1]
    if r_a is None and cfg.split == "joint":
        n_kv, n_ffn = joint_split(kv_sa, kv_sb, shape.n_kv_heads), joint_split(ffn_sa, ffn_sb, d_ff)
        r_a = n_ffn[0] / d_ff
    else:
        if r_a is None:
            r_a = split_ratio(stats_a.bi, stats_b.bi, cfg.skew, cfg.min_max, n_original=n_original)
        n_kv, n_ffn = split_counts(shape.n_kv_heads, r_a), split_counts(d_ff, r_a)
    return Choice(top_units(kv_sa, n_kv[0]), top_units(kv_sb, n_kv[1]), top_units(ffn_sa, n_ffn[0]),
                  top_units(ffn_sb, n_ffn[1]), r_a)


def _read_pair(adapter: Adapter, model, k: int):
    layers = adapter.decoder_layers(model)
    return (adapter.read_layer(layers[k]).map(lambda t: t.double()),
            adapter.read_layer(layers[k + 1]).map(lambda t: t.double()))


def write_down_proj(adapter: Adapter, layer: nn.Module, weight: Tensor) -> None:
    proj = adapter.ffn_output_proj(layer)
    with torch.no_grad():
        proj.weight.copy_(weight.to(proj.weight.dtype))


class ErrorScores:
    """`--pair-score error` (DECISION): a pair's cost is the held-out error, relative to the
    dense stream, of its ACTUAL merged layer (refit if --refit ls) against the dense group's
    output, on the dense group's input. Degenerate splits (all units of one side = drop the
    other) compete, so come can only match or beat drop + refit on the same layers.
    `--pair-score merge-error`: the same error of the merge itself, before any refit (the
    refit still follows the choice): a refit fitted on the calibration can make a merge look
    cheap on calibration-domain text only, the unfitted merge cannot.
    Dense inputs and targets make a pair's cost independent of merges elsewhere: only pairs
    touching the newly merged layer are re-scored."""

    def __init__(self, prof: Profiler, shape, cfg: CompressConfig):
        self.prof, self.shape, self.cfg = prof, shape, cfg
        self.cache: dict[tuple, tuple[float, Choice]] = {}

    def scores(self, groups: list[list[int]], eligible: list[bool]) -> tuple[list[float], list[Choice | None]]:
        out_s, out_c = [], []
        todo = [k for k, ok in enumerate(eligible) if ok and self._key(groups, k) not in self.cache]
        for k in tqdm(todo, desc="scoring pairs", leave=False, unit="pair"):
            self.cache[self._key(groups, k)] = self._score(groups, k)
        for k, ok in enumerate(eligible):
            score, choice = self.cache[self._key(groups, k)] if ok else (math.inf, None)
            out_s.append(score)
            out_c.append(choice)
        return out_s, out_c

    @staticmethod
    def _key(groups, k) -> tuple:
        return tuple(groups[k]), tuple(groups[k + 1])

    def _score(self, groups, k: int) -> tuple[float, Choice]:
        prof, cfg = self.prof, self.cfg
        a, b = _read_pair(prof.adapter, prof.model, k)
        sa, sb = prof.stats[k], prof.stats[k + 1]
        group = groups[k] + groups[k + 1]
        scratch = copy.deepcopy(prof.adapter.decoder_layers(prof.model)[k])
        best = None
        fitted = cfg.refit == "ls" and cfg.pair_score == "error"
        for r_a in (None, 1.0, 0.0):
            choice = choose_units(a, b, sa, sb, self.shape, cfg, len(group), r_a)
            prof.adapter.write_layer(scratch, concat_merge(a, b, self.shape, choice.kv_a, choice.kv_b, choice.ffn_a,
                                                           choice.ffn_b, choice.r_a, cfg.norm))
            res = prof.refit(k, group, "dense", layer=scratch, solve=fitted)
            err = res.err_after if fitted else res.err_before
            if best is None or err < best[0]:
                best = (err, choice)
        return best


def refit_batches(n_batches: int, batch_bytes: int, n_layers: int, max_cache_gb: float) -> int:
    """How many calibration batches keep their dense state at every layer boundary (the
    refit's targets): all of them if that fits in half of --max-cache-gb, else fewer, so
    host memory stays bounded (a 7B at 128 x 2048 tokens would need 66 GiB for all)."""
    fit = int(max_cache_gb * 2**30 / 2 // ((n_layers + 1) * batch_bytes))
    if min(fit, n_batches) < 2:
        raise ComeError(f"the refit needs the dense states of at least 2 calibration batches (one held out); "
                        f"{n_batches} batch(es) exist and --max-cache-gb {max_cache_gb} holds {fit}: raise --nsamples "
                        "or --max-cache-gb, lower --batch-size, or use --refit none")
    return min(fit, n_batches)


def cache_layout(n_layers: int, n_batches: int, batch_bytes: int, max_cache_gb: float,
                 keep_dense: bool) -> tuple[int, int]:
    """(dense batches kept for the refit, stride of the cached layer inputs) within
    --max-cache-gb: the dense states first (refit_batches), the layer inputs in the rest."""
    dense_batches = refit_batches(n_batches, batch_bytes, n_layers, max_cache_gb) if keep_dense else 0
    boundary = (n_layers + 1) * batch_bytes
    budget = max_cache_gb * 2**30 - boundary * dense_batches
    return dense_batches, max(1, math.ceil(boundary * n_batches / max(budget, 1.0)))


def prepare(model: nn.Module, tokenizer, cfg: CompressConfig, calib: Tensor | None, model_name: str, method: str,
            keep_dense: bool):
    """Shared set-up of every method: checks, calibration, embedding, the profiler, the Plan."""
    cfg.validate()
    adapter = get_adapter(model.config)
    n_layers = len(adapter.decoder_layers(model))
    total, per_layer, n_merges = merge_budget(model, cfg.sparsity)
    device = resolve_device(cfg.device)
    if calib is None:
        from .data import load_calibration

        calib = load_calibration(cfg.calib, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
    n_batches = math.ceil(calib.shape[0] / cfg.batch_size)
    batch_bytes = cfg.batch_size * calib.shape[1] * model.config.hidden_size * model.dtype.itemsize
    dense_batches, stride = cache_layout(n_layers, n_batches, batch_bytes, cfg.max_cache_gb, keep_dense)
    model.eval()
    runner = LayerRunner(model, adapter, device, torch.device("cpu"))
    first = runner.embed(list(calib.split(cfg.batch_size)))
    log.info("cache: layer inputs every %d layer(s)%s", stride,
             f"; dense states of {dense_batches}/{n_batches} calibration batches for the refit "
             f"({(n_layers + 1) * batch_bytes * dense_batches / 2**30:.2f} GiB)" if keep_dense else "")
    prof = Profiler(model, adapter, runner, cfg, first, stride, dense_batches)
    plan = Plan(model=model_name, method=method, settings=cfg.to_dict(), num_layers_before=n_layers,
                params_before=total, target_sparsity=cfg.sparsity, calibration_tokens=calib.numel(),
                versions=library_versions())
    log.info("%s: %d layers, %.1fM params, %.2fM per layer -> %d layers to remove for sparsity %.3f (%s)",
             model_name or "model", n_layers, total / 1e6, per_layer / 1e6, n_merges, cfg.sparsity, method)
    return adapter, prof, plan, n_merges


def finish(model: nn.Module, plan: Plan, prof: Profiler, groups: list[list[int]], t0: float) -> Plan:
    plan.groups = groups
    plan.num_layers_after = len(groups)
    plan.params_after = count_params(model)
    plan.achieved_sparsity = 1.0 - plan.params_after / plan.params_before
    plan.layer_forwards = prof.forwards
    plan.wall_time_s = time.perf_counter() - t0
    log.info("done: %d -> %d layers, %.2fM -> %.2fM params (%.2f%% removed), %d layer-forwards, %.1fs",
             plan.num_layers_before, plan.num_layers_after, plan.params_before / 1e6, plan.params_after / 1e6,
             100 * plan.achieved_sparsity, plan.layer_forwards, plan.wall_time_s)
    return plan


def compress(model: nn.Module, tokenizer, cfg: CompressConfig, calib: Tensor | None = None, model_name: str = "") -> tuple[nn.Module, Plan]:
    """Compress `model` in place to `cfg.sparsity`; return it and its Plan.

    `cfg.method` picks the operator: "come" (progressive concatenation merges) or a peer
    from baselines.py on the same plumbing. `calib` ([nsamples, seqlen] token ids)
    overrides `cfg.calib` (tests, benchmarks).
    """
    cfg.validate()
    if cfg.method in ("shortgpt", "replaceme"):
        from .baselines import compress_baseline

        return compress_baseline(model, tokenizer, cfg, calib, model_name)
    t0 = time.perf_counter()
    keep_dense = cfg.refit == "ls" or cfg.pair_score in ("error", "merge-error")
    adapter, prof, plan, n_merges = prepare(model, tokenizer, cfg, calib, model_name, cfg.method, keep_dense)
    shape = adapter.attn_shape(model.config)
    groups = [[i] for i in range(plan.num_layers_before)]
    originals = ([adapter.read_layer(layer) for layer in adapter.decoder_layers(model)]
                 if cfg.method == "laco" else None)
    errors = ErrorScores(prof, shape, cfg) if cfg.pair_score in ("error", "merge-error") else None

    for step in tqdm(range(n_merges), desc="merging", unit="merge"):
        prof.refresh()
        eligible = eligible_pairs(groups, cfg)
        if not any(eligible):
            raise ComeError(f"target not reachable: no eligible pair left after {step} merges "
                            "(--no-repeat/--protect too strict); lower --sparsity")
        scores, choices = errors.scores(groups, eligible) if errors else (prof.pair_scores(), None)
        k = choose_pair(scores, eligible)
        ga, gb = groups[k], groups[k + 1]
        a, b = _read_pair(adapter, model, k)
        sa, sb = prof.stats[k], prof.stats[k + 1]
        if cfg.method != "come":  # weight-space operators keep no units
            choice = Choice([], [], [], [], 0.5)
        else:
            choice = choices[k] if choices else choose_units(a, b, sa, sb, shape, cfg, len(ga) + len(gb))
        params_before = count_params(model)
        layers = adapter.decoder_layers(model)
        if cfg.method == "come":
            merged = concat_merge(a, b, shape, choice.kv_a, choice.kv_b, choice.ffn_a, choice.ffn_b, choice.r_a, cfg.norm)
        elif cfg.method == "laco":
            merged = linear_combination([originals[i].map(torch.Tensor.double) for i in ga + gb],
                                        rdsc_coefficients(len(ga + gb)))
        else:
            merged = linear_combination([a, b], [0.5, 0.5])
        adapter.write_layer(layers[k], merged)
        adapter.keep_layers(model, [i for i in range(len(layers)) if i != k + 1])
        groups[k:k + 2] = [ga + gb]
        prof.merged(k)
        refit = None
        if cfg.refit == "ls":
            res = prof.refit(k, groups[k], cfg.refit_input)
            if res.kept:
                write_down_proj(adapter, adapter.decoder_layers(model)[k], res.weight)
            refit = res.record()
        record = MergeRecord(step=step, position=k, group_a=ga, group_b=gb, operator=OPERATORS[cfg.method], kv_a=choice.kv_a,
                             kv_b=choice.kv_b, ffn_a=choice.ffn_a, ffn_b=choice.ffn_b, r_a=choice.r_a, bi_a=sa.bi,
                             bi_b=sb.bi, pair_score=scores[k], pair_scores=scores, params_before=params_before,
                             params_after=count_params(model), refit=refit)
        plan.merges.append(record)
        log.info("merge %d/%d: layers %d+%d (original %s + %s) -> kv %d+%d, ffn %d+%d, r_A=%.3f%s; params %.2fM -> %.2fM",
                 step + 1, n_merges, k, k + 1, _span(ga), _span(gb), len(choice.kv_a), len(choice.kv_b),
                 len(choice.ffn_a), len(choice.ffn_b), choice.r_a, _refit_note(refit), params_before / 1e6,
                 record.params_after / 1e6)
    return model, finish(model, plan, prof, groups, t0)


def _refit_note(refit: dict | None) -> str:
    if refit is None:
        return ""
    if not refit["kept"]:
        return f"; refit vetoed (held-out err {refit['heldout_err_before']:.4f})"
    return f"; refit lam={refit['lam']:g} held-out err {refit['heldout_err_before']:.4f} -> {refit['heldout_err_after']:.4f}"


def _span(group: list[int]) -> str:
    return str(group[0]) if len(group) == 1 else f"{group[0]}-{group[-1]}"
