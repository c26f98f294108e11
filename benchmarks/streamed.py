#!/usr/bin/env python3
"""Bigger than the machine (issue 40): compress a model under a hard memory cap below its size.

`come compress` loads a checkpoint in its own dtype (`--dtype auto`), and transformers then maps
the safetensors files instead of reading them (copy on write: the file is never written); a
layer's pages come in when it runs and, being clean file pages, the kernel drops them again
under pressure. What the run itself allocates (calibration caches within --max-cache-gb, one
merge's float64 merged layer, the refit's statistics) is what must fit; the output is written
shard by shard from those mapped pages. This script measures that:

    make   a random-weight model of a given shape written to disk in bf16, layer by layer
           (never whole in memory), with the tokenizer of --tokenizer or, without one, a
           word-level tokenizer of --vocab entries built here (_common.word_tokenizer);
    run    what `come compress` does (come.compress_to, `--dtype auto`: the CLI's typer is not
           needed) on it in a child process, inside a cgroup-v1 memory cap with --cap-gb (page
           cache counts against it, so the kernel must evict), then one dense pass over the same
           calibration through the same layer-at-a-time pipeline (_common.dense_pass), and the
           output reloaded with a forward on a few tokens; each child alone, under the same cap.
           Prints and writes JSON (rewritten after each child): peak anonymous memory (sampled),
           peak RSS, the cgroup's peak, wall time, wall / one dense pass, the memory plan's host and
           device predictions, and with --device cuda the peak GPU memory.

    python benchmarks/streamed.py make --out /work/big7b --shape llama2-7b --tokenizer ~/.cache/come/smollm2-135m
    python benchmarks/streamed.py run --model /work/big7b --cap-gb 6.5 --sparsity 0.3 --nsamples 4 --seqlen 128 \\
        --json benchmarks/results/streamed/llama2-7b.json -- refit=none
    python benchmarks/streamed.py make --out /tmp/s --shape small ... ; ... run --model /tmp/s --cap-gb 0.9  # minutes
    python benchmarks/streamed.py make --out D/m --shape llama2-13b --vocab 32000 --device cuda  # gpu.py's row:
    python benchmarks/streamed.py run --model D/m --device cuda --calib TEXT ...                  # no cap

A cap needs root (or a writable /sys/fs/cgroup/memory); without it `run --cap-gb` refuses in one line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup/memory")
RESULT = "STREAMED_RESULT "  # a child's last line: this, then its measurements as JSON


def make(a: argparse.Namespace) -> None:
    """The random model at --out: `_common.write_random_checkpoint` of --shape."""
    import transformers
    from _common import DISK_SHAPES, word_tokenizer, write_random_checkpoint

    if a.shape not in DISK_SHAPES:
        raise SystemExit(f"--shape must be one of {', '.join(DISK_SHAPES)}, got {a.shape!r}")
    out = Path(a.out)
    if out.exists():
        raise SystemExit(f"{out} exists: give a new --out")
    tok = transformers.AutoTokenizer.from_pretrained(a.tokenizer) if a.tokenizer else word_tokenizer(a.vocab)
    write_random_checkpoint(out, DISK_SHAPES[a.shape], tok, a.device)


class Capped:
    """A cgroup-v1 memory group with a hard limit, for one child process at a time."""

    def __init__(self, cap_bytes: int) -> None:
        if not os.access(CGROUP, os.W_OK):
            raise SystemExit(f"no writable {CGROUP}: run as root on a cgroup-v1 host (the cap needs it)")
        self.path = CGROUP / f"come-streamed-{os.getpid()}"
        self.path.mkdir(exist_ok=True)
        (self.path / "memory.limit_in_bytes").write_text(str(cap_bytes))
        self.cap = cap_bytes

    def enter(self, argv: list[str]) -> list[str]:
        """`argv` started inside the group, its peak reset and the clean page cache dropped (the
        model's pages, cached by whoever read or wrote them last, are charged to that group;
        read afresh by the child, they count against its cap)."""
        (self.path / "memory.max_usage_in_bytes").write_text("0")
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]

    def peaks(self) -> dict:
        """The group's peak usage (page cache included) and its OOM kills since `enter`."""
        m = re.search(r"oom_kill (\d+)", (self.path / "memory.oom_control").read_text())
        return {"cgroup_peak_gb": int((self.path / "memory.max_usage_in_bytes").read_text()) / 1e9,
                "oom_kills": int(m.group(1)) if m else 0}

    def close(self) -> None:
        self.path.rmdir()


