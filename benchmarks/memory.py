#!/usr/bin/env python3
"""Peak host RSS and peak GPU memory of `come compress`, each configuration in a FRESH process
(so one run's high-water mark cannot leak into the next), next to a first-principles
prediction of what the pipeline holds at its peak.

    python benchmarks/memory.py --model ~/.cache/come/smollm2-135m --nsamples 16 --seqlen 256
    python benchmarks/memory.py --random-llama-1b --device cuda --nsamples 128 --seqlen 2048 --json mem.json
    python benchmarks/memory.py --quick

Targets (issue): peak RSS <= 1.5x the model's bytes; peak GPU <= 2 layers' weights + one
calibration batch's activations. The model-loading options are shared with distill_speed.py.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from come import CompressConfig, compress
from come.engine.cache import cache_layout
from _common import GPU_FORMULA, REFIT_COLLECT, REFIT_SOLVE, add_model_args, gpu_prediction, load, model_shape

ROWS = {"come (+ refit)": {}, "come --refit none": {"refit": "none"}, "shortgpt": {"method": "shortgpt"}}
MERGE_LAYERS = 3  # float64 copies of layers in a come merge: the pair (_read_pair) and the merged layer


def _peak_rss() -> int:
    """The process's high-water RSS in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _runtime_baseline(a: argparse.Namespace) -> int:
    """RSS of the runtime alone: the interpreter, torch, transformers and the model's modeling
    code (imported by building its structure on the 'meta' device, no weights: 130 MiB for
    LLaMA in transformers 5), and on CUDA the context's host memory."""
    from come.models.checkpoint import load_config, meta_model

    if a.quick or a.random_llama_1b:
        with torch.device("meta"):
            load(a)
    else:
        meta_model(load_config(a.model))
    if a.device == "cuda":
        torch.zeros(1, device="cuda")
    return psutil.Process().memory_info().rss


def child(a: argparse.Namespace) -> dict:
    """Load, compress with row `a.child`, and report the measurements and the model's shape."""
    base_rss = _runtime_baseline(a)
    model, name = load(a)
    load_rss, load_peak = psutil.Process().memory_info().rss, _peak_rss()
    report = {
        "run": a.child, "model": name, "device": a.device, "nsamples": a.nsamples, "seqlen": a.seqlen,
        "batch_size": a.batch_size, "base_rss": base_rss, "load_rss": load_rss, "load_peak_rss": load_peak,
        **model_shape(model),
    }
    calib = torch.randint(0, model.config.vocab_size, (a.nsamples, a.seqlen),
                          generator=torch.Generator().manual_seed(0))
    ccfg = CompressConfig(sparsity=a.sparsity, device=a.device, batch_size=a.batch_size, max_cache_gb=a.max_cache_gb,
                          **ROWS[a.child])
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _, plan = compress(model, None, ccfg, calib=calib)
    report.update(
        seconds=time.perf_counter() - t0, peak_rss=_peak_rss(),
        gpu_peak=torch.cuda.max_memory_allocated() if a.device == "cuda" else None,
        # the settings the run resolved (refit=None means the method's default)
        method=plan.settings["method"], refit=plan.settings["refit"], max_cache_gb=plan.settings["max_cache_gb"],
        layers_after=plan.num_layers_after,
        merge_positions=[m.position for m in plan.merges])
    return report


def cache_bytes(n_layers: int, stride: int, merges: list[int], per: int, shared: int) -> tuple[int, int]:
    """(peak bytes of the state cache, boundaries held then) in the ActivationCache.

    It caches the current model's layer inputs every `stride` boundaries, `per` bytes each
    (preparation.prepare), and, with the refit, the dense model's state at EVERY boundary for
    the first calibration batches only, `shared` bytes each (activation_cache.refit_batches). The
    first pass's boundaries hold the same tensors for those batches; a merge at position p
    makes the layers after p be re-profiled into new tensors. `merges`: each merge's
    position; no re-profile follows the last one."""
    n, held = n_layers, [j % stride == 0 for j in range(n_layers + 1)]
    fresh = [False] * (n_layers + 1)

    def size() -> tuple[int, int]:
        return (sum(per if f else per - shared for h, f in zip(held, fresh) if h) + (n_layers + 1) * shared,
                sum(held))

    peak = size()
    for p in merges[:-1]:
        n -= 1
        held = held[:p + 1] + [j % stride == 0 for j in range(p + 1, n + 1)]
        fresh = fresh[:p + 1] + [True] * (n - p)
        peak = max(peak, size())
    return peak


