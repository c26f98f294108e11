"""The methods: every module of this package registers one method (base.py says how) into
the registry (come.registry); this file imports them all, so a new method is one new file
and nothing else. No module here loads torch on import (base.py: why)."""

from __future__ import annotations

import importlib
import pkgutil

from ..settings.registry import REGISTRY, default_methods, get_method, method_names, method_options, register
from .base import DropMethod, MergeMethod, MergeOptions, Method

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["REGISTRY", "DropMethod", "MergeMethod", "MergeOptions", "Method", "default_methods", "get_method",
           "method_names", "method_options", "register"]
