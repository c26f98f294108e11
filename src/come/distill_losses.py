"""Distillation losses from tensors alone: KL / NLL through two LM heads, chunked over tokens
so full-vocabulary logits exist for one chunk at a time, and a scale-free MSE on hidden states."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _chunk_terms(head_t: nn.Module, head_s: nn.Module, temperature: float, h_t: Tensor, h_s: Tensor,
                 targets: Tensor | None) -> Tensor:
    """[sum of KL(teacher || student), sum of the student's NLL on `targets`] over one chunk, in fp32."""
    with torch.no_grad():
        log_t = F.log_softmax(head_t(h_t).float() / temperature, dim=-1)
    logits_s = head_s(h_s).float()
    kl = F.kl_div(F.log_softmax(logits_s / temperature, dim=-1), log_t, log_target=True, reduction="sum")
    nll = F.cross_entropy(logits_s, targets, reduction="sum", ignore_index=-100) if targets is not None else kl.new_zeros(())
    return torch.stack([kl, nll])


def head_terms(head_t: nn.Module, head_s: nn.Module, h_t: Tensor, h_s: Tensor, temperature: float = 1.0,
               chunk: int = 2048, targets: Tensor | None = None) -> Tensor:
    """[KL sum, NLL sum] of the two heads' distributions on hidden states [..., hidden].

    Chunked over tokens; with gradients each chunk is checkpointed (logits recomputed in
    backward), so one chunk of full-vocabulary logits is the memory peak."""
    fn = partial(_chunk_terms, head_t, head_s, temperature)
    h_t, h_s = h_t.flatten(0, -2), h_s.flatten(0, -2)
    flat_targets = targets.flatten() if targets is not None else None
    total = h_s.new_zeros(2, dtype=torch.float32)
    for start in range(0, h_s.shape[0], chunk):
        part = slice(start, start + chunk)
        args = (h_t[part], h_s[part], flat_targets[part] if flat_targets is not None else None)
        total = total + (checkpoint(fn, *args, use_reentrant=False) if h_s.requires_grad else fn(*args))
    return total


def normalized_mse(h_t: Tensor, h_s: Tensor) -> Tensor:
    """||h_s - h_t||^2 / ||h_t||^2 in fp32: scale-free across layers whose norms grow with depth."""
    h_t, h_s = h_t.float(), h_s.float()
    return (h_s - h_t).pow(2).sum() / h_t.pow(2).sum().clamp_min(1e-12)
