"""README's command reference is the one the CLI generates from the options objects, and
every options field is on the command line of each command that takes it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from come.cli import app
from come.cli_reference import END, START, markdown
from come.config import CompressConfig, EvalConfig, LoadOptions
from come.distill_config import DistillConfig
from come.options import cli_fields, flag_of

README = Path(__file__).parents[1] / "README.md"


def test_readme_reference_is_generated():
    text = README.read_text()
    block = text[text.index(START):text.index(END) + len(END)]
    assert block == markdown(), "README reference is stale: run python -m come.cli_reference README.md"


def _flags(command: str) -> set[str]:
    cmd = typer.main.get_command(app).commands[command]
    return {o for p in cmd.params for o in getattr(p, "opts", [])}


def test_every_field_is_an_option_of_its_commands():
    """No hand-copied fields: each command exposes exactly its objects' fields."""
    want = {"compress": [CompressConfig, LoadOptions], "eval": [EvalConfig, LoadOptions],
            "distill": [DistillConfig]}
    for command, classes in want.items():
        flags = _flags(command)
        for cls in classes:
            for f in cli_fields(cls):
                assert flag_of(f) in flags, (command, f.name)
    compare = _flags("compare")
    for f in cli_fields(CompressConfig, ("method",)):
        assert flag_of(f) in compare, f.name
    for f in cli_fields(EvalConfig):
        assert flag_of(f) in compare or flag_of(f, "eval-") in compare, f.name
    assert {"--eval-seqlen", "--eval-batch-size", "--seqlen", "--batch-size"} <= compare
    assert {f.name for f in dataclasses.fields(DistillConfig) if not f.metadata.get("cli", True)} == {"checkpoint_dir"}
