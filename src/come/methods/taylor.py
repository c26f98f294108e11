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
--nsamples / --seqlen), backpropagated one decoder layer at a time (backprop.py, shared with
`--sensitivity taylor`). No weight is written (bit-identical after `select`)."""

from __future__ import annotations

import logging

from typing import TYPE_CHECKING

from .base import DropMethod, register
from .magnitude import block_weights, least_important_plus

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger("come")


def taylor_importance(profile) -> list[float]:
    """Per original layer, sum over its weight tensors of sum |W * dL/dW| (L: mean next-token
    NLL of the calibration batches), by backpropagation one layer at a time."""
    import torch

    from ..scoring.backprop import backward_by_layer, weight_grads

    importance = [0.0] * profile.n_layers

    def on_layer(k: int, inputs: list[Tensor], grad_out: list[Tensor]) -> list[Tensor]:
        weights = block_weights(profile.adapter.decoder_layers(profile.model)[k])
        grads, grad_in = weight_grads(profile, k, inputs, grad_out, weights)
        importance[k] = sum(float((p.detach() * g).abs().sum(dtype=torch.float64)) for p, g in zip(weights, grads))
        return grad_in

    backward_by_layer(profile, on_layer)
    return importance


@register
class Taylor(DropMethod):
    name = "taylor"
    summary = "drop the blocks of least first-order Taylor importance, first 4 and last 2 spared (Taylor+, one shot)"
    order = 70
    compared_by_default = False

    def select(self, profile, n, cfg):
        importance = taylor_importance(profile)
        log.info("taylor+ block importance: %s", ", ".join(f"{v:.4g}" for v in importance))
        return least_important_plus(importance, n, cfg.protect)
