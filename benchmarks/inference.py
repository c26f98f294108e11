#!/usr/bin/env python3
"""Prefill and decode tokens/s of a compressed model vs its dense original, same batch,
same lengths, KV cache on, measured in one run (median of repeats, warm-up first).

    python benchmarks/inference.py --dense ~/.cache/come/smollm2-135m --compressed smol-come
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import transformers

from _common import sync, tiny_llama


@torch.no_grad()
def measure(model, batch: int, prompt: int, new: int, repeats: int, device: str) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s): prefill = one forward over the prompt; decode =
    `new` single-token steps on the cache."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    pre, dec = [], []
    for i in range(repeats + 1):  # the first run warms up
        cache = transformers.DynamicCache(config=model.config)
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        sync(device)
        t1 = time.perf_counter()
        tok = out.logits[:, -1:].argmax(-1)
        for _ in range(new):
            out = model(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        sync(device)
        t2 = time.perf_counter()
        if i:
            pre.append(batch * prompt / (t1 - t0))
            dec.append(batch * new / (t2 - t1))
    return statistics.median(pre), statistics.median(dec)


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
        rows.append((name, model.config.num_hidden_layers, params, *measure(model, a.batch, a.prompt, a.new, a.repeats, a.device)))
        model.to("cpu")
    print(f"\n{a.device}, {a.dtype}, batch {a.batch}, prompt {a.prompt}, {a.new} new tokens, median of {a.repeats}\n")
    print("| model | layers | params | prefill tok/s | decode tok/s | prefill x dense | decode x dense |")
    print("|---|---|---|---|---|---|---|")
    for name, layers, params, pre, dec in rows:
        print(f"| {name} | {layers} | {params / 1e6:.1f}M | {pre:.0f} | {dec:.1f} | {pre / rows[0][3]:.2f} | {dec / rows[0][4]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
