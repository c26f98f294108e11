"""The method registry: every module of this package registers one method (base.py says
how); this file finds them, so a new method is one new file and nothing else."""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import ComeError
from .base import REGISTRY, DropMethod, MergeMethod, Method, method_options, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def method_names() -> tuple[str, ...]:
    """Every registered method, in listing order."""
    return tuple(sorted(REGISTRY, key=lambda n: (REGISTRY[n].order, n)))


def get_method(name: str) -> Method:
    """The registered method called `name` (one-line error naming the choices otherwise)."""
    if name not in REGISTRY:
        raise ComeError(f"--method must be one of {', '.join(method_names())}, got {name!r}")
    return REGISTRY[name]


__all__ = ["DropMethod", "MergeMethod", "Method", "get_method", "method_names", "method_options", "register"]
