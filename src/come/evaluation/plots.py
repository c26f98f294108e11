"""The figures of `come compare`, each answering one question with labelled axes and units:
accuracy.png (how does each method score per task? drawn only when tasks ran),
versus_params.png (what does each method keep as it removes more? several sparsities only),
merge_map.png (what became of each original layer?), pair_scores.png (which scores chose
each merge or drop?). Drawn on matplotlib Figures directly: no pyplot, no global backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from ..settings.plan import Plan

CLIP_PERCENTILE = 90  # colour scale of pair_scores.png: values above this percentile share the top colour
PANELS_PER_ROW = 3
KIND_COLOURS = {"kept": "tab:blue", "merged": "tab:orange", "dropped": "lightgrey"}


def write_plots(out: Path, rows: list[dict], tasks: list[str], plans: dict[str, Plan]) -> list[tuple[str, str]]:
    """Draw the figures the run has data for into `out`; (file name, caption) of each."""
    figures = [_accuracy(out, rows, tasks)] if tasks else []
    if len({r.get("sparsity") for r in rows if r.get("sparsity")}) > 1 and (tasks or rows[0].get("perplexity") is not None):
        figures.append(_versus_params(out, rows, tasks))
    if plans:
        figures.append(_merge_map(out, plans))
    scored = {name: plan for name, plan in plans.items() if plan.merges and plan.merges[0].pair_scores}
    if scored:
        figures.append(_pair_scores(out, scored))
    return figures


def _save(fig: Figure, out: Path, name: str) -> None:
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)


def _accuracy(out: Path, rows: list[dict], tasks: list[str]) -> tuple[str, str]:
    cols = [*tasks, "average"]
    fig = Figure(figsize=(max(6.0, 1.2 * len(cols)), 4))
    ax = fig.subplots()
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        scores = [r["tasks"].get(t, {}).get("score") for t in tasks] + [r.get("average")]
        ax.bar(np.arange(len(cols)) + i * width, [np.nan if s is None else s for s in scores], width, label=r["method"])
    ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2, cols, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (fraction of documents right)")
    ax.set_title("Zero-shot score per task")
    ax.legend(fontsize=7)
    _save(fig, out, "accuracy.png")
    return "accuracy.png", ("Zero-shot score of every model per task and their average: acc_norm for ARC, HellaSwag, "
                            "OpenBookQA and PIQA, acc for BoolQ and WinoGrande (the papers' choice).")


def _versus_params(out: Path, rows: list[dict], tasks: list[str]) -> tuple[str, str]:
    """What does each method keep as it removes more? Average score and perplexity against
    parameters, one line per method through its levels, the dense model as a star."""
    panels = [("average", "average score (fraction right)", False)] if tasks else []
    if rows[0].get("perplexity") is not None:
        panels.append(("perplexity", "perplexity (log scale; lower is better)", True))
    fig = Figure(figsize=(5.5 * len(panels), 4))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    methods = list(dict.fromkeys(r["method"].rpartition("@")[0] for r in rows[1:]))
    for ax, (key, label, log_y) in zip(axes, panels):
        for m in methods:
            pts = sorted((r["params"] / 1e6, r[key]) for r in rows[1:] if r["method"].rpartition("@")[0] == m)
            ax.plot(*zip(*pts), marker="o", label=m)
        ax.plot(rows[0]["params"] / 1e6, rows[0][key], marker="*", markersize=12, color="black", linestyle="",
                label="dense")
        ax.set_xlabel("parameters (M, all of them)")
        ax.set_ylabel(label)
        if log_y:
            ax.set_yscale("log")
        ax.set_title(f"{key.capitalize()} against size")
        ax.legend(fontsize=7)
    _save(fig, out, "versus_params.png")
    return "versus_params.png", ("Each method through its sparsity levels (points, fewest parameters = highest "
                                 "sparsity) and the dense model (star): what it keeps as it removes more.")


def dropped_layers(plan: Plan) -> set[int]:
    """Original layers a one-shot method removed (their group's kept layer absorbs them)."""
    return {i for m in plan.merges if m.operator.startswith("drop") for i in m.group_b}


def _merge_map(out: Path, plans: dict[str, Plan]) -> tuple[str, str]:
    n_layers = max(plan.num_layers_before for plan in plans.values())
    fig = Figure(figsize=(max(6.0, 0.3 * n_layers + 2), 0.5 * len(plans) + 1.6))
    ax = fig.subplots()
    for y, plan in enumerate(plans.values()):
        dropped = dropped_layers(plan)
        for k, group in enumerate(plan.groups):
            kept = [i for i in group if i not in dropped]
            kind = "merged" if len(kept) > 1 else "kept"
            ax.barh(y, len(kept), left=kept[0] - 0.5, color=KIND_COLOURS[kind], edgecolor="white")
            if kind == "merged":
                ax.text((kept[0] + kept[-1]) / 2, y, str(k), ha="center", va="center", fontsize=7)
            for i in sorted(set(group) & dropped):
                ax.barh(y, 1, left=i - 0.5, color=KIND_COLOURS["dropped"], edgecolor="white", hatch="//")
    ax.set_yticks(range(len(plans)), list(plans))
    ax.invert_yaxis()
    ax.set_xlim(-0.5, n_layers - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("original layer")
    ax.set_title("What became of each original layer")
    ax.legend(handles=[Patch(color=KIND_COLOURS["kept"], label="kept"),
                       Patch(color=KIND_COLOURS["merged"], label="merged into one new layer (its number inside)"),
                       Patch(facecolor=KIND_COLOURS["dropped"], hatch="//", label="dropped")],
              fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, frameon=False)
    _save(fig, out, "merge_map.png")
    return "merge_map.png", ("One row per method, one cell per original layer: kept as it was (blue), merged with "
                             "its neighbours into one new layer (orange, the new layer's number inside), or dropped "
                             "(grey, hatched: removed, the kept layer before it takes its place).")


def _pair_scores(out: Path, plans: dict[str, Plan]) -> tuple[str, str]:
    ncols = min(PANELS_PER_ROW, len(plans))
    nrows = -(-len(plans) // ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.4 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax in axes[len(plans):]:
        ax.set_axis_off()
    for ax, (name, plan) in zip(axes, plans.items()):
        dropped = dropped_layers(plan)
        if dropped:  # one shot: one profile of the dense model, the same in every record
            grid = np.array([plan.merges[0].pair_scores], dtype=float)
            marks = [(i, 0) for i in sorted(dropped)]
            ax.set_yticks([0], ["one shot"])
            ax.set_xlabel("original layer (x: dropped)")
            label = "block influence 1 - cos(in, out)"
        else:
            grid = np.full((len(plan.merges), max(len(m.pair_scores) for m in plan.merges)), np.nan)
            for step, m in enumerate(plan.merges):
                grid[step, :len(m.pair_scores)] = [np.nan if s is None else s for s in m.pair_scores]
            marks = [(m.position, step) for step, m in enumerate(plan.merges)]
            ax.set_yticks(range(len(plan.merges)), [str(s + 1) for s in range(len(plan.merges))])
            ax.set_ylabel("merge step")
            ax.set_xlabel("pair k: current layers k, k+1 (x: merged)")
            label = f"pair score: {plan.settings.get('pair_score', '?')}"
        grid[~np.isfinite(grid)] = np.nan
        norm = _robust_norm(grid)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
        ax.plot(*zip(*marks), "x", color="red", markersize=6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, label=label, extend="max" if np.nanmax(grid) > norm.vmax else "neither")
    _save(fig, out, "pair_scores.png")
    return "pair_scores.png", (
        "The scores that chose what to remove (lower: cheaper to remove). A progressive method re-scores the pairs "
        "of the current model before each merge: one row per merge step, x on the pair merged. A one-shot method "
        "scores the dense model once: one row, the block influence of each original layer (what ShortGPT drops "
        "the lowest of), x on the layers dropped. Blank: no such pair (the model is one layer shorter after each "
        f"merge) or one that may not merge. The colour scale is clipped at the {CLIP_PERCENTILE}th percentile of "
        "each panel's scores (the colour bar's arrow stands for higher values), so the first layers' large scores "
        "do not turn every other cell the same colour.")


def _robust_norm(grid: np.ndarray) -> Normalize:
    """Colour scale from the smallest score to the CLIP_PERCENTILE-th percentile."""
    low, high = np.nanmin(grid), np.nanpercentile(grid, CLIP_PERCENTILE)
    return Normalize(low, high if high > low else np.nanmax(grid))
