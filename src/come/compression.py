"""`compress()`, the API entry point: settings resolved and checked once, the method
looked up in the registry, its run started."""

from __future__ import annotations

from torch import Tensor, nn

from .config import CompressConfig
from .methods import get_method
from .plan import Plan


def compress(model: nn.Module, tokenizer, cfg: CompressConfig, calib: Tensor | None = None,
             model_name: str = "") -> tuple[nn.Module, Plan]:
    """Compress `model` in place to `cfg.sparsity` with `cfg.method`; return it and its Plan.

    `calib` ([nsamples, seqlen] token ids) overrides `cfg.calib` (tests, benchmarks).
    """
    resolved = cfg.resolved()
    return get_method(resolved.method).compress(model, tokenizer, resolved, calib, model_name)
