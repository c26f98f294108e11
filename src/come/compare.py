"""`come compare`: every method with the same calibration and seed, each evaluated the
same way, into one report folder (report.md, report.json, plots)."""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from torch import Tensor

from .api_inputs import expect, expect_model, expect_token_ids
from .checkpoint import atomic_dir
from .compression import compress, resolve
from .config import CompressConfig, EvalConfig
from .errors import ComeError
from .evaluate import evaluate, paired_delta, paper_score
from .fidelity import ReferenceWriter, paired_fidelity
from .methods import REGISTRY, default_methods, get_method, method_names
from .options import flag_of, override
from .plan import Plan
from .preflight import check_output_dir
from .report import write_report

SHARED = ("method", "sparsity", "calib", "nsamples", "seqlen", "seed", "protect")  # the same in every row

log = logging.getLogger("come")


def _scored(tasks: dict) -> dict:
    """Add the paper-style `score` (acc_norm or acc, as in the average) to each task."""
    return {task: {**r, "score": paper_score(task, r)} for task, r in tasks.items()}


def compare(model, tokenizer, base: CompressConfig, methods: "list[MethodSpec] | str", calib: Tensor, out: Path,
            evaluation: EvalConfig, model_name: str = "", overwrite: bool = False) -> list[dict]:
    """Compress a copy of `model` with each method (same calibration ids), evaluate each
    and the dense model, and write the report into `out`. Returns the report rows. With
    several sparsities (`base.sparsity` a list) each method runs once through every level
    (compress's `on_level`) and gives one row per level, labelled `method@level`. `methods` may
    be given as `--methods` text ("come,shortgpt:refit=ls"). `out` is checked before any work
    (empty, or with `overwrite` a come output: atomic_dir)."""
    expect(base, CompressConfig, "base")
    expect(evaluation, EvalConfig, "evaluation")
    expect_token_ids(calib, expect_model(model), "calib")
    methods = method_list(methods, base) if isinstance(methods, str) else methods
    evaluation.check()
    check_output_dir(out, overwrite, inputs={"model": model_name, "calib": base.calib})
    eval_kwargs = evaluation.evaluate_kwargs()
    levels = base.levels()
    plans: dict[str, Plan] = {}
    with tempfile.TemporaryDirectory(prefix="come-reference-") as ref_dir:
        # the dense row's perplexity pass records its distributions: every row's KL reuses them
        writer = ReferenceWriter(ref_dir, "dense") if eval_kwargs["ppl_data"] else None
        rows = [_row("dense", model, None, None, tokenizer, eval_kwargs, plans, writer=writer)]
        reference = writer.close() if writer else None
        for spec in methods:
            def on_level(lm, plan: Plan, spec=spec) -> None:  # each level's model is evaluated as the run passes it
                label = spec.label if len(levels) == 1 else f"{spec.label}@{plan.target_sparsity:g}"
                rows.append(_row(label, lm, plan, plan.wall_time_s, tokenizer, eval_kwargs, plans, reference))

            on_level(*compress(copy.deepcopy(model), tokenizer, spec.config(base), calib=calib, model_name=model_name,
                               on_level=on_level if len(levels) > 1 else None))
    _set_against_first(rows, len(methods) > 1)
    tasks = list(rows[0]["tasks"])
    header = (f"Model {model_name or 'model'}; sparsity {', '.join(f'{s:g}' for s in levels)} of all params; "
              f"calibration {calib.shape[0]} x {calib.shape[1]} tokens of {base.calib} (seed {base.seed}); "
              f"{_evaluated(evaluation, eval_kwargs)}.")
    with atomic_dir(out, overwrite) as tmp:
        write_report(tmp, rows, tasks, plans, header)
    return rows


def _row(label: str, lm, plan: Plan | None, seconds: float | None, tokenizer, eval_kwargs: dict,
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


def _set_against_first(rows: list[dict], several: bool) -> None:
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


def _evaluated(evaluation: EvalConfig, kwargs: dict) -> str:
    """What the evaluation covered, in words: only the parts that ran."""
    parts = []
    if kwargs["tasks"]:
        start = f", from document {evaluation.skip}" if evaluation.skip else ""
        parts.append(f"{evaluation.limit or 'all'} documents per task{start}")
    if kwargs["ppl_data"]:
        parts.append(f"perplexity on {kwargs['ppl_data']} ({evaluation.ppl_windows or 'all'} windows of "
                     f"{evaluation.seqlen} tokens)")
    return "eval: " + ", ".join(parts) if parts else "not evaluated (--tasks none, --ppl-data none)"


@dataclass(frozen=True)
class MethodSpec:
    """One row of a comparison: a method plus option overrides, written `method[:key=value...]`
    (e.g. `come:refit=none:split=bi:pair_score=angular` for the paper's pure merge, `shortgpt:refit=ls`), so what the
    refit buys and what the operator buys can sit in one table."""

    label: str
    method: str
    overrides: tuple[tuple[str, object], ...] = ()

    def config(self, base: CompressConfig) -> CompressConfig:
        """`base` with this row's method and overrides (unset refit / pair score: the method's own).
        A shared option this row's method does not read stays at its default here: it is for the
        rows whose method reads it (an override that does not apply is refused by `resolved`)."""
        return replace(get_method(self.method).own(replace(base, method=self.method)), **dict(self.overrides))


def method_list(text: str, base: CompressConfig | None = None, flag: str = "--methods") -> list[MethodSpec]:
    """Parse `--methods` (or `flag`, e.g. --candidates); every row's full config is resolved here,
    before any work. Overrides are parsed like the command line parses the same option."""
    base = base or CompressConfig()
    specs = []
    for item in (m.strip() for m in text.split(",")):
        if not item:
            continue
        method, *pairs = item.split(":")
        if method not in REGISTRY:
            raise ComeError(f"{flag}: unknown method {method!r}; choose from {', '.join(method_names())}")
        overrides = []
        for pair in pairs:
            key, _, value = pair.partition("=")
            if not value:
                raise ComeError(f"{flag}: bad override {pair!r} in {item!r}; write method:option=value with a "
                                "`come compress` option such as refit=none or pair-score=error")
            overrides.append(override(CompressConfig, key, value.strip(), flag, SHARED))
        keys = [name for name, _ in overrides]
        if len(set(keys)) != len(keys):
            twice = next(k for k in keys if keys.count(k) > 1).replace("_", "-")
            raise ComeError(f"{flag}: {item!r} sets {twice} twice; give each option once per row")
        spec = MethodSpec(item, method, tuple(overrides))
        try:
            resolve(spec.config(base))
        except ComeError as exc:
            raise ComeError(f"{flag} {item}: {exc}") from None
        specs.append(spec)
    if not specs:
        raise ComeError(f"{flag}: none given; choose from {', '.join(method_names())} (leave --methods out for "
                        f"the default set, {default_methods()})")
    if len({s.label for s in specs}) != len(specs):
        raise ComeError(f"{flag}: a row is listed twice")
    _applies_somewhere(base, specs)
    return specs


def _applies_somewhere(base: CompressConfig, specs: list[MethodSpec]) -> None:
    """A method-specific option given for every row is read by at least one row's method."""
    ignored = [set(get_method(s.method).ignored(replace(base, method=s.method))) for s in specs]
    for name in sorted(set.intersection(*ignored)):
        flag = flag_of(base.__dataclass_fields__[name])
        raise ComeError(f"{flag} is read by none of the methods compared ({', '.join(s.method for s in specs)}): "
                        f"drop {flag}, or add a method that reads it")
