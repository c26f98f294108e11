#!/usr/bin/env python3
"""How far the compact reference (its top-K tokens a position + one bucket) reads below the
full-vocabulary KL, on a real model compressed two ways; and whether the paired difference of
the two keeps its size.

    python benchmarks/kl_top_k.py --model ~/.cache/come/smollm2-135m \
        --calib /usr/share/common-licenses/GPL-3 --text /usr/share/common-licenses/GPL-2

Prints, per K, each model's mean KL and its ratio to the exact (K = vocabulary) value.
"""

from __future__ import annotations

import argparse
import copy

import torch

from come import CompressConfig, compress
from come.models.checkpoint import load_model
from come.models.data import eval_windows, read_text, token_windows
from come.scoring.fidelity import compact, token_stats
from come.settings.specs import method_list


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--rows", default="shortgpt,shortgpt:refit=ls")
    ap.add_argument("--windows", type=int, default=12, help="windows of 256 tokens scored")
    ap.add_argument("--ks", default="64,256,1024,4096,0", help="0: the whole vocabulary (exact)")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    dense, tok = load_model(a.model, "fp32")
    windows = eval_windows(read_text(a.text), tok, 256)[: a.windows]
    calib = token_windows(read_text(a.calib), tok, 8, 128, 0)
    base = CompressConfig(sparsity=0.25, device="cpu", nsamples=8, seqlen=128)
    ref = torch.log_softmax(dense(input_ids=windows).logits[:, :-1].float(), -1).flatten(0, 1)
    targets = windows[:, 1:].flatten()
    nll = -ref.gather(-1, targets[:, None])[:, 0]
    kl = {}
    for spec in method_list(a.rows, base):
        logits = compress(copy.deepcopy(dense), tok, spec.config(base), calib=calib)[0](input_ids=windows).logits
        for k in map(int, a.ks.split(",")):
            kl[spec.label, k] = token_stats({**compact(ref, k), "nll": nll}, logits[:, :-1].flatten(0, 1), targets)["kl"]
    ks = list(map(int, a.ks.split(",")))
    labels = list(dict.fromkeys(label for label, _ in kl))
    print(f"| K | {' | '.join(labels)} | paired difference |\n|---|" + "---|" * (len(labels) + 1))
    for k in ks:
        cells = [f"{float(kl[n, k].mean()):.4f} ({float(kl[n, k].mean() / kl[n, 0].mean()):.3f}x)" for n in labels]
        diff = kl[labels[-1], k] - kl[labels[0], k]
        print(f"| {k or 'all'} | {' | '.join(cells)} | {float(diff.mean()):+.4f} |")


if __name__ == "__main__":
    main()
