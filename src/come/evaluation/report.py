"""Render a comparison: report.md (the table, what its columns mean and the figures, each
only when the run has data for it), report.json, and the figures (plots.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..settings.plan import Plan
from .plots import write_plots


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def delta_cell(delta: dict | None) -> str:
    """'+0.012 ± 0.006' (a paired difference of averages), '-' when there is none."""
    return "-" if not delta else f"{delta['average']:+.3f} ± {delta['se']:.3f}"


@dataclass(frozen=True)
class Column:
    """A column of the report: its heading, its cell for a row, and what it means (for the
    notes under the table; None when the heading says it all)."""

    head: str
    cell: Callable[[dict], str]
    note: str | None = None


def _task_columns(tasks: list[str]) -> list[Column]:
    note = ("Task scores: acc_norm for ARC, HellaSwag, OpenBookQA, PIQA; acc for BoolQ, WinoGrande (paper-style); "
            "average: their mean.")
    cols = [Column(t, lambda r, t=t: _fmt(r["tasks"].get(t, {}).get("score"))) for t in tasks]
    return [*cols, Column("average", lambda r: _fmt(r.get("average")), note)]


def columns(rows: list[dict], tasks: list[str]) -> list[Column]:
    """The report's columns: those the rows have data for (no task, average, vs or retention
    column without tasks; no perplexity without perplexity text)."""
    cols = [Column("method", lambda r: r["method"]), *(_task_columns(tasks) if tasks else [])]
    refs = list(dict.fromkeys(r["delta"]["vs"] for r in rows if r.get("delta")))
    if refs:  # several sparsities: each row is set against the first method at its own level
        vs = refs[0] if len(refs) == 1 else "the first method at the same sparsity (" + ", ".join(refs) + ")"
        cols.append(Column(f"vs {refs[0] if len(refs) == 1 else 'first method'} (± paired SE)",
                           lambda r: delta_cell(r.get("delta")),
                           f"vs {vs}: this row's average minus that row's, per document on the same documents, with "
                           "the standard error of that paired difference (a gap under ~2 SE is noise)."))
    if any(r.get("retention_pct") is not None for r in rows):
        cols.append(Column("retention %", lambda r: _fmt(r.get("retention_pct"), ".1f"),
                           "retention: the average as % of the dense model's."))
    if any(r.get("perplexity") is not None for r in rows):
        cols.append(Column("perplexity", lambda r: _fmt(r.get("perplexity"), ".2f")))
    if any(r.get("fidelity") for r in rows):
        cols += [Column("KL to dense", lambda r: _fmt((r.get("fidelity") or {}).get("kl", {}).get("mean"), ".4f"),
                        "KL to dense: mean per-token KL(dense || model) on the perplexity windows (nats; 0 is the "
                        "dense model itself); top-1: share of tokens where the model's most likely next token is "
                        "the dense model's."),
                 Column("top-1", lambda r: _fmt((r.get("fidelity") or {}).get("top1"), ".3f"))]
    kl_refs = list(dict.fromkeys(r["kl_delta"]["vs"] for r in rows if r.get("kl_delta")))
    if kl_refs:
        cols.append(Column(f"KL vs {kl_refs[0] if len(kl_refs) == 1 else 'first method'} (± paired SE)",
                           lambda r: "-" if not r.get("kl_delta") else
                           f"{r['kl_delta']['kl']:+.4f} ± {r['kl_delta']['se']:.4f}",
                           "KL vs: this row's mean KL minus that row's, paired over the same perplexity windows, "
                           "with the standard error over windows (negative: closer to dense)."))
    return cols + [Column("params", lambda r: f"{r['params'] / 1e6:.2f}M", "params: all parameters, embeddings and "
                          "head included."),
                   Column("layers", lambda r: str(r["layers"])),
                   Column("time (s)", lambda r: _fmt(r.get("compress_s"), ".1f"), "time: wall time of the "
                          "compression (the evaluation not included).")]


def markdown_table(rows: list[dict], tasks: list[str]) -> str:
    """Rows = models (dense first); columns = `columns(rows, tasks)`."""
    cols = columns(rows, tasks)
    lines = ["| " + " | ".join(c.head for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(c.cell(r) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict], tasks: list[str], plans: dict[str, Plan], header: str) -> None:
    """report.md + report.json + the figures this run has data for."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"header": header, "tasks": tasks, "rows": rows}, indent=1))
    notes = [c.note for c in columns(rows, tasks) if c.note]
    md = [f"# come compare\n\n{header}\n", markdown_table(rows, tasks), "", *notes, ""]
    for name, caption in write_plots(out, rows, tasks, plans):
        md += [f"![{Path(name).stem}]({name})", "", caption, ""]
    (out / "report.md").write_text("\n".join(md))
