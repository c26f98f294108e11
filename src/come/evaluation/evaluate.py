"""Evaluation: perplexity by the pruning papers' protocol, lm-eval zero-shot tasks, retention.

`evaluate()` returns (and `come eval --out` writes) one dict:
`{"tasks": {task: {"acc", "acc_norm", "n", "split", "usual_split"}}, "average": float | None,
"perplexity": float | None, "fidelity": dict | None, "settings": {...}}`; "fidelity" (with a
reference model: KL, top-1 agreement, NLL difference) is fidelity.py's `summarize`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import ComeError
from ..models.api_inputs import expect_model
from ..models.data import eval_windows, read_text
from ..scoring.fidelity import ReferenceLogprobs, ReferenceWriter, score_windows
from ..settings.eval_inputs import PPL_SETS, boolq_dir, check_inputs
from ..settings.hub import hf_offline
from ..settings.tasks import DEFAULT_TASKS, TASK_DATA_HINT
from .zero_shot import run_tasks

log = logging.getLogger(__name__)

AVERAGE_METRIC = {
    "arc_challenge": "acc_norm", "arc_easy": "acc_norm", "hellaswag": "acc_norm", "openbookqa": "acc_norm",
    "piqa": "acc_norm", "boolq": "acc", "winogrande": "acc",
}
# a random guess's accuracy per task (before class imbalance): what "retention" is read against
CHANCE = {"arc_challenge": 0.25, "arc_easy": 0.25, "hellaswag": 0.25, "openbookqa": 0.25, "piqa": 0.5,
          "boolq": 0.5, "winogrande": 0.5}


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 1, device: str | torch.device | None = None) -> float:
    """exp(token-weighted mean NLL) over all next-token predictions in `windows`.

    Each window is scored independently (no context carried across windows); every
    window contributes seqlen-1 predictions, so the mean is exact, not a mean of means.
    Runs on `device` (default: where the model is). One window per forward by default:
    the full-vocabulary fp32 logits are the memory peak.
    """
    model.eval()
    device = device or next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", leave=False, unit="batch"):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        nll += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    return math.exp(nll / count)


def boolq_passages(task_data: str | Path | None) -> str:
    """The unique BoolQ validation passages, in order, joined by blank lines: Wikipedia
    prose of about WikiText-2 test's size, a stand-in when WikiText is unreachable."""
    import datasets

    return "\n\n".join(dict.fromkeys(datasets.load_from_disk(str(boolq_dir(task_data)))["passage"]))


def ppl_text(source: str, task_data: str | Path | None = None) -> str:
    """Perplexity text: `wikitext2` / `ptb` (TEST splits) or `c4` (validation), joined as in
    the papers; `boolq-passages` (from the task-data dir); or a local .txt/.jsonl file."""

    if source == "boolq-passages":
        return boolq_passages(task_data)
    if source in PPL_SETS and not Path(source).exists():
        import datasets

        args, field, joiner, docs = PPL_SETS[source]
        try:
            ds = datasets.load_dataset(**args)
            return joiner.join(ds[field] if docs is None else ds[:docs][field])
        except Exception as exc:  # network / hub errors surface as many types
            raise ComeError(f"could not load the perplexity text {source!r} from the Hub ({type(exc).__name__}); "
                            f"{TASK_DATA_HINT}, with --ppl-data boolq-passages (the default then) or a local "
                            "FILE") from exc
    return read_text(source)


def paper_metric(task: str, result: dict) -> str:
    """The metric a task counts with in the paper-style average (AVERAGE_METRIC; acc when
    that metric is missing or the task is not listed)."""
    metric = AVERAGE_METRIC.get(task, "acc")
    return metric if result.get(metric) is not None else "acc"


def paper_score(task: str, result: dict) -> float | None:
    return result.get(paper_metric(task, result))


def average(tasks: dict[str, dict]) -> float | None:
    """Paper-style mean over the tasks run: acc_norm (length-normalised log-likelihood, the
    fair score when answers are several tokens of different lengths) for arc_challenge,
    arc_easy, hellaswag, openbookqa and piqa; acc for boolq (one-word yes/no answers) and
    winogrande (the harness scores one shared continuation, so it has no acc_norm). Any
    other task counts with acc."""
    values = [v for task, r in tasks.items() if (v := paper_score(task, r)) is not None]
    return sum(values) / len(values) if values else None


def chance(tasks: Sequence[str]) -> float | None:
    """The paper-style average a random guess scores on `tasks` (CHANCE; 0 for a task not listed)."""
    return sum(CHANCE.get(t, 0.0) for t in tasks) / len(tasks) if tasks else None


def paired_delta(a: dict[str, dict], b: dict[str, dict]) -> tuple[float, float] | None:
    """(paper-style average of `a` minus that of `b`, its standard error) from two models'
    per-document scores on the SAME documents. Pairing cancels each document's own
    difficulty, so it resolves gaps far below either average's own error (~0.013 at 200
    docs x 7 tasks). None when a task lacks per-document scores or saw other documents."""
    deltas, var = [], 0.0
    for task, ra in a.items():
        rb = b.get(task)
        if rb is None or paper_score(task, ra) is None:
            continue
        metric = paper_metric(task, ra)
        xa, xb = ra.get("per_doc", {}).get(metric), rb.get("per_doc", {}).get(metric)
        if not xa or not xb or len(xa) != len(xb):
            return None
        d = torch.tensor(xa, dtype=torch.float64) - torch.tensor(xb, dtype=torch.float64)
        deltas.append(float(d.mean()))
        var += float(d.var()) / len(d) if len(d) > 1 else 0.0
    if not deltas:
        return None
    return sum(deltas) / len(deltas), math.sqrt(var) / len(deltas)


