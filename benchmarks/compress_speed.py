#!/usr/bin/env python3
"""Time and layer-forwards of `come compress` vs (a) ONE dense calibration forward pass over
the same samples (the floor) and (b) the naive progressive loop that re-profiles the whole
model after every merge (same code with the activation cache disabled). All in one run.

    python benchmarks/compress_speed.py --model ~/.cache/come/smollm2-135m --sparsity 0.3
    python benchmarks/compress_speed.py --random-llama-1b --nsamples 8 --seqlen 256

`--reprofile full,window` picks the re-profiling modes timed, each with and without the
refit (window, today's default, re-runs W = `--window` layers after each merge and the rest
only when the state leaving them drifted by `--drift`); each is printed against one dense
pass and against the naive loop.

The refit's cost is reported twice: its own steps timed inside the run (robust to a noisy
machine) and the end-to-end difference between the rows with and without it.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from come import CompressConfig, compress
from _common import add_model_args, load


def _spread(times: list[float]) -> str:
    """' (all: a, b)' when a row was repeated, so the noise is on the page."""
    return f" (all: {', '.join(f'{t:.1f}' for t in times)})" if len(times) > 1 else ""


def _comma_list(*allowed: str):
    """A comma-list argument type, checked here so a typo is one argparse line, not a KeyError."""
    def parse(value: str) -> list[str]:
        items = value.split(",")
        if any(m not in allowed for m in items):
            raise argparse.ArgumentTypeError(f"a comma list of {' and '.join(allowed)} (got {value!r})")
        return items
    return parse


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, device=False)  # the rows run on the CPU
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--no-naive", action="store_true", help="skip the naive re-profile row (the slowest)")
    ap.add_argument("--reprofile", type=_comma_list("full", "window"), default=["full", "window"],
                    help="comma list of re-profiling modes to time, each with and without the refit "
                         "(window is today's default)")
    ap.add_argument("--refit", type=_comma_list("none", "ls"), default=["none", "ls"],
                    help="comma list of the refits each mode is timed with (ls: today's default; "
                         "only ls skips the slow no-refit rows)")
    ap.add_argument("--window", type=int, default=CompressConfig().reprofile_window,
                    help="--reprofile-window of the window rows")
    ap.add_argument("--drift", type=float, default=CompressConfig().reprofile_drift,
                    help="--reprofile-drift of the window rows")
    ap.add_argument("--repeats", type=int, default=1, help="run every row N times, interleaved; report the fastest")
    a = ap.parse_args()
    if a.quick:
        a.nsamples, a.seqlen = 8, 64
    model, name = load(a)
    vocab = model.config.vocab_size
    calib = torch.randint(0, vocab, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    n_layers = model.config.num_hidden_layers

    def dense_pass() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for batch in calib.split(4):
                model.model(input_ids=batch, use_cache=False)
        return time.perf_counter() - t0

    # one (no refit, + refit) pair of rows per re-profiling mode; "window" is today's default
    modes = {"full": {"reprofile": "full"},
             "window": {"reprofile": "window", "reprofile_window": a.window, "reprofile_drift": a.drift}}
    names = {"full": "come full re-profile", "window": f"come window W={a.window} drift {a.drift:g}"}
    refits = {"none": ("no refit", {"refit": "none"}), "ls": ("+ refit", {"refit": "ls"})}

    def row_label(mode: str, refit: str) -> str:
        return f"{names[mode]} ({refits[refit][0]})"

    runs = [(row_label(m, r), {**refits[r][1], **modes[m]}) for m in a.reprofile for r in a.refit]
    pairs = {m: (row_label(m, "none"), row_label(m, "ls")) for m in a.reprofile}
    naive = "naive re-profile (no refit)"
    if not a.no_naive:
        runs.append((naive, {"refit": "none", "reprofile": "full", "max_cache_gb": 1e-12}))
    # repeats interleave (floor, run 1, run 2, ...) so that a slow spell of a shared machine
    # hits every row alike; each row reports its fastest repeat, the usual benchmark estimate
    floors, times = [], {label: [] for label, _ in runs}
    plans = {}
    for _ in range(a.repeats):
        floors.append(dense_pass())
        for label, extra in runs:
            cfg = CompressConfig(sparsity=a.sparsity, device="cpu", batch_size=4, **extra)
            fresh = copy.deepcopy(model)  # outside the timer: seconds for a 1B model
            t0 = time.perf_counter()
            _, plan = compress(fresh, None, cfg, calib=calib)
            times[label].append(time.perf_counter() - t0)
            if times[label][-1] == min(times[label]):
                plans[label] = plan  # the fastest repeat's Plan: its in-run refit timings
    floor = min(floors)
    print(f"\n{name}: {n_layers} layers, {a.nsamples} x {a.seqlen} calibration tokens, sparsity {a.sparsity}; "
          f"floor = one dense forward over the samples = {floor:.1f}s ({n_layers} layer-forwards)"
          f"{_spread(floors)}\n")
    print("| run | time (s) | x floor | layer-forwards | layers after |")
    print("|---|---|---|---|---|")
    for label, _ in runs:
        secs, plan = min(times[label]), plans[label]
        print(f"| {label} | {secs:.1f}{_spread(times[label])} | {secs / floor:.2f} | {plan.layer_forwards} | "
              f"{plan.num_layers_after} |")
    print()
    for m, (plain, fitted) in pairs.items():
        if fitted in plans:
            steps = [s.refit for s in plans[fitted].merges if s.refit]
            own, solves = sum(r["seconds"] for r in steps), sum(r["solve_seconds"] for r in steps)
            print(f"{m}: the refit's own steps, timed inside the fastest + refit run ({len(steps)} refits: inputs, one "
                  f"layer pass with the Gram accumulation, the solves): {own:.1f}s = {own / floor:.2f} calibration "
                  f"passes (ridge solves {solves:.1f}s = {solves / floor:.2f})")
        if fitted in plans and plain in plans:
            extra = min(times[fitted]) - min(times[plain])
            print(f"{m}: end to end (fastest repeats) the refit adds {extra / min(times[plain]):+.0%} = "
                  f"{extra / floor:.2f} passes (this also holds any difference in merge path: "
                  f"{plans[fitted].layer_forwards} vs {plans[plain].layer_forwards} layer-forwards)")
        if not a.no_naive and plain in plans:
            f = plans[plain].layer_forwards
            print(f"{m} vs naive (no refit): {min(times[naive]) / min(times[plain]):.2f}x faster; "
                  f"{plans[naive].layer_forwards / f:.2f}x fewer layer-forwards ({f} vs {plans[naive].layer_forwards})")
    if set(pairs) == {"full", "window"}:
        for r in a.refit:
            full, window = row_label("full", r), row_label("window", r)
            print(f"{window}: same groups as full: {plans[window].groups == plans[full].groups}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
