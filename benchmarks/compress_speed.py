#!/usr/bin/env python3
"""Time and layer-forwards of `come compress` vs (a) ONE dense calibration forward pass over
the same samples (the floor) and (b) the naive progressive loop that re-profiles the whole
model after every merge (same code with the activation cache disabled). All in one run.

    python benchmarks/compress_speed.py --model ~/.cache/come/smollm2-135m --sparsity 0.3
    python benchmarks/compress_speed.py --random-llama-1b --nsamples 8 --seqlen 256
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import nn

from come import CompressConfig, compress


def llama_1b():
    """TinyLlama-1.1B's shape (22 layers, hidden 2048, 32q/4kv, FFN 5632), random weights."""
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                   num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def tiny_llama(num_hidden_layers: int = 8) -> nn.Module:
    """The toy LLaMA every script's --quick uses (seconds, no download)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def load(a: argparse.Namespace) -> tuple[nn.Module, str]:
    """(model on CPU, its name) from --quick, --random-llama-1b or --model (memory.add_model_args)."""
    if a.quick:
        return tiny_llama(), "tiny LLaMA (8 layers, hidden 128)"
    if a.random_llama_1b:
        return llama_1b(), "random LLaMA 1.1B"
    if not a.model:
        raise SystemExit("give --model DIR, --random-llama-1b or --quick")
    from come.checkpoint import load_model

    return load_model(a.model)[0], Path(a.model).name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF dir")
    ap.add_argument("--random-llama-1b", action="store_true")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="tiny random model, seconds")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive re-profile row (the slowest)")
    a = ap.parse_args()
    if a.quick:
        a.nsamples, a.seqlen = 8, 64
    model, name = load(a)
    vocab = model.config.vocab_size
    calib = torch.randint(0, vocab, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    n_layers = model.config.num_hidden_layers

    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in calib.split(4):
            model.model(input_ids=batch, use_cache=False)
    floor = time.perf_counter() - t0

    runs = [("come (cached, no refit)", {"refit": "none"}), ("come (cached, + refit)", {})]
    if not a.no_naive:
        runs.append(("naive re-profile (no refit)", {"refit": "none", "max_cache_gb": 1e-12}))
    rows, solve_s = [], 0.0
    for label, extra in runs:
        cfg = CompressConfig(sparsity=a.sparsity, device="cpu", batch_size=4, **extra)
        t0 = time.perf_counter()
        _, plan = compress(copy.deepcopy(model), None, cfg, calib=calib)
        rows.append((label, time.perf_counter() - t0, plan.layer_forwards, plan.num_layers_after))
        solve_s += sum(m.refit["seconds"] for m in plan.merges if m.refit)
    print(f"\n{name}: {n_layers} layers, {a.nsamples} x {a.seqlen} calibration tokens, sparsity {a.sparsity}; "
          f"floor = one dense forward over the samples = {floor:.1f}s ({n_layers} layer-forwards)\n")
    print("| run | time (s) | x floor | layer-forwards | layers after |")
    print("|---|---|---|---|---|")
    for label, secs, fwd, after in rows:
        print(f"| {label} | {secs:.1f} | {secs / floor:.2f} | {fwd} | {after} |")
    extra = rows[1][1] - rows[0][1]
    print(f"\nrefit adds {extra / rows[0][1]:+.0%} to the cached run = {extra / floor:.2f} calibration passes "
          f"(of which the ridge solves: {solve_s / floor:.2f} passes, {solve_s:.1f}s; the rest: the refit's "
          "layer passes and Gram accumulation, plus any difference in merge path or machine load between the runs)")
    if not a.no_naive:
        print(f"cached vs naive (no refit): {rows[-1][1] / rows[0][1]:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
