"""Calibration and evaluation text: named datasets or local files, cut into token windows."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .errors import ComeError

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
        raise ComeError(
            f"calibration/eval text not found: {source!r}; give an existing .txt/.jsonl file or one of {', '.join(NAMED)}"
        )
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ComeError(f"{path}:{n}: each .jsonl line must be a JSON object with a \"text\" field") from None
        text = "\n\n".join(texts)
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ComeError(f"text file {path} is empty; give a file with calibration text")
    return text


def _named_text(name: str) -> str:
    import datasets

    path, config, split = NAMED[name]
    try:
        if name == "c4":
            ds = datasets.load_dataset(path, data_files={split: C4_SHARD}, split=split)
        else:
            ds = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # network / hub errors surface as many types
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
