"""Unit sensitivity: expected L1 size of the output change if a unit were cut.

Pure tensor functions (method.md section 1). A unit's contribution to the residual
update is W_out[:, j] * a_j, so E_t |a_j| * ||W_out[:, j]||_1 is the first-order size of
what removing it changes. The statistics E_t |a_j| come from profile.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F


def channel_sensitivity(act_abs_mean: Tensor, w_out: Tensor, gain: Tensor | None = None) -> Tensor:
    """S_j = E_t|a_j| * ||g * W_out[:, j]||_1 for the input channels j of an output projection.

    Used for FFN channels (w_out = down_proj) and attention channels (w_out = o_proj).
    `gain`: a post-norm's per-channel gain g (Gemma 2/3, OLMo-2), which scales what each
    unit writes to the residual stream (its 1 / rms is in the statistics, profile.py);
    without it the column writes as it is.
    """
    if act_abs_mean.shape[0] != w_out.shape[1]:
        raise ValueError(f"{act_abs_mean.shape[0]} activations for a projection with {w_out.shape[1]} inputs")
    w = w_out.double() if gain is None else gain.double().reshape(-1, 1) * w_out.double()
    return act_abs_mean.double() * w.abs().sum(dim=0)


def head_sensitivity(attn_channel_s: Tensor, n_heads: int) -> Tensor:
    """Per query head: the sum of its head_dim channels' sensitivities."""
    return attn_channel_s.reshape(n_heads, -1).sum(dim=1)


def kv_group_sensitivity(head_s: Tensor, n_kv_heads: int) -> Tensor:
    """Per KV group: the query heads sharing KV head g are the CONTIGUOUS block
    g*n_rep .. g*n_rep+n_rep-1 in transformers' layout (repeat_kv), so sum those."""
    return head_s.reshape(n_kv_heads, -1).sum(dim=1)


def exact_head_sensitivity(head_out_l1_mean: Tensor) -> Tensor:
    """`--head-score exact`: E_t ||W_o[:, cols(i)] z_i(t)||_1 (what the head writes to the
    residual stream: through the post-norm's gain and 1 / rms where there is one), measured
    directly by profile.py.

    The channel-sum score bounds it from above (triangle inequality); the exact score sees
    cancellation between a head's channels.
    """
    return head_out_l1_mean.double()


def routed_expert_l1(x: Tensor, top_idx: Tensor, top_w: Tensor, gate_up: Tensor, down: Tensor,
                     act: Callable[[Tensor], Tensor]) -> Tensor:
    """Per expert e, the sum over tokens of ||w_e(t) * expert_e(x_t)||_1 (float64 [E]): what e
    writes to the residual stream, w_e(t) its routing weight (0 where e is not among the
    token's top-k), so the first-order size of what removing it changes. An MoE FFN's unit
    score (profile.py divides by the tokens). The experts' own computation, re-run per
    expert: their module only returns the sum. x [T, hidden]; top_idx, top_w [T, k];
    gate_up [E, 2 ff, hidden] (gate rows first); down [E, hidden, ff]."""
    out = torch.zeros(gate_up.shape[0], dtype=torch.float64, device=x.device)
    for e in top_idx.unique().tolist():
        tok, slot = (top_idx == e).nonzero(as_tuple=True)
        gate, up = F.linear(x[tok], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(act(gate) * up, down[e]) * top_w[tok, slot, None]
        out[e] = y.abs().sum(dtype=torch.float64)
    return out


def top_units(scores: Tensor, n: int) -> list[int]:
    """Ids of the `n` highest-scoring units, returned in their original order."""
    if not 0 <= n <= scores.numel():
        raise ValueError(f"cannot keep {n} of {scores.numel()} units")
    if n == 0:
        return []
    ids = torch.topk(scores.double(), n, sorted=False).indices
    return sorted(ids.tolist())
