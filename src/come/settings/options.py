"""Option fields: each setting's default, help and choices declared once, beside the field.

The options objects (CompressConfig, EvalConfig, DistillConfig, ...) are dataclasses whose
fields are made with `option()`; the CLI builds its typer options from them
(cli/commands.py) and README's reference is generated from them, so the command line, the
Python API and the docs cannot drift apart (mergekit's `add_merge_options` pattern).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal

from ..errors import ComeError


SEEDS = "[0, 4294967295]"  # the bounds of a seed: 32 bits, what every seeded generator (torch, CUDA) takes


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The numbers an option allows, written as in the docs: '> 0', '>= 1', '[0, 1)', '(0, 0.9]'.
    Every allowed number is finite: NaN and infinity mean nothing to any setting."""

    text: str
    low: float
    high: float
    low_open: bool
    high_open: bool

    @classmethod
    def parse(cls, text: str) -> "Bounds":
        number = r"\s*(-?[\d.e+-]+)\s*"
        if m := re.fullmatch(r"(>=?)" + number, text):
            return cls(text, float(m[2]), math.inf, m[1] == ">", True)
        if m := re.fullmatch(r"([\[(])" + number + "," + number + r"([\])])", text):
            return cls(text, float(m[2]), float(m[3]), m[1] == "(", m[4] == ")")
        raise ValueError(f"bounds {text!r}: write '> x', '>= x' or an interval such as '[0, 1)'")

    def holds(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self, number_kind: str) -> str:
        """'in [0, 1)', '>= 1' (an integer option), 'a finite number > 0' (a float one)."""
        if self.text[0] in "[(":
            return f"in {self.text}"
        return f"a finite number {self.text}" if number_kind == "float" else self.text


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
           bounds: str | None = None, flag: str | None = None, short: str | None = None, cli: bool = True,
           parse: Callable[[str], Any] | None = None, show: Callable[[Any], str] | None = None,
           envvar: str | None = None, default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field carrying its CLI help.

    choices: the allowed values (or a function returning them, e.g. the method registry);
    checked by the object's own validation, shown in the help. bounds: the numbers allowed
    (Bounds: '> 0', '[0, 1)'), checked the same way (check_ranges). flag: the option name
    when it is not --field-name. parse: turns the CLI text into the field's value (e.g. a
    list). show: how the CLI prints the default. cli=False: API-only (set by the command itself).
    """
    meta = {"help": help, "choices": choices, "bounds": Bounds.parse(bounds) if bounds else None, "flag": flag,
            "short": short, "cli": cli, "parse": parse, "show": show, "envvar": envvar}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    c = f.metadata.get("choices")
    return tuple(c() if callable(c) else c) if c is not None else None


def flag_of(f: dataclasses.Field, prefix: str = "") -> str:
    return f.metadata.get("flag") or "--" + prefix + f.name.replace("_", "-")


def default_of(f: dataclasses.Field) -> Any:
    """The field's default value (a fresh one where it has a factory)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def option_groups(cls: type) -> list[type]:
    """The classes whose fields an options class takes: itself, then (CompressConfig) the option
    groups the registered methods declare (`Options.groups`)."""
    return cls.groups() if isinstance(cls, type) and issubclass(cls, Options) else [cls]


def panel_fields(cls: type) -> list[tuple[type, dataclasses.Field]]:
    """(declaring class, field) of every option `cls` takes, each once, in order: a field goes
    with the first group that has it (groups list a base before the classes extending it)."""
    seen: set[str] = set()
    out = []
    for group in option_groups(cls):
        for f in dataclasses.fields(group):
            if f.name not in seen:
                seen.add(f.name)
                out.append((group, f))
    return out


def all_fields(obj_or_cls: Any) -> list[dataclasses.Field]:
    """Every option field of an options object or class, its method groups' included."""
    return [f for _, f in panel_fields(obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls))]


def field_of(cls: type, name: str) -> dataclasses.Field:
    """The option field `name` of `cls` (its method groups' included)."""
    return next(f for f in all_fields(cls) if f.name == name)