def measure(argv: list[str], log: Path, group: Capped | None) -> dict:
    """Run `argv` (inside `group` if given), its output to `log`: wall time, exit code, sampled
    peak anonymous and resident memory (VmHWM; None where /proc does not say), the group's
    peaks, and what the child reported (its RESULT line)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(group.enter(argv) if group else argv, stdout=out, stderr=subprocess.STDOUT)
        peak = {"anon": None, "hwm": None}
        sampler = threading.Thread(target=_sample, args=(child, peak), daemon=True)
        sampler.start()
        rc = child.wait()
        sampler.join()
    lines = [line for line in log.read_text().splitlines() if line.startswith(RESULT)]
    return {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1),
            "peak_anon_gb": None if peak["anon"] is None else peak["anon"] / 1e9,
            "peak_rss_gb": None if peak["hwm"] is None else peak["hwm"] / 1e9,
            **(group.peaks() if group else {}), "result": json.loads(lines[-1][len(RESULT):]) if lines else None}


def _sample(child: subprocess.Popen, peak: dict) -> None:
    """Peak RssAnon and VmHWM of the child (and its own children: none here), every 0.1 s."""
    while child.poll() is None:
        try:
            status = Path(f"/proc/{child.pid}/status").read_text()
        except OSError:
            break
        for key, field in (("anon", "RssAnon"), ("hwm", "VmHWM")):
            m = re.search(field + r":\s+(\d+) kB", status)
            if m:
                peak[key] = max(peak[key] or 0, int(m.group(1)) * 1024)
        time.sleep(0.1)


def child(kind: str, spec: dict) -> None:
    """One measured step in this process, as `come compress` would run it (the OpenMP wait
    policy set before torch loads); prints RESULT and its numbers."""
    from come.settings.threads import choose_wait_policy

    choose_wait_policy()
    import logging
    import resource

    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    cuda = spec["device"] == "cuda"
    out = {"compress": _compress, "dense": _dense, "reload": _reload}[kind](spec)
    out["maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    out["device_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    print(RESULT + json.dumps(out), flush=True)


def _compress(spec: dict) -> dict:
    """come.compress_to (what `come compress` calls), the memory plan it logs kept: its host
    peak, and the device peak it predicts for CUDA (computed on a CPU too)."""
    from come import CompressConfig, compress_to
    from come.engine import memory_plan
    from come.settings.options import override

    plans = []
    planned = memory_plan.plan_memory

    def plan_memory(shape, cfg, device):
        plans.append((planned(shape, cfg, device), planned(shape, cfg, "cuda")))
        return plans[-1][0]

    memory_plan.plan_memory = plan_memory
    extra = dict(override(CompressConfig, *s.split("=", 1), "streamed.py run") for s in spec["settings"])
    cfg = CompressConfig(**spec["cfg"], **extra)
    t0 = time.perf_counter()
    plan = compress_to(spec["model"], spec["out"], cfg, dtype="auto")[-1]
    here, on_cuda = plans[0]
    return {"compress_s": time.perf_counter() - t0, "plan_wall_s": plan.wall_time_s,
            "layers": [plan.num_layers_before, plan.num_layers_after], "layer_forwards": plan.layer_forwards,
            "predicted_host_gb": here.host_peak / 1e9,
            "predicted_host_parts_gb": {k: v / 1e9 for k, v in here.host.items()},
            "predicted_device_gb": on_cuda.device_peak / 1e9,
            "predicted_device_phases_gb": {k: v / 1e9 for k, v in on_cuda.device.items()}}


def _dense(spec: dict) -> dict:
    """One dense pass of the mapped model over compress's calibration, through its pipeline."""
    from come import CompressConfig
    from come.models.checkpoint import load_model, load_tokenizer
    from come.models.data import load_calibration
    from _common import dense_pass

    cfg = CompressConfig(**spec["cfg"])
    tok = load_tokenizer(spec["model"])
    calib = load_calibration(cfg.calib, tok, cfg.nsamples, cfg.seqlen, cfg.seed)
    return {"dense_pass_s": dense_pass(load_model(spec["model"], "auto", tok)[0], calib, cfg)}


