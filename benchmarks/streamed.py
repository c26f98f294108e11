#!/usr/bin/env python3
"""Bigger than the machine (issue 40): compress a model under a hard memory cap below its size.

`come compress` loads a checkpoint in its own dtype (`--dtype auto`), and transformers then maps
the safetensors files instead of reading them (copy on write: the file is never written); a
layer's pages come in when it runs and, being clean file pages, the kernel drops them again
under pressure. What the run itself allocates (calibration caches within --max-cache-gb, one
merge's float64 merged layer, the refit's statistics) is what must fit; the output is written
shard by shard from those mapped pages. This script measures that:

    make   a random-weight model of a given shape written to disk in bf16, layer by layer
           (never whole in memory), with SmolLM2's tokenizer (--tokenizer);
    run    `come compress` on it in a child process inside a cgroup-v1 memory cap (--cap-gb;
           page cache counts against it, so the kernel must evict), then one dense pass over
           the same calibration under the same cap, and the output reloaded under it; prints
           and writes JSON: peak anonymous memory (sampled), peak RSS, the cgroup's peak, wall
           time, wall / one dense pass, and the output's layer count.

    python benchmarks/streamed.py make --out /work/big7b --shape llama2-7b --tokenizer ~/.cache/come/smollm2-135m
    python benchmarks/streamed.py run --model /work/big7b --cap-gb 6.5 --sparsity 0.3 --nsamples 4 --seqlen 128 \\
        --json benchmarks/results/streamed/llama2-7b.json
    python benchmarks/streamed.py make --out /tmp/s --shape small ... ; ... run --model /tmp/s --cap-gb 0.9  # minutes

Needs root (or a writable /sys/fs/cgroup/memory) for the cap; without it `run` refuses in one line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

SHAPES = {  # hidden, intermediate, layers, heads, kv heads
    "llama2-7b": (4096, 11008, 32, 32, 32),
    "llama2-13b": (5120, 13824, 40, 40, 40),
    "small": (1024, 2816, 24, 16, 4),  # about 0.4B parameters, 0.8 GB in bf16
    "tiny": (512, 1408, 12, 8, 4),
}
CGROUP = Path("/sys/fs/cgroup/memory")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make(a: argparse.Namespace) -> None:
    """Write the random model shard by shard: each decoder layer's tensors are made, saved and dropped."""
    import torch
    import transformers
    from safetensors.torch import save_file

    hidden, inter, layers, heads, kv = SHAPES[a.shape]
    tok = transformers.AutoTokenizer.from_pretrained(a.tokenizer)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, vocab_size=len(tok),
                                   max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16",
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    out = Path(a.out)
    if out.exists():
        raise SystemExit(f"{out} exists: give a new --out")
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True)
    cfg.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (Path(a.tokenizer) / name).is_file():
            shutil.copy(Path(a.tokenizer) / name, tmp / name)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    head_dim = hidden // heads

    def layer(i: int) -> dict:
        p = f"model.layers.{i}."
        return {p + "self_attn.q_proj.weight": rand(hidden, hidden),
                p + "self_attn.k_proj.weight": rand(kv * head_dim, hidden),
                p + "self_attn.v_proj.weight": rand(kv * head_dim, hidden),
                p + "self_attn.o_proj.weight": rand(hidden, hidden),
                p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
                p + "mlp.down_proj.weight": rand(hidden, inter),
                p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}

    # one shard at a time, made when it is written: never more than one layer in memory
    shards = [lambda: {"model.embed_tokens.weight": rand(len(tok), hidden)},
              *(lambda i=i: layer(i) for i in range(layers)),
              lambda: {"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                       "lm_head.weight": rand(len(tok), hidden)}]
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
        tensors = shard()
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: name for k in tensors})
        print(f"\rwrote shard {n + 1}/{len(shards)}", end="", file=sys.stderr, flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    tmp.rename(out)
    print(f"\n{out}: {a.shape}, {total / 1e9:.2f} GB of bf16 weights", file=sys.stderr)


class Capped:
    """A cgroup-v1 memory group with a hard limit, for one child process at a time."""

    def __init__(self, cap_bytes: int) -> None:
        if not os.access(CGROUP, os.W_OK):
            raise SystemExit(f"no writable {CGROUP}: run as root on a cgroup-v1 host (the cap needs it)")
        self.path = CGROUP / f"come-streamed-{os.getpid()}"
        self.path.mkdir(exist_ok=True)
        (self.path / "memory.limit_in_bytes").write_text(str(cap_bytes))
        self.cap = cap_bytes

    def run(self, argv: list[str], log: Path) -> dict:
        """Run `argv` inside the group; its wall time, exit code, sampled peak anonymous and
        resident memory (VmHWM), and the group's peak usage (page cache included)."""
        (self.path / "memory.max_usage_in_bytes").write_text("0")
        _drop_page_cache()
        cmd = ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]
        t0 = time.perf_counter()
        with open(log, "w") as out:
            child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
            peak = {"anon": 0, "hwm": 0}
            sampler = threading.Thread(target=_sample, args=(child, peak), daemon=True)
            sampler.start()
            rc = child.wait()
            sampler.join()
        return {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "peak_anon_gb": peak["anon"] / 1e9,
                "peak_rss_gb": peak["hwm"] / 1e9,
                "cgroup_peak_gb": int((self.path / "memory.max_usage_in_bytes").read_text()) / 1e9,
                "oom_kills": _oom_kills(self.path)}

    def close(self) -> None:
        self.path.rmdir()


