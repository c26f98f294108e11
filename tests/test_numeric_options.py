"""Numbers: every numeric option of every command refuses NaN, infinity and values outside its
declared bounds in one line, exit 2, before anything loads or is written (a property test over
the options objects' fields, so an option added later is covered without a new test); a
distillation whose loss or weights stop being finite stops in one line, writes no result and
keeps only checkpoints whose tensors are finite; its JSON files are strict JSON."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from come import ComeError, DistillConfig, distill
from come.cli.app import app
from come.models.checkpoint import save_checkpoint
from come.scoring.selection import split_ratio
from come.settings.options import base_type, bounds_of, count

distill_mod = importlib.import_module("come.recovery.distill")  # the module; `come.distill` is the API function

pytestmark = pytest.mark.usefixtures("one_thread")

COMMANDS = ("compress", "eval", "compare", "distill")
# text typed for a number: NaN, both infinities, a negative and a huge value (as the parser reads them)
CANDIDATES = {int: ["nan", "inf", "-inf", "-1", str(10**30)], float: ["nan", "inf", "-inf", "-1.5", "1e30"]}


def _numeric_flags(command: str) -> list[tuple[str, dataclasses.Field, type]]:
    """(flag, field, int or float) of every numeric option the command generates from its options
    objects (cli_options.with_options), read from the command itself: what a user can type."""
    callbacks = {info.name or info.callback.__name__: info.callback for info in app.registered_commands}
    spec = callbacks[command].__wrapped__._spec[1]  # one_line_errors wraps with_options' function
    return [(flag, f, base) for _, _, entries in spec for _, f, tp, flag in entries
            if (base := base_type(tp)[0]) in (int, float)]


def _refused(base: type, text: str, f: dataclasses.Field) -> bool:
    """Whether the option must refuse this text: not a number of its type (an int option given
    'nan'), or a number outside its declared bounds."""
    try:
        value = base(text)
    except ValueError:
        return True
    return not bounds_of(f).holds(value)


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _args(command: str, model: Path, text: Path, out: Path) -> list[str]:
    """A command line that would run (and write OUT) if the number were accepted."""
    return {"compress": ["compress", model, "--out", out, "--calib", text, "--device", "cpu"],
            "eval": ["eval", model, "--out", out, "--tasks", "none", "--ppl-data", text, "--device", "cpu"],
            "compare": ["compare", model, "--out", out, "--calib", text, "--tasks", "none", "--ppl-data", text,
                        "--device", "cpu"],
            "distill": ["distill", "--teacher", model, "--student", model, "--out", out, "--data", text,
                        "--device", "cpu"]}[command]


def test_every_numeric_option_declares_its_bounds():
    for command in COMMANDS:
        missing = [flag for flag, f, _ in _numeric_flags(command) if bounds_of(f) is None]
        assert not missing, f"{command}: declare bounds= beside {missing}"


@pytest.mark.parametrize("command, flag", [(c, flag) for c in COMMANDS for flag, _, _ in _numeric_flags(c)])
def test_a_number_out_of_bounds_is_one_line_before_any_work(command, flag, model_dir, text_file, tmp_path):
    _, f, base = next(entry for entry in _numeric_flags(command) if entry[0] == flag)
    bad = [text for text in CANDIDATES[base] if _refused(base, text, f)]
    assert {"nan", "inf", "-inf"} <= set(bad)  # never a number of any option
    out, before = tmp_path / ("out.json" if command == "eval" else "out"), _tree(tmp_path)
    for text in bad:
        result = CliRunner().invoke(app, [str(a) for a in [*_args(command, model_dir, text_file, out), flag, text]])
        assert result.exit_code == 2, (flag, text, result.output)
        assert result.stdout == "", (flag, text, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0], (flag, text, result.stderr)
        assert not out.exists() and _tree(tmp_path) == before, (flag, text)


def test_bounds_name_the_flag_the_value_and_the_range():
    with pytest.raises(ComeError, match=r"^--lr must be a finite number > 0, got inf$"):
        DistillConfig(lr=math.inf).validate()
    with pytest.raises(ComeError, match=r"^--warmup must be in \[0, 1\), got nan$"):
        DistillConfig(warmup=math.nan).validate()
    with pytest.raises(ComeError, match=r"^--batch-size must be >= 1, got 0$"):
        DistillConfig(batch_size=0).validate()
    with pytest.raises(ComeError, match=r"^--tokens must be a count such as 20M"):  # not an OverflowError
        count("infM")


@pytest.mark.parametrize("argv, flag", [
    (["--split", "bi", "--skew", "nan"], "--skew"), (["--split", "bi", "--skew", "inf"], "--skew"),
    (["--max-cache-gb", "nan"], "--max-cache-gb"), (["--max-cache-gb", "inf"], "--max-cache-gb"),
    (["--max-cache-gb", "-1"], "--max-cache-gb"),
])
def test_the_reported_numbers_are_one_line(argv, flag, model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(a) for a in [*_args("compress", model_dir, text_file, out), *argv]])
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {flag} must be"), result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_any_skew_splits(model_dir, text_file, tmp_path):
    """A large p gives the side of higher BI every unit (its share's limit), not 0/0."""
    assert split_ratio(0.2, 0.3, p=1e6) == 0.0 and split_ratio(0.3, 0.2, p=1e6) == 1.0
    assert split_ratio(0.2, 0.3, p=0.0) == 0.5
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(a) for a in [*_args("compress", model_dir, text_file, out), "--nsamples", 8,
                                                        "--seqlen", 32, "--split", "bi", "--skew", "1e6"]])
    assert result.exit_code == 0, result.output
    assert (out / "come_plan.json").is_file()