def _reload(spec: dict) -> dict:
    """The output as a stock checkpoint: its layer count, and one forward on a few tokens."""
    import torch
    import transformers

    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["out"], dtype="auto").to(spec["device"])
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids.to(spec["device"])).logits
    return {"reload_s": time.perf_counter() - t0, "layers": model.config.num_hidden_layers,
            "modules": len(model.model.layers), "logits_finite": bool(torch.isfinite(logits).all()),
            "logits_shape": list(logits.shape)}


def run(a: argparse.Namespace) -> None:
    model = Path(a.model)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    out = Path(a.out or f"{model}-come")
    if out.exists():
        raise SystemExit(f"{out} exists: give a new --out")
    work = Path(a.json).with_suffix("") if a.json else Path(f"{model}-streamed")
    work.parent.mkdir(parents=True, exist_ok=True)
    cfg = {"sparsity": a.sparsity, "calib": a.calib, "nsamples": a.nsamples, "seqlen": a.seqlen,
           "batch_size": a.batch_size, "device": a.device, "max_cache_gb": a.max_cache_gb}
    row = {"model": str(model), "weights_gb": size / 1e9, "cap_gb": a.cap_gb, "settings": vars(a),
           "date": time.strftime("%Y-%m-%d")}
    group = Capped(int(a.cap_gb * 1e9)) if a.cap_gb else None
    spec = {"model": str(model), "out": str(out), "cfg": cfg, "settings": a.settings, "device": a.device}
    try:
        for kind in ("compress", "dense", "reload"):
            if kind == "reload" and not out.exists():
                break
            argv = [sys.executable, __file__, "child", kind, json.dumps(spec)]
            row[kind] = measure(argv, Path(f"{work}.{kind}.log"), group)
            _finish(row, a.json)
    finally:
        if group:
            group.close()
    print(json.dumps(row, indent=1, default=str))


def _finish(row: dict, path: str | None) -> None:
    """The derived numbers of what `row` holds so far; written to `path` (a stopped run keeps them)."""
    done = {k: (row.get(k) or {}).get("result") or {} for k in ("compress", "dense", "reload")}
    row["dense_pass_s"] = done["dense"].get("dense_pass_s")
    row["wall_over_dense_pass"] = row["compress"]["wall_s"] / row["dense_pass_s"] if row["dense_pass_s"] else None
    row["layers_after"] = done["reload"].get("layers")
    if path:
        Path(path).write_text(json.dumps(row, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="a random-weight model on disk, layer by layer")
    m.add_argument("--out", required=True)
    m.add_argument("--shape", default="llama2-7b", help="llama2-7b | llama2-13b | small | tiny (_common.DISK_SHAPES)")
    m.add_argument("--tokenizer", help="a local HF dir whose tokenizer the model takes (default: a built-in one)")
    m.add_argument("--vocab", type=int, default=32000, help="the built-in tokenizer's size (LLaMA-2's: 32000)")
    m.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda: seconds for a 13B)")
    r = sub.add_parser("run", help="compress (under a memory cap); then one dense pass and the reload (under it)")
    r.add_argument("--model", required=True)
    r.add_argument("--out", help="the compressed model (default MODEL-come)")
    r.add_argument("--cap-gb", type=float, help="the cgroup's hard limit (page cache included); none: no cap")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the layers run")
    r.add_argument("--sparsity", type=float, default=0.3)
    r.add_argument("--calib", default="/usr/share/common-licenses/GPL-3")
    r.add_argument("--nsamples", type=int, default=4)
    r.add_argument("--seqlen", type=int, default=128)
    r.add_argument("--batch-size", type=int, default=2)
    r.add_argument("--max-cache-gb", type=float, default=0.5)
    r.add_argument("--json", help="where the row goes")
    r.add_argument("settings", nargs="*", help="more `come compress` settings as key=value (refit=none), after --")
    c = sub.add_parser("child", help="one measured step (run starts these)")
    c.add_argument("kind", choices=["compress", "dense", "reload"])
    c.add_argument("spec", type=json.loads)
    a = ap.parse_args(argv)
    {"make": make, "run": run, "child": lambda a: child(a.kind, a.spec)}[a.command](a)


if __name__ == "__main__":
    main()
