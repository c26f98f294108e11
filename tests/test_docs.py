"""The docs state no stale default and no dead link: every default docs/decisions.md names is the
code's, README stays a page a user reads in one sitting, and every relative link in README.md, docs/*.md,
BENCHMARKS.md and benchmarks/history.md reaches a file (and, where it names one, a heading of it)."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest

from come import CompressConfig, DistillConfig, EvalConfig
from come.settings.options import all_fields

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "BENCHMARKS.md",
        ROOT / "benchmarks" / "history.md"]
# a decision row: | `compress --split` | `joint` | ... (or `compress --method come --refit`, `come.mod.NAME`)
ROW = re.compile(r"^\| `([^`]+)` \| `([^`]*)` \|", re.M)
COMMANDS = {"compress": CompressConfig, "eval": EvalConfig, "distill": DistillConfig}


def _field(cls: type, flag: str) -> dataclasses.Field:
    """The options field behind `flag` (its own `flag` metadata, else --field-name), a method's own included."""
    for f in all_fields(cls):
        if (f.metadata.get("flag") or "--" + f.name.replace("_", "-")) == flag:
            return f
    raise AssertionError(f"{cls.__name__} has no option {flag}")


def code_default(setting: str):
    """The default the code gives `setting`, as docs/decisions.md names it."""
    words = setting.split()
    if len(words) == 1:  # come.module.NAME: a constant
        module, name = setting.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)
    command, *rest = words
    cls = COMMANDS[command]
    if len(rest) == 3 and rest[0] == "--method":  # what the method resolves the option to
        method, flag = rest[1], rest[2]
        return getattr(CompressConfig(method=method).resolved(), _field(cls, flag).name)
    f = _field(cls, rest[0])
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _same(doc: str, value) -> bool:
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    if isinstance(value, float):
        return float(doc) == value
    return doc == str(value)


def decision_rows() -> list[tuple[str, str]]:
    return ROW.findall((ROOT / "docs" / "decisions.md").read_text())


def test_every_default_in_decisions_is_the_codes():
    rows = decision_rows()
    named = {setting for setting, _ in rows}
    assert {"compress --split", "compress --method come --refit", "compress --method come --pair-score",
            "compress --method come --reprofile", "compress --reprofile-window", "distill --layer-loss"} <= named
    stale = [(s, doc, code_default(s)) for s, doc in rows if not _same(doc, code_default(s))]
    assert not stale, f"docs/decisions.md states defaults the code does not have (setting, docs, code): {stale}"


def test_a_changed_default_is_caught(monkeypatch):
    """The check reads the code, so a default that moves makes a row stale."""
    assert code_default("compress --method laco --pair-score") == "angular"
    from come.methods.come import ComeOptions

    monkeypatch.setattr(ComeOptions.__dataclass_fields__["split"], "default", "bi")
    assert not _same("joint", code_default("compress --split"))
    with pytest.raises(AssertionError, match="no option --nope"):
        code_default("compress --nope")


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines: move details to docs/"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def links(path: Path) -> list[str]:
    """The relative link targets of a markdown file (code spans and blocks left out)."""
    text = re.sub(r"```.*?```|`[^`\n]*`", "", path.read_text(), flags=re.S)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def test_slug_is_githubs():
    assert slug("The quickstart's time, and torch's threads (issue 21 item 5), 2026-12-02") == \
        "the-quickstarts-time-and-torchs-threads-issue-21-item-5-2026-12-02"
    assert slug("Windowed re-profiling (`--reprofile window`)") == "windowed-re-profiling---reprofile-window"


def dead_links(doc: Path) -> list[str]:
    """The relative links of `doc` whose file is missing, or whose #anchor is no heading of it."""
    dead = []
    for target in links(doc):
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
            dead.append(target)
    return dead


def test_dead_links_are_found(tmp_path):
    (tmp_path / "b.md").write_text("# Some heading, 2026\n")
    doc = tmp_path / "a.md"
    doc.write_text("[ok](b.md#some-heading-2026) [gone](c.md) [bad anchor](b.md#other) [web](https://x.org/y)\n"
                   "`[code](nope.md)`\n\n    [indented](nope.md)\n\n## Here\n[self](#here) [self bad](#there)\n")
    assert dead_links(doc) == ["c.md", "b.md#other", "#there"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    dead = dead_links(doc)
    assert not dead, f"{doc.name} links to what is not there: {dead}"