# ---- distillation that diverges ------------------------------------------------------------------

def _strict_json(path: Path):
    """json.loads refusing NaN / Infinity (which Python writes by default and JSON does not have)."""
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def dirs(tokenizer, tmp_path_factory):
    from conftest import corpus
    from golden_distill import student_pair

    teacher, student, plan = student_pair(tokenizer)
    root = tmp_path_factory.mktemp("numbers")
    save_checkpoint(teacher, tokenizer, None, root / "teacher")
    save_checkpoint(student, tokenizer, plan, root / "student")
    (root / "train.txt").write_text(corpus())
    return root, (teacher, student, plan)


def _distill_cli(root: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["distill", "--teacher", str(root / "teacher"), "--student", str(root / "student"),
                                    "--out", str(out), "--data", str(root / "train.txt"), "--seqlen", "32",
                                    "--batch-size", "2", "--eval-windows", "2", "--device", "cpu", *extra])


def _assert_finite_checkpoints(checkpoints: Path) -> list[str]:
    steps = sorted(p.name for p in checkpoints.iterdir())
    for step in steps:
        _strict_json(checkpoints / step / "come_checkpoint.json")
        for name, t in torch.load(checkpoints / step / "custom_checkpoint_0.pkl", weights_only=False)["layers"].items():
            assert all(v.isfinite().all() for v in t.values()), (step, name)
    return steps


def test_a_diverging_run_stops_in_one_line_and_keeps_the_last_good_checkpoint(dirs):
    """--lr 1e30 is a number > 0, so it is taken; the step after the first update is NaN."""
    root, _ = dirs
    out = root / "diverged"
    result = _distill_cli(root, out, "--lr", "1e30", "--steps", "4", "--save-every", "1")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: distillation stopped at step 2"), result.stderr
    assert "Traceback" not in result.output and "checkpoints/step_1" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # no result: no config, weights, log
    assert _assert_finite_checkpoints(out / "checkpoints") == ["step_1"]


def test_a_weight_gone_non_finite_is_never_checkpointed(dirs, tokenizer, tmp_path, monkeypatch):
    """The loss of step 2 was finite (computed before its update); the weight check before the
    step-2 checkpoint stops the run, and step_1 stays the newest checkpoint."""
    root, (teacher, student, plan) = dirs
    step = distill_mod._Run.step

    def poisoned(self):
        step(self)
        if self.state.step == 2:
            with torch.no_grad():
                next(iter(self.state.layers.values())).mlp.down_proj.weight[0, 0] = math.inf

    monkeypatch.setattr(distill_mod._Run, "step", poisoned)
    cfg = DistillConfig(data=str(root / "train.txt"), seqlen=32, batch_size=2, eval_windows=2, device="cpu", steps=4,
                        save_every=1, checkpoint_dir=str(tmp_path / "checkpoints"))
    with pytest.raises(ComeError, match=r"^distillation stopped at step 2: a trained weight is NaN or infinite") as exc:
        distill(teacher, copy.deepcopy(student), tokenizer, plan, cfg)
    assert "\n" not in str(exc.value) and str(tmp_path / "checkpoints" / "step_1") in str(exc.value)
    assert _assert_finite_checkpoints(tmp_path / "checkpoints") == ["step_1"]


def test_distill_log_and_checkpoint_records_are_strict_json(dirs):
    root, _ = dirs
    out = root / "fine"
    result = _distill_cli(root, out, "--lr", "3e-3", "--steps", "3", "--save-every", "2")
    assert result.exit_code == 0, result.output
    log = _strict_json(out / "distill_log.json")
    assert all(math.isfinite(e["loss"]) for e in log["train"]) and len(log["eval"]) == 2
    assert _assert_finite_checkpoints(out / "checkpoints") == ["step_2"]
    assert all(t.isfinite().all() for t in load_file(out / "model.safetensors").values())
