"""Unit sensitivity: how much cutting a unit (KV group, FFN channel, expert) would cost.

Pure tensor functions (method.md section 1), one family per `--sensitivity`:
- l1 (the paper's): a unit's contribution to the residual update is W_out[:, j] * a_j, so
  E_t |a_j| * ||W_out[:, j]||_1 is the first-order size of what removing it changes. The
  statistics E_t |a_j| come from engine/runner.py.
- magnitude: weight-only, the unit's L1 path norm (`ffn_path_norm`, `attn_path_norm`).
- taylor: the first-order Taylor estimate |dL| of the calibration loss when the unit goes
  (`output_taylor`, `taylor_unit_sensitivity`); the gradients come from backprop.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from .row_blocks import row_blocks


def channel_sensitivity(act_abs_mean: Tensor, w_out: Tensor, gain: Tensor | None = None) -> Tensor:
    """S_j = E_t|a_j| * ||g * W_out[:, j]||_1 for the input channels j of an output projection.

    Used for FFN channels (w_out = down_proj) and attention channels (w_out = o_proj).
    `gain`: a post-norm's per-channel gain g (Gemma 2/3, OLMo-2), which scales what each
    unit writes to the residual stream (its 1 / rms is in the statistics, engine/runner.py);
    without it the column writes as it is.
    """
    if act_abs_mean.shape[0] != w_out.shape[1]:
        raise ValueError(f"{act_abs_mean.shape[0]} activations for a projection with {w_out.shape[1]} inputs")
    w = w_out.double() if gain is None else gain.double().reshape(-1, 1) * w_out.double()
    return act_abs_mean.double() * w.abs().sum(dim=0)


def channel_abs_sum(x: Tensor) -> Tensor:
    """sum_t |x_t,j| per channel j (last dim) over every leading dim, summed in float64: the
    numerator of E_t |a_j|. Over row blocks (row_blocks.py): in one pass over a batch it took
    a tenth of a compression run on a CPU. The blocks change the order of the float64 sums only."""
    return sum((b.abs().sum(dim=0, dtype=torch.float64) for b, in row_blocks(x)),
               torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device))


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
    directly by engine/runner.py.

    The channel-sum score bounds it from above (triangle inequality); the exact score sees
    cancellation between a head's channels.
    """
    return head_out_l1_mean.double()


