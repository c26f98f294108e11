"""Which loop runs a method: a `MergeMethod` the progressive loop (pipeline.py), a
`DropMethod` the one-shot loop (dropping.py); a method of neither kind runs itself (auto).

The loops sit above the methods' hooks and call them back; this module, above the loops,
is where a run starts (compression.compress, and auto for each candidate), so no method
module starts a loop and methods/base.py imports none."""

from __future__ import annotations

from torch import Tensor, nn

from .config import CompressConfig
from .dropping import compress_by_dropping
from .methods.base import DropMethod, MergeMethod, Method
from .pipeline import merge_progressively
from .plan import Plan
from .preparation import Levels


def run_method(method: Method, model: nn.Module, tokenizer, cfg: CompressConfig, calib: Tensor | None,
               model_name: str, levels: Levels | None = None) -> tuple[nn.Module, Plan]:
    """Compress `model` in place with `method` to `cfg.sparsity` (cfg resolved), handing each
    of `levels` over on the way."""
    if isinstance(method, MergeMethod):
        return merge_progressively(method, model, tokenizer, cfg, calib, model_name, levels)
    if isinstance(method, DropMethod):
        return compress_by_dropping(method, model, tokenizer, cfg, calib, model_name, levels)
    return method.compress(model, tokenizer, cfg, calib, model_name, levels)
