"""The method registry, on the settings floor: method name -> the registered method object.

It imports nothing of the engine. The methods (come.methods, one module each) register
themselves into it when imported, and the package imports them (come/__init__.py), so the
settings can look a method up by name (`CompressConfig.resolved()` fills in its defaults and
runs its checks; the CLI lists the names and summaries) without importing the methods'
modules: the objects arrive by registration, not by an import from below (the layers stay
a DAG: settings <- methods <- engine calls)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..errors import ComeError

if TYPE_CHECKING:
    from ..methods.base import Method

REGISTRY: dict[str, "Method"] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make the method available by its name. Its own options (`own_options`,
    a dataclass of `option()` fields) join `come compress`'s: a name another method's group
    already declares is refused, so each option has one meaning."""
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    if cls.own_options is not None:
        declared = {name: g for g in option_groups() for name in _own(g)}
        for f in dataclasses.fields(cls.own_options):
            owner = declared.get(f.name)
            if owner is not None and not issubclass(cls.own_options, owner):
                raise ValueError(f"method {cls.name!r}: option {f.name!r} is already {owner.__name__}'s")
    REGISTRY[cls.name] = cls()
    return cls


def _own(group: type) -> set[str]:
    """The option fields `group` declares itself (not those of the classes it extends, nor its
    ClassVars such as `cli_panel`)."""
    declared = vars(group).get("__annotations__", {})
    return {f.name for f in dataclasses.fields(group) if f.name in declared}


def readers(group: type) -> list[str]:
    """The registered methods that read option group `group` (theirs, or one extending it)."""
    return [n for n in method_names() if REGISTRY[n].own_options and issubclass(REGISTRY[n].own_options, group)]


def option_groups() -> list[type]:
    """The option groups of the registered methods, each once, a group after the ones it extends
    (MergeOptions before CoMe's): the help panels of `come compress` after its shared options."""
    found: list[type] = []
    for name in method_names():
        group = REGISTRY[name].own_options
        for cls in reversed(group.__mro__ if group is not None else ()):
            if dataclasses.is_dataclass(cls) and _own(cls) and cls not in found:
                found.append(cls)
    return found


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
