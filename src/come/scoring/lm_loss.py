"""The calibration next-token loss computed from final hidden states through the model's
own final norm and LM head, a few rows at a time on the compute device: what the methods
that score by loss read (SLEB, Taylor+, CoMe-P's split search, `--pair-score nll`)."""

from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ComeError
from ..models.placement import on_device

_LOGIT_BYTES = 2**28  # float32 logits held at once by the loss (rows x vocabulary)


def head_rows(cache, states: list[Tensor]):
    """Yield (batch, first row, rows of final hidden states on the compute device, their
    next-token targets, final norm, LM head), a few rows at a time, with the norm and the head
    on that device. A row is one predicted position of a batch (all but the last of each window,
    row-major over [window, position])."""
    model, adapter, device = cache.model, cache.adapter, cache.runner.device
    if len(cache.token_batches) != len(states):
        raise ComeError(f"the next-token loss needs the calibration token ids of all {len(states)} batches; "
                        f"the cache holds {len(cache.token_batches)}")
    norm, head = adapter.final_norm(model), adapter.lm_head(model)
    chunk = max(1, _LOGIT_BYTES // (4 * head.out_features))
    with ExitStack() as stack:
        for module in (norm, head):
            stack.enter_context(on_device(module, device))
        for b, (h, ids) in enumerate(zip(states, cache.token_batches)):
            x = h[:, :-1].reshape(-1, h.shape[-1])
            y = ids[:, 1:].reshape(-1)
            for r in range(0, x.shape[0], chunk):
                yield b, r, x[r:r + chunk].to(device), y[r:r + chunk].to(device), norm, head


def n_predicted(cache) -> int:
    """Predicted positions in the calibration batches (the loss's denominator)."""
    return sum(ids.shape[0] * (ids.shape[1] - 1) for ids in cache.token_batches)


@torch.no_grad()
def next_token_nll(cache, states: list[Tensor]) -> float:
    """Mean next-token NLL of the calibration batches, given their final hidden states
    (before the final norm), through the model's own final norm and LM head."""
    total = torch.zeros((), dtype=torch.float64)
    for _, _, x, y, norm, head in head_rows(cache, states):
        total += F.cross_entropy(head(norm(x)).float(), y, reduction="sum").double().cpu()
    return float(total) / n_predicted(cache)


def nll_with_merge(cache, k: int, candidate, inputs: list[Tensor]) -> float:
    """Calibration NLL of the current model with its layers k, k + 1 replaced by `candidate`
    (run on `inputs`, the states entering layer k); the model itself is not touched. L - k - 1
    layer passes, each counted into `cache.forwards`, then the head."""
    layers = cache.adapter.decoder_layers(cache.model)
    h, _ = cache.runner.run(candidate, inputs, False, position=k)
    cache.forwards += 1
    for j in range(k + 2, len(layers)):
        h, _ = cache.runner.run(layers[j], h, False, position=j)
        cache.forwards += 1
    return next_token_nll(cache, h)
