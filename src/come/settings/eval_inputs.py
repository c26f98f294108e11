"""What an evaluation reads (lm-eval task names, local task data, the perplexity text), checked
before any model loads. Torch-free, so the settings floor (`EvalConfig.check`) can call it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import ComeError
from .tasks import SOURCES, check_task_names, resolve_split

# The pruning papers' perplexity texts (SparseGPT/Wanda protocol): dataset args, text field,
# joiner, documents used (C4: the first 1100 documents of the first validation shard).
PPL_SETS = {
    "wikitext2": ({"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"}, "text", "\n\n", None),
    "ptb": ({"path": "ptb_text_only", "name": "penn_treebank", "split": "test"}, "sentence", " ", None),
    "c4": ({"path": "allenai/c4", "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
            "split": "validation"}, "text", " ", 1100),
}
BOOLQ = SOURCES["boolq"].data + "/validation"


def boolq_dir(task_data: str | Path | None) -> Path:
    """The local BoolQ validation split whose passages are the offline perplexity text."""
    path = Path(task_data or ".") / BOOLQ
    if task_data is None or not path.is_dir():
        raise ComeError(f"--ppl-data boolq-passages needs --task-data with {BOOLQ}; looked for {path}")
    return path


def check_inputs(tasks: Sequence[str], task_data: str | Path | None, ppl_data: str | None,
                 limit: int | None = None, seqlen: int = 2048, batch_size: int = 8,
                 ppl_windows: int | None = None, skip: int = 0) -> None:
    """Fail fast, before any weights load: numbers in range, every task's local data and the
    perplexity file present."""
    if seqlen < 2 or batch_size < 1 or min(1 if limit is None else limit, 1 if ppl_windows is None else ppl_windows) < 1 \
            or skip < 0:
        raise ComeError(f"need --seqlen >= 2, --batch-size >= 1, --limit and --ppl-windows >= 1, --skip >= 0 "
                        f"(got {seqlen}, {batch_size}, {limit}, {ppl_windows}, {skip})")
    if task_data is not None:
        if not Path(task_data).is_dir():
            raise ComeError(f"--task-data {task_data} is not a directory")
        for task in tasks:
            resolve_split(task, task_data)
    else:
        check_task_names(list(tasks))
    if ppl_data == "boolq-passages":
        boolq_dir(task_data)
    if ppl_data not in (None, "boolq-passages", *PPL_SETS) and not Path(ppl_data).is_file():
        raise ComeError(f"--ppl-data {ppl_data!r}: not a file and not one of {', '.join(PPL_SETS)}, boolq-passages, none")