def host_prediction(r: dict) -> dict[str, int]:
    """Bytes the process should hold at its peak, by part: the runtime (measured before
    loading), the model, the calibration state cache, and the float64 workspaces of a come
    merge and (on the CPU) of the refit."""
    n, per = r["n_layers"], r["nsamples"] * r["seqlen"] * r["hidden"] * r["elem_bytes"]
    n_batches = math.ceil(r["nsamples"] / r["batch_size"])
    batch = r["batch_size"] * r["seqlen"] * r["hidden"] * r["elem_bytes"]
    dense, stride = cache_layout(n, n_batches, batch, r["max_cache_gb"], r["refit"] == "ls")  # as prepare() picks
    cache, bounds = cache_bytes(n, stride, r["merge_positions"], per, min(dense * batch, per))
    parts = {"runtime": r["base_rss"], "model": r["model_bytes"], "cache": cache,
             "refit": REFIT_SOLVE * r["d_ff"] ** 2 * (dense > 0 and r["device"] == "cpu"),
             "merge": MERGE_LAYERS * r["layer_params"] * 8 * (r["method"] == "come")}
    return {**parts, "total": sum(parts.values()), "boundaries": bounds, "stride": stride, "dense_batches": dense}


def _mib(x: float) -> str:
    return f"{x / 2**20:,.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4, help="calibration samples per layer pass (GPU batch)")
    ap.add_argument("--max-cache-gb", type=float, default=CompressConfig.max_cache_gb,
                    help="come compress --max-cache-gb: the state-cache budget (trades re-runs for memory)")
    ap.add_argument("--json", help="write the rows (measurements and predictions) here")
    ap.add_argument("--child", choices=list(ROWS), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.nsamples, a.seqlen = 8, 64
        torch.set_num_threads(1)  # tiny matmuls: on a loaded CPU, spinning intra-op threads only slow them
    if a.child:
        print(json.dumps(child(a)))
        return 0
    rows = []
    for run in ROWS:  # stderr (progress) passes through; stdout carries the child's report
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", run], stdout=subprocess.PIPE,
                             text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["host_pred"], r["gpu_pred"] = host_prediction(r), gpu_prediction(r)
        rows.append(r)

    r0 = rows[0]
    print(f"\n{r0['model']}: {r0['n_layers']} layers, {_mib(r0['model_bytes'])} MiB of weights, "
          f"sparsity {a.sparsity}, calibration {a.nsamples} x {a.seqlen} tokens, batch {a.batch_size}, "
          f"device {a.device}; each row a fresh process (runtime alone: {_mib(r0['base_rss'])} MiB RSS). "
          "MiB throughout.\n")
    print("| run | RSS after load | peak RSS | predicted peak RSS | peak / predicted "
          "| peak RSS / model (target <= 1.5) | peak GPU | predicted GPU | GPU / predicted "
          "| GPU / (2 layers + act.) (target <= 1) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        hp, gp, g = r["host_pred"], r["gpu_pred"], r["gpu_peak"]
        gpu = (f"{_mib(g)} | {_mib(gp['total'])} | {g / gp['total']:.2f} | {g / gp['target']:.2f}" if g is not None
               else "n/a | n/a | n/a | n/a")
        print(f"| {r['run']} | {_mib(r['load_rss'])} | {_mib(r['peak_rss'])} | {_mib(hp['total'])} | "
              f"{r['peak_rss'] / hp['total']:.2f} | {r['peak_rss'] / r['model_bytes']:.2f} | {gpu} |")
    print("\nPredicted peak RSS = runtime (measured: interpreter, torch, transformers, modeling code) + model + "
          "state cache + refit workspace (CPU only) + merge workspace. The cache: the current model's layer inputs every "
          "`stride` boundaries (nsamples x seqlen x hidden x element bytes each) and, with the refit, the dense state "
          "at all n_layers + 1 boundaries for the first D calibration batches (at most half of --max-cache-gb; shared "
          "with the first pass's inputs until merges make re-profiled copies); the refit "
          f"workspace {REFIT_SOLVE // 8} x d_ff^2 float64; the merge workspace {MERGE_LAYERS} layers in float64:")
    for r in rows:
        hp = r["host_pred"]
        print(f"- {r['run']}: {_mib(hp['runtime'])} + {_mib(hp['model'])} + {_mib(hp['cache'])} ({hp['boundaries']} "
              f"layer inputs, stride {hp['stride']}, D = {hp['dense_batches']}) + {_mib(hp['refit'])} + "
              f"{_mib(hp['merge'])}; peak during load alone {_mib(r['load_peak_rss'])}; {r['seconds']:.0f} s, "
              f"{r['n_layers']} -> {r['layers_after']} layers")
    if a.device == "cuda":
        print(f"\nPredicted GPU = the largest phase: embedding pass (embedding weights + a batch's hidden states), "
              f"layer pass (2 layers + activations, {GPU_FORMULA}; with the refit + {REFIT_COLLECT} x d_ff^2 B of "
              f"accumulators) or refit solve ({REFIT_SOLVE} x d_ff^2 B):")
        for r in rows:
            print(f"- {r['run']}: " + ", ".join(f"{k} {_mib(v)}" for k, v in r["gpu_pred"].items() if k != "total"))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
