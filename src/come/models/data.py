"""Calibration, evaluation and training text: named datasets or local files, cut into token windows."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import ComeError
from ..settings.hub import OFFLINE_HINT, hub_access

log = logging.getLogger("come")

if TYPE_CHECKING:
    from ..settings.distill_config import DistillConfig

NAMED = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train"),
    "c4": ("allenai/c4", None, "train"),
}
C4_SHARD = "en/c4-train.00000-of-01024.json.gz"


def read_text(source: str) -> str:
    """Text of a named dataset (wikitext2, c4: via `datasets`) or of a local .txt/.jsonl file.

    A .jsonl file is one JSON object per line with a "text" field (empty lines skipped).
    """
    path = Path(source)
    if source in NAMED and not path.exists():
        return _named_text(source)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "not found"
        raise ComeError(f"calibration/eval text {source!r} {what}; give an existing .txt/.jsonl file or one of "
                        f"{', '.join(NAMED)}")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise ComeError(f"{path} is a binary file, not text; give a .txt or .jsonl file of text")
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if path.suffix == ".jsonl":  # JSON is UTF-8 by definition
            raise ComeError(f"{path} is not UTF-8 text (byte {exc.start}); convert it, e.g. iconv -t utf-8") from None
        content = raw.decode("utf-8", errors="replace")
        log.warning("%s is not valid UTF-8 (first bad byte at %d): undecodable bytes replaced", path, exc.start)
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ComeError(f"{path}:{n}: each .jsonl line must be a JSON object with a \"text\" field") from None
            if not isinstance(value, str):
                raise ComeError(f"{path}:{n}: \"text\" must be a string, got {type(value).__name__}")
            texts.append(value)
        text = "\n\n".join(texts)
    else:
        text = content
    if not text.strip():
        raise ComeError(f"text file {path} is empty; give a file with calibration text")
    return text


def _named_text(name: str) -> str:
    import datasets

    path, config, split = NAMED[name]
    try:
        with hub_access() as online:
            if name == "c4":
                ds = datasets.load_dataset(path, data_files={split: C4_SHARD}, split=split)
            else:
                ds = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # network / hub errors surface as many types
        if not online:
            raise ComeError(f"could not load dataset {name!r}: {OFFLINE_HINT}; pass a local .txt/.jsonl file instead") from None
        raise ComeError(f"could not load dataset {name!r} ({type(exc).__name__}); offline? pass a local .txt/.jsonl file instead") from exc
    return "\n\n".join(t for t in ds["text"] if t.strip())


def token_windows(text: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> Tensor:
    """`nsamples` non-overlapping windows of `seqlen` tokens, chosen at random (seeded).

    Non-overlapping so that nsamples x seqlen really is the number of distinct tokens the
    statistics see (recorded in the Plan).
    """
    if nsamples < 1 or seqlen < 2:
        raise ComeError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    n_windows = len(ids) // seqlen
    if n_windows < nsamples:
        raise ComeError(
            f"text has {len(ids)} tokens = {n_windows} windows of {seqlen}, fewer than --nsamples {nsamples}; "
            "lower --nsamples or --seqlen, or give more text"
        )
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))[:nsamples]
    flat = torch.tensor(ids[: n_windows * seqlen], dtype=torch.long).view(n_windows, seqlen)
    return flat[order.sort().values]


def load_calibration(source: str, tokenizer, nsamples: int, seqlen: int, seed: int) -> Tensor:
    """[nsamples, seqlen] token ids for calibration."""
    return token_windows(read_text(source), tokenizer, nsamples, seqlen, seed)


def eval_windows(text: str, tokenizer, seqlen: int, what: str = "perplexity text") -> Tensor:
    """The whole text as consecutive non-overlapping windows of `seqlen` tokens
    (the tail shorter than a window is dropped, as in the papers' protocol); `what` names the
    text in the error when it is shorter than one window."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    n = len(ids) // seqlen
    if n == 0:
        raise ComeError(f"{what} has {len(ids)} tokens, fewer than one --seqlen window of {seqlen}")
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)


def training_windows(cfg: DistillConfig, tokenizer) -> tuple[Tensor, Tensor]:
    """(training windows, held-out windows) of `come distill`: consecutive non-overlapping
    windows of seqlen tokens; without --eval-data the held-out ones are the last of --data,
    never trained on. The CLI calls it before loading weights, so bad data fails fast."""
    train = eval_windows(read_text(cfg.data), tokenizer, cfg.seqlen, "--data (training text)")
    if cfg.eval_data is not None:
        held_out = eval_windows(read_text(cfg.eval_data), tokenizer, cfg.seqlen, "--eval-data (held-out text)")
        return train, held_out[: cfg.eval_windows]
    if len(train) <= cfg.eval_windows:
        raise ComeError(f"--data has {len(train)} windows of {cfg.seqlen} tokens, not more than --eval-windows "
                        f"{cfg.eval_windows} held out: give more text, lower --seqlen / --eval-windows, or pass --eval-data")
    return train[: -cfg.eval_windows], train[-cfg.eval_windows:]


def shuffled_batch(windows: Tensor, first: int, size: int, seed: int) -> Tensor:
    """Samples first..first+size-1 of an endless stream of seeded per-epoch shuffles: the
    batch depends only on its position, so a resumed run sees exactly the same data."""
    n = len(windows)
    idx = [int(torch.randperm(n, generator=torch.Generator().manual_seed(seed + j // n))[j % n])
           for j in range(first, first + size)]
    return windows[idx]
