#!/usr/bin/env python3
"""Prefill and decode tokens/s of a compressed model vs its dense original, same batch,
same lengths, KV cache on, measured in one run (median of repeats, warm-up first).

    python benchmarks/inference.py --dense ~/.cache/come/smollm2-135m --compressed smol-come
"""

from __future__ import annotations

import argparse
import sys

import torch
import transformers

from _common import generation_speed, tiny_llama


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense")
    ap.add_argument("--compressed")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quick", action="store_true", help="two tiny random models, seconds")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    if a.quick:
        dense, small = tiny_llama(), tiny_llama(num_hidden_layers=6)
        a.prompt, a.new, a.repeats = 32, 8, 2
    else:
        load = transformers.AutoModelForCausalLM.from_pretrained
        dense, small = load(a.dense, dtype=dtype), load(a.compressed, dtype=dtype)
    rows = []
    for name, model in (("dense", dense), ("compressed", small)):
        model.to(a.device).eval()
        params = sum(p.numel() for p in model.parameters())
        rows.append((name, model.config.num_hidden_layers, params, *generation_speed(model, a.batch, a.prompt, a.new, a.repeats, a.device)))
        model.to("cpu")
    print(f"\n{a.device}, {a.dtype}, batch {a.batch}, prompt {a.prompt}, {a.new} new tokens, median of {a.repeats}\n")
    print("| model | layers | params | prefill tok/s | decode tok/s | prefill x dense | decode x dense |")
    print("|---|---|---|---|---|---|---|")
    for name, layers, params, pre, dec in rows:
        print(f"| {name} | {layers} | {params / 1e6:.1f}M | {pre:.0f} | {dec:.1f} | {pre / rows[0][3]:.2f} | {dec / rows[0][4]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
