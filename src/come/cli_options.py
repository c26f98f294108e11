"""Typer options generated from the options objects' fields (options.py), so every
command's flags, help, choices and defaults come from one declaration and the CLI cannot
drift from the Python API (mergekit's `add_merge_options`, done for typer)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable

import typer

from .options import base_type, choices_of, cli_fields, convert, flag_of


def _metavar(f: dataclasses.Field, base: Any) -> str:
    choices = choices_of(f)
    if choices:
        return "[" + "|".join(choices) + "]"
    return {int: "INT", float: "FLOAT"}.get(base, "TEXT")


def _help(f: dataclasses.Field) -> str:
    h = f.metadata.get("help", "")
    return h() if callable(h) else h


def _default(f: dataclasses.Field) -> Any:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    show = f.metadata.get("show")
    return show(value) if show and value is not None else value


def _parameter(f: dataclasses.Field, tp: Any, pname: str, flag: str, panel: str) -> inspect.Parameter:
    base, optional = base_type(tp)
    default = _default(f)
    common = dict(help=_help(f), envvar=f.metadata.get("envvar"), rich_help_panel=panel)
    if base is bool and not optional:
        names = [flag] if not default else [f"{flag}/--no-{flag[2:]}"]
        opt = typer.Option(default, *names, **common)
        annotation: Any = bool
    else:
        opt = typer.Option(None if default is None else str(default), flag, metavar=_metavar(f, base),
                           show_default=default is not None and default != "", **common)
        annotation = typing.Optional[str]
    return inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=annotation)


def with_options(**groups: tuple[type, str, tuple[str, ...]] | type) -> Callable:
    """Decorator: the command receives one object per group (keyword = argument name) built
    from generated options. A group is a class, or (class, clash prefix, excluded fields);
    a field whose name an earlier group or the command already uses takes the prefix
    (`--eval-seqlen` beside compress's `--seqlen`)."""

    def decorate(fn: Callable) -> Callable:
        specs = []  # (argument, class, [(param name, field, type, flag)])
        params = [p for name, p in inspect.signature(fn).parameters.items() if name not in groups]
        taken = {p.name for p in params}
        for arg, group in groups.items():
            cls, prefix, exclude = group if isinstance(group, tuple) else (group, "", ())
            hints = typing.get_type_hints(cls)
            entries = []
            for f in cli_fields(cls, exclude):
                clash = f.name in taken
                pname = prefix.replace("-", "_") + f.name if clash else f.name
                if pname in taken:
                    raise ValueError(f"option {pname} declared twice in {fn.__name__}")
                taken.add(pname)
                flag = flag_of(f, prefix if clash else "")
                entries.append((pname, f, hints[f.name], flag))
                params.append(_parameter(f, hints[f.name], pname, flag, getattr(cls, "cli_panel", cls.__name__)))
            specs.append((arg, cls, entries))

        @functools.wraps(fn)
        def wrapper(**kwargs):
            for arg, cls, entries in specs:
                values = {f.name: convert(f, tp, kwargs.pop(pname), flag) for pname, f, tp, flag in entries}
                kwargs[arg] = cls(**values)
            return fn(**kwargs)

        wrapper.__signature__ = inspect.Signature(params)
        return wrapper

    return decorate
