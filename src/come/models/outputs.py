"""What `come` writes, recognised by its own marks: --overwrite replaces only such an output
(preflight.check_output_dir / check_output_file), and a killed run's temporary sibling is
removed only when its name is exactly the one `come` makes (checkpoint.atomic_dir).

The marks: a compress or distill output holds come_plan.json (a Plan: a JSON object with
its keys; a distill output also distill_log.json); a compare report holds report.json with
the keys `come compare` writes; a multi-sparsity compress OUT holds only sparsity-* outputs
(and their temporary siblings); a distill OUT interrupted before its result holds only
checkpoints/ with step_N checkpoints; `come eval --out` results are a JSON object with the
keys `evaluate()` returns. Anything else is not `come`'s, whatever it is called.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from ..settings.plan import PLAN_FILE

LOG_FILE = "distill_log.json"
CHECKPOINTS = "checkpoints"
REPORT_FILE = "report.json"
_MARKS = {PLAN_FILE: ("model", "method", "groups", "merges"), REPORT_FILE: ("header", "tasks", "rows")}
_RESULTS = ("tasks", "average", "perplexity", "settings")
# `.NAME.tmp-<pid>-<mkdtemp's 8 characters>`, and `-replaced` after it for the output moved aside
_TEMP = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>[0-9]{1,10})-[a-z0-9_]{8}(?:-replaced)?")
_LEVEL = re.compile(r"sparsity-[0-9][0-9.e-]*")
_STEP = re.compile(r"step_[0-9]+|\.step_[0-9]+\.tmp-[a-z0-9_]{8}")  # train_state.write_checkpoint's names


def temp_prefix(name: str) -> str:
    """The start of the temporary sibling this process makes for the output `name`."""
    return f".{name}.tmp-{os.getpid()}-"


def temp_sibling(entry: str) -> tuple[str, int] | None:
    """(the output's name, the pid that made it) when `entry` is named exactly as `come`'s
    temporary sibling of an output (or that output moved aside), else None."""
    match = _TEMP.fullmatch(entry)
    return (match["name"], int(match["pid"])) if match else None


def _json_with(path: Path, keys: tuple[str, ...]) -> bool:
    """`path` is a regular file holding a JSON object with all of `keys`."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


def come_output(path: str | Path) -> str | None:
    """What `come` output the directory `path` is, in words ("a come compress output", ...);
    None when it is not one (a symbolic link never is)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return None
    if _json_with(path / PLAN_FILE, _MARKS[PLAN_FILE]):
        return "a come distill output" if (path / LOG_FILE).is_file() else "a come compress output"
    if _json_with(path / REPORT_FILE, _MARKS[REPORT_FILE]):
        return "a come compare report"
    entries = list(path.iterdir())
    if any(_LEVEL.fullmatch(e.name) for e in entries) and all(_level_part(e) for e in entries):
        return "a come multi-sparsity output"
    ckpt = path / CHECKPOINTS
    if [e.name for e in entries] == [CHECKPOINTS] and not ckpt.is_symlink() and ckpt.is_dir() and \
            all(_STEP.fullmatch(e.name) for e in ckpt.iterdir()):
        return "an interrupted come distill run"
    return None


def _level_part(entry: Path) -> bool:
    """`entry` is a sparsity-* output, or `come`'s temporary sibling of one (a killed level)."""
    if _LEVEL.fullmatch(entry.name):
        return come_output(entry) is not None
    temp = temp_sibling(entry.name)
    return temp is not None and bool(_LEVEL.fullmatch(temp[0]))


def come_results(path: str | Path) -> bool:
    """`path` is a results file `come eval --out` wrote."""
    return _json_with(Path(path), _RESULTS)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a temporary file beside it, renamed over it. A file
    replaced keeps its permissions; a new one gets the umask's. Raises OSError."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if path.exists():
            mode = path.stat().st_mode & 0o777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
