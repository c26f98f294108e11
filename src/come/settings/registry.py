"""The method registry, on the settings floor: method name -> the registered method object.

It imports nothing of the engine. The methods (come.methods, one module each) register
themselves into it when imported, and the package imports them (come/__init__.py), so the
settings can look a method up by name (`CompressConfig.resolved()` fills in its defaults and
runs its checks; the CLI lists the names and summaries) without importing the methods'
modules: the objects arrive by registration, not by an import from below (the layers stay
a DAG: settings <- methods <- engine calls)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ComeError

if TYPE_CHECKING:
    from ..methods.base import Method

REGISTRY: dict[str, "Method"] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make the method available by its name."""
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls()
    return cls


def method_names() -> tuple[str, ...]:
    """Every registered method, in listing order."""
    return tuple(sorted(REGISTRY, key=lambda n: (REGISTRY[n].order, n)))


def get_method(name: str) -> "Method":
    """The registered method called `name` (one-line error naming the choices otherwise)."""
    if name not in REGISTRY:
        raise ComeError(f"--method must be one of {', '.join(method_names())}, got {name!r}")
    return REGISTRY[name]


def method_options() -> frozenset[str]:
    """Every option some registered method declares: the ones a method may ignore."""
    return frozenset().union(*(m.options for m in REGISTRY.values()))


def default_methods() -> str:
    """`come compare --methods` when not given: every registered method marked for the default comparison."""
    return ",".join(n for n in method_names() if REGISTRY[n].compared_by_default)
