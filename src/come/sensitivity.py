"""Unit sensitivity: expected L1 size of the output change if a unit were cut.

Pure tensor functions (method.md section 1). A unit's contribution to the residual
update is W_out[:, j] * a_j, so E_t |a_j| * ||W_out[:, j]||_1 is the first-order size of
what removing it changes. The statistics E_t |a_j| come from profile.py.
"""

from __future__ import annotations

import torch
from torch import Tensor


def channel_sensitivity(act_abs_mean: Tensor, w_out: Tensor) -> Tensor:
    """S_j = E_t|a_j| * ||W_out[:, j]||_1 for the input channels j of an output projection.

    Used for FFN channels (w_out = down_proj) and attention channels (w_out = o_proj).
    """
    if act_abs_mean.shape[0] != w_out.shape[1]:
        raise ValueError(f"{act_abs_mean.shape[0]} activations for a projection with {w_out.shape[1]} inputs")
    return act_abs_mean.double() * w_out.double().abs().sum(dim=0)


def head_sensitivity(attn_channel_s: Tensor, n_heads: int) -> Tensor:
    """Per query head: the sum of its head_dim channels' sensitivities."""
    return attn_channel_s.reshape(n_heads, -1).sum(dim=1)


def kv_group_sensitivity(head_s: Tensor, n_kv_heads: int) -> Tensor:
    """Per KV group: the query heads sharing KV head g are the CONTIGUOUS block
    g*n_rep .. g*n_rep+n_rep-1 in transformers' layout (repeat_kv), so sum those."""
    return head_s.reshape(n_kv_heads, -1).sum(dim=1)


def exact_head_sensitivity(head_out_l1_mean: Tensor) -> Tensor:
    """`--head-score exact`: E_t ||W_o[:, cols(i)] z_i(t)||_1, measured directly by profile.py.

    The channel-sum score bounds it from above (triangle inequality); the exact score sees
    cancellation between a head's channels.
    """
    return head_out_l1_mean.double()


def top_units(scores: Tensor, n: int) -> list[int]:
    """Ids of the `n` highest-scoring units, returned in their original order."""
    if not 0 <= n <= scores.numel():
        raise ValueError(f"cannot keep {n} of {scores.numel()} units")
    if n == 0:
        return []
    ids = torch.topk(scores.double(), n, sorted=False).indices
    return sorted(ids.tolist())