def hints_of(cls: type) -> dict[str, Any]:
    """The declared types of every option of `cls`, its method groups' included."""
    hints: dict[str, Any] = {}
    for group in reversed(option_groups(cls)):
        hints.update(_hints(group))
    return hints


def check_choices(obj: Any) -> None:
    """Every field with choices holds one of them (None allowed where the default is None)."""
    for f in all_fields(obj):
        allowed = choices_of(f)
        value = getattr(obj, f.name)
        if allowed is None or (value is None and f.default is None):
            continue
        if value not in allowed:
            raise ComeError(f"{flag_of(f)} must be one of {', '.join(allowed)}, got {value!r}")


def bounds_of(f: dataclasses.Field) -> Bounds | None:
    return f.metadata.get("bounds")


def check_bounds(f: dataclasses.Field, value: Any, flag: str) -> None:
    """The field's value is a finite number within its bounds, each item of a list too (None
    allowed where the default is None): one line naming the flag, the value and the range."""
    allowed = bounds_of(f)
    if allowed is None or (value is None and f.default is None):
        return
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if not allowed.holds(item):
            kind = "float" if "float" in str(f.type) else "int"
            raise ComeError(f"{flag} must be {allowed.describe(kind)}, got {item!r}")


def check_ranges(obj: Any) -> None:
    """Every field of an options object within its bounds (the API's check; the command line's
    text is checked as it is read, by `convert`, naming the flag as typed: --eval-seqlen)."""
    for f in all_fields(obj):
        check_bounds(f, getattr(obj, f.name), flag_of(f))


def int_list(text: str) -> list[int]:
    """'2,3' -> [2, 3] (the CLI form of a list of layer indices)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ComeError(f"expected comma-separated layer indices, got {text!r}") from None


def count(text: str) -> int:
    """'20M' -> 20_000_000 (K, M, B suffixes; plain integers too)."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}
    t = text.strip().upper()
    try:
        return int(float(t[:-1]) * scale[t[-1]]) if t and t[-1] in scale else int(t)
    except (ValueError, OverflowError):  # OverflowError: infM
        raise ComeError(f"--tokens must be a count such as 20M, 500K or 1000000, got {text!r}") from None


def base_type(tp: Any) -> tuple[Any, bool]:
    """(the field's value type, whether None is allowed)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return base_type(inner[0])[0], True
    if typing.get_origin(tp) is Literal:
        return type(args[0]), False
    return (typing.get_origin(tp) or tp), False


def convert(f: dataclasses.Field, tp: Any, text: str | None, flag: str) -> Any:
    """The field's value from its command-line text: the one parser of the CLI and of
    `come compare`'s per-row overrides (method:key=value); a number is checked against the
    field's bounds here, where the flag is known as typed."""
    if text is None or not isinstance(text, str):
        return text
    value = _parsed(f, tp, text, flag)
    check_bounds(f, value, flag)
    return value


def _parsed(f: dataclasses.Field, tp: Any, text: str, flag: str) -> Any:
    base, optional = base_type(tp)
    if f.metadata.get("parse"):
        return f.metadata["parse"](text)
    if optional and text.lower() == "none" and "none" not in (choices_of(f) or ()):
        return None
    if base is bool:
        if text.lower() not in ("true", "false"):
            raise ComeError(f"{flag} takes true or false, got {text!r}")
        return text.lower() == "true"
    if base in (int, float):
        try:
            return base(text)
        except ValueError:
            raise ComeError(f"{flag} takes {'an integer' if base is int else 'a number'}, got {text!r}") from None
    return text


def check_context(config: Any, seqlen: int, flag: str = "--seqlen") -> None:
    """Windows of `seqlen` tokens fit the model's positions (its config's max_position_embeddings):
    checked on the config, before weights load, by every command that takes a --seqlen."""
    context = getattr(config, "max_position_embeddings", None)
    if context and seqlen > context:
        raise ComeError(f"{flag} {seqlen} exceeds the model's context of {context} positions; lower {flag} to at "
                        f"most {context}")


