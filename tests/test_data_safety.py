"""Nothing `come` did not write is ever removed or changed: `--out` (and `--overwrite`) of
every command pointed at a user's folder, an input, a folder holding an input, the working
directory, a symbolic link, next to a user's `.X.tmp-*` folder, or empty, is one line on
stderr and exit code 2, and the whole tree (names, sizes, contents, link targets) is the same
after as before. `--overwrite` still replaces what `come` wrote."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from come.cli.app import app
from come.models.checkpoint import atomic_dir, save_checkpoint
from come.models.outputs import come_output, come_results
from come.recovery.train_state import write_output
from come.settings.plan import PLAN_FILE, Plan

from conftest import tiny_model

DEAD = 999999999  # a pid no process has


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root`, links not followed: (kind, size, sha256) or (link, target)."""
    tree = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            if path.is_symlink():
                tree[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif path.is_dir():
                tree[str(path.relative_to(root))] = ("dir",)
            else:
                data = path.read_bytes()
                tree[str(path.relative_to(root))] = ("file", len(data), hashlib.sha256(data).hexdigest())
    return tree


def plan_for(model: str) -> Plan:
    return Plan(model=model, method="come", settings={}, num_layers_before=2, num_layers_after=2, groups=[[0], [1]])


@pytest.fixture
def sandbox(tmp_path, model_dir, text_file):
    """tmp_path as a user has it: the dense model, calibration text, a come compress output
    (the distill student), eval results, a folder of documents, and a link to each folder."""
    student = tmp_path / "student"
    shutil.copytree(model_dir, student)
    plan_for(str(model_dir)).save(student)
    (tmp_path / "results.json").write_text(json.dumps({"tasks": {}, "average": None, "perplexity": 9.0,
                                                       "settings": {}}))
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "notes.txt").write_text("my notes")
    (docs / "sub" / "draft.md").write_text("# draft")
    (tmp_path / "docs-link").symlink_to(docs)
    (tmp_path / "student-link").symlink_to(student)
    (tmp_path / ".docs.tmp-backup").mkdir()
    (tmp_path / ".docs.tmp-backup" / "keep.txt").write_text("a user's backup")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "todo.txt").write_text("the working directory's file")
    return tmp_path


def command(name: str, root: Path, out: str, *extra) -> list[str]:
    """`come NAME` with its inputs in `root` and `--out out`."""
    inputs = {"compress": ["compress", root / "dense", "--calib", root / "calib.txt", "--nsamples", 8, "--seqlen", 32,
                           "--device", "cpu"],
              "compare": ["compare", root / "dense", "--calib", root / "calib.txt", "--nsamples", 8, "--seqlen", 32,
                          "--tasks", "none", "--ppl-data", root / "calib.txt", "--device", "cpu"],
              "distill": ["distill", "--teacher", root / "dense", "--student", root / "student", "--data",
                          root / "calib.txt", "--seqlen", 32, "--device", "cpu"],
              "eval": ["eval", root / "dense", "--tasks", "none", "--ppl-data", root / "calib.txt", "--seqlen", 32,
                       "--ppl-windows", 1, "--device", "cpu"]}[name]
    return [str(a) for a in [*inputs, "--out", out, *extra]]


def refused(root: Path, args: list[str], *said: str, advises_overwrite: bool = False) -> None:
    """Exit 2, one line on stderr saying `said`, and not one byte under `root` changed."""
    before = snapshot(root)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for part in said:
        assert part in lines[0], lines[0]
    assert ("--overwrite" in lines[0]) == advises_overwrite, lines[0]
    assert snapshot(root) == before


