"""The rows of a comparison's report (`come compare`, service.compare): each model evaluated
the same way into one row, the rows set against dense and against the first method listed,
and what the evaluation covered, in words."""

from __future__ import annotations

import logging

from ..scoring.fidelity import ReferenceWriter, paired_fidelity
from ..settings.config import EvalConfig
from ..settings.plan import Plan
from .evaluate import evaluate, paired_delta, paper_score

log = logging.getLogger("come")


def _scored(tasks: dict) -> dict:
    """Add the paper-style `score` (acc_norm or acc, as in the average) to each task."""
    return {task: {**r, "score": paper_score(task, r)} for task, r in tasks.items()}


def row(label: str, lm, plan: Plan | None, seconds: float | None, tokenizer, eval_kwargs: dict,
        plans: dict[str, Plan], reference=None, writer: ReferenceWriter | None = None) -> dict:
    """Evaluate one model into a report row (`seconds`: its compression's wall time)."""
    log.info("evaluating %s", label)
    res = evaluate(lm, tokenizer, **eval_kwargs, reference=reference, writer=writer)
    if plan is not None:
        plans[label] = plan
    return {"method": label, "sparsity": plan.target_sparsity if plan else 0.0,
            "tasks": _scored(res["tasks"]), "average": res["average"], "perplexity": res["perplexity"],
            "fidelity": res["fidelity"],
            "params": plan.params_after if plan else sum(p.numel() for p in lm.parameters()),
            "layers": plan.num_layers_after if plan else lm.config.num_hidden_layers,
            "compress_s": seconds, "groups": plan.groups if plan else None,
            "achieved_sparsity": plan.achieved_sparsity if plan else 0.0}


def set_against_first(rows: list[dict], several: bool) -> None:
    """Retention against dense; with several methods, each row's paired differences (task
    average, KL to dense) against the first method listed at its level."""
    first = {}  # per level, the first method listed: what the others at that level are set against
    for r in rows[1:]:
        first.setdefault(r["sparsity"], r)
    dense_avg = rows[0]["average"]
    for r in rows:
        r["retention_pct"] = 100.0 * r["average"] / dense_avg if dense_avg and r["average"] is not None else None
        ref = first.get(r["sparsity"], rows[1]) if several else None  # dense: the smallest level's
        paired = paired_delta(r["tasks"], ref["tasks"]) if ref is not None and r is not ref else None
        r["delta"] = {"vs": ref["method"], "average": paired[0], "se": paired[1]} if paired else None
        kl = paired_fidelity(r["fidelity"], ref["fidelity"]) if ref is not None and r is not ref else None
        r["kl_delta"] = {"vs": ref["method"], "kl": kl[0], "se": kl[1]} if kl and r["sparsity"] else None


def evaluated(evaluation: EvalConfig, kwargs: dict) -> str:
    """What the evaluation covered, in words: only the parts that ran."""
    parts = []
    if kwargs["tasks"]:
        start = f", from document {evaluation.skip}" if evaluation.skip else ""
        parts.append(f"{evaluation.limit or 'all'} documents per task{start}")
    if kwargs["ppl_data"]:
        parts.append(f"perplexity on {kwargs['ppl_data']} ({evaluation.ppl_windows or 'all'} windows of "
                     f"{evaluation.seqlen} tokens)")
    return "eval: " + ", ".join(parts) if parts else "not evaluated (--tasks none, --ppl-data none)"