def _drop_page_cache() -> None:
    """Clean page cache dropped (root): the model's pages, cached by whoever read or wrote them
    last, are charged to that group; read afresh by the child, they count against its cap."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


def _oom_kills(path: Path) -> int:
    m = re.search(r"oom_kill (\d+)", (path / "memory.oom_control").read_text())
    return int(m.group(1)) if m else 0


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
                peak[key] = max(peak[key], int(m.group(1)) * 1024)
        time.sleep(0.1)


DENSE_PASS = """
import sys, time, torch
from come.models.checkpoint import load_model
from come.models.data import load_calibration
model, tok = load_model(sys.argv[1])
calib = load_calibration(sys.argv[2], tok, int(sys.argv[3]), int(sys.argv[4]), 0)
t0 = time.perf_counter()
with torch.no_grad():
    for ids in calib.split(int(sys.argv[5])):
        model(ids)
print("DENSE_PASS_S", time.perf_counter() - t0)
"""

RELOAD = """
import sys, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
print("RELOADED_LAYERS", m.config.num_hidden_layers)
"""


def run(a: argparse.Namespace) -> None:
    model = Path(a.model)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    out = Path(a.out or f"{model}-come")
    if out.exists():
        raise SystemExit(f"{out} exists: give a new --out")
    work = Path(a.json).with_suffix("") if a.json else Path(f"{model}-streamed")
    work.parent.mkdir(parents=True, exist_ok=True)
    group = Capped(int(a.cap_gb * 1e9))
    try:
        compress = group.run([sys.executable, "-m", "come.cli.app", "compress", str(model), "--out", str(out),
                              "--sparsity", str(a.sparsity), "--calib", a.calib, "--nsamples", str(a.nsamples),
                              "--seqlen", str(a.seqlen), "--batch-size", str(a.batch_size), "--device", "cpu",
                              "--max-cache-gb", str(a.max_cache_gb), *a.extra], Path(f"{work}.compress.log"))
        dense = group.run([sys.executable, "-c", DENSE_PASS, str(model), a.calib, str(a.nsamples), str(a.seqlen),
                           str(a.batch_size)], Path(f"{work}.dense.log"))
        reload = group.run([sys.executable, "-c", RELOAD, str(out)], Path(f"{work}.reload.log")) if out.exists() else {}
    finally:
        group.close()
    dense_s = _grep(Path(f"{work}.dense.log"), r"DENSE_PASS_S ([\d.]+)")
    layers = _grep(Path(f"{work}.reload.log"), r"RELOADED_LAYERS (\d+)") if reload else None
    row = {"model": str(model), "weights_gb": size / 1e9, "cap_gb": a.cap_gb, "settings": vars(a),
           "compress": compress, "dense_pass": dense, "reload": reload, "dense_pass_s": dense_s,
           "wall_over_dense_pass": compress["wall_s"] / dense_s if dense_s else None,
           "layers_after": int(layers) if layers else None, "date": time.strftime("%Y-%m-%d")}
    text = json.dumps(row, indent=1, default=str)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


def _grep(path: Path, pattern: str) -> float | None:
    m = re.search(pattern, path.read_text()) if path.is_file() else None
    return float(m.group(1)) if m else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="a random-weight model on disk, layer by layer")
    m.add_argument("--out", required=True)
    m.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    m.add_argument("--tokenizer", required=True, help="a local HF dir whose tokenizer the model takes")
    r = sub.add_parser("run", help="compress under a memory cap; then one dense pass and the reload under it")
    r.add_argument("--model", required=True)
    r.add_argument("--out", help="the compressed model (default MODEL-come)")
    r.add_argument("--cap-gb", type=float, required=True, help="the cgroup's hard limit (page cache included)")
    r.add_argument("--sparsity", type=float, default=0.3)
    r.add_argument("--calib", default="/usr/share/common-licenses/GPL-3")
    r.add_argument("--nsamples", type=int, default=4)
    r.add_argument("--seqlen", type=int, default=128)
    r.add_argument("--batch-size", type=int, default=2)
    r.add_argument("--max-cache-gb", type=float, default=0.5)
    r.add_argument("--json", help="where the row goes")
    r.add_argument("extra", nargs="*", help="more `come compress` options, after --")
    a = ap.parse_args(argv)
    make(a) if a.command == "make" else run(a)


if __name__ == "__main__":
    main()
