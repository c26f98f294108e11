"""Concatenation merge: ONE layer built from the selected units of two (method.md section 3),
or of m adjacent layers (`--merge-item m`, `concat_merge_many`: every statement below holds
side by side for m sides, "A" the first).

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

from ..errors import ComeError
from ..models.adapters import AttnShape, LayerWeights

NormMode = Literal["fold", "average"]
_FFN_READERS = ("gate", "up", "router", "shared_gate", "shared_up", "shared_expert_gate")  # what reads the FFN's input
_SHARED = ("shared_gate", "shared_up", "shared_down", "shared_expert_gate")  # Qwen2-MoE's shared expert, kept whole


def fold_norms(w: LayerWeights) -> LayerWeights:
    """Fold each pre-norm's gain into the projections it feeds (float64); the norms become
    identities.

    RMSNorm(x) = g * x / rms(x), so W @ (g * n) == (W diag(g)) @ n: exact, and it lets
    units from layers with different norm weights share one layer. Post-norms normalize
    a block's output and cannot fold.
    """
    out = {n: _folded(w, n, t) for n in ("q", "k", "v", *_FFN_READERS)
           if (t := getattr(w, n)) is not None and _gain_of(w, n) is not None}
    out.update({n: _identity_norm(w, norm) for n in ("attn_norm", "ffn_norm") if (norm := getattr(w, n)) is not None})
    return replace(w, **out)


def _gain_of(w: LayerWeights, name: str) -> Tensor | None:
    """The pre-norm gain (float64) scaling the input of field `name` (None: no pre-norm does)."""
    if name in ("q", "k", "v"):
        return w.gain(w.attn_norm)
    return w.gain(w.ffn_norm) if name in _FFN_READERS else None


def _folded(w: LayerWeights, name: str, t: Tensor) -> Tensor:
    """`t` (field `name` of `w`, or some of its rows) in float64 times its pre-norm gain."""
    g = _gain_of(w, name)
    return t.double() if g is None else t.double() * g


def _identity_norm(w: LayerWeights, norm: Tensor) -> Tensor:
    """The norm weight whose gain is one (float64 ones; Gemma's zeros)."""
    return torch.full_like(norm, 1.0 - w.norm_offset, dtype=torch.float64)


def _rows(t: Tensor | None, blocks: list[int], size: int) -> Tensor | None:
    """Rows of blocks `blocks` (each `size` rows) of a [out, ...] tensor, in the given order."""
    if t is None:
        return None
    idx = torch.cat([torch.arange(b * size, (b + 1) * size) for b in blocks]) if blocks else torch.empty(0, dtype=torch.long)
    return t.index_select(0, idx.to(t.device))


def query_heads(kv_groups: list[int], n_rep: int) -> list[int]:
    """Query heads served by KV groups `kv_groups` (contiguous, as repeat_kv lays them out)."""
    return [g * n_rep + r for g in kv_groups for r in range(n_rep)]


def _kept(w: LayerWeights, name: str, shape: AttnShape, kv_groups: list[int], channels: list[int],
          fold: bool) -> Tensor | None:
    """Field `name` of side `w` cut to KV groups `kv_groups` (with their query heads) and FFN
    units `channels`, in float64, its pre-norm gain folded in when `fold`. Rows are cut before
    the conversion and the fold (the gain scales columns, so the bytes are those of folding
    first): only the kept rows of one tensor are ever held in float64. Biases and
    whole-projection q/k norm weights travel with their rows; what no unit owns comes whole."""
    t = getattr(w, name)
    if t is None:
        return None
    heads, hd = query_heads(kv_groups, shape.n_rep), shape.head_dim
    ch = torch.tensor(channels, dtype=torch.long, device=t.device)
    if name in ("q", "q_bias") or (name == "q_norm" and _whole_projection(t, shape)):
        t = _rows(t, heads, hd)
    elif name in ("k", "v", "k_bias", "v_bias") or (name == "k_norm" and _whole_projection(t, shape)):
        t = _rows(t, kv_groups, hd)
    elif name == "o":
        t = _rows(t.T, heads, hd).T
    elif name in ("gate", "up", "router"):
        t = t.index_select(0, ch)
    elif name == "down":
        t = t.index_select(_down_unit_dim(w), ch)
    return _folded(w, name, t) if fold else t.double()


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


def _cat(parts: list[Tensor | None], dim: int = 0) -> Tensor | None:
    return None if parts[0] is None else torch.cat(parts, dim=dim)


def _mix(parts: list[Tensor | None], weights: list[float]) -> Tensor | None:
    """sum_i w_i x_i, left to right (two sides: w_a a + w_b b)."""
    if parts[0] is None:
        return None
    out = weights[0] * parts[0]
    for w, x in zip(weights[1:], parts[1:]):
        out = out + w * x
    return out


def _mean(parts: list[Tensor | None]) -> Tensor | None:
    if parts[0] is None:
        return None
    out = parts[0]
    for x in parts[1:]:
        out = out + x
    return out / len(parts)


def _shares(units: list[list[int]]) -> list[float]:
    """Each side's share of a block's kept units (the last side takes the rest of 1)."""
    total = max(sum(len(u) for u in units), 1)
    first = [len(u) / total for u in units[:-1]]
    return first + [1.0 - sum(first)]


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
    """Merge layer A (first) and B into one layer: A's kept units first, then B's
    (`concat_merge_many` of the two, side A's share r_a)."""
    return concat_merge_many([a, b], shape, [kv_a, kv_b], [ffn_a, ffn_b], [r_a, 1.0 - r_a], norm)


def concat_merge_many(
    layers: list[LayerWeights],
    shape: AttnShape,
    kv: list[list[int]],
    ffn: list[list[int]],
    shares: list[float],
    norm: NormMode = "fold",
) -> LayerWeights:
    """Merge adjacent layers (in order; two for a pair, m for `--merge-item m`) into one layer:
    each side's kept units in turn, KV groups `kv[i]` and FFN units `ffn[i]` of side i.

    `norm="fold"` (ours, exact) folds every side's pre-norm weights into its projections;
    `norm="average"` (OFFICIAL code) keeps raw projections under the mean norm weight.
    Shared per-head q/k norms (Qwen3, Gemma 3) and output biases are weighted by `shares`
    (each side's share of the units, OFFICIAL for two); post-norm gains are weighted by each
    block's unit share (module docstring). The result has sum(len(kv[i])) KV groups and
    sum(len(ffn[i])) channels (MoE: experts, with their router rows; the shared expert whole
    from the side keeping the most routed experts, the first on a tie).
    """
    for w in layers[1:]:
        _check_same_ffn(layers[0], w)
    first, fold = layers[0], norm == "fold"
    whole_q, whole_k = _whole_projection(first.q_norm, shape), _whole_projection(first.k_norm, shape)
    shared = layers[max(range(len(layers)), key=lambda i: len(ffn[i]))]

    def cat(name: str, dim: int = 0) -> Tensor | None:
        """One field of the merged layer, built alone from each side's kept part of it."""
        return _cat([_kept(w, name, shape, k, f, fold) for w, k, f in zip(layers, kv, ffn)], dim)

    def mix(name: str, weights: list[float]) -> Tensor | None:
        return _mix([_double(getattr(w, name)) for w in layers], weights)

    def pre_norm(name: str) -> Tensor | None:
        """Folded: the identity; averaged: the sides' mean."""
        norm = getattr(first, name)
        if norm is None or not fold:
            return _mean([_double(getattr(w, name)) for w in layers])
        return _identity_norm(first, norm)

    return type(first)(
        q=cat("q"), k=cat("k"), v=cat("v"), o=cat("o", dim=1),
        gate=cat("gate"), up=cat("up"), down=cat("down", dim=_down_unit_dim(first)),
        router=cat("router"), **{n: _kept(shared, n, shape, [], [], fold) for n in _SHARED},
        attn_norm=pre_norm("attn_norm"), ffn_norm=pre_norm("ffn_norm"),
        q_bias=cat("q_bias"), k_bias=cat("k_bias"), v_bias=cat("v_bias"),
        o_bias=mix("o_bias", shares), down_bias=mix("down_bias", shares),
        q_norm=cat("q_norm") if whole_q else mix("q_norm", shares),
        k_norm=cat("k_norm") if whole_k else mix("k_norm", shares),
        attn_post_norm=mix("attn_post_norm", _shares(kv)),
        ffn_post_norm=mix("ffn_post_norm", _shares(ffn)),
    )


def _double(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.double()


def linear_combination(layers: list[LayerWeights], coeffs: list[float]) -> LayerWeights:
    """sum_i c_i W_i over every tensor (norms and biases included): the weight-space
    merges the paper argues against (LaCo's RDSC, plain averaging), in float64 a tensor at a
    time. MoE: expert e of every layer is combined with expert e of the others, router rows
    likewise."""
    first = layers[0]
    for w in layers[1:]:
        _check_same_ffn(first, w)
    return replace(first, **{
        f.name: sum(c * getattr(w, f.name).double() for c, w in zip(coeffs, layers))
        for f in fields(first) if getattr(first, f.name) is not None
    })


def rdsc_coefficients(n_layers: int) -> list[float]:
    """LaCo's Reserving-Differences-while-Seeking-Common: theta_0 + sum_{i>0} (theta_i - theta_0)
    = (1 - m) theta_0 + sum_{i>0} theta_i for a group of m+1 original layers."""
    return [1.0 - (n_layers - 1)] + [1.0] * (n_layers - 1)
