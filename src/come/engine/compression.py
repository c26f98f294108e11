"""`compress()`, the API entry point: settings resolved and checked once (specs.resolve), the
method looked up in the registry, its run started (`run_method`); with several target
sparsities, one run hands over every level on its way to the largest.

`run_method` is which loop runs a method, by the loop it names (`Method.loop`): the progressive
loop (pipeline.py) or the one-shot loop (dropping.py); a method of neither kind runs itself
(auto). The loops call the method back, so the engine imports no method: the registry hands
the method object over (methods/base.py: why a method never starts a loop)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from torch import Tensor, nn

from ..errors import ComeError
from ..models.api_inputs import expect, expect_model, expect_token_ids
from ..models.budget import merge_budget
from ..settings.config import CompressConfig
from ..settings.plan import Plan
from ..settings.registry import get_method
from ..settings.specs import resolve
from .dropping import compress_by_dropping
from .pipeline import merge_progressively
from .preparation import Levels

if TYPE_CHECKING:
    from ..methods.base import Method

LOOPS = {"progressive": merge_progressively, "one-shot": compress_by_dropping}  # Method.loop -> the loop


def run_method(method: Method, model: nn.Module, tokenizer, cfg: CompressConfig, calib: Tensor | None,
               model_name: str, levels: Levels | None = None) -> tuple[nn.Module, Plan]:
    """Compress `model` in place with `method` to `cfg.sparsity` (cfg resolved), handing each
    of `levels` over on the way."""
    if method.loop is None:
        return method.compress(model, tokenizer, cfg, calib, model_name, levels)
    return LOOPS[method.loop](method, model, tokenizer, cfg, calib, model_name, levels)


def compress(model: nn.Module, tokenizer, cfg: CompressConfig, calib: Tensor | None = None,
             model_name: str = "", on_level: Callable[[nn.Module, Plan], None] | None = None,
             ) -> tuple[nn.Module, Plan]:
    """Compress `model` in place to `cfg.sparsity` with `cfg.method`; return it and its Plan.

    `calib` ([nsamples, seqlen] token ids) overrides `cfg.calib` (tests, benchmarks, the service:
    service.py); without it `cfg.calib` is tokenized here, once for every level.
    `cfg.sparsity` a list (ascending): `on_level(model, plan)` receives each smaller level,
    the model and Plan a run at that level alone gives (use or save the model before
    returning: the run goes on with it); the largest is returned. A merge method passes
    every level in one progressive run. A drop method's levels are separate runs on copies
    of the dense model: which layers it drops, and the refit of the layers it keeps, depend
    on the level, so sharing any of it would not give each level's own model; except a
    greedy one's removal order (SLEB), which is computed once and cut at each level.
    """
    expect(cfg, CompressConfig, "cfg")
    expect_model(model)
    resolved = resolve(cfg)
    if calib is not None:
        expect_token_ids(calib, model, "calib")
    # settings against the model, as the CLI checks them on its config (the windows: calib's when given)
    replace(resolved, seqlen=resolved.seqlen if calib is None else calib.shape[1]).check_model(model.config)
    resolved.check_reachable(model.config.num_hidden_layers, merge_budget(model, resolved.levels()[-1])[2])
    if calib is None:  # here only: once for every level, and every method receives ids
        from ..models.data import load_calibration

        calib = load_calibration(resolved.calib, tokenizer, resolved.nsamples, resolved.seqlen, resolved.seed)
    method = get_method(resolved.method)
    *smaller, largest = resolved.levels()
    if not smaller:
        return run_method(method, model, tokenizer, resolved, calib, model_name)
    if on_level is None:
        raise ComeError("several --sparsity levels need on_level, which receives each smaller level's model")
    levels = Levels(smaller, on_level)
    out = run_method(method, model, tokenizer, resolved.at(largest), calib, model_name, levels)
    if levels.handed != smaller:
        raise ComeError(f"--method {method.name} did not pass the levels {smaller} on its way; give one --sparsity")
    return out
