#!/usr/bin/env python3
"""Quality of every method at one sparsity, measured in one run: perplexity on held-out
text of the calibration's domain and on an unseen text, params, layers, wall time.

    python benchmarks/quality.py --model ~/.cache/come/smollm2-135m --sparsity 0.25 \
        --calib calib.txt --heldout heldout.txt --unseen /usr/share/common-licenses/GPL-2

Prints a markdown table; ratios are against ShortGPT measured in the same run. Rows are
`come compare --methods` specs (e.g. `shortgpt:refit=ls`, `come:refit=none:split=bi:pair_score=angular`) or `dense`;
`--task-data DIR --limit N` adds the zero-shot tasks (paper-style metric) and their average;
`--distill come` adds a `come + sp` row (hierarchical distillation, sp mode, on the
calibration windows; its time column is the distillation's).
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

from come import CompressConfig, DistillConfig, compress, distill
from come.evaluation.evaluate import evaluate, paired_delta, paper_score, perplexity
from come.evaluation.report import delta_cell
from come.models.checkpoint import load_model
from come.models.data import eval_windows, read_text, token_windows
from come.settings.specs import method_list
from come.settings.tasks import DEFAULT_TASKS, parse_tasks

# Each row is a `come compare` method spec (method[:option=value...]) or "dense".
ROWS = ("dense,shortgpt,shortgpt:refit=ls,replaceme:select=angle,replaceme:select=bi,come:refit=none:split=bi:pair_score=angular,come,"
        "come:split=bi:pair_score=angular,"
        "come:refit_input=dense,come:pair_score=error,laco,average")


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
    ap.add_argument("--rows", default=ROWS, help="comma list of dense and `come compare --methods` specs")
    ap.add_argument("--task-data", help="offline lm-eval data dir: adds the zero-shot tasks and their average")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--limit", type=int, help="first N documents of each task")
    ap.add_argument("--skip", type=int, default=0, help="start at document N of each task (validate a choice on "
                    "documents other than the reported ones)")
    ap.add_argument("--distill", default="", help="comma list of rows to also recover with `come distill --mode sp "
                    "--layer-loss mse` on the calibration windows, each giving a '<row> + sp' row")
    ap.add_argument("--distill-steps", type=int, default=50, help="optimizer steps of each distillation (batch 4)")
    ap.add_argument("--dtype", default="fp32", help="weights dtype on CPU (fp32: bf16 matmuls are slow there)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    dense, tok = load_model(a.model, a.dtype)
    if a.quick:
        dense.model.layers = dense.model.layers[:4]
        dense.config.num_hidden_layers = 4
        a.nsamples, a.eval_windows = 8, 4
    calib = token_windows(read_text(a.calib), tok, a.nsamples, a.seqlen, seed=0)
    heldout = eval_windows(read_text(a.heldout), tok, a.seqlen)[: a.eval_windows]
    unseen = eval_windows(read_text(a.unseen), tok, a.seqlen)[: a.eval_windows]
    base = CompressConfig(sparsity=a.sparsity, device="cpu", nsamples=a.nsamples, seqlen=a.seqlen)
    names = [r.strip() for r in a.rows.split(",") if r.strip()]
    methods = [n for n in names if n != "dense"]
    specs = {s.label: s for s in method_list(",".join(methods), base)} if methods else {}
    tasks = parse_tasks(a.tasks) if a.task_data else []
    rows = []

    def add_row(name: str, model, layers: int, params: int, secs: float) -> None:
        row = {"method": name, "heldout_ppl": perplexity(model, heldout, 8), "unseen_ppl": perplexity(model, unseen, 8),
               "params_M": params / 1e6, "layers": layers, "compress_s": secs}
        if tasks:
            res = evaluate(model, tok, tasks, a.task_data, a.limit, ppl_data=None, skip=a.skip)
            row.update(tasks={t: paper_score(t, r) for t, r in res["tasks"].items()},
                       average=res["average"], per_task=res["tasks"])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    to_distill = {r.strip() for r in a.distill.split(",") if r.strip()}
    for name in names:
        t0 = time.perf_counter()
        if name == "dense":
            add_row(name, dense, dense.config.num_hidden_layers, sum(p.numel() for p in dense.parameters()), 0.0)
            continue
        model, plan = compress(copy.deepcopy(dense), tok, specs[name].config(base), calib=calib)
        add_row(name, model, plan.num_layers_after, plan.params_after, time.perf_counter() - t0)
        if name in to_distill:
            t0 = time.perf_counter()
            dcfg = DistillConfig(mode="sp", steps=a.distill_steps, seqlen=a.seqlen, batch_size=4, layer_loss="mse",
                                 device="cpu", eval_windows=min(8, len(heldout)))
            with torch.enable_grad():  # main() runs under no_grad
                student, _ = distill(dense, model, tok, plan, dcfg, windows=(calib, heldout[: dcfg.eval_windows]))
            add_row(f"{name} + sp", student, plan.num_layers_after, plan.params_after, time.perf_counter() - t0)
    ref = next((r for r in rows if r["method"] == "shortgpt"), None)
    pair_ref = (ref or next((r for r in rows if r["method"] != "dense"), None)) if tasks else None
    for r in rows:
        paired = paired_delta(r["per_task"], pair_ref["per_task"]) if pair_ref and r is not pair_ref else None
        r["delta"] = {"vs": pair_ref["method"], "average": paired[0], "se": paired[1]} if paired else None
    print(f"\n{Path(a.model).name}, sparsity {a.sparsity}, calibration {a.nsamples} x {a.seqlen} tokens of {Path(a.calib).name}; "
          f"ppl over {a.eval_windows} windows of {a.seqlen}\n")
    base_avg = next((r["average"] for r in rows if r["method"] == "dense"), None) if tasks else None
    acc_head = "".join(f" {t} |" for t in tasks) + " average acc |" + (" retention % |" if base_avg else "") if tasks else ""
    acc_head += f" vs {pair_ref['method']} (± paired SE) |" if pair_ref else ""
    print(f"| method | held-out ppl | unseen ppl | x ShortGPT (held-out / unseen) |{acc_head} params | layers | time (s) |")
    print("|---|---|---|---|" + "---|" * (len(tasks) + bool(tasks) + bool(base_avg) + bool(pair_ref)) + "---|---|---|")
    for r in rows:
        ratio = f"{ref['heldout_ppl'] / r['heldout_ppl']:.2f}x / {ref['unseen_ppl'] / r['unseen_ppl']:.2f}x" if ref else ""
        accs = "".join(f" {r['tasks'][t]:.3f} |" for t in tasks) + f" {r['average']:.3f} |" if tasks else ""
        accs += f" {100 * r['average'] / base_avg:.1f} |" if base_avg else ""
        accs += f" {delta_cell(r['delta'])} |" if pair_ref else ""
        print(f"| {r['method']} | {r['heldout_ppl']:.1f} | {r['unseen_ppl']:.1f} | {ratio} |{accs} {r['params_M']:.1f}M | "
              f"{r['layers']} | {r['compress_s']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
