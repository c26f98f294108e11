#!/usr/bin/env python3
"""Which step of `come compress` holds its peak GPU memory (the question gpu.sh's "peak GPU
memory / predicted" row raises). Every function and method of the `come` package is wrapped
so that, when it returns, the peak allocated since the previous return is recorded under its
name and the peak counter is reset: the peak lands on the innermost function that was
running when it happened. Prints the top phases and the calls around the overall peak.

    PYTHONPATH=src python benchmarks/gpu_peak_phase.py            # LLaMA-2-7B shape, bf16, 16 x 2048, GPU
    PYTHONPATH=src python benchmarks/gpu_peak_phase.py --quick    # tiny shape on the CPU: the code path only

On the CPU there is no allocator counter, so --quick's memory columns are 0 and only the
phases and their call counts mean anything.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import pkgutil
import sys
import time
import types
from collections import Counter

import torch

import come
from come import CompressConfig, compress
from _common import LLAMA2_7B, TINY_GQA, model_shape, random_llama

GIB = 2**30


def instrument(events: list, cuda: bool) -> None:
    """Wrap every come function and method (dunder methods excepted) to append
    (name, allocated before, peak since the last return, allocated after) on return."""
    allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
    peak = torch.cuda.max_memory_allocated if cuda else (lambda: 0)
    reset = torch.cuda.reset_peak_memory_stats if cuda else (lambda: None)

    def wrap(name, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            before = allocated()
            out = fn(*args, **kwargs)
            events.append((name, before / GIB, peak() / GIB, allocated() / GIB))
            reset()
            return out
        return wrapped

    mods = [importlib.import_module(m.name) for m in pkgutil.walk_packages(come.__path__, "come.")]
    wrapped_fns = {}
    for mod in mods:
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, types.FunctionType) and obj.__module__ == mod.__name__ and not name.startswith("__"):
                wrapped_fns[obj] = wrap(f"{mod.__name__[5:]}.{name}", obj)
            elif isinstance(obj, type) and obj.__module__ == mod.__name__:
                for attr, fn in list(vars(obj).items()):
                    if isinstance(fn, types.FunctionType) and not attr.startswith("__"):
                        setattr(obj, attr, wrap(f"{name}.{attr}", fn))
    # every module that imported a function by name gets the wrapped one too
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("come"):
            for name, obj in list(vars(mod).items()):
                if isinstance(obj, types.FunctionType) and obj in wrapped_fns:
                    setattr(mod, name, wrapped_fns[obj])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shape on the CPU (the code path; no memory figures)")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--top", type=int, default=8)
    a = ap.parse_args()
    cuda = not a.quick
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU (--quick runs its code on the CPU)")
    shape, dtype, device, (n, s) = (TINY_GQA, torch.float32, "cpu", (8, 64)) if a.quick else \
        (LLAMA2_7B, torch.bfloat16, "cuda", (16, 2048))
    events: list = []
    instrument(events, cuda)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = random_llama(shape, dtype, device).to("cpu")  # compress keeps the model on the host
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    calib = torch.randint(0, shape["vocab_size"], (n, s), generator=torch.Generator().manual_seed(0))
    compress(model, None, CompressConfig(sparsity=a.sparsity, device=device, batch_size=4), calib=calib)
    layer = model_shape(model)["layer_bytes"] / GIB
    print(f"\n{time.perf_counter() - t0:.0f} s, {len(events)} calls; one layer = {layer:.4f} GiB\n")
    print("| phase | allocated before (GiB) | peak since the last return (GiB) | allocated after (GiB) |")
    print("|---|---|---|---|")
    best = {}
    for e in events:  # each phase's highest peak
        if e[0] not in best or e[2] > best[e[0]][2]:
            best[e[0]] = e
    for e in sorted(best.values(), key=lambda e: -e[2])[: a.top]:
        print(f"| {e[0]} | {e[1]:.3f} | {e[2]:.3f} | {e[3]:.3f} |")
    i = max(range(len(events)), key=lambda j: events[j][2])
    print("\ncalls around the overall peak: " + "; ".join(
        f"{e[0]} ({e[1]:.3f} -> {e[2]:.3f} -> {e[3]:.3f})" for e in events[max(0, i - 3): i + 3]))
    print("calls: " + ", ".join(f"{k} {v}" for k, v in Counter(e[0] for e in events).most_common(6)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