DIR_COMMANDS = ("compress", "compare", "distill")


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)], ids=["plain", "overwrite"])
@pytest.mark.parametrize("name", DIR_COMMANDS)
def test_out_never_replaces_what_come_did_not_write(sandbox, monkeypatch, name, overwrite):
    root = sandbox
    cases = {
        root / "docs": "not a come output (it holds notes.txt, sub/)",  # a user's folder of documents
        root / "dense": "is the input",  # the input model itself
        root / "dense" / "..": "holds the input",  # a folder holding the inputs, through `..`
        root: "holds the input",
        root / "docs-link": "is a symbolic link",
        root / "student-link": "is a symbolic link",  # a link to a come output: refused, not replaced
        "": "--out is empty",
    }
    if name == "distill":
        cases[root / "student"] = "is the input --student"
    for out, said in cases.items():
        refused(root, command(name, root, str(out), *overwrite), said)
    monkeypatch.chdir(root / "work")
    for out in (".", "..", str(root / "work"), "../work/."):
        refused(root, command(name, root, out, *overwrite), "is the working directory or holds it")


@pytest.mark.parametrize("name", DIR_COMMANDS)
def test_a_come_output_needs_overwrite_and_says_so(sandbox, name):
    """Without --overwrite a come output is refused, naming what it is and the flag; the flag
    is never suggested where it would be refused too (the test above)."""
    root = sandbox
    report = root / "report"
    report.mkdir()
    (report / "report.json").write_text(json.dumps({"header": "", "tasks": [], "rows": []}))
    for out, what in ((root / "student", "a come compress output"), (report, "a come compare report")):
        if name == "distill" and out == root / "student":
            continue  # an input
        refused(root, command(name, root, str(out)), f"is {what}; pass --overwrite", advises_overwrite=True)


def test_distill_never_writes_over_its_inputs(sandbox):
    root = sandbox
    plan = root / "plan.json"
    plan.write_text(plan_for("x").to_json())
    refused(root, command("distill", root, str(root / "student"), "--overwrite"), "is the input --student")
    refused(root, command("distill", root, str(root), "--overwrite", "--plan", str(plan)), "holds the input")
    refused(root, command("distill", root, str(root / "student"), "--resume"), "is the input --student")
    through_link = command("distill", root, str(root / "student"), "--overwrite")
    through_link[through_link.index("--student") + 1] = str(root / "student-link")
    refused(root, through_link, "is the input --student")  # the student named through a link


def test_eval_out_replaces_only_come_results(sandbox):
    root = sandbox
    (root / "notes.txt").write_text("a user's file")
    for overwrite in ((), ("--overwrite",)):
        for out, said in ((root / "notes.txt", "exists and is not come eval results"),
                          (root / "dense" / "config.json", "is a file of the input MODEL"),
                          (root / "docs-link", "is a symbolic link"),  # a link to a folder
                          (root / "docs", "is a directory"),
                          ("", "--out is empty")):
            refused(root, command("eval", root, str(out), *overwrite), said)
        refused(root, command("eval", root, str(root / "results.json"), "--baseline", str(root / "results.json"),
                              *overwrite), "is the input --baseline")
    link = root / "results-link.json"
    link.symlink_to(root / "results.json")
    refused(root, command("eval", root, str(link), "--overwrite"), "is a symbolic link")
    refused(root, command("eval", root, str(root / "results.json")), "holds come eval results; pass --overwrite",
            advises_overwrite=True)


