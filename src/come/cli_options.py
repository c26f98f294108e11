"""Typer commands whose options are generated from the options objects' fields (options.py),
so every command's flags, help, choices and defaults come from one declaration and the CLI
cannot drift from the Python API (mergekit's `add_merge_options`, done for typer).

Commands are built when one runs or shows its help, not at start-up: building one imports
its options objects, whose modules load torch and the method registry (seconds), while
`come --help` needs only each command's name and summary."""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect
import typing
from collections.abc import Iterable, Iterator, MutableMapping
from typing import Any, Callable, ClassVar

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption
from typer.models import CommandInfo, ParameterInfo

from .options import base_type, bounds_of, choices_of, cli_fields, convert, flag_of

GroupSpec = typing.Union[type, str, tuple[typing.Union[type, str], str, tuple[str, ...]]]


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


def _resolve(cls: type | str) -> type:
    """A class, or `module.Class` of this package, imported now."""
    if not isinstance(cls, str):
        return cls
    module, _, name = cls.rpartition(".")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def _declared(p: inspect.Parameter) -> inspect.Parameter:
    """A parameter the command declares itself, its help computed now when given as a function."""
    if isinstance(p.default, ParameterInfo) and callable(p.default.help):
        info = copy.copy(p.default)
        info.help = info.help()
        return p.replace(default=info)
    return p


class _WithOptions:
    """A command function plus the options of its groups' fields. The signature typer reads,
    and so the import of the options classes, is made on first inspection: when typer builds
    the command, not when cli.py is imported."""

    def __init__(self, fn: Callable, groups: dict[str, GroupSpec]) -> None:
        functools.update_wrapper(self, fn, assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=())
        self._fn, self._groups = fn, groups
        self.__annotations__: dict = {}  # the parameters' types are in __signature__, evaluated

    @functools.cached_property
    def _spec(self) -> tuple[inspect.Signature, list]:
        groups = {arg: g if isinstance(g, tuple) else (g, "", ()) for arg, g in self._groups.items()}
        classes = {arg: _resolve(cls) for arg, (cls, _, _) in groups.items()}
        own = inspect.signature(self._fn, eval_str=True, locals={c.__name__: c for c in classes.values()})
        params = [_declared(p) for name, p in own.parameters.items() if name not in groups]
        taken = {p.name for p in params}
        specs = []  # (argument, class, [(param name, field, type, flag)])
        for arg, (_, prefix, exclude) in groups.items():
            cls = classes[arg]
            hints = typing.get_type_hints(cls)
            entries = []
            for f in cli_fields(cls, exclude):
                clash = f.name in taken
                pname = prefix.replace("-", "_") + f.name if clash else f.name
                if pname in taken:
                    raise ValueError(f"option {pname} declared twice in {self.__name__}")
                taken.add(pname)
                flag = flag_of(f, prefix if clash else "")
                entries.append((pname, f, hints[f.name], flag))
                params.append(_parameter(f, hints[f.name], pname, flag, getattr(cls, "cli_panel", cls.__name__)))
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
    from generated options. A group is a class (or `module.Class` of this package, imported
    when the command is built), or (class, clash prefix, excluded fields); a field whose name
    an earlier group or the command already uses takes the prefix (`--eval-seqlen` beside
    compress's `--seqlen`). The command's own options may give `help` as a function."""
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


class _Commands(MutableMapping):
    """A group's commands by name: every name is listed, each command built on first lookup."""

    def __init__(self, names: Iterable[str], build: Callable[[str], Command]) -> None:
        self.names, self.built, self._build = list(names), {}, build

    def __getitem__(self, name: str) -> Command:
        if name not in self.built:
            if name not in self.names:
                raise KeyError(name)
            self.built[name] = self._build(name)
        return self.built[name]

    def __setitem__(self, name: str, command: Command) -> None:
        self.names += [] if name in self.names else [name]
        self.built[name] = command

    def __delitem__(self, name: str) -> None:
        self.names.remove(name)
        self.built.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class LazyGroup(TyperGroup):
    """The group of a `Typer` app: lists its commands by name and summary, and builds one
    (options generated, their modules imported) only when it runs or shows its help."""

    app: ClassVar["Typer"]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands = _Commands(self.app.deferred, self._build)

    def _build(self, name: str) -> Command:
        return typer.main.get_command_from_info(self.app.deferred[name], rich_markup_mode=self.rich_markup_mode,
                                                pretty_exceptions_short=self.app.pretty_exceptions_short)

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(self.commands)

    def get_command(self, ctx: typer.Context, name: str) -> TyperCommand | None:
        """For a listing: the command once built, until then its name and summary."""
        if name in self.commands.built:
            return self.commands.built[name]
        info = self.app.deferred.get(name)
        return TyperCommand(name=name, help=inspect.getdoc(info.callback)) if info else None

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> tuple:
        name, command, rest = super().resolve_command(ctx, args)
        return name, self.commands[name] if name else command, rest

    def get_params(self, ctx: typer.Context) -> list:
        return _plain_types(super().get_params(ctx))


class Typer(typer.Typer):
    """typer.Typer whose commands are kept as declared and built by its group on first use."""

    def __init__(self, **kwargs: Any) -> None:
        self.deferred: dict[str, CommandInfo] = {}
        super().__init__(cls=type("LazyGroup", (LazyGroup,), {"app": self}), **kwargs)

    def command(self, name: str | None = None, **kwargs: Any) -> Callable[[Callable], Callable]:  # type: ignore
        def register(fn: Callable) -> Callable:
            self.deferred[name or typer.main.get_command_name(fn.__name__)] = CommandInfo(
                name, cls=Command, callback=fn, **kwargs)
            return fn

        return register
