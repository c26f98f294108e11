"""Which student weights train: the chosen layers in full, or LoRA adapters on their
projections, and the LM head where asked; the seeded RNG their dropout draws from; and
activation checkpointing across transformers versions."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from peft import LoraModel

    from ..settings.distill_config import DistillConfig

_log = logging.getLogger("come")


def make_trainable(student: nn.Module, layers: list[nn.Module], cfg: DistillConfig) -> LoraModel | None:
    """Full fine-tuning: every weight of `layers` trains; returns None. LoRA (lora_r > 0):
    peft wraps the linear projections of `layers` only, in place (so every module path the
    distiller holds stays valid), and only the adapters train; returns the peft LoraModel
    that merges them back. The adapters' random init (on CPU) is seeded by cfg.seed: without
    DDP nothing else would make them equal in every process."""
    if not cfg.lora_r:
        for layer in layers:
            layer.requires_grad_(True)
        return None
    from peft import LoraConfig, LoraModel

    inside = {id(m) for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)}
    targets = [name for name, m in student.named_modules() if id(m) in inside]  # full names: no other layer matches
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_r
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LoraModel(student, LoraConfig(r=cfg.lora_r, lora_alpha=alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=targets), "default")


def train_head(student: nn.Module) -> nn.Module:
    """Make the student's LM head train in full, in fp32 (--train last:K,head), also beside
    LoRA adapters on the layers: peft's merge would put a tied head's update into the input
    embedding it never saw in training. A tied head is the input embedding's matrix, so that
    one matrix trains (through both of its uses) and the embedding moves with it; said once."""
    head = student.get_output_embeddings()
    if head.weight is student.get_input_embeddings().weight:
        _log.info("--train ...,head: the LM head is tied to the input embedding; the shared matrix trains, "
                  "so the embedding moves too")
    return head.float().requires_grad_(True)


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global RNG, which LoRA dropout draws from, seeded by `seed` inside the block and
    given back as it was after it: the same --seed draws the same masks in any process, and a
    resume continues the stream (accelerate's checkpoints carry the RNG states, and loading
    one inside the block sets them)."""
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Switch recomputation of layer activations in backward on or off; transformers 5
    renamed gradient_checkpointing_* to activation_checkpointing_*."""
    kind = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        getattr(model, f"{kind}_checkpointing_enable")(**{f"{kind}_checkpointing_kwargs": {"use_reentrant": False}})
    else:
        getattr(model, f"{kind}_checkpointing_disable")()
