"""README's command reference, generated from the CLI (itself generated from the options
objects), so the docs cannot go stale: tests/test_cli_reference.py compares them.

    python -m come.cli_reference README.md   # rewrite the block between the markers
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from typer.core import TyperArgument, TyperOption

START, END = "<!-- cli-reference:start (generated: python -m come.cli_reference README.md) -->", \
    "<!-- cli-reference:end -->"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(p: TyperArgument | TyperOption) -> str:
    if getattr(p, "is_flag", False):
        return "off" if not p.default else "on"
    if p.required or p.default in (None, ""):
        return ""
    return f"`{p.default}`"


def command_table(cmd: typer.core.TyperCommand) -> str:
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for p in cmd.params:
        if p.name == "help":
            continue
        if isinstance(p, TyperArgument):
            name = f"`{p.metavar or p.name.upper()}`"
        else:
            name = ", ".join(f"`{o}`" for o in p.opts)
        if isinstance(p, TyperOption) and p.secondary_opts:
            name += ", " + ", ".join(f"`{o}`" for o in p.secondary_opts)
        if isinstance(p, TyperOption) and p.metavar and p.metavar.startswith("["):
            name += f" `{_cell(p.metavar)}`"
        rows.append(f"| {name} | {_default(p)} | {_cell(getattr(p, 'help', '') or '')} |")
    return "\n".join(rows)


def markdown() -> str:
    """One section per command: its summary and a table of every option."""
    from .cli import app

    group = typer.main.get_command(app)
    parts = [START]
    for name, cmd in group.commands.items():
        parts += [f"### `come {name}`", "", _cell(cmd.help or ""), "", command_table(cmd), ""]
    parts.append(END)
    return "\n".join(parts)


def replace_block(text: str) -> str:
    start, end = text.index(START), text.index(END) + len(END)
    return text[:start] + markdown() + text[end:]


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(replace_block(path.read_text()))
