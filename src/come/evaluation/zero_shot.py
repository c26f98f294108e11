"""Zero-shot tasks through lm-evaluation-harness, offline from a local data directory.

lm-eval 0.4.x ships task YAMLs but no data. With a data directory we write, per task, a
small YAML that `include:`s the stock one by absolute path and swaps only the data source
for the local arrow files, so prompts, choices and metrics stay the harness's own and the
results carry the stock task names (which tasks, and where their data is: settings/tasks.py).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from ..errors import ComeError
from ..settings.hub import hf_offline
from ..settings.tasks import SOURCES, TASK_DATA_HINT, arrow_files, resolve_split, stock_dir

log = logging.getLogger(__name__)


def write_task_yamls(tasks: list[str], data_dir: str | Path, out_dir: str | Path) -> dict[str, tuple[str, str]]:
    """Write one override YAML per task into `out_dir` (an lm-eval --include_path) that reads
    the task's split from `data_dir`. Returns task -> (split used, usual split)."""
    import yaml

    splits = {}
    for task in tasks:
        split, usual = resolve_split(task, data_dir)
        src = SOURCES[task]
        local = Path(data_dir) / src.data
        if split != usual:
            log.warning("%s: no %r split in %s; using %r instead", task, usual, local, split)
        config = {
            "include": str(stock_dir() / src.yaml),
            "task": task,
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: arrow_files(local / split)}},
            "training_split": None,
            "validation_split": split if split == "validation" else None,
            "test_split": split if split == "test" else None,
            **src.overrides,
        }
        (Path(out_dir) / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        splits[task] = (split, usual)
    return splits


def run_tasks(model, tokenizer, tasks: list[str], task_data: str | Path | None = None,
              limit: int | None = None, batch_size: int = 8, skip: int = 0) -> dict[str, dict]:
    """Zero-shot `tasks` on the loaded model (wrapped in lm-eval's HFLM, on its device).

    task_data None: the stock tasks, data from the Hub. Otherwise offline from that
    directory. Returns task -> {"acc", "acc_norm" (None if the task has none), "n", "split",
    "usual_split", "per_doc"}: the harness's own figures on documents [skip, skip + limit)
    (the first `limit` by default); per_doc holds each metric per document in doc order, so
    two models scored on the same documents can be compared pairwise (evaluate.paired_delta).
    `skip` lets a choice be made on documents other than the ones a table reports.
    """
    import tempfile

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with contextlib.ExitStack() as stack:
        splits = {}
        if task_data is None:
            manager = TaskManager()
        else:
            yamls = stack.enter_context(tempfile.TemporaryDirectory(prefix="come-tasks-"))
            splits = write_task_yamls(tasks, task_data, yamls)
            stack.enter_context(hf_offline())
            manager = TaskManager(include_path=yamls, include_defaults=False)
        unknown = [t for t in tasks if t not in manager.all_subtasks]
        if unknown:
            raise ComeError(f"unknown lm-eval task(s): {', '.join(unknown)}")
        hf_log = logging.getLogger("lm_eval.models.huggingface")
        level = hf_log.level
        hf_log.setLevel(logging.ERROR)  # its warnings say we pass a model object, as we mean to
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        finally:
            hf_log.setLevel(level)
        # loaded once: the window needs each task's size, and the harness takes the Task objects
        try:
            loaded = manager.load(list(tasks))["tasks"]
        except Exception as exc:  # the Hub's errors surface as many types
            if task_data is not None:
                raise
            raise ComeError(f"could not load the task data of {', '.join(tasks)} from the Hub "
                            f"({type(exc).__name__}); {TASK_DATA_HINT}") from exc
        window = dict(limit=limit) if not skip else dict(samples=_doc_window(tasks, loaded, skip, limit))
        out = simple_evaluate(model=lm, tasks=[loaded[t] for t in tasks], task_manager=manager, log_samples=True,
                              bootstrap_iters=0, **window)
    results = {}
    for task in tasks:
        metrics, config = out["results"][task], out["configs"][task]
        split = config.get("test_split") or config.get("validation_split")
        results[task] = {
            "acc": metrics.get("acc,none"),
            "acc_norm": metrics.get("acc_norm,none"),
            "n": out["n-samples"][task]["effective"],
            "split": split,
            "usual_split": splits.get(task, (split, split))[1],
            "per_doc": _per_doc(out["samples"][task]),
        }
    return results


def _doc_window(tasks: list[str], loaded: dict, skip: int, limit: int | None) -> dict[str, list[int]]:
    """task -> the document ids [skip, skip + limit), cut at the task's size (`loaded`: name ->
    lm-eval Task); a task with no document past `skip` is a ComeError (it would silently
    score nothing)."""
    sizes = {name: len(task.eval_docs) for name, task in loaded.items()}
    short = [f"{t} ({sizes[t]})" for t in tasks if sizes[t] <= skip]
    if short:
        raise ComeError(f"--skip {skip} leaves no documents of {', '.join(short)}; lower --skip")
    return {t: list(range(skip, sizes[t] if limit is None else min(sizes[t], skip + limit))) for t in tasks}


def _per_doc(samples: list[dict]) -> dict[str, list[float]]:
    """metric -> its value on each document, in doc order (the harness logs one sample per doc)."""
    samples = sorted(samples, key=lambda s: s["doc_id"])
    return {m: [float(s[m]) for s in samples] for m in ("acc", "acc_norm") if samples and m in samples[0]}
