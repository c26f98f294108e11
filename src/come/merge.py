"""Concatenation merge: ONE layer built from the selected units of two (method.md section 3).

Pure tensor functions. A layer's attention output is a sum over heads and its FFN
output a sum over channels, so a layer holding some heads/channels of A and some of B
computes the sum of those units' contributions: concatenation, not averaging.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor

from .adapters import AttnShape, LayerWeights

NormMode = Literal["fold", "average"]


def fold_norms(w: LayerWeights) -> LayerWeights:
    """Fold each RMSNorm's weight into the projections it feeds; the norms become ones.

    RMSNorm(x) = g * x / rms(x), so W @ (g * n) == (W diag(g)) @ n: exact, and it lets
    units from layers with different norm weights share one layer.
    """
    g_a, g_f = w.attn_norm, w.ffn_norm
    return replace(
        w,
        q=w.q * g_a, k=w.k * g_a, v=w.v * g_a,
        gate=w.gate * g_f, up=w.up * g_f,
        attn_norm=torch.ones_like(g_a), ffn_norm=torch.ones_like(g_f),
    )


def _rows(t: Tensor | None, blocks: list[int], size: int) -> Tensor | None:
    """Rows of blocks `blocks` (each `size` rows) of a [out, ...] tensor, in the given order."""
    if t is None:
        return None
    idx = torch.cat([torch.arange(b * size, (b + 1) * size) for b in blocks]) if blocks else torch.empty(0, dtype=torch.long)
    return t.index_select(0, idx.to(t.device))


def query_heads(kv_groups: list[int], n_rep: int) -> list[int]:
    """Query heads served by KV groups `kv_groups` (contiguous, as repeat_kv lays them out)."""
    return [g * n_rep + r for g in kv_groups for r in range(n_rep)]


def select_units(w: LayerWeights, shape: AttnShape, kv_groups: list[int], channels: list[int]) -> LayerWeights:
    """The sub-layer holding only KV groups `kv_groups` (with their query heads) and FFN
    channels `channels`. Biases travel with their rows."""
    heads = query_heads(kv_groups, shape.n_rep)
    hd = shape.head_dim
    ch = torch.tensor(channels, dtype=torch.long, device=w.down.device)
    cols = _rows(w.o.T, heads, hd).T
    return replace(
        w,
        q=_rows(w.q, heads, hd), k=_rows(w.k, kv_groups, hd), v=_rows(w.v, kv_groups, hd), o=cols,
        q_bias=_rows(w.q_bias, heads, hd), k_bias=_rows(w.k_bias, kv_groups, hd), v_bias=_rows(w.v_bias, kv_groups, hd),
        gate=w.gate.index_select(0, ch), up=w.up.index_select(0, ch), down=w.down.index_select(1, ch),
    )


def _cat(a: Tensor | None, b: Tensor | None, dim: int = 0) -> Tensor | None:
    return None if a is None else torch.cat([a, b], dim=dim)


def _mix(a: Tensor | None, b: Tensor | None, r_a: float) -> Tensor | None:
    return None if a is None else r_a * a + (1.0 - r_a) * b


def concat_merge(
    a: LayerWeights,
    b: LayerWeights,
    shape: AttnShape,
    kv_a: list[int],
    kv_b: list[int],
    ffn_a: list[int],
    ffn_b: list[int],
    r_a: float,
    norm: NormMode = "fold",
) -> LayerWeights:
    """Merge layer A (first) and B into one layer: A's kept units first, then B's.

    `norm="fold"` (ours, exact) folds both sides' norm weights into their projections;
    `norm="average"` (OFFICIAL code) keeps raw projections under the mean norm weight.
    Shared per-head q/k norms (Qwen3) and output biases are r-weighted (OFFICIAL).
    The result has len(kv_a)+len(kv_b) KV groups and len(ffn_a)+len(ffn_b) channels.
    """
    if norm == "fold":
        a, b = fold_norms(a), fold_norms(b)
    sa = select_units(a, shape, kv_a, ffn_a)
    sb = select_units(b, shape, kv_b, ffn_b)
    return LayerWeights(
        q=_cat(sa.q, sb.q), k=_cat(sa.k, sb.k), v=_cat(sa.v, sb.v), o=_cat(sa.o, sb.o, dim=1),
        gate=_cat(sa.gate, sb.gate), up=_cat(sa.up, sb.up), down=_cat(sa.down, sb.down, dim=1),
        attn_norm=(a.attn_norm + b.attn_norm) / 2, ffn_norm=(a.ffn_norm + b.ffn_norm) / 2,
        q_bias=_cat(sa.q_bias, sb.q_bias), k_bias=_cat(sa.k_bias, sb.k_bias), v_bias=_cat(sa.v_bias, sb.v_bias),
        o_bias=_mix(a.o_bias, b.o_bias, r_a), down_bias=_mix(a.down_bias, b.down_bias, r_a),
        q_norm=_mix(a.q_norm, b.q_norm, r_a), k_norm=_mix(a.k_norm, b.k_norm, r_a),
    )


def linear_combination(layers: list[LayerWeights], coeffs: list[float]) -> LayerWeights:
    """sum_i c_i W_i over every tensor (norms and biases included): the weight-space
    merges the paper argues against (LaCo's RDSC, plain averaging)."""
    first = layers[0]
    return replace(first, **{
        name: sum(c * getattr(w, name) for c, w in zip(coeffs, layers))
        for name in first.__dataclass_fields__ if getattr(first, name) is not None
    })


def rdsc_coefficients(n_layers: int) -> list[float]:
    """LaCo's Reserving-Differences-while-Seeking-Common: theta_0 + sum_{i>0} (theta_i - theta_0)
    = (1 - m) theta_0 + sum_{i>0} theta_i for a group of m+1 original layers."""
    return [1.0 - (n_layers - 1)] + [1.0] * (n_layers - 1)