def test_eval_overwrites_come_results_and_makes_missing_folders(sandbox):
    root = sandbox
    before = snapshot(root / "docs")
    result = CliRunner().invoke(app, command("eval", root, str(root / "results.json"), "--overwrite"))
    assert result.exit_code == 0, result.output
    assert come_results(root / "results.json") and json.loads((root / "results.json").read_text())["perplexity"] != 9.0
    new = root / "new" / "deeper" / "r.json"
    result = CliRunner().invoke(app, command("eval", root, str(new)))
    assert result.exit_code == 0, result.output
    assert come_results(new) and oct(new.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert [p.name for p in new.parent.iterdir()] == ["r.json"]  # no temporary file left
    assert snapshot(root / "docs") == before


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_eval_leaves_the_card_of_a_corrupt_come_output(tmp_path, tokenizer, text_file):
    """A come output whose come_plan.json is corrupt: a one-line warning, README.md untouched;
    a whole one: its card's evaluation section is filled."""
    for corrupt in (True, False):
        out = save_checkpoint(tiny_model("llama", layers=2), tokenizer, plan_for("tiny"), tmp_path / f"m{corrupt}")
        if corrupt:
            (out / PLAN_FILE).write_text('{"model": "tiny", "merg')
        card = (out / "README.md").read_bytes()
        result = CliRunner().invoke(app, ["eval", str(out), "--out", str(tmp_path / f"r{corrupt}.json"), "--tasks",
                                          "none", "--ppl-data", str(text_file), "--seqlen", "32", "--ppl-windows", "1",
                                          "--device", "cpu"])
        assert result.exit_code == 0, result.output
        assert ((out / "README.md").read_bytes() == card) == corrupt
        said = " ".join(result.stderr.split())
        assert ("come_plan.json is not a valid come Plan" in said) == corrupt, said
        assert ("updated the evaluation section" in said) != corrupt, said


def test_only_come_s_own_temporary_siblings_are_removed(tmp_path):
    """Removed: a directory named exactly `.NAME.tmp-<pid>-<8 characters>` (or that,
    `-replaced`) whose pid is dead. Kept: any other name, a live pid, a file, a link, and
    siblings of another output; `--out 'o3/*'` is a name, not a pattern."""
    o3 = tmp_path / "o3"
    o3.mkdir()
    target = tmp_path / "linked"
    target.mkdir()
    (target / "data").write_text("kept")
    removed = [f".*.tmp-{DEAD}-abcdefgh", f".*.tmp-{DEAD}-a1b2_c3d-replaced"]
    kept = [".*.tmp-backup", f".*.tmp-{DEAD}-abcdefg", f".*.tmp-{DEAD}-abcdefghi", f".*.tmp-x{DEAD}-abcdefgh",
            f".*.tmp-{os.getpid()}-abcdefgh", f".model.tmp-{DEAD}-abcdefgh", ".model.tmp-old", f"..tmp-{DEAD}-abcdefgh"]
    for name in removed + kept:
        (o3 / name).mkdir()
        (o3 / name / "f").write_text(name)
    (o3 / f".*.tmp-{DEAD}-filefile").write_text("a file")
    (o3 / f".*.tmp-{DEAD}-linklink").symlink_to(target)
    before = snapshot(tmp_path)
    with atomic_dir(o3 / "*") as tmp:
        (tmp / "result").write_text("ok")
    after = snapshot(tmp_path)

    def under(key: str, names: list[str]) -> bool:
        return any(key == f"o3/{n}" or key.startswith(f"o3/{n}/") for n in names)

    assert {k: v for k, v in before.items() if not under(k, removed)} == \
        {k: v for k, v in after.items() if not under(k, ["*"])}
    assert not any((o3 / n).exists() for n in removed)
    assert sorted(p.name for p in (o3 / "*").iterdir()) == ["result"]


def test_compress_overwrites_its_own_output_and_levels(sandbox):
    root = sandbox
    out = root / "out"
    (root / ".out.tmp-backup").mkdir()  # a user's, beside OUT
    (root / ".out.tmp-backup" / "keep.txt").write_text("mine")
    (root / f".out.tmp-{DEAD}-abcdefgh").mkdir()  # a killed run's
    args = command("compress", root, str(out), "--sparsity", "0.15")
    assert CliRunner().invoke(app, args).exit_code == 0
    assert (root / ".out.tmp-backup" / "keep.txt").read_text() == "mine"
    assert not (root / f".out.tmp-{DEAD}-abcdefgh").exists()
    assert come_output(out) == "a come compress output"
    first = snapshot(out)
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert snapshot(out).keys() == first.keys()
    assert [p.name for p in root.iterdir() if p.name.startswith(".out.")] == [".out.tmp-backup"]  # nothing left
    levels = command("compress", root, str(root / "levels"), "--sparsity", "0.1,0.2", "--method", "shortgpt")
    assert CliRunner().invoke(app, levels).exit_code == 0
    assert come_output(root / "levels") == "a come multi-sparsity output"
    refused(root, levels, "is a come multi-sparsity output; pass --overwrite", advises_overwrite=True)
    assert CliRunner().invoke(app, [*levels, "--overwrite"]).exit_code == 0
    refused(root, command("compress", root, str(root / "docs"), "--sparsity", "0.1,0.2"), "not a come output")


def test_distill_result_keeps_its_checkpoints_and_nothing_else_is_touched(tmp_path, tokenizer):
    """write_output: the run's checkpoints/ move into the result; the older come output is
    replaced; a user's `.out.replaced` / `.out.distilled` folders (the old fixed names) stay."""
    out = tmp_path / "out"
    model = tiny_model("llama", layers=2)
    save_checkpoint(model, tokenizer, plan_for("tiny"), out)
    (out / "checkpoints" / "step_2").mkdir(parents=True)
    (out / "checkpoints" / "step_2" / "state").write_text("state")
    for name in (".out.replaced", ".out.distilled", ".out.tmp-backup"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("mine")
    before = snapshot(tmp_path)
    write_output(model, tokenizer, plan_for("tiny"), {"eval": []}, out)
    after = snapshot(tmp_path)
    assert come_output(out) == "a come distill output"
    assert after["out/checkpoints/step_2/state"] == before["out/checkpoints/step_2/state"]
    assert {k: v for k, v in after.items() if not k.startswith("out")} == \
        {k: v for k, v in before.items() if not k.startswith("out")}


def test_what_counts_as_a_come_output(tmp_path):
    """The marks, and near misses that are not come's (a corrupt Plan, another report.json,
    a user's file among levels or checkpoints, a link)."""
    def folder(name: str, files: dict[str, str]) -> Path:
        for rel, text in files.items():
            (tmp_path / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / rel).write_text(text)
        return tmp_path / name

    plan = plan_for("x").to_json()
    report = json.dumps({"header": "", "tasks": [], "rows": []})
    want = {
        folder("compress", {PLAN_FILE: plan, "model.safetensors": ""}): "a come compress output",
        folder("distill", {PLAN_FILE: plan, "distill_log.json": "{}"}): "a come distill output",
        folder("report", {"report.json": report, "report.md": ""}): "a come compare report",
        folder("levels", {f"sparsity-0.10/{PLAN_FILE}": plan, f"sparsity-0.2/{PLAN_FILE}": plan,
                          f".sparsity-0.30.tmp-{DEAD}-abcdefgh/x": ""}): "a come multi-sparsity output",
        folder("run", {"checkpoints/step_4/x": "", "checkpoints/.step_6.tmp-abcd_f12/x": ""}):
            "an interrupted come distill run",
        folder("corrupt", {PLAN_FILE: plan[:20]}): None,
        folder("list-plan", {PLAN_FILE: "[]"}): None,
        folder("other-report", {"report.json": json.dumps({"rows": []})}): None,
        folder("levels-and-mine", {f"sparsity-0.10/{PLAN_FILE}": plan, "notes.txt": ""}): None,
        folder("level-not-come", {"sparsity-0.10/notes.txt": ""}): None,
        folder("my-checkpoints", {"checkpoints/epoch1.pt": ""}): None,
        folder("checkpoints-and-mine", {"checkpoints/step_4/x": "", "notes.txt": ""}): None,
        folder("docs", {"notes.txt": ""}): None,
    }
    (tmp_path / "link").symlink_to(tmp_path / "compress")
    want[tmp_path / "link"] = None
    assert {p.name: come_output(p) for p in want} == {p.name: w for p, w in want.items()}
    results = {"tasks": {}, "average": None, "perplexity": None, "settings": {}}
    (tmp_path / "r.json").write_text(json.dumps(results))
    (tmp_path / "partial.json").write_text(json.dumps({"tasks": {}, "average": None}))
    assert [come_results(tmp_path / n) for n in ("r.json", "partial.json", "docs/notes.txt")] == [True, False, False]
