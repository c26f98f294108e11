"""`come compare`: every method with the same calibration and seed, each evaluated the
same way, into one report folder (report.md, report.json, plots)."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import replace
from pathlib import Path

from torch import Tensor

from .config import CompressConfig
from .evaluate import AVERAGE_METRIC, evaluate
from .pipeline import compress
from .checkpoint import atomic_dir
from .plan import Plan
from .report import write_report

log = logging.getLogger("come")


def _scored(tasks: dict) -> dict:
    """Add the paper-style `score` (acc_norm or acc, as in the average) to each task."""
    out = {}
    for task, r in tasks.items():
        value = r.get(AVERAGE_METRIC.get(task, "acc"))
        out[task] = {**r, "score": r.get("acc") if value is None else value}
    return out


def compare(model, tokenizer, base: CompressConfig, methods: list[str], calib: Tensor, out: Path, eval_kwargs: dict,
            model_name: str = "", overwrite: bool = False) -> list[dict]:
    """Compress a copy of `model` with each method (same calibration ids), evaluate each
    and the dense model, and write the report into `out`. Returns the report rows."""
    rows: list[dict] = []
    plans: dict[str, Plan] = {}
    for method in ["dense", *methods]:
        t0 = time.perf_counter()
        if method == "dense":
            lm, plan = model, None
        else:
            lm, plan = compress(copy.deepcopy(model), tokenizer, replace(base, method=method, refit=None),
                                calib=calib, model_name=model_name)
            plans[method] = plan
        seconds = time.perf_counter() - t0
        log.info("evaluating %s", method)
        res = evaluate(lm, tokenizer, **eval_kwargs)
        rows.append({"method": method, "tasks": _scored(res["tasks"]), "average": res["average"],
                     "perplexity": res["perplexity"],
                     "params": plan.params_after if plan else sum(p.numel() for p in model.parameters()),
                     "layers": plan.num_layers_after if plan else model.config.num_hidden_layers,
                     "compress_s": seconds if plan else None, "groups": plan.groups if plan else None,
                     "achieved_sparsity": plan.achieved_sparsity if plan else 0.0})
        del lm
    dense_avg = rows[0]["average"]
    for r in rows:
        r["retention_pct"] = 100.0 * r["average"] / dense_avg if dense_avg and r["average"] is not None else None
    tasks = list(rows[0]["tasks"])
    header = (f"Model {model_name or 'model'}; sparsity {base.sparsity} of all params; calibration "
              f"{calib.shape[0]} x {calib.shape[1]} tokens of {base.calib} (seed {base.seed}); "
              f"eval: {eval_kwargs.get('limit') or 'all'} docs per task, perplexity on {eval_kwargs.get('ppl_data')} "
              f"(seqlen {eval_kwargs.get('seqlen')}).")
    with atomic_dir(out, overwrite) as tmp:
        write_report(tmp, rows, tasks, plans, header)
    return rows


def method_list(text: str) -> list[str]:
    from .config import Method
    from .errors import ComeError

    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in Method.__args__]
    if bad or not methods:
        raise ComeError(f"--methods: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(Method.__args__)}")
    return methods

