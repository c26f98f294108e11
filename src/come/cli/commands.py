"""Typer commands whose options are generated from the options objects' fields (options.py),
so every command's flags, help, choices and defaults come from one declaration and the CLI
cannot drift from the Python API (mergekit's `add_merge_options`, done for typer).

The options objects and the method registry they list import no torch (config.py), so every
command is built at start-up, as typer builds any: `come compress --help` takes a fraction of
a second (docs/architecture.md: measured)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from ..settings.options import base_type, bounds_of, choices_of, convert, flag_of, hints_of, panel_fields
from ..settings.registry import readers

GroupSpec = typing.Union[type, tuple[type, str, tuple[str, ...]]]


TYPE_NAMES = {int: "INT", float: "FLOAT"}  # anything else: TEXT


def _metavar(f: dataclasses.Field, base: Any) -> str:
    choices = choices_of(f)
    if choices:
        return "[" + "|".join(choices) + "]"
    return TYPE_NAMES.get(base, "TEXT")


def _help(f: dataclasses.Field) -> str:
    h = f.metadata.get("help", "")
    h = h() if callable(h) else h
    return f"{h} Range: {bounds_of(f).text}." if bounds_of(f) else h


def _default(f: dataclasses.Field) -> Any:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    show = f.metadata.get("show")
    return show(value) if show and value is not None else value


def _negative(flag: str) -> str:
    """The off switch of a flag that is on by default: --x -> --no-x, and --no-x -> --x
    (never --no-no-x)."""
    return "--" + flag[5:] if flag.startswith("--no-") else "--no-" + flag[2:]


def _parameter(f: dataclasses.Field, tp: Any, pname: str, flag: str, panel: str) -> inspect.Parameter:
    base, optional = base_type(tp)
    default = _default(f)
    common = dict(help=_help(f), envvar=f.metadata.get("envvar"), rich_help_panel=panel)
    if base is bool and not optional:
        names = [flag] if not default else [f"{flag}/{_negative(flag)}"]
        opt = typer.Option(default, *names, **common)
        annotation: Any = bool
    else:
        opt = typer.Option(None if default is None else str(default), flag, metavar=_metavar(f, base),
                           show_default=default is not None and default != "", **common)
        annotation = typing.Optional[str]
    return inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=annotation)


def _panel(group: type) -> str:
    """A group's help panel: its name, and the methods that read it when it is a method's own."""
    methods = readers(group)
    name = getattr(group, "cli_panel", "") or group.__name__
    return f"{name} (--method {' / '.join(methods)})" if methods else name


class _WithOptions:
    """A command function plus the options of its groups' fields: the signature typer reads
    is the function's own parameters followed by one option per field."""

    def __init__(self, fn: Callable, groups: dict[str, GroupSpec]) -> None:
        functools.update_wrapper(self, fn, assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=())
        self._fn = fn
        self.__annotations__: dict = {}  # the parameters' types are in __signature__, evaluated
        self._spec = self._build({arg: g if isinstance(g, tuple) else (g, "", ()) for arg, g in groups.items()})

    def _build(self, groups: dict[str, tuple[type, str, tuple[str, ...]]]) -> tuple[inspect.Signature, list]:
        classes = {arg: cls for arg, (cls, _, _) in groups.items()}
        own = inspect.signature(self._fn, eval_str=True, locals={c.__name__: c for c in classes.values()})
        params = [p for name, p in own.parameters.items() if name not in groups]
        taken = {p.name for p in params}
        specs = []  # (argument, class, [(param name, field, type, flag)])
        for arg, (_, prefix, exclude) in groups.items():
            cls = classes[arg]
            hints = hints_of(cls)
            entries = []
            for group, f in panel_fields(cls):
                if not f.metadata.get("cli", True) or f.name in exclude:
                    continue
                clash = f.name in taken
                pname = prefix.replace("-", "_") + f.name if clash else f.name
                if pname in taken:
                    raise ValueError(f"option {pname} declared twice in {self.__name__}")
                taken.add(pname)
                flag = flag_of(f, prefix if clash else "")
                entries.append((pname, f, hints[f.name], flag))
                params.append(_parameter(f, hints[f.name], pname, flag, _panel(group)))
            specs.append((arg, cls, entries))
        return inspect.Signature(params), specs

    @property
    def __signature__(self) -> inspect.Signature:
        return self._spec[0]

    def __call__(self, **kwargs: Any) -> Any:
        for arg, cls, entries in self._spec[1]:
            values = {f.name: convert(f, tp, kwargs.pop(pname), flag) for pname, f, tp, flag in entries}
            kwargs[arg] = cls(**values)
        return self._fn(**kwargs)


def with_options(**groups: GroupSpec) -> Callable[[Callable], Callable]:
    """Decorator: the command receives one object per group (keyword = argument name) built
    from generated options. A group is a class, or (class, clash prefix, excluded fields); a
    field whose name an earlier group or the command already uses takes the prefix
    (`--eval-seqlen` beside compress's `--seqlen`)."""
    return lambda fn: _WithOptions(fn, groups)


def _plain_types(params: list) -> list:
    """Option types as the generated options show them (TEXT, INT): none beside on/off flags,
    which take no value, and TEXT rather than typer's `<str>` for a declared option."""
    for p in params:
        if isinstance(p, TyperOption) and p.metavar is None:
            p.metavar = "" if p.is_flag else TYPE_NAMES.get(p.type_descriptor.annotation, "TEXT")
    return params


class Command(TyperCommand):
    """typer's command with plainer help: option types as in _plain_types, and MODEL rather
    than {MODEL} (typer's mark of a required argument) in the usage line."""

    def get_params(self, ctx: typer.Context) -> list:
        return _plain_types(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        args = [p.metavar or p.name.upper() for p in self.get_params(ctx) if isinstance(p, TyperArgument)]
        return [self.options_metavar, *args] if self.options_metavar else args


class Group(TyperGroup):
    """typer's group with the option types shown as in _plain_types."""

    def get_params(self, ctx: typer.Context) -> list:
        return _plain_types(super().get_params(ctx))


class Typer(typer.Typer):
    """typer.Typer whose group and commands show the plainer help (Group, Command)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cls=Group, **kwargs)

    def command(self, name: str | None = None, **kwargs: Any) -> Callable[[Callable], Callable]:  # type: ignore
        return super().command(name, cls=Command, **kwargs)
