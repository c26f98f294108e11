"""Render a comparison: report.md (the paper-style table), report.json and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from .plan import Plan


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def delta_cell(delta: dict | None) -> str:
    """'+0.012 ± 0.006' (a paired difference of averages), '-' when there is none."""
    return "-" if not delta else f"{delta['average']:+.3f} ± {delta['se']:.3f}"


def markdown_table(rows: list[dict], tasks: list[str]) -> str:
    """Rows = methods; columns = tasks (paper-style metric), average, the paired difference
    of the average against the first method (when per-document scores exist), retention,
    ppl, size, time."""
    vs = next((r["delta"]["vs"] for r in rows if r.get("delta")), None)
    head = ["method", *tasks, "average", *([f"vs {vs} (± paired SE)"] if vs else []), "retention %", "perplexity",
            "params", "layers", "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        delta = [delta_cell(r.get("delta"))] if vs else []
        cells = [r["method"], *(_fmt(r["tasks"].get(t, {}).get("score")) for t in tasks), _fmt(r.get("average")),
                 *delta, _fmt(r.get("retention_pct"), ".1f"), _fmt(r.get("perplexity"), ".2f"),
                 f"{r['params'] / 1e6:.1f}M", str(r["layers"]), _fmt(r.get("compress_s"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict], tasks: list[str], plans: dict[str, Plan], header: str) -> None:
    """report.md + report.json + accuracy bars, merge map and pair-score heatmap PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"header": header, "tasks": tasks, "rows": rows}, indent=1))
    md = [f"# come compare\n\n{header}\n", markdown_table(rows, tasks), "",
          "Task scores: acc_norm for ARC, HellaSwag, OpenBookQA, PIQA; acc for BoolQ, WinoGrande (paper-style).",
          "'vs' column: this row's average minus the first method's, per document on the same documents, with "
          "the standard error of that paired difference (a gap under ~2 SE is noise).",
          "", "![accuracy](accuracy.png)", "![merge map](merge_map.png)", "![pair scores](pair_scores.png)"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    _plots(out, rows, tasks, plans)


def _plots(out: Path, rows: list[dict], tasks: list[str], plans: dict[str, Plan]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * (len(tasks) + 1)), 4))
    cols = tasks + ["average"]
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        vals = [r["tasks"].get(t, {}).get("score") or 0 for t in tasks] + [r.get("average") or 0]
        ax.bar([c + i * width for c in range(len(cols))], vals, width, label=r["method"])
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cols))], cols, rotation=30, ha="right")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 0.6 * max(len(plans), 1) + 1))
    for y, (name, plan) in enumerate(plans.items()):
        for k, group in enumerate(plan.groups):
            ax.barh(y, len(group), left=group[0], color="tab:orange" if len(group) > 1 else "tab:blue",
                    edgecolor="white")
            if len(group) > 1:
                ax.text(group[0] + len(group) / 2, y, str(k), ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(plans)), list(plans))
    ax.set_xlabel("original layer (orange: several original layers became the new layer numbered inside)")
    fig.tight_layout()
    fig.savefig(out / "merge_map.png", dpi=120)
    plt.close(fig)

    scored = {n: p for n, p in plans.items() if p.merges and p.merges[0].pair_scores}
    fig, axes = plt.subplots(1, max(len(scored), 1), figsize=(4 * max(len(scored), 1), 3.5), squeeze=False)
    for ax, (name, plan) in zip(axes[0], scored.items()):
        width = max(len(m.pair_scores) for m in plan.merges)
        grid = [[float("nan")] * width for _ in plan.merges]
        for i, m in enumerate(plan.merges):
            for j, s in enumerate(m.pair_scores):
                grid[i][j] = s if s is not None and s != float("inf") else float("nan")
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("pair / layer position")
        ax.set_ylabel("step")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "pair_scores.png", dpi=120)
    plt.close(fig)
