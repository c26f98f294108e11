#!/usr/bin/env python3
"""How far a merge moves the statistics of the layers after it, by distance from the merge
(what `--reprofile window` relies on), and what the window mode then costs and changes.

    python benchmarks/reprofile_drift.py --model ~/.cache/come/smollm2-135m --sparsity 0.3 \
        --calib /usr/share/common-licenses/GPL-3 --nsamples 16 --seqlen 128

Part 1 runs `--reprofile full` and, after every merge at current layer l, compares each later
layer l + d (d >= 1; the same original layer before and after) as re-profiled now with its
statistics from before the merge: the state entering it (relative Frobenius change), its
unit sensitivities (relative L1 change and Spearman rank correlation of the FFN-channel and
KV-group scores), the units a merge of it with its right neighbour would keep (share that
changes), its pair score with that neighbour (relative change). Then, per window W, on how
many merges the pair the loop picks would differ had the pairs past l + W kept their stale
scores (one step of staleness; part 2 measures the accumulated effect).
Part 2 runs `--reprofile window` for each --windows / --drifts setting and compares it with
the full run: layer-forwards (x one dense pass = the model's layer count), merges with the
same position and the same units, final groups, the drift checks that re-ran everything.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

from come import CompressConfig, compress
from come.engine.cache import ActivationCache, relative_change
from come.models.data import read_text, token_windows
from come.scoring.pair_scoring import choose_units, unit_scores
from come.scoring.selection import choose_pair
from _common import add_model_args, load

SMOL = Path.home() / ".cache" / "come" / "smollm2-135m"


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (x.double().argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _rel_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new.double() - old.double()).abs().sum() / old.double().abs().sum())


def _per_token(new: list[torch.Tensor], old: list[torch.Tensor]) -> float:
    """Mean over tokens of ||new_t - old_t|| / ||old_t|| (Frobenius over all tokens lets a few
    massive-activation tokens dominate)."""
    num = torch.cat([(a.double() - b.double()).norm(dim=-1).flatten() for a, b in zip(new, old)])
    den = torch.cat([b.double().norm(dim=-1).flatten() for b in old])
    return float((num / den).mean())


def _changed(new, old) -> float:
    """Share of the kept FFN channels and KV groups (both sides) that differ."""
    n = len(old.ffn_a) + len(old.ffn_b) + len(old.kv_a) + len(old.kv_b)
    same = sum(len(set(getattr(new, f)) & set(getattr(old, f))) for f in ("ffn_a", "ffn_b", "kv_a", "kv_b"))
    return 1.0 - same / n


class Recorder:
    """Wraps ActivationCache.merged / refresh: the statistics before each merge and after the
    re-profile that follows it, compared by distance (part 1)."""

    def __init__(self, cfg, windows: list[int]):
        self.cfg, self.windows, self.rows, self.picks = cfg, windows, [], {w: [] for w in windows}
        self.snap = None

    def install(self):
        rec, merged, refresh = self, ActivationCache.merged, ActivationCache.refresh

        def merged_(cache, position):
            rec.snap = dict(position=position, stats=list(cache.stats), pairs=cache.pair_scores(),
                            states=dict(cache.states))
            merged(cache, position)

        def refresh_(cache):
            refresh(cache)
            if rec.snap is not None:
                rec.compare(cache)
                rec.snap = None

        ActivationCache.merged, ActivationCache.refresh = merged_, refresh_
        return lambda: (setattr(ActivationCache, "merged", merged), setattr(ActivationCache, "refresh", refresh))

    def compare(self, cache):
        s, p = self.snap, self.snap["position"]
        shape = cache.adapter.attn_shape(cache.model.config)
        layers = cache.adapter.decoder_layers(cache.model)
        weights = {}

        def w(j):
            if j not in weights:
                weights[j] = cache.adapter.read_layer(layers[j]).map(lambda t: t.double())
            return weights[j]

        new_pairs = cache.pair_scores()
        n = len(layers)
        for j in range(p + 1, n):  # current layer j was layer j + 1 before the merge
            old, new = s["stats"][j + 1], cache.stats[j]
            how = (self.cfg.head_score, getattr(self.cfg, "sensitivity", "l1"))
            kv_o, ffn_o = unit_scores(old, w(j), shape, *how)
            kv_n, ffn_n = unit_scores(new, w(j), shape, *how)
            row = {"d": j - p, "ffn_l1": _rel_l1(ffn_n, ffn_o), "kv_l1": _rel_l1(kv_n, kv_o),
                   "ffn_rho": _spearman(ffn_n, ffn_o), "kv_rho": _spearman(kv_n, kv_o),
                   "state": float("nan"), "state_tok": float("nan")}
            if j in cache.states and j + 1 in s["states"]:
                row["state"] = relative_change(cache.states[j], s["states"][j + 1])
                row["state_tok"] = _per_token(cache.states[j], s["states"][j + 1])
            if j + 1 < n:
                c_old = choose_units(w(j), w(j + 1), old, s["stats"][j + 2], shape, self.cfg, 2)
                c_new = choose_units(w(j), w(j + 1), new, cache.stats[j + 1], shape, self.cfg, 2)
                row["units"] = _changed(c_new, c_old)
                row["pair"] = abs(new_pairs[j] - s["pairs"][j + 1]) / abs(s["pairs"][j + 1])
            self.rows.append(row)
        every = [True] * len(new_pairs)
        fresh = choose_pair(new_pairs, every)
        for win in self.windows:  # pairs owned by layers <= p + win (pair i: layers i, i + 1) are fresh
            mixed = [new_pairs[i] if i <= p + win - 1 else s["pairs"][i + 1] for i in range(len(new_pairs))]
            self.picks[win].append(choose_pair(mixed, every) != fresh)


def _mean(xs) -> str:
    xs = [x for x in xs if x == x]
    return f"{statistics.fmean(xs):.4f}" if xs else "-"


def part1(rec: Recorder) -> None:
    print("\n### Part 1: how much a merge at layer l moves layer l + d (mean over merges)\n")
    print("| d | merges | state entering (rel. Frobenius) | (per token) | FFN sens. rel. L1 | FFN Spearman | "
          "KV sens. rel. L1 | KV Spearman | units kept that change (pair l+d, l+d+1) | pair score rel. change |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in sorted({r["d"] for r in rec.rows}):
        rows = [r for r in rec.rows if r["d"] == d]
        print(f"| {d} | {len(rows)} | {_mean(r['state'] for r in rows)} | {_mean(r['state_tok'] for r in rows)} | "
              f"{_mean(r['ffn_l1'] for r in rows)} | "
              f"{_mean(r['ffn_rho'] for r in rows)} | {_mean(r['kv_l1'] for r in rows)} | "
              f"{_mean(r['kv_rho'] for r in rows)} | {_mean(r.get('units', float('nan')) for r in rows)} | "
              f"{_mean(r.get('pair', float('nan')) for r in rows)} |")
    print("\n| window W (layers re-run after the merged one) | merges whose pick would change (one step stale) |")
    print("|---|---|")
    for win, picks in rec.picks.items():
        print(f"| {win} | {sum(picks)} / {len(picks)} |")


def _key(m) -> tuple:
    return m.position, m.kv_a, m.kv_b, m.ffn_a, m.ffn_b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, device=False)  # default --model: SmolLM2-135M's local copy; --quick: toy LLaMA, random tokens
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--calib", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--windows", default="1,2,4,8", help="windows W of part 2 (and of part 1's pick table)")
    ap.add_argument("--drifts", default="0.05", help="drift thresholds of part 2 (each with every window)")
    ap.add_argument("--no-part2", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.nsamples, a.seqlen, a.windows = 8, 64, "1,2"
    elif not (a.model or a.random_llama_1b):
        a.model = str(SMOL)
    dense, name = load(a)
    dense.float()
    n_layers = dense.config.num_hidden_layers
    if a.model and not a.quick:
        from transformers import AutoTokenizer

        calib = token_windows(read_text(a.calib), AutoTokenizer.from_pretrained(a.model), a.nsamples, a.seqlen, seed=0)
        source = Path(a.calib).name
    else:
        gen = torch.Generator().manual_seed(0)
        calib, source = torch.randint(0, dense.config.vocab_size, (a.nsamples, a.seqlen), generator=gen), "random ids"
    tok = None
    base = CompressConfig(sparsity=a.sparsity, device="cpu", nsamples=a.nsamples, seqlen=a.seqlen)
    windows = [int(x) for x in a.windows.split(",")]
    rec = Recorder(base.resolved(), windows)
    restore = rec.install()
    try:
        _, full = compress(copy.deepcopy(dense), tok, base, calib=calib)
    finally:
        restore()
    print(f"\n{name}: {n_layers} layers, sparsity {a.sparsity}, calibration {a.nsamples} x {a.seqlen} "
          f"tokens of {source}; {len(full.merges)} merges, full re-profiling: {full.layer_forwards} "
          f"layer-forwards = {full.layer_forwards / n_layers:.2f} dense passes")
    part1(rec)
    if a.no_part2:
        return 0
    print("\n### Part 2: --reprofile window against full, end to end\n")
    print("| run | layer-forwards | x one dense pass | merges as full (position + units) | same groups | "
          "drift checks (re-ran all) | drift at exits (median, max) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| full | {full.layer_forwards} | {full.layer_forwards / n_layers:.2f} | - | - | - | - |")
    caches = []
    orig_init = ActivationCache.__init__

    def init(cache, *args, **kw):
        orig_init(cache, *args, **kw)
        caches.append(cache)

    ActivationCache.__init__ = init
    try:
        for drift in [float(x) for x in a.drifts.split(",")]:
            for win in windows:
                cfg = CompressConfig(sparsity=a.sparsity, device="cpu", nsamples=a.nsamples, seqlen=a.seqlen,
                                     reprofile="window", reprofile_window=win, reprofile_drift=drift)
                _, plan = compress(copy.deepcopy(dense), tok, cfg, calib=calib)
                same = sum(_key(m) == _key(f) for m, f in zip(plan.merges, full.merges))
                checks = caches[-1].drifts
                values = sorted(d for _, _, d, _ in checks)
                spread = f"{statistics.median(values):.4f}, {values[-1]:.4f}" if values else "-"
                print(f"| window W={win}, drift {drift:g} | {plan.layer_forwards} | {plan.layer_forwards / n_layers:.2f} "
                      f"| {same} / {len(full.merges)} | {plan.groups == full.groups} | {len(checks)} "
                      f"({sum(r for *_, r in checks)}) | {spread} |")
    finally:
        ActivationCache.__init__ = orig_init
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
