"""Concatenation merge: ONE layer built from the selected units of two (method.md section 3).

Pure tensor functions. A layer's attention output is a sum over heads and its FFN
output a sum over channels, so a layer holding some heads/channels of A and some of B
computes the sum of those units' contributions: concatenation, not averaging.

What is not a plain sum of units, and what the merge does with it:
- Pre-norms: folded into the projections they feed (exact; a gain is `norm_offset + w`,
  Gemma's 1 + w). OLMo-2 has none.
- Post-norms (Gemma 2/3 after attention and after the FFN; OLMo-2): a block adds
  g * u / rms(u), u the sum over its units, and rms(u) couples every unit, so no stock
  layer computes A's and B's blocks side by side. The merged gain is the two sides' gains
  weighted by the block's unit share (kept KV groups of A over all kept, FFN channels
  likewise): EXACT when a block keeps all its units from one side (keep-all of A or of B,
  e.g. a zeroed layer merged away), APPROXIMATE otherwise (the rms is the merged sum's).
- q/k norms shared by every head (Qwen3, Gemma 3): r-weighted mix (OFFICIAL); exact when
  both sides carry the same ones or r_a is 0 or 1. q/k norms over the whole projection
  (OLMo-2, one weight per row): the weights travel with their heads' rows, the RMS spans
  the merged layer's heads; exact when every head comes from one side.
- Per-head logit soft-capping (Gemma 2), the attention scale (Gemma's
  query_pre_attn_scalar, Granite's attention_multiplier) and Granite's residual multiplier
  are one setting for every layer and act per head or linearly: concatenation stays exact.
- The merged layer sits at A's position and takes A's attention type (mask, window, Gemma
  3's rotary base; adapters.keep_layers): exact for B's units only when both types agree.
- Mixture-of-Experts FFNs (Mixtral, Qwen-MoE, OLMoE): the units are the experts; each kept
  expert carries its router row (folded by the FFN pre-norm like the experts), so the merged
  layer is a stock MoE layer with the same expert count and top-k. The router's softmax and
  top-k compare logits ACROSS experts, and two layers' routers have different scales, so a
  mixed router is APPROXIMATE: tokens may route to other experts, with other weights.
  EXACT: keeping every expert of one side (that layer's FFN), and a side whose experts
  write nothing (zero down projections) contributes nothing, so keeping the other side
  whole merges it away losslessly. Qwen2-MoE's shared expert and its sigmoid gate (which
  scales the shared expert's whole output per token, so channels of two shared experts
  cannot share one gate) are kept WHOLE from the side keeping more routed experts (A on a
  tie): exact in the keep-all cases, the other side's shared expert dropped otherwise.
  A dense FFN and an MoE FFN (Qwen-MoE's `mlp_only_layers`) do not merge (ComeError).
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Literal

import torch
from torch import Tensor

from .adapters import AttnShape, LayerWeights
from .errors import ComeError

NormMode = Literal["fold", "average"]
_FFN_READERS = ("gate", "up", "router", "shared_gate", "shared_up", "shared_expert_gate")  # what reads the FFN's input
_SHARED = ("shared_gate", "shared_up", "shared_down", "shared_expert_gate")  # Qwen2-MoE's shared expert, kept whole


def fold_norms(w: LayerWeights) -> LayerWeights:
    """Fold each pre-norm's gain into the projections it feeds; the norms become identities.

    RMSNorm(x) = g * x / rms(x), so W @ (g * n) == (W diag(g)) @ n: exact, and it lets
    units from layers with different norm weights share one layer. Post-norms normalize
    a block's output and cannot fold.
    """
    out = {}
    if w.attn_norm is not None:
        g = w.gain(w.attn_norm)
        out.update(q=w.q * g, k=w.k * g, v=w.v * g, attn_norm=_identity_norm(w, w.attn_norm))
    if w.ffn_norm is not None:
        g = w.gain(w.ffn_norm)
        out.update({n: t * g for n in _FFN_READERS if (t := getattr(w, n)) is not None},
                   ffn_norm=_identity_norm(w, w.ffn_norm))
    return replace(w, **out)


def _identity_norm(w: LayerWeights, norm: Tensor) -> Tensor:
    """The norm weight whose gain is one (ones; Gemma's zeros)."""
    return torch.full_like(norm, 1.0 - w.norm_offset)


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
    channels `channels`. Biases and whole-projection q/k norm weights travel with their rows."""
    heads = query_heads(kv_groups, shape.n_rep)
    hd = shape.head_dim
    ch = torch.tensor(channels, dtype=torch.long, device=w.down.device)
    unit_dim = _down_unit_dim(w)
    cols = _rows(w.o.T, heads, hd).T
    rows = {}
    if _whole_projection(w.q_norm, shape):
        rows["q_norm"] = _rows(w.q_norm, heads, hd)
    if _whole_projection(w.k_norm, shape):
        rows["k_norm"] = _rows(w.k_norm, kv_groups, hd)
    return replace(
        w,
        q=_rows(w.q, heads, hd), k=_rows(w.k, kv_groups, hd), v=_rows(w.v, kv_groups, hd), o=cols,
        q_bias=_rows(w.q_bias, heads, hd), k_bias=_rows(w.k_bias, kv_groups, hd), v_bias=_rows(w.v_bias, kv_groups, hd),
        gate=w.gate.index_select(0, ch), up=w.up.index_select(0, ch), down=w.down.index_select(unit_dim, ch),
        router=None if w.router is None else w.router.index_select(0, ch), **rows,
    )


def _down_unit_dim(w: LayerWeights) -> int:
    """Where the FFN's units lie in `down`: input channels of a [hidden, ff] projection, the
    leading expert dimension of an MoE layer's [E, hidden, ff]."""
    return 1 if w.router is None else 0


def _check_same_ffn(a: LayerWeights, b: LayerWeights) -> None:
    """A dense FFN's channels are no experts, nor the reverse: such a pair has no stock merge."""
    if (a.router is None) != (b.router is None):
        raise ComeError("cannot merge a dense-FFN layer with an MoE layer (Qwen-MoE mlp_only_layers / "
                        "decoder_sparse_step): --protect the dense layers, or use a drop method")


def _whole_projection(norm: Tensor | None, shape: AttnShape) -> bool:
    """A q/k norm with one weight per projection row, its RMS over every head (OLMo-2), rather
    than one head_dim weight shared by every head (Qwen3, Gemma 3)."""
    return norm is not None and norm.shape[0] != shape.head_dim


def _cat(a: Tensor | None, b: Tensor | None, dim: int = 0) -> Tensor | None:
    return None if a is None else torch.cat([a, b], dim=dim)


def _mix(a: Tensor | None, b: Tensor | None, r_a: float) -> Tensor | None:
    return None if a is None else r_a * a + (1.0 - r_a) * b


def _mean(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None else (a + b) / 2


def _share(units_a: list[int], units_b: list[int]) -> float:
    """Side A's share of a block's kept units."""
    return len(units_a) / max(len(units_a) + len(units_b), 1)


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

    `norm="fold"` (ours, exact) folds both sides' pre-norm weights into their projections;
    `norm="average"` (OFFICIAL code) keeps raw projections under the mean norm weight.
    Shared per-head q/k norms (Qwen3, Gemma 3) and output biases are r-weighted (OFFICIAL);
    post-norm gains are weighted by each block's unit share (module docstring).
    The result has len(kv_a)+len(kv_b) KV groups and len(ffn_a)+len(ffn_b) channels (MoE:
    experts, with their router rows; the shared expert whole from one side, module docstring).
    """
    _check_same_ffn(a, b)
    if norm == "fold":
        a, b = fold_norms(a), fold_norms(b)
    sa = select_units(a, shape, kv_a, ffn_a)
    sb = select_units(b, shape, kv_b, ffn_b)
    whole_q, whole_k = _whole_projection(a.q_norm, shape), _whole_projection(a.k_norm, shape)
    shared = a if len(ffn_a) >= len(ffn_b) else b
    return type(a)(
        q=_cat(sa.q, sb.q), k=_cat(sa.k, sb.k), v=_cat(sa.v, sb.v), o=_cat(sa.o, sb.o, dim=1),
        gate=_cat(sa.gate, sb.gate), up=_cat(sa.up, sb.up), down=_cat(sa.down, sb.down, dim=_down_unit_dim(a)),
        router=_cat(sa.router, sb.router), **{n: getattr(shared, n) for n in _SHARED},
        attn_norm=_mean(a.attn_norm, b.attn_norm), ffn_norm=_mean(a.ffn_norm, b.ffn_norm),
        q_bias=_cat(sa.q_bias, sb.q_bias), k_bias=_cat(sa.k_bias, sb.k_bias), v_bias=_cat(sa.v_bias, sb.v_bias),
        o_bias=_mix(a.o_bias, b.o_bias, r_a), down_bias=_mix(a.down_bias, b.down_bias, r_a),
        q_norm=_cat(sa.q_norm, sb.q_norm) if whole_q else _mix(a.q_norm, b.q_norm, r_a),
        k_norm=_cat(sa.k_norm, sb.k_norm) if whole_k else _mix(a.k_norm, b.k_norm, r_a),
        attn_post_norm=_mix(a.attn_post_norm, b.attn_post_norm, _share(kv_a, kv_b)),
        ffn_post_norm=_mix(a.ffn_post_norm, b.ffn_post_norm, _share(ffn_a, ffn_b)),
    )


def linear_combination(layers: list[LayerWeights], coeffs: list[float]) -> LayerWeights:
    """sum_i c_i W_i over every tensor (norms and biases included): the weight-space
    merges the paper argues against (LaCo's RDSC, plain averaging). MoE: expert e of every
    layer is combined with expert e of the others, router rows likewise."""
    first = layers[0]
    for w in layers[1:]:
        _check_same_ffn(first, w)
    return replace(first, **{
        f.name: sum(c * getattr(w, f.name) for c, w in zip(coeffs, layers))
        for f in fields(first) if getattr(first, f.name) is not None
    })


def rdsc_coefficients(n_layers: int) -> list[float]:
    """LaCo's Reserving-Differences-while-Seeking-Common: theta_0 + sum_{i>0} (theta_i - theta_0)
    = (1 - m) theta_0 + sum_{i>0} theta_i for a group of m+1 original layers."""
    return [1.0 - (n_layers - 1)] + [1.0] * (n_layers - 1)
