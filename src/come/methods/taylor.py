"""Taylor+ (Kim et al., 2024, "Shortened LLaMA: Depth Pruning for Large Language Models with
Comparison of Retraining Methods"; github.com/Nota-NetsPresso/shortened-llm): a block's
importance is the first-order Taylor estimate of the loss change when its weights go to zero,
sum over every weight tensor W of the block (projections and norm weights, no biases) of
sum |W * dL/dW|, L the calibration next-token loss: their
`src/anal_block_sensitivity_taylor.py` with its defaults norm_power=1, weight_reduction=sum,
block_reduction=sum (W * grad is summed over the calibration batches before the absolute
value, as they accumulate it; the CoMe authors' re-implementation takes it per window). The
n least important blocks go in one shot, with the "+" rule of magnitude.py (the first four
and the last two blocks spared; `--protect` honoured).

L here is the mean NLL over every predicted token of all calibration batches (Kim et al.: 10
windows of 128 tokens of BookCorpus in one batch, which is that mean; ours is --calib /
--nsamples / --seqlen). The gradient is exact backpropagation through the whole model, taken
one decoder layer at a time on the compute device (checkpointed at the cached layer inputs:
a segment between two cached inputs is re-run without gradients, then each of its layers is
re-run with them, last layer first), so device memory holds one layer and one batch, as
everywhere in come. `torch.autograd.grad` returns the gradients without writing any `.grad`;
no weight is written (bit-identical after `select`), no optimizer exists. Each layer pass
counts one into `cache.forwards` (a pass with gradients counts one; its backward is not
counted)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from ..lm_loss import head_rows, n_predicted
from ..profile import on_device
from .base import DropMethod, register
from .magnitude import block_weights, least_important_plus

log = logging.getLogger("come")


def loss_grad(cache, states: list[Tensor]) -> list[Tensor]:
    """Per batch, dL/dh of the mean next-token NLL L with respect to the final hidden states
    `states` (before the final norm); zero at each window's last position, which predicts nothing."""
    n = n_predicted(cache)
    flat = [torch.zeros(h.shape[0] * (h.shape[1] - 1), h.shape[-1], dtype=h.dtype) for h in states]
    with torch.enable_grad():
        for b, r, x, y, norm, head in head_rows(cache, states):
            x = x.detach().requires_grad_(True)
            loss = F.cross_entropy(head(norm(x)).float(), y, reduction="sum") / n
            (gx,) = torch.autograd.grad(loss, x)
            flat[b][r:r + x.shape[0]] = gx.to(flat[b].device)
    return [torch.cat([f.view(h.shape[0], h.shape[1] - 1, -1), torch.zeros_like(h[:, :1])], dim=1).to(h.device)
            for f, h in zip(flat, states)]


def _states_from(cache, s: int, e: int) -> list[list[Tensor]]:
    """The dense model's states entering layers s..e (e - s + 1 of them), from the cached
    state at s; cached ones are taken, the others run."""
    layers = cache.adapter.decoder_layers(cache.model)
    hs = [cache.states[s]]
    for i in range(s, e):
        if i + 1 in cache.states:
            hs.append(cache.states[i + 1])
        else:
            hs.append(cache.runner.run(layers[i], hs[-1], False, position=i)[0])
            cache.forwards += 1
    return hs


def _layer_backward(cache, k: int, inputs: list[Tensor], grad_out: list[Tensor]) -> tuple[float, list[Tensor]]:
    """Layer k's importance sum |W * dL/dW| given dL/d(its output) per batch, and dL/d(its
    input) per batch (empty for layer 0, whose input is the embedding)."""
    layer = cache.adapter.decoder_layers(cache.model)[k]
    runner, want_input = cache.runner, k > 0
    weights = block_weights(layer)
    trainable = [p.requires_grad for p in weights]
    grad_in: list[Tensor] = []
    try:
        for p in weights:
            p.requires_grad_(True)
        with on_device(layer, runner.device), torch.enable_grad():
            acc = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in weights]
            for h, g, kw in zip(inputs, grad_out, runner.kwargs_at(k)):
                x = h.to(runner.device).requires_grad_(want_input)
                y = layer(x, **kw)
                y = y[0] if isinstance(y, tuple) else y
                grads = torch.autograd.grad(y, weights + [x] * want_input, grad_outputs=g.to(y.device, y.dtype),
                                            allow_unused=True)
                for a, d in zip(acc, grads):
                    if d is not None:
                        a += d
                if want_input:
                    grad_in.append(grads[-1].to(h.device))
            importance = sum(float((p.detach() * a).abs().sum(dtype=torch.float64)) for p, a in zip(weights, acc))
    finally:
        for p, flag in zip(weights, trainable):
            p.requires_grad_(flag)
    cache.forwards += 1
    return importance, grad_in


def taylor_importance(cache) -> list[float]:
    """Per original layer, sum over its weight tensors of sum |W * dL/dW| (L: mean next-token
    NLL of the calibration batches), by backpropagation one layer at a time."""
    n_layers = len(cache.adapter.decoder_layers(cache.model))
    bounds = sorted(k for k in cache.states if k < n_layers) + [n_layers]
    importance = [0.0] * n_layers
    grad: list[Tensor] = []
    for s, e in reversed(list(zip(bounds, bounds[1:]))):
        if e == n_layers:  # the top segment also gives the final states
            hs = _states_from(cache, s, e)
            grad = loss_grad(cache, hs.pop())
        else:
            hs = _states_from(cache, s, e - 1)
        for k in range(e - 1, s - 1, -1):
            importance[k], grad = _layer_backward(cache, k, hs.pop(), grad)
    return importance


@register
class Taylor(DropMethod):
    name = "taylor"
    summary = "drop the blocks of least first-order Taylor importance, first 4 and last 2 spared (Taylor+, one shot)"
    order = 70
    compared_by_default = False

    def select(self, cache, n, cfg):
        importance = taylor_importance(cache)
        log.info("taylor+ block importance: %s", ", ".join(f"{v:.4g}" for v in importance))
        return least_important_plus(importance, n, cfg.protect)
