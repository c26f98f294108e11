"""come: compress Hugging Face causal LMs by layer concatenation (CoMe, arXiv 2510.15304).

The settings (CompressConfig, EvalConfig, DistillConfig) and the method registry load here:
neither imports torch. The registry must be filled before any setting is resolved
(config.py asks it for a method's defaults), so the methods are imported with the package.
The path-level service (compress_to, compare_to: a model path in, checkpoints or a report out)
loads its engine when called. The in-memory entry points (compress, distill, evaluate, Plan)
load on first use (PEP 562), since they import torch and `come --help` should not wait for it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import methods  # noqa: F401  (fills the registry the settings resolve against)
from ._version import __version__
from .errors import ComeError
from .service import compare_to, compress_to
from .settings.config import CompressConfig, EvalConfig
from .settings.distill_config import DistillConfig

_HOMES = {"compress": "engine.compression", "Plan": "settings.plan", "load_plan": "settings.plan",
          "distill": "recovery.distill", "evaluate": "evaluation.evaluate"}

if TYPE_CHECKING:
    from .engine.compression import compress
    from .evaluation.evaluate import evaluate
    from .recovery.distill import distill
    from .settings.plan import Plan, load_plan

__all__ = ["CompressConfig", "ComeError", "EvalConfig", "DistillConfig", "Plan", "compare_to", "compress",
           "compress_to", "distill", "evaluate", "load_plan", "__version__"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
