"""Distillation losses from tensors alone: KL / NLL through two LM heads, chunked over tokens
so full-vocabulary logits exist for one chunk at a time, and a scale-free MSE on hidden states.

The training KL (`head_kl`) differentiates each chunk as soon as it is computed, so the
chunk's logits are dropped at once and never recomputed: the 49K-vocabulary head of a small
model costs 3 matrix products per chunk (teacher, student, the student's backward) instead
of the 5 of a checkpointed chunk, whose backward recomputed both heads. The gradient is
seeded with the one the caller says the KL will receive, so it is bit for bit the gradient
a backward through the chunk would give.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _chunk_terms(head_t: nn.Module, head_s: nn.Module, temperature: float, h_t: Tensor, h_s: Tensor,
                 targets: Tensor | None) -> Tensor:
    """[sum of KL(teacher || student), sum of the student's NLL on `targets`] over one chunk, in fp32."""
    with torch.no_grad():
        log_t = F.log_softmax(_tempered(head_t(h_t).float(), temperature), dim=-1)
    logits_s = head_s(h_s).float()
    kl = F.kl_div(F.log_softmax(_tempered(logits_s, temperature), dim=-1), log_t, log_target=True, reduction="sum")
    nll = F.cross_entropy(logits_s, targets, reduction="sum", ignore_index=-100) if targets is not None else kl.new_zeros(())
    return torch.stack([kl, nll])


def _tempered(logits: Tensor, temperature: float) -> Tensor:
    """logits / T; at T = 1 the logits themselves (the division is exact, so only a full-vocabulary copy is saved)."""
    return logits if temperature == 1 else logits / temperature


def _parts(n: int, chunk: int) -> list[slice]:
    return [slice(start, start + chunk) for start in range(0, n, chunk)]


@torch.no_grad()
def head_terms(head_t: nn.Module, head_s: nn.Module, h_t: Tensor, h_s: Tensor, temperature: float = 1.0,
               chunk: int = 2048, targets: Tensor | None = None) -> Tensor:
    """[KL sum, NLL sum] of the two heads' distributions on hidden states [..., hidden], chunked
    over tokens (evaluation: no gradient)."""
    h_t, h_s = h_t.flatten(0, -2), h_s.flatten(0, -2)
    flat_targets = targets.flatten() if targets is not None else None
    total = h_s.new_zeros(2, dtype=torch.float32)
    for part in _parts(h_s.shape[0], chunk):
        total = total + _chunk_terms(head_t, head_s, temperature, h_t[part], h_s[part],
                                     flat_targets[part] if flat_targets is not None else None)
    return total


def head_kl(head_t: nn.Module, head_s: nn.Module, h_t: Tensor, h_s: Tensor, temperature: float, chunk: int,
            upstream: Tensor) -> Tensor:
    """The KL sum of `head_terms`, differentiable in `h_s` (which must require grad) and in
    the student head's weights that require grad (--train last:K,head).

    Each chunk's gradient is computed in this forward, seeded with `upstream`, the gradient
    the caller's backward will give this KL (the head weights' gradients summed over the
    chunks); the backward hands them out rescaled by the gradient it does receive over
    `upstream` (1.0, exactly, when the caller said true)."""
    flat_t, flat_s = h_t.flatten(0, -2), h_s.flatten(0, -2)
    weights = [p for p in head_s.parameters() if p.requires_grad]
    total, grad = flat_s.new_zeros((), dtype=torch.float32), torch.empty_like(flat_s)
    weight_grads = [torch.zeros_like(p) for p in weights]
    for part in _parts(flat_s.shape[0], chunk):
        x = flat_s[part].detach().requires_grad_()
        with torch.enable_grad():
            kl = _chunk_terms(head_t, head_s, temperature, flat_t[part], x, None)[0]
        with torch.autocast(x.device.type, enabled=False):  # a backward runs outside autocast
            grad[part], *chunk_grads = torch.autograd.grad(kl, (x, *weights), upstream)
        for total_grad, g in zip(weight_grads, chunk_grads):
            total_grad += g
        total = total + kl.detach()
    return _Seeded.apply(total, upstream, flat_s, *weights, grad, *weight_grads)


class _Seeded(torch.autograd.Function):
    """`value`, a function of its inputs whose gradients `grads` (listed after them, in their
    order) were computed for the upstream gradient `upstream`: backward returns each
    grad * (received / upstream)."""

    @staticmethod
    def forward(ctx, value: Tensor, upstream: Tensor, *inputs_then_grads: Tensor) -> Tensor:
        ctx.save_for_backward(upstream, *inputs_then_grads[len(inputs_then_grads) // 2:])
        return value.clone()

    @staticmethod
    def backward(ctx, received: Tensor):
        upstream, *grads = ctx.saved_tensors
        return None, None, *(grad * (received / upstream) for grad in grads), *(None for _ in grads)


def normalized_mse(h_t: Tensor, h_s: Tensor) -> Tensor:
    """Mean over windows (dim 0) of ||h_s - h_t||^2 / ||h_t||^2, in fp32: scale-free across
    layers whose norms grow with depth, and a mean of per-window terms, so two processes on
    half a batch each (or two accumulated micro-batches) train as one on the whole batch."""
    h_t, h_s = h_t.float().flatten(1), h_s.float().flatten(1)
    return ((h_s - h_t).pow(2).sum(1) / h_t.pow(2).sum(1).clamp_min(1e-12)).mean()
