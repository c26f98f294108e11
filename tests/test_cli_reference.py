"""The docs' generated blocks are what the code generates: docs/cli.md's command reference (from
the CLI, itself from the options objects) and README's families and methods tables (from the
adapters and the method registry); and every options field is on the command line of each
command that takes it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer

from come.cli.app import app
from come.cli.reference import BLOCKS, block, markdown, markers, replace_block
from come.settings.config import CompressConfig, EvalConfig, LoadOptions
from come.settings.distill_config import DistillConfig
from come.settings.options import cli_fields, flag_of

ROOT = Path(__file__).parents[1]


def test_generated_blocks_are_current():
    assert set(BLOCKS) == {"docs/cli.md", "README.md"} and BLOCKS["docs/cli.md"]["cli-reference"] is markdown
    for file, blocks in BLOCKS.items():
        text = (ROOT / file).read_text()
        for name, make in blocks.items():
            assert block(text, name) == make(), f"{file}'s {name} block is stale: run python -m come.cli.reference"


def test_the_generated_tables_name_every_method_and_family():
    from come.methods import method_names
    from come.models.adapters import ADAPTERS

    text = (ROOT / "README.md").read_text()
    methods, families = block(text, "methods"), block(text, "families")
    assert all(f"| `{name}` |" in methods for name in method_names())
    assert all(f"(`{t}`) |" in families for a in ADAPTERS for t in a.model_types)
    assert "| `come` | merge | ls |" in methods and "| `shortgpt` | drop | none |" in methods


def test_replace_block_rewrites_only_between_its_markers():
    start, end = markers("x")
    text = f"a\n{start}\nold\n{end}\nb\n"
    assert replace_block(text, "x", "new") == f"a\n{start}\nnew\n{end}\nb\n"
    with pytest.raises(KeyError, match="x:start"):
        block("no markers", "x")


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
    for f in cli_fields(CompressConfig, ("method", "max_memory_gb")):  # compress plans its memory, compare does not
        assert flag_of(f) in compare, f.name
    for f in cli_fields(EvalConfig):
        assert flag_of(f) in compare or flag_of(f, "eval-") in compare, f.name
    assert {"--eval-seqlen", "--eval-batch-size", "--seqlen", "--batch-size"} <= compare
    assert {f.name for f in dataclasses.fields(DistillConfig) if not f.metadata.get("cli", True)} == {"checkpoint_dir"}
