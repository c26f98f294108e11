"""Evaluation: perplexity by the pruning papers' protocol (+ lm-eval tasks, retention)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import ComeError


def eval_windows(text: str, tokenizer, seqlen: int) -> Tensor:
    """The whole text as consecutive non-overlapping windows of `seqlen` tokens
    (the tail shorter than a window is dropped, as in the papers' protocol)."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    n = len(ids) // seqlen
    if n == 0:
        raise ComeError(f"perplexity text has {len(ids)} tokens, fewer than one --seqlen window of {seqlen}")
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 4, device: str | torch.device = "cpu") -> float:
    """exp(token-weighted mean NLL) over all next-token predictions in `windows`.

    Each window is scored independently (no context carried across windows); every
    window contributes seqlen-1 predictions, so the mean is exact, not a mean of means.
    """
    model.eval()
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", leave=False, unit="batch"):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        nll += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    return math.exp(nll / count)
