"""The generated blocks of the docs: the command reference (docs/cli.md), generated from the CLI
(itself generated from the options objects), and README's families and methods tables
(docs_tables.py), so the docs cannot go stale: tests/test_cli_reference.py compares them.

    python -m come.cli.reference   # rewrite every generated block (run from the repository root)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import typer
from typer.core import TyperArgument, TyperOption

from .docs_tables import families_table, methods_table


def markers(name: str) -> tuple[str, str]:
    """The comment lines that open and close the generated block `name`."""
    return f"<!-- {name}:start (generated: python -m come.cli.reference) -->", f"<!-- {name}:end -->"


START, END = markers("cli-reference")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(p: TyperArgument | TyperOption) -> str:
    if getattr(p, "is_flag", False):
        return "off" if not p.default else "on"
    if p.required or p.default in (None, ""):
        return ""
    return f"`{p.default}`"


def command_tables(cmd: typer.core.TyperCommand) -> str:
    """The command's options as its help shows them: a table per help panel (the command's own,
    the shared settings, each method's own options), under the panel's name."""
    panels: dict[str, list] = {}
    for p in cmd.params:
        if p.name != "help":
            panels.setdefault(getattr(p, "rich_help_panel", None) or "Options", []).append(p)
    if len(panels) == 1:
        return command_table(next(iter(panels.values())))
    return "\n\n".join(f"#### {panel}\n\n{command_table(params)}" for panel, params in panels.items())


def command_table(params: list) -> str:
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for p in params:
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
    from .app import app

    group = typer.main.get_command(app)
    parts = []
    for name, cmd in group.commands.items():
        parts += [f"### `come {name}`", "", _cell(cmd.help or ""), "", command_tables(cmd), ""]
    return "\n".join(parts).rstrip("\n")


# file (relative to the repository root) -> the generated blocks it holds
BLOCKS: dict[str, dict[str, Callable[[], str]]] = {
    "docs/cli.md": {"cli-reference": markdown},
    "README.md": {"families": families_table, "methods": methods_table},
}


def block(text: str, name: str) -> str:
    """What `text` holds between the markers of block `name`; a KeyError names missing markers."""
    start, end = markers(name)
    if start not in text or end not in text:
        raise KeyError(f"no generated block {name!r}: add the lines {start} and {end}")
    return text[text.index(start) + len(start):text.index(end)].strip("\n")


def replace_block(text: str, name: str, body: str) -> str:
    """`text` with block `name`'s content replaced by `body`."""
    start, end = markers(name)
    block(text, name)
    return text[:text.index(start) + len(start)] + "\n" + body + "\n" + text[text.index(end):]


def main(root: Path) -> None:
    for file, blocks in BLOCKS.items():
        path = root / file
        text = path.read_text()
        for name, make in blocks.items():
            text = replace_block(text, name, make())
        path.write_text(text)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
