"""Backpropagation of the calibration next-token loss through the CURRENT model, one decoder
layer at a time: what Taylor+ (methods/taylor.py, block importance) and `--sensitivity taylor`
(unit importance, engine/cache.py) read.

L is the mean NLL over every predicted token of all calibration batches. The gradient is
exact backpropagation through the whole model, taken one decoder layer at a time on the
compute device (checkpointed at the cached layer inputs: a segment between two cached inputs
is re-run without gradients, then each of its layers is re-run with them, last layer first),
so device memory holds one layer and one batch, as everywhere in come.
`torch.autograd.grad` returns the gradients without writing any `.grad`; no weight is
written, no optimizer exists. Each layer pass counts one into `cache.forwards` (a pass with
gradients counts one; its backward is not counted).

Cost: one call is a forward pass over the model (the layers between cached inputs re-run)
plus one forward-with-gradients and backward per layer: about three forward passes."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.placement import on_device
from .lm_loss import head_rows, n_predicted
from .sensitivity import output_taylor


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
    """The current model's states entering layers s..e (e - s + 1 of them), from the cached
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


def weight_grads(cache, k: int, inputs: list[Tensor], grad_out: list[Tensor],
                 weights: list[torch.nn.Parameter]) -> tuple[list[Tensor], list[Tensor]]:
    """dL/dW of `weights` (parameters of current layer k), summed over the calibration batches
    (float32 at least, where the weights live), given dL/d(the layer's output) per batch; and
    dL/d(its input) per batch (empty for layer 0, whose input is the embedding)."""
    layer = cache.adapter.decoder_layers(cache.model)[k]
    runner, want_input = cache.runner, k > 0
    trainable = [p.requires_grad for p in weights]
    grad_in: list[Tensor] = []
    try:
        for p in weights:
            p.requires_grad_(True)
        with on_device(layer, runner.device), torch.enable_grad():
            acc = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in weights]
            for h, g, kw in zip(inputs, grad_out, runner.kwargs_at(k)):
                x = h.to(runner.device).detach().requires_grad_(want_input)  # the cached state stays as it was
                y = layer(x, **kw)
                y = y[0] if isinstance(y, tuple) else y
                grads = torch.autograd.grad(y, weights + [x] * want_input, grad_outputs=g.to(y.device, y.dtype),
                                            allow_unused=True)
                for a, d in zip(acc, grads):
                    if d is not None:
                        a += d
                if want_input:
                    grad_in.append(grads[-1].to(h.device))
    finally:
        for p, flag in zip(weights, trainable):
            p.requires_grad_(flag)
    cache.forwards += 1
    return [a.to(p.device) for a, p in zip(acc, weights)], grad_in


def backward_by_layer(cache, on_layer: Callable[[int, list[Tensor], list[Tensor]], list[Tensor]]) -> None:
    """Backpropagate L through every current layer, last first: `on_layer(k, inputs, grad_out)`
    gets layer k's input states and dL/d(its output) per batch and returns dL/d(its input)
    (`weight_grads` does both)."""
    n_layers = len(cache.adapter.decoder_layers(cache.model))
    bounds = sorted(k for k in cache.states if k < n_layers) + [n_layers]
    grad: list[Tensor] = []
    for s, e in reversed(list(zip(bounds, bounds[1:]))):
        if e == n_layers:  # the top segment also gives the final states
            hs = _states_from(cache, s, e)
            grad = loss_grad(cache, hs.pop())
        else:
            hs = _states_from(cache, s, e - 1)
        for k in range(e - 1, s - 1, -1):
            grad = on_layer(k, hs.pop(), grad)


def unit_taylor(cache) -> list[tuple[Tensor, Tensor]]:
    """Per current layer, `output_taylor` of o_proj (per input channel) and of the FFN's output
    projection (per down_proj input channel; per expert in an MoE layer): what
    `--sensitivity taylor` scores units by. One backward over the whole current model (module
    docstring: about three forward passes); only the output projections take gradients."""
    layers = cache.adapter.decoder_layers(cache.model)
    out: list = [None] * len(layers)

    def on_layer(k: int, inputs: list[Tensor], grad_out: list[Tensor]) -> list[Tensor]:
        weights = list(cache.adapter.unit_output_weights(layers[k]))
        grads, grad_in = weight_grads(cache, k, inputs, grad_out, weights)
        out[k] = tuple(output_taylor(p.detach(), g) for p, g in zip(weights, grads))
        return grad_in

    backward_by_layer(cache, on_layer)
    return out
