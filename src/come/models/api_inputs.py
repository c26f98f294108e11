"""What the Python API's entry points receive, checked before any work with the CLI's one-line
ComeError (the options objects check their own fields as they are built: options.Options)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ComeError


def expect(value: Any, cls: type, name: str) -> Any:
    """`value` is a `cls` (an options object, a Plan), not a dict or None."""
    if not isinstance(value, cls):
        raise ComeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}; build one with "
                        f"{cls.__name__}(...)")
    return value


def expect_model(model: Any, name: str = "model") -> nn.Module:
    """A loaded transformers causal LM (a module with a config)."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ComeError(f"{name} must be a loaded causal LM (e.g. from come.models.checkpoint.load_model or "
                        f"AutoModelForCausalLM.from_pretrained), got {type(model).__name__}")
    return model


def expect_token_ids(ids: Any, model: nn.Module, name: str) -> Tensor:
    """A 2-D integer tensor [windows, seqlen] of ids the model's embedding has rows for (an id
    outside it would index past the table, deep inside the first forward)."""
    if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.is_floating_point() or ids.is_complex() \
            or ids.dtype == torch.bool or ids.shape[1] < 2:
        kind = f"a {ids.ndim}-D {ids.dtype} tensor" if isinstance(ids, Tensor) else type(ids).__name__
        raise ComeError(f"{name} must be token ids, a 2-D integer tensor [windows, seqlen >= 2], got {kind}")
    vocab = model.get_input_embeddings().num_embeddings
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.numel():
        raise ComeError(f"{name} holds token id {int(bad[0])}, outside the model's vocabulary 0..{vocab - 1}; "
                        "tokenize with the model's own tokenizer")
    return ids