def check_device_name(name: str, flag: str = "--device") -> None:
    """A device name torch knows: cpu, cuda, cuda:N or auto. Whether this machine has it is
    device.resolve_device's question (it needs torch)."""
    if name != "auto" and name.split(":")[0] not in ("cpu", "cuda"):
        raise ComeError(f"{flag} must be cpu, cuda or auto, got {name!r}")


def check_cache_dir(folder: str) -> None:
    """--cache-dir is an existing folder this process can write: come makes its files in it, never the folder."""
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise ComeError(f"--cache-dir {folder} {what}: give an existing folder (mkdir -p it first)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ComeError(f"--cache-dir {folder} is not writable by this user: give a folder you can write")


def cli_fields(cls: type, exclude: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    """The fields of `cls` a command line sets (cli=False ones are set by the command)."""
    return [f for f in all_fields(cls) if f.metadata.get("cli", True) and f.name not in exclude]


def override(cls: type, key: str, text: str, where: str, fixed: tuple[str, ...] = ()) -> tuple[str, Any]:
    """(field name, value) of a `key=value` override of `cls`, parsed like the CLI parses it."""
    name = key.strip().replace("-", "_")
    fields = {f.name: f for f in cli_fields(cls, fixed)}
    if name not in fields:
        raise ComeError(f"{where}: bad override {key!r}; write method:option=value with a `come compress` option "
                        "such as refit=none or pair-score=error")
    tp = hints_of(cls)[name]
    return name, convert(fields[name], tp, text, f"{where}: {key}")


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def _typed(value: Any, tp: Any, flag: str) -> Any:
    """`value` as type `tp` (an int for a float field, an integral float for an int one), or a
    ComeError naming what the option takes."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for inner in (a for a in args if a is not type(None)):
            try:
                return _typed(value, inner, flag)
            except ComeError:
                pass
        kinds = " or ".join(_kind(a) for a in args if a is not type(None))
        raise ComeError(f"{flag} takes {kinds}, got {value!r}")
    if origin is Literal:  # which of them: check_choices, with the other checks
        if not isinstance(value, type(args[0])):
            raise ComeError(f"{flag} takes {_kind(tp)}, got {value!r}")
        return value
    if origin in (list, tuple):
        try:
            if isinstance(value, (list, tuple)):
                return [_typed(v, args[0], flag) for v in value]
        except ComeError:
            pass
        raise ComeError(f"{flag} takes {_kind(tp)}, got {value!r}")
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer(),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}.get(tp, True)
    if not ok:
        raise ComeError(f"{flag} takes {_kind(tp)}, got {value!r}")
    return tp(value) if tp in (int, float) else value


def _kind(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) in (list, tuple):
        return "a list of " + {int: "integers", float: "numbers"}.get(typing.get_args(tp)[0], "values")
    return _KINDS.get(typing.get_origin(tp) or tp, getattr(tp, "__name__", str(tp)))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class Options:
    """Base of the options objects: whatever builds one (the CLI, the Python API, `replace`),
    each field is converted from text as the command line converts it (`convert`: "0.3", "4,5",
    "20M") and then must hold its declared type, so a wrong value is one line naming the option
    at construction, never a TypeError deep inside a run."""

    cli_panel: typing.ClassVar[str] = ""  # the help panel of its options

    @classmethod
    def groups(cls) -> list[type]:
        """The classes whose fields this object takes: its own (CompressConfig adds the methods')."""
        return [cls]

    def __post_init__(self) -> None:
        hints = hints_of(type(self))
        for f in all_fields(self):
            flag, value = flag_of(f), getattr(self, f.name)
            if isinstance(value, str):
                value = convert(f, hints[f.name], value, flag)
            self._set(f, _typed(value, hints[f.name], flag))

    def _set(self, f: dataclasses.Field, value: Any) -> None:
        setattr(self, f.name, value)

