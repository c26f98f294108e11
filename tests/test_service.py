"""One compress service (service.py): `come compress`, `come compare`, `come.compress_to` and
`come.compare_to` all go through `prepare`, so they refuse a bad input with the same line before
any weight loads; the calibration is tokenized once per run, in one place."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from typer.testing import CliRunner

import come
import come.models.checkpoint
import come.models.data
import come.service
from come import ComeError, CompressConfig, EvalConfig
from come.cli.app import app

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(come.__file__).parent
CALIB = dict(nsamples=8, seqlen=32, device="cpu")
EVAL = dict(tasks="none", seqlen=32, ppl_windows=2)


def _cli_args(calib: Path, cfg: dict) -> list[str]:
    return [str(a) for k, v in cfg.items() for a in (f"--{k.replace('_', '-')}", v)] + ["--calib", str(calib)]


def _entries(model_dir: Path, text_file: Path, out: Path, **cfg) -> dict:
    """The four ways to compress a model at a path, each a call that returns its error line (or
    None when it ran through)."""
    settings = {**CALIB, **cfg}
    evaluation = {**EVAL, "ppl_data": str(text_file)}
    eval_flags = ["--tasks", "none", "--eval-seqlen", "32", "--ppl-windows", "2", "--ppl-data", str(text_file)]

    def cli(*args: str):
        result = CliRunner().invoke(app, [*args], env={"COLUMNS": "400"})
        assert result.exit_code in (0, 2) and "Traceback" not in result.output, result.output
        return result.stderr.strip().removeprefix("error: ") if result.exit_code else None

    def api(call):
        try:
            call()
        except ComeError as exc:
            return str(exc)
        return None

    def cfg_obj() -> CompressConfig:  # built in the call: its own checks are part of the entry
        return CompressConfig(calib=str(text_file), **settings)

    return {
        "come compress": lambda: cli("compress", str(model_dir), "--out", str(out), *_cli_args(text_file, settings)),
        "come compare": lambda: cli("compare", str(model_dir), "--out", str(out), "--methods", "come,shortgpt",
                                    *_cli_args(text_file, settings), *eval_flags),
        "come.compress_to": lambda: api(lambda: come.compress_to(str(model_dir), str(out), cfg_obj())),
        "come.compare_to": lambda: api(lambda: come.compare_to(str(model_dir), str(out), cfg_obj(), "come,shortgpt",
                                                               EvalConfig(**evaluation))),
    }


def test_every_entry_goes_through_prepare(model_dir, text_file, tmp_path, monkeypatch):
    reached = []

    def stand_in(name, cfgs, outs, overwrite, inputs, dtype="auto", evaluation=None, before_load=None):
        reached.append((name, [str(o) for o in outs], sorted(inputs), len(cfgs), evaluation is not None,
                        before_load is not None))
        raise ComeError("prepare reached")

    monkeypatch.setattr(come.service, "prepare", stand_in)
    out = tmp_path / "out"
    for entry, call in _entries(model_dir, text_file, out).items():
        assert call() == "prepare reached", entry
    compress_in = ["--calib", "MODEL"]
    compare_in = ["--calib", "--ppl-data", "--task-data", "MODEL"]
    # compress checks its memory plan last (before_load), compare has none
    assert reached == [(str(model_dir), [str(out)] * 2, compress_in, 1, False, True),  # OUT, then the level's dir
                       (str(model_dir), [str(out)], compare_in, 2, True, False),  # one row per method
                       (str(model_dir), [str(out)] * 2, compress_in, 1, False, True),
                       (str(model_dir), [str(out)], compare_in, 2, True, False)]


@pytest.mark.parametrize("cfg, said", [
    (dict(seqlen=1024, nsamples=2), "--seqlen 1024 exceeds the model's context of 256 positions"),
    (dict(protect="0,1,2,3,4,5"), "nothing can merge"),
])
def test_the_same_preflight_for_every_entry(model_dir, text_file, tmp_path, monkeypatch, cfg, said):
    monkeypatch.setattr(come.models.checkpoint, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    out = tmp_path / "out"
    lines = {entry: call() for entry, call in _entries(model_dir, text_file, out, **cfg).items()}
    assert said in lines["come compress"], lines
    assert len(set(lines.values())) == 1, lines  # the very same line from each
    assert not out.exists()


def test_the_output_check_names_the_inputs(model_dir, text_file, monkeypatch):
    monkeypatch.setattr(come.models.checkpoint, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    lines = {entry: call() for entry, call in _entries(model_dir, text_file, model_dir).items()}
    assert all("is the input MODEL" in line for line in lines.values()), lines


def test_calibration_is_tokenized_once_per_run(model_dir, text_file, tokenizer, tmp_path, monkeypatch):
    calls = []
    real = come.models.data.load_calibration
    monkeypatch.setattr(come.models.data, "load_calibration", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    levels = dict(sparsity="0.1,0.3")
    written = {"come compress": "sparsity-0.30/come_plan.json", "come.compress_to": "sparsity-0.30/come_plan.json",
               "come compare": "report.json", "come.compare_to": "report.json"}
    for entry, file in written.items():  # two levels; compare: two methods as well
        out = tmp_path / entry.replace(" ", "-")
        assert _entries(model_dir, text_file, out, **levels)[entry]() is None, entry
        assert calls == [str(text_file)] and (out / file).is_file(), entry
        calls.clear()
    for cfg in (CompressConfig(calib=str(text_file), **CALIB, **levels),
                CompressConfig(calib=str(text_file), **CALIB, method="auto", candidates="come,shortgpt")):
        come.compress(tiny_model("llama"), tokenizer, cfg, on_level=lambda model, plan: None)
        assert calls == [str(text_file)], cfg.method
        calls.clear()


def _calls(path: Path, names: set[str]) -> set[str]:
    return {node.func.id for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names}


def test_calibration_is_tokenized_in_one_place():
    """token_windows cuts calibration text (data.load_calibration); load_calibration runs where a
    run starts without ids: compress() and the service. The methods receive the ids (the test
    above runs auto, whose candidates share them)."""
    names = {"token_windows", "load_calibration"}
    callers = {p.relative_to(SRC).as_posix(): _calls(p, names) for p in SRC.rglob("*.py")}
    assert {p: c for p, c in callers.items() if c} == {"models/data.py": {"token_windows"},
                                                       "engine/compression.py": {"load_calibration"},
                                                       "service.py": {"load_calibration"}}


def test_the_cli_leaves_the_run_to_the_service():
    """cli/app.py parses and prints: the budget, the run and the comparison are the service's."""
    tree = ast.parse((SRC / "cli" / "app.py").read_text())
    imported = {node.module.rpartition(".")[2] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"budget", "compression", "rows"}, imported
    assert "service" in imported