def routed_expert_l1(x: Tensor, top_idx: Tensor, top_w: Tensor, gate_up: Tensor, down: Tensor,
                     act: Callable[[Tensor], Tensor]) -> Tensor:
    """Per expert e, the sum over tokens of ||w_e(t) * expert_e(x_t)||_1 (float64 [E]): what e
    writes to the residual stream, w_e(t) its routing weight (0 where e is not among the
    token's top-k), so the first-order size of what removing it changes. An MoE FFN's unit
    score (engine/runner.py divides by the tokens). The experts' own computation, re-run per
    expert: their module only returns the sum. x [T, hidden]; top_idx, top_w [T, k];
    gate_up [E, 2 ff, hidden] (gate rows first); down [E, hidden, ff]."""
    out = torch.zeros(gate_up.shape[0], dtype=torch.float64, device=x.device)
    for e in top_idx.unique().tolist():
        tok, slot = (top_idx == e).nonzero(as_tuple=True)
        gate, up = F.linear(x[tok], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(act(gate) * up, down[e]) * top_w[tok, slot, None]
        out[e] = y.abs().sum(dtype=torch.float64)
    return out


def _gained(w: Tensor, gain: Tensor | None, dim: int) -> Tensor:
    """`w` (float64) with a norm's per-channel gain applied along `dim` (-1: the inputs a
    pre-norm scales; -2: the outputs a post-norm scales)."""
    w = w.double()
    if gain is None:
        return w
    return w * (gain.double() if dim == -1 else gain.double().reshape(-1, 1))


def ffn_path_norm(gate: Tensor, up: Tensor, down: Tensor, gain_in: Tensor | None = None,
                  gain_out: Tensor | None = None) -> Tensor:
    """`--sensitivity magnitude` of FFN units, weight-only: the L1 path norm (Neyshabur,
    Tomioka & Srebro 2015, "Norm-Based Capacity Control in Neural Networks": the sum over all
    input-output paths through a unit of the product of the weights' absolute values) of each
    channel j of a gated FFN, a_j = act(gate_j . x) * (up_j . x), whose paths run through both
    input rows: ||g * gate[j]||_1 * ||g * up[j]||_1 * ||g_out * down[:, j]||_1, g the pre-norm's
    gain (folded in, so a merged layer's folded weights score as before the fold), g_out a
    post-norm's. The input rows stand in for the activation E|a_j| of the l1 metric: a channel
    whose output column is zero scores 0. Dense: gate, up [ff, hidden], down [hidden, ff] ->
    [ff]. MoE: gate, up [E, ff, hidden], down [E, hidden, ff] -> [E], each expert the sum over
    its channels (its routing weight, an activation, is not seen)."""
    path = (_gained(gate, gain_in, -1).abs().sum(-1) * _gained(up, gain_in, -1).abs().sum(-1)
            * _gained(down, gain_out, -2).abs().sum(-2))
    return path if path.ndim == 1 else path.sum(-1)


def attn_path_norm(v: Tensor, o: Tensor, n_heads: int, n_kv_heads: int, gain_in: Tensor | None = None,
                   gain_out: Tensor | None = None) -> Tensor:
    """`--sensitivity magnitude` of KV groups [n_kv_heads]: the L1 path norm (`ffn_path_norm`)
    through the value path, sum over the group's query heads h and channels c of
    ||g * v[row of c in h's KV head]||_1 * ||g_out * o[:, column of c in h]||_1. The softmax
    mixes values by weights summing to one, so queries and keys set no scale and are left out.
    v [n_kv_heads * head_dim, hidden], o [hidden, n_heads * head_dim]."""
    v_in = _gained(v, gain_in, -1).abs().sum(-1).reshape(n_kv_heads, 1, -1)
    o_out = _gained(o, gain_out, -2).abs().sum(-2).reshape(n_kv_heads, n_heads // n_kv_heads, -1)
    return (v_in * o_out).sum(dim=(1, 2))


def output_taylor(w_out: Tensor, grad: Tensor) -> Tensor:
    """sum_i W[i, j] dL/dW[i, j] (signed, float64) for each input channel j of an output
    projection W [out, in] (o_proj, down_proj), or for each expert e of an MoE layer's fused
    down [E, hidden, ff] (summed over its slice). W[:, j] multiplies the unit's activation a_j,
    so this is sum_t a_j(t) dL/da_j(t): zeroing the unit changes L by minus this, to first
    order (with the norms, multipliers and post-norms the gradient passed through)."""
    prod = w_out.double() * grad.double()
    return prod.sum(dim=0) if prod.ndim == 2 else prod.sum(dim=(1, 2))


def taylor_unit_sensitivity(channel_taylor: Tensor, n_units: int) -> Tensor:
    """`--sensitivity taylor`: |sum of `output_taylor` over each unit's channels|, the units
    `n_units` equal contiguous blocks (KV groups over o_proj's inputs: a group's query heads are
    contiguous, `kv_group_sensitivity`; FFN channels or experts: one each). The first-order
    Taylor estimate |dL| of removing the whole unit (LLM-Pruner's group importance, Ma et al.
    2023; Kim et al. 2024's Taylor+ at unit level): the sum is signed until the unit is whole."""
    return channel_taylor.double().reshape(n_units, -1).sum(dim=1).abs()


def top_units(scores: Tensor, n: int) -> list[int]:
    """Ids of the `n` highest-scoring units, returned in their original order."""
    if not 0 <= n <= scores.numel():
        raise ValueError(f"cannot keep {n} of {scores.numel()} units")
    if n == 0:
        return []
    ids = torch.topk(scores.double(), n, sorted=False).indices
    return sorted(ids.tolist())
