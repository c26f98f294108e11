"""Checks that run before any weight loads or any compute: where the output goes (never
onto anything `come` did not write: outputs.py), whether the model source is whole,
whether tensors are finite. Each failure is one line naming the problem and the fix (a
ComeError: exit code 2 from the CLI), and nothing is written."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import ComeError
from .outputs import come_output, come_results

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _writable_ancestor(path: Path, flag: str) -> None:
    """The nearest existing ancestor of `path` is a directory this process can create in
    (probed with a temporary directory removed at once: root passes every os.access)."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ComeError(f"{flag} {path}: {parent} is a file, not a directory; choose another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".come-probe-", dir=parent))
    except OSError as exc:
        raise ComeError(f"{flag} {path}: cannot write in {parent} ({exc.strerror or exc}); choose another {flag}") from None


def _forms(path: str | Path) -> set[Path]:
    """`path` absolute as written (`..` collapsed) and with every symbolic link resolved."""
    return {Path(os.path.abspath(path)), Path(os.path.realpath(path))}


def _holds(outer: str | Path, inner: str | Path) -> bool:
    """`outer` is `inner` or one of its ancestors (under either form of each)."""
    return any(o == i or o in i.parents for o in _forms(outer) for i in _forms(inner))


def _check_place(out: str | Path, flag: str, inputs: Mapping[str, str | None]) -> Path:
    """What no output may be, --overwrite or not: an empty name (not `.`), a symbolic link,
    the working directory or a folder above it, an input or a folder holding one."""
    if not str(out).strip():
        raise ComeError(f"{flag} is empty; give a path")
    path = Path(out)
    if path.is_symlink():
        raise ComeError(f"{flag} {out} is a symbolic link (to {os.readlink(path)}); give a real path, not a link")
    if _holds(path, Path.cwd()):
        raise ComeError(f"{flag} {out} is the working directory or holds it; choose another {flag}")
    for name, value in inputs.items():
        if value and os.path.lexists(value) and _holds(path, value):
            what = "is" if any(o == i for o in _forms(path) for i in _forms(value)) else "holds"
            raise ComeError(f"{flag} {out} {what} the input {name} {value}; choose another {flag}")
    return path


def _listing(path: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_output_dir(out: str | Path, overwrite: bool, flag: str = "--out", *,
                     inputs: Mapping[str, str | None] | None = None, kept: tuple[str, ...] = ()) -> Path:
    """An output DIRECTORY: absent or empty, or (with --overwrite) an output `come` wrote
    (outputs.come_output); never an input or a folder holding one (`inputs`: {option: path}),
    the working directory, a link; creatable. `kept`: entries not counted (distill's
    checkpoints/, carried into its result)."""
    out = _check_place(out, flag, inputs or {})
    if out.exists() and not out.is_dir():
        raise ComeError(f"output path {out} exists and is not a directory; choose another {flag}")
    if out.is_dir() and any(p.name not in kept for p in out.iterdir()):
        what = come_output(out)
        if what is None:
            raise ComeError(f"output directory {out} is not empty and not a come output (it holds {_listing(out)}); "
                            f"choose another {flag}")
        if not overwrite:
            raise ComeError(f"output directory {out} is {what}; pass --overwrite to replace it or choose another "
                            f"{flag}")
    _writable_ancestor(out, flag)
    return out


def check_output_file(out: str | Path, overwrite: bool = False, flag: str = "--out", *,
                      inputs: Mapping[str, str | None] | None = None) -> Path:
    """An output FILE: absent, or (with --overwrite) results `come eval` wrote; never an input
    or a file inside one, a directory, a link; its folder creatable."""
    if not str(out).strip():
        raise ComeError(f"{flag} is empty; give a file path such as results.json")
    path, inputs = Path(out), inputs or {}
    if path.is_dir() and not path.is_symlink():
        raise ComeError(f"{flag} {out} is a directory; give a file path such as {path / 'results.json'}")
    _check_place(path, flag, {k: v for k, v in inputs.items() if v and not Path(v).is_dir()})
    if path.exists():
        inside = [f"{k} {v}" for k, v in inputs.items() if v and Path(v).is_dir() and _holds(v, path)]
        if inside:
            raise ComeError(f"{flag} {out} is a file of the input {inside[0]}; choose another {flag}")
        if not come_results(path):
            raise ComeError(f"{flag} {out} exists and is not come eval results; choose another {flag}")
        if not overwrite:
            raise ComeError(f"{flag} {out} holds come eval results; pass --overwrite to replace it or choose another "
                            f"{flag}")
    _writable_ancestor(path, flag)
    return path


def _safetensors_ok(path: Path) -> bool:
    """The file's header is whole: 8-byte length, then that much JSON, within the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError):
        return False
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0) <= size


def _local_model(name: str) -> Path | None:
    path = Path(name)
    return path if path.is_dir() and (path / "config.json").is_file() else None


def check_model_dir(name: str) -> None:
    """A local model directory has whole, readable weights (Hub ids and .gguf files are
    checked by their loaders)."""
    path = _local_model(name)
    if path is None:
        return
    present = [f for f in WEIGHT_FILES if (path / f).is_file()]
    if not present:
        raise ComeError(f"model directory {path} has config.json but no weights ({', '.join(WEIGHT_FILES[::2])}); "
                        "point MODEL at a complete checkpoint")
    shards = [path / "model.safetensors"] if "model.safetensors" in present else []
    if "model.safetensors.index.json" in present:
        try:
            index = json.loads((path / "model.safetensors.index.json").read_text())
            shards = sorted({path / f for f in index["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError):
            raise ComeError(f"{path / 'model.safetensors.index.json'} is not a valid shard index; re-download or "
                            "re-save the model") from None
    for shard in shards:
        if not shard.is_file() or not _safetensors_ok(shard):
            raise ComeError(f"{shard} is missing, truncated or not a safetensors file; re-download or re-save the model")


def check_tokenizer_dir(name: str) -> None:
    """A local model directory has tokenizer files."""
    path = _local_model(name)
    if path is not None and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ComeError(f"model directory {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                        "save the tokenizer beside the model")


def first_nonfinite(module: nn.Module) -> str | None:
    """Name of the first parameter or buffer holding NaN or inf (None when all are finite)."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_finite(module: nn.Module, what: str, fix: str) -> None:
    """One line naming the first non-finite tensor of `module`, where it was found and the fix."""
    bad = first_nonfinite(module)
    if bad is not None:
        raise ComeError(f"{what}: tensor {bad} holds NaN or inf; {fix}")