def perplexity_windows(tokenizer, ppl_data: str, task_data: str | Path | None = None, seqlen: int = 2048,
                       ppl_windows: int | None = None) -> Tensor:
    """The windows perplexity (and fidelity to a reference) is measured on: `ppl_data`'s text
    cut into non-overlapping `seqlen`-token windows, the first `ppl_windows` of them."""
    with hf_offline() if task_data else contextlib.nullcontext():
        return eval_windows(ppl_text(ppl_data, task_data), tokenizer, seqlen)[:ppl_windows]


def evaluate(model: nn.Module, tokenizer, tasks: Sequence[str] = DEFAULT_TASKS, task_data: str | Path | None = None,
             limit: int | None = None, ppl_data: str | None = "wikitext2", seqlen: int = 2048,
             batch_size: int = 8, ppl_windows: int | None = None, skip: int = 0,
             reference: ReferenceLogprobs | None = None, writer: ReferenceWriter | None = None) -> dict:
    """Zero-shot `tasks` (lm-eval, offline from `task_data` when given) and perplexity on
    `ppl_data` (None or "none": skipped) of a loaded model, on the device it is on.

    `limit`: N documents of each task, after the first `skip` (default: the first N); `ppl_windows`: the first N perplexity windows
    (default all: the papers' protocol; a cap keeps CPU runs short). `reference`: a reference
    model's distributions on the same windows (fidelity.py): adds KL / top-1 agreement / NLL
    difference, from the same pass as the perplexity; `writer`: records THIS model as a reference
    during that pass. Returns the dict in this module's docstring; "average" is over the tasks
    run, with AVERAGE_METRIC's metric per task.
    """
    expect_model(model)
    start = time.perf_counter()
    tasks, ppl_data = list(tasks), None if ppl_data == "none" else ppl_data
    check_inputs(tasks, task_data, ppl_data, limit, seqlen, batch_size, ppl_windows, skip)
    if (reference is not None or writer is not None) and ppl_data is None:
        raise ComeError("fidelity to a reference is measured on the perplexity windows; give --ppl-data")
    windows = perplexity_windows(tokenizer, ppl_data, task_data, seqlen, ppl_windows) if ppl_data else None
    with hf_offline() if task_data else contextlib.nullcontext():
        scores = run_tasks(model, tokenizer, tasks, task_data, limit, batch_size, skip) if tasks else {}
    ppl, fidelity = score_windows(model, windows, reference, writer=writer) if windows is not None else (None, None)
    return {
        "tasks": scores,
        "average": average(scores),
        "perplexity": ppl,
        "fidelity": fidelity,
        "settings": {"limit": limit, "skip": skip, "ppl_data": ppl_data, "seqlen": seqlen, "ppl_windows": ppl_windows,
                     "ppl_tokens": windows.numel() if windows is not None else 0,
                     "task_data": str(task_data) if task_data else None,
                     "wall_time_s": round(time.perf_counter() - start, 1)},
    }


def check_results(results, source: str) -> dict:
    """`results` is what `evaluate` returns (what `retention` reads of a baseline), or one line
    naming what is missing."""
    tasks = results.get("tasks") if isinstance(results, dict) else None
    missing = [k for k in ("tasks", "average", "perplexity") if not isinstance(results, dict) or k not in results]
    if not missing and not (isinstance(tasks, dict) and all(
            isinstance(r, dict) and {"n", "acc", "acc_norm"} <= r.keys() for r in tasks.values())):
        missing = ["per-task n / acc / acc_norm"]
    if missing:
        raise ComeError(f"{source} is not a results JSON of `come eval --out` (no {', '.join(missing)}); give one, "
                        "or the dense model itself")
    return results


def retention(results: dict, dense: dict) -> dict:
    """Each metric as % of the dense model's (perplexity too: there, above 100 is worse).
    Warns when the two runs did not see the same documents or text."""
    def pct(a, b):
        return None if a is None or not b else 100.0 * a / b

    for key in ("limit", "skip", "ppl_data", "seqlen", "ppl_windows"):
        if results.get("settings", {}).get(key) != dense.get("settings", {}).get(key):
            log.warning("baseline was run with a different %s; retention compares unlike runs", key)
    tasks = {}
    for task, r in results["tasks"].items():
        d = dense["tasks"].get(task)
        if d is None:
            continue
        if d["n"] != r["n"]:
            log.warning("%s: baseline scored %d documents, this model %d", task, d["n"], r["n"])
        tasks[task] = {m: pct(r[m], d[m]) for m in ("acc", "acc_norm")}
    return {"tasks": tasks, "average": pct(results["average"], dense["average"]),
            "perplexity": pct(results["perplexity"], dense["perplexity"])}
