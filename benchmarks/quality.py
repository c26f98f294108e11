#!/usr/bin/env python3
"""Quality of every method at one sparsity, measured in one run: perplexity on held-out
text of the calibration's domain and on an unseen text, params, layers, wall time.

    python benchmarks/quality.py --model ~/.cache/come/smollm2-135m --sparsity 0.25 \
        --calib calib.txt --heldout heldout.txt --unseen /usr/share/common-licenses/GPL-2

Prints a markdown table; ratios are against ShortGPT measured in the same run.
`--quick` runs a 4-layer cut of the model on little data (smoke test, < 1 min).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from come import CompressConfig, compress
from come.checkpoint import load_model
from come.data import read_text, token_windows
from come.evaluate import eval_windows, perplexity

ROWS = {
    "dense": None,
    "shortgpt": {"method": "shortgpt"},
    "shortgpt+refit": {"method": "shortgpt", "refit": "ls"},
    "replaceme (angle)": {"method": "replaceme", "select": "angle"},
    "replaceme (bi)": {"method": "replaceme", "select": "bi"},
    "come (paper: no refit)": {"refit": "none"},
    "come + refit (angular pairs)": {"pair_score": "angular"},
    "come + refit (error pairs)": {"pair_score": "error"},
    "come + refit (error pairs; dense inputs)": {"pair_score": "error", "refit_input": "dense"},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--unseen", required=True)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=100, help="held-out windows of --seqlen scored")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma list of: " + ", ".join(ROWS))
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    dense, tok = load_model(a.model)
    if a.quick:
        dense.model.layers = dense.model.layers[:4]
        dense.config.num_hidden_layers = 4
        a.nsamples, a.eval_windows = 8, 4
    calib = token_windows(read_text(a.calib), tok, a.nsamples, a.seqlen, seed=0)
    heldout = eval_windows(read_text(a.heldout), tok, a.seqlen)[: a.eval_windows]
    unseen = eval_windows(read_text(a.unseen), tok, a.seqlen)[: a.eval_windows]
    rows = []
    for name in [r for r in a.rows.split(",") if r]:
        overrides = ROWS[name]
        t0 = time.perf_counter()
        if overrides is None:
            model, layers, params = dense, dense.config.num_hidden_layers, sum(p.numel() for p in dense.parameters())
        else:
            cfg = CompressConfig(sparsity=a.sparsity, device="cpu", nsamples=a.nsamples, seqlen=a.seqlen, **overrides)
            model, plan = compress(copy.deepcopy(dense), tok, cfg, calib=calib)
            layers, params = plan.num_layers_after, plan.params_after
        secs = time.perf_counter() - t0
        row = {"method": name, "heldout_ppl": perplexity(model, heldout, 8), "unseen_ppl": perplexity(model, unseen, 8),
               "params_M": params / 1e6, "layers": layers, "compress_s": secs}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    ref = next((r for r in rows if r["method"] == "shortgpt"), None)
    print(f"\n{Path(a.model).name}, sparsity {a.sparsity}, calibration {a.nsamples} x {a.seqlen} tokens of {Path(a.calib).name}; "
          f"ppl over {a.eval_windows} windows of {a.seqlen}\n")
    print("| method | held-out ppl | unseen ppl | x ShortGPT (held-out / unseen) | params | layers | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{ref['heldout_ppl'] / r['heldout_ppl']:.2f}x / {ref['unseen_ppl'] / r['unseen_ppl']:.2f}x" if ref else ""
        print(f"| {r['method']} | {r['heldout_ppl']:.1f} | {r['unseen_ppl']:.1f} | {ratio} | {r['params_M']:.1f}M | "
              f"{r['layers']} | {r['compress_s']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
