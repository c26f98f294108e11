#!/usr/bin/env python3
"""Where `come compress` spends its GPU time and holds its peak memory (the questions gpu.sh's
"compress / one dense pass" and "peak GPU memory / predicted" rows raise). Every function and
method of the `come` package is wrapped, and so are the copies between host and device
(Tensor.to / .cpu / .cuda and Module.to that change a device). Each wrapped call records:

- time: the device is synchronised when a call starts and returns, and a call's own seconds
  are its wall time less that of the wrapped calls inside it, so the phases add up to the run
  (the copies are one phase, "host<->device copies"; a layer's forward is in the runner's
  method that ran it, its statistics hooks in the functions they call). The syncs cost what
  overlap of host and device the run had: compare the total with an unwrapped compress;
- memory: when it returns, the peak allocated since the previous return, the peak counter then
  reset, so the peak lands on the innermost function that was running when it happened.

Prints the phases by own time and by peak, and the calls around the overall peak; --json
writes them.

    PYTHONPATH=src python benchmarks/gpu_peak_phase.py            # LLaMA-2-7B shape, bf16, 16 x 2048, GPU
    PYTHONPATH=src python benchmarks/gpu_peak_phase.py --quick    # tiny shape on the CPU: the code path only

On the CPU there is no allocator counter, so --quick's memory columns are 0 and only the
phases, their seconds and call counts mean anything.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import pkgutil
import sys
import time
import types
from collections import Counter
from pathlib import Path

import torch
from torch import nn

import come
from come import CompressConfig
from _common import LLAMA2_7B, TINY_GQA, model_shape, random_llama, sync

GIB = 2**30
COPIES = "host<->device copies"


class Tracer:
    """The wrapping, and what the wrapped calls recorded: per name, calls and own seconds; per
    return, (name, allocated before, peak since the last return, allocated after)."""

    def __init__(self, cuda: bool) -> None:
        self.device = "cuda" if cuda else "cpu"
        self.allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
        self.peak = torch.cuda.max_memory_allocated if cuda else (lambda: 0)
        self.reset = torch.cuda.reset_peak_memory_stats if cuda else (lambda: None)
        self.own, self.calls, self.events = Counter(), Counter(), []
        self.inner: list[float] = []  # per open wrapped call: the seconds of the wrapped calls inside it

    def timed(self, fn, args, kwargs):
        """(fn's result, its wall seconds, theirs of the wrapped calls inside it)."""
        sync(self.device)
        t0 = time.perf_counter()
        self.inner.append(0.0)
        try:
            out = fn(*args, **kwargs)
        finally:
            sync(self.device)
            inner = self.inner.pop()
        return out, time.perf_counter() - t0, inner

    def count(self, name: str, spent: float, inner: float) -> None:
        self.own[name] += spent - inner
        self.calls[name] += 1
        if self.inner:
            self.inner[-1] += spent

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            before = self.allocated()
            out, spent, inner = self.timed(fn, args, kwargs)
            self.count(name, spent, inner)
            self.events.append((name, before / GIB, self.peak() / GIB, self.allocated() / GIB))
            self.reset()
            return out
        return wrapped

    def wrap_copy(self, fn, where):
        """`fn` (a copy method) timed as a copy when `where` of its object changes; else its
        seconds stay with the caller's."""
        @functools.wraps(fn)
        def wrapped(obj, *args, **kwargs):
            before = where(obj)
            out, spent, inner = self.timed(fn, (obj, *args), kwargs)
            if where(out) != before:
                self.count(COPIES, spent, inner)
            return out
        return wrapped

    def install(self) -> None:
        """Wrap every come function and method (dunder methods excepted) of the modules this
        machine can import, in its module and in every module that imported it by name, and the
        copy methods of Tensor and Module."""
        wrapped_fns = {}
        mods = []
        for m in pkgutil.walk_packages(come.__path__, "come."):
            try:
                mods.append(importlib.import_module(m.name))
            except ImportError:  # needs a package this machine lacks (the CLI's typer): compress calls none of them
                pass
        for mod in mods:
            for name, obj in list(vars(mod).items()):
                if isinstance(obj, types.FunctionType) and obj.__module__ == mod.__name__ and not name.startswith("__"):
                    wrapped_fns[obj] = self.wrap(f"{mod.__name__[5:]}.{name}", obj)
                elif isinstance(obj, type) and obj.__module__ == mod.__name__:
                    for attr, fn in list(vars(obj).items()):
                        if isinstance(fn, types.FunctionType) and not attr.startswith("__"):
                            setattr(obj, attr, self.wrap(f"{name}.{attr}", fn))
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("come"):
                for name, obj in list(vars(mod).items()):
                    if isinstance(obj, types.FunctionType) and obj in wrapped_fns:
                        setattr(mod, name, wrapped_fns[obj])
        for attr in ("to", "cpu", "cuda"):
            setattr(torch.Tensor, attr, self.wrap_copy(getattr(torch.Tensor, attr), _tensor_device))
        nn.Module.to = self.wrap_copy(nn.Module.to, _module_device)

    def tables(self, top: int) -> dict:
        """The top phases by own seconds and by peak memory, and the calls around the overall peak."""
        best = {}
        for e in self.events:  # each phase's highest peak
            if e[0] not in best or e[2] > best[e[0]][2]:
                best[e[0]] = e
        i = max(range(len(self.events)), key=lambda j: self.events[j][2])
        return {"total_s": sum(self.own.values()), "calls": sum(self.calls.values()),
                "time": [{"phase": k, "own_s": v, "calls": self.calls[k], "peak_gib": best.get(k, (0, 0, 0))[2]}
                         for k, v in self.own.most_common(top)],
                "peak": [dict(zip(("phase", "before_gib", "peak_gib", "after_gib"), e))
                         for e in sorted(best.values(), key=lambda e: -e[2])[:top]],
                "around_peak": [dict(zip(("phase", "before_gib", "peak_gib", "after_gib"), e))
                                for e in self.events[max(0, i - 3): i + 3]]}


def _tensor_device(t):
    return t.device if isinstance(t, torch.Tensor) else None


def _module_device(m: nn.Module):
    return next((p.device for p in m.parameters()), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shape on the CPU (the code path; no memory figures)")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--json", help="where the tables go")
    a = ap.parse_args()
    cuda = not a.quick
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU (--quick runs its code on the CPU)")
    shape, dtype, device, (n, s) = (TINY_GQA, torch.float32, "cpu", (8, 64)) if a.quick else \
        (LLAMA2_7B, torch.bfloat16, "cuda", (16, 2048))
    torch.manual_seed(0)
    model = random_llama(shape, dtype, device).to("cpu")  # compress keeps the model on the host
    tracer = Tracer(cuda)
    tracer.install()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    calib = torch.randint(0, shape["vocab_size"], (n, s), generator=torch.Generator().manual_seed(0))
    compress = importlib.import_module("come.engine.compression").compress  # wrapped: every second is in a phase
    t0 = time.perf_counter()
    compress(model, None, CompressConfig(sparsity=a.sparsity, device=device, batch_size=4), calib=calib)
    wall = time.perf_counter() - t0
    t = tracer.tables(a.top)
    layer = model_shape(model)["layer_bytes"] / GIB
    print(f"\n{wall:.1f} s ({t['total_s']:.1f} s in come's functions), {t['calls']} calls; "
          f"one layer = {layer:.4f} GiB\n")
    print("| phase | own seconds | share | calls | peak (GiB) |\n|---|---|---|---|---|")
    for r in t["time"]:
        share = r["own_s"] / t["total_s"]
        print(f"| {r['phase']} | {r['own_s']:.3f} | {share:.1%} | {r['calls']} | {r['peak_gib']:.3f} |")
    print("\n| phase | allocated before (GiB) | peak since the last return (GiB) | allocated after (GiB) |")
    print("|---|---|---|---|")
    for r in t["peak"]:
        print(f"| {r['phase']} | {r['before_gib']:.3f} | {r['peak_gib']:.3f} | {r['after_gib']:.3f} |")
    print("\ncalls around the overall peak: " + "; ".join(
        f"{e['phase']} ({e['before_gib']:.3f} -> {e['peak_gib']:.3f} -> {e['after_gib']:.3f})"
        for e in t["around_peak"]))
    print("calls: " + ", ".join(f"{k} {v}" for k, v in tracer.calls.most_common(6)))
    if a.json:
        report = {"wall_s": wall, "shape": shape, "calibration": [n, s], **t}
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
