"""Options checked as a whole before any weight loads: the Python API converts and type-checks
its settings as the CLI does; an option the chosen method would ignore is refused; windows
longer than the model's context, nothing to measure, a bad --baseline or task name, a target
that --protect makes unreachable, an unreadable calibration path or .gguf: each one line and
exit code 2 (ComeError in the API) before the weights load."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from come import CompressConfig, ComeError, DistillConfig, EvalConfig, compress
from come.cli.app import app
from come.models.data import token_windows

from conftest import corpus, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

NO_WEIGHTS = "the test's stand-in for loading weights was reached"


@pytest.fixture
def no_weights(monkeypatch):
    """Loading weights fails with a marker: a check that fires first is one line without it;
    a run that passes every check ends on it (exit 2, the marker in its line)."""
    import come.models.checkpoint

    def refuse(*args, **kwargs):
        raise ComeError(NO_WEIGHTS)

    monkeypatch.setattr(come.models.checkpoint, "load_model", refuse)


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def _one_line(result, pattern: str, absent: str = NO_WEIGHTS):
    assert result.exit_code == 2, result.output
    assert pattern in result.output, result.output
    assert absent not in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output


def _passes_checks(result):
    """Every pre-flight check passed: the run reached the weights."""
    assert result.exit_code == 2 and NO_WEIGHTS in result.output, result.output


def _compress(model_dir, calib, *extra):
    return _run("compress", model_dir, "--out", Path(calib).parent / "out", "--calib", calib, "--nsamples", 8,
                "--seqlen", 32, "--device", "cpu", "--sparsity", 0.15, *extra)


def _compare(model_dir, calib, *extra):
    return _run("compare", model_dir, "--out", Path(calib).parent / "report", "--calib", calib, "--nsamples", 8,
                "--seqlen", 32, "--device", "cpu", "--sparsity", 0.15, "--tasks", "none", "--ppl-data", calib, "--eval-seqlen", 32, *extra)


# ---- the Python API -------------------------------------------------------------------------------


def test_api_settings_are_converted_and_typed_like_the_cli():
    cfg = CompressConfig(protect="4,5", sparsity="0.3", nsamples=8.0, no_repeat="true")
    assert (cfg.protect, cfg.sparsity, cfg.nsamples, cfg.no_repeat) == ([4, 5], 0.3, 8, True)
    assert type(cfg.nsamples) is int
    assert CompressConfig(sparsity="0.1,0.2").sparsity == [0.1, 0.2]
    assert DistillConfig(tokens="20K").tokens == 20_000 and EvalConfig(limit="5").limit == 5
    bad = {"--nsamples takes an integer, got 8.5": lambda: CompressConfig(nsamples=8.5),
           "--protect takes a list of integers": lambda: CompressConfig(protect=[1.5]),
           "--sparsity takes a number": lambda: CompressConfig(sparsity=None),
           "--split takes one of bi, joint, search, refit, got 1": lambda: CompressConfig(split=1),
           "--lr takes a number": lambda: DistillConfig(lr="fast"),
           "--limit takes an integer": lambda: EvalConfig(limit=2.5)}
    for message, build in bad.items():
        with pytest.raises(ComeError, match=message) as e:
            build()
        assert "\n" not in str(e.value)


def test_api_protect_text_is_honoured(tokenizer):
    calib = token_windows(corpus(), tokenizer, 8, 32, seed=0)
    _, plan = compress(tiny_model("llama"), tokenizer, CompressConfig(sparsity=0.25, device="cpu", protect="2,3"),
                       calib=calib)
    assert plan.settings["protect"] == [2, 3]
    assert plan.merges and all({2, 3}.isdisjoint(m.group_a + m.group_b) for m in plan.merges)


def test_api_entry_refuses_wrong_objects(tokenizer):
    model = tiny_model("llama")
    calib = token_windows(corpus(), tokenizer, 8, 32, seed=0)
    cfg = CompressConfig(sparsity=0.15, device="cpu")
    cases = {"model must be a loaded causal LM": lambda: compress(None, tokenizer, cfg, calib=calib),
             "cfg must be a CompressConfig, got dict": lambda: compress(model, tokenizer, {"sparsity": 0.15}, calib),
             "calib holds token id 300, outside the model's vocabulary 0..299":
                 lambda: compress(model, tokenizer, cfg, calib=torch.full((2, 16), 300)),
             "calib must be token ids": lambda: compress(model, tokenizer, cfg, calib=calib.float())}
    for message, call in cases.items():
        with pytest.raises(ComeError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_api_distill_and_compare_refuse_wrong_objects(tokenizer, tmp_path):
    from come import distill
    from come.service import compare

    model = tiny_model("llama")
    calib = token_windows(corpus(), tokenizer, 8, 32, seed=0)
    with pytest.raises(ComeError, match="cfg must be a DistillConfig, got dict"):
        distill(model, model, tokenizer, None, {"steps": 1})
    with pytest.raises(ComeError, match="evaluation must be a EvalConfig, got NoneType"):
        compare(model, tokenizer, CompressConfig(), "come", calib, tmp_path / "r", None)
    with pytest.raises(ComeError, match="--methods: 'come:refit=none:refit=ls' sets refit twice"):
        compare(model, tokenizer, CompressConfig(), "come:refit=none:refit=ls", calib, tmp_path / "r",
                EvalConfig(tasks="none", ppl_data="none"))
    assert not (tmp_path / "r").exists()


# ---- options the method does not read -------------------------------------------------------------


@pytest.mark.parametrize("method, option", [("come", ("--select", "bi")), ("shortgpt", ("--split", "bi")),
                                            ("shortgpt", ("--pair-score", "nll")), ("laco", ("--norm", "average")),
                                            ("replaceme", ("--no-repeat",)), ("sleb", ("--reprofile", "window"))])
def test_an_option_the_method_ignores_is_refused(no_weights, model_dir, text_file, method, option):
    flag = option[0]
    _one_line(_compress(model_dir, text_file, "--method", method, *option),
              f"--method {method} ignores it: drop {flag}")


def test_the_refit_options_need_a_refit(no_weights, model_dir, text_file):
    """replaceme always fits its own map: --refit (ls or none) would be ignored; --refit-input and
    --refit-holdout shape a refit, so without one they would be too."""
    for refit in ("ls", "none"):
        _one_line(_compress(model_dir, text_file, "--method", "replaceme", "--refit", refit),
                  "--method replaceme ignores --refit: drop --refit (replaceme always fits its own map)")
    for option in (("--refit-holdout", "0.2"), ("--refit-input", "dense")):
        _one_line(_compress(model_dir, text_file, "--method", "shortgpt", *option), "shape the refit; add --refit ls")
        _one_line(_compress(model_dir, text_file, "--refit", "none", *option), "shape the refit; add --refit ls")
        _passes_checks(_compress(model_dir, text_file, "--method", "shortgpt", "--refit", "ls", *option))
    _passes_checks(_compress(model_dir, text_file, "--method", "replaceme", "--official"))
    _passes_checks(_compare(model_dir, text_file, "--methods", "come,replaceme", "--refit", "ls"))


def test_a_drop_method_records_no_pair_score(tokenizer):
    calib = token_windows(corpus(), tokenizer, 8, 32, seed=0)
    _, plan = compress(tiny_model("llama"), tokenizer, CompressConfig(sparsity=0.15, device="cpu", method="shortgpt"),
                       calib=calib)
    assert plan.settings["pair_score"] is None and plan.settings["reprofile"] is None
    assert CompressConfig(method="laco").resolved().pair_score == "angular"


def test_official_presets_set_only_what_the_method_reads(no_weights, model_dir, text_file):
    _passes_checks(_compress(model_dir, text_file, "--method", "shortgpt", "--official"))
    _passes_checks(_compress(model_dir, text_file, "--method", "laco", "--official"))
    _one_line(_compress(model_dir, text_file, "--method", "shortgpt", "--official", "--split", "bi"),
              "--method shortgpt ignores it: drop --split")


def test_compare_applies_a_shared_option_where_it_is_read(no_weights, model_dir, text_file):
    _passes_checks(_compare(model_dir, text_file, "--methods", "come,shortgpt", "--split", "bi"))
    _one_line(_compare(model_dir, text_file, "--methods", "come,shortgpt:split=bi"),
              "--methods shortgpt:split=bi: --split is read by --method come only")
    _one_line(_compare(model_dir, text_file, "--methods", "shortgpt,laco", "--split", "bi"),
              "--split is read by none of the methods compared (shortgpt, laco)")


def test_compare_methods_list_is_checked(no_weights, model_dir, text_file):
    from come.settings.registry import default_methods

    _one_line(_compare(model_dir, text_file, "--methods", ""), "--methods: none given")
    _one_line(_compare(model_dir, text_file, "--methods", "come:refit=none:refit=ls"), "sets refit twice")
    _one_line(_compare(model_dir, text_file, "--methods", "come:pair-score=angular:pair_score=nll"),
              "sets pair-score twice")
    help_text = " ".join(_run("compare", "--help").output.split())
    assert f"(default: {default_methods()})" in help_text


# ---- windows and the model's context ---------------------------------------------------------------


@pytest.fixture(scope="module")
def student_dirs(tokenizer, tmp_path_factory):
    """(teacher dir, student dir with its Plan, training text): a tiny 6 -> 5 layer pair."""
    from come.models.checkpoint import save_checkpoint

    teacher = tiny_model("llama")
    calib = token_windows(corpus(), tokenizer, 8, 32, seed=0)
    student, plan = compress(copy.deepcopy(teacher), tokenizer, CompressConfig(sparsity=0.15, device="cpu"),
                             calib=calib)
    root = tmp_path_factory.mktemp("pair")
    save_checkpoint(teacher, tokenizer, None, root / "teacher")
    save_checkpoint(student, tokenizer, plan, root / "student")
    (root / "train.txt").write_text(corpus())
    return root / "teacher", root / "student", root / "train.txt"


def test_windows_longer_than_the_context_are_refused(no_weights, model_dir, text_file, student_dirs, tmp_path):
    _one_line(_run("eval", model_dir, "--tasks", "none", "--ppl-data", text_file, "--seqlen", 1000),
              "--seqlen 1000 exceeds the model's context of 256 positions")
    _one_line(_compare(model_dir, text_file, "--eval-seqlen", 1000),
              "--eval-seqlen 1000 exceeds the model's context of 256 positions")
    teacher, student, text = student_dirs
    _one_line(_run("distill", "--teacher", teacher, "--student", student, "--out", tmp_path / "d", "--data", text,
                   "--seqlen", 1000), "--seqlen 1000 exceeds the model's context of 256 positions")
    assert not (tmp_path / "d").exists()


def test_compare_names_its_eval_flags(no_weights, model_dir, text_file):
    _one_line(_compare(model_dir, text_file, "--eval-batch-size", 0), "--eval-batch-size must be >= 1")
    result = _compare(model_dir, text_file, "--eval-seqlen", 1)
    _one_line(result, "--eval-seqlen must be >= 2")
    assert " --seqlen" not in result.output


def test_distill_names_its_training_text(student_dirs, tmp_path):
    teacher, student, _ = student_dirs
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    result = _run("distill", "--teacher", teacher, "--student", student, "--out", tmp_path / "d", "--data", short,
                  "--seqlen", 64, "--device", "cpu")
    _one_line(result, "--data (training text) has")
    assert "perplexity" not in result.output


# ---- what eval measures and compares against -------------------------------------------------------


def test_eval_with_nothing_to_measure_is_refused(no_weights, model_dir, tmp_path):
    _one_line(_run("eval", model_dir, "--tasks", "none", "--ppl-data", "none", "--out", tmp_path / "r.json"),
              "nothing to measure")
    assert not (tmp_path / "r.json").exists()


def test_eval_baseline_is_checked_before_the_eval(no_weights, model_dir, text_file, tmp_path):
    no_average = tmp_path / "dense.json"
    no_average.write_text(json.dumps({"tasks": {}, "perplexity": 10.0}))
    not_a_list = tmp_path / "list.json"
    not_a_list.write_text("[1, 2]")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    cases = {no_average: "is not a results JSON of `come eval --out` (no average)",
             not_a_list: "is not a results JSON of `come eval --out` (no tasks, average, perplexity)",
             notes: "is a file but neither a results JSON",
             tmp_path / "missing-dir": "no such file or directory"}
    for baseline, message in cases.items():
        result = _run("eval", model_dir, "--tasks", "none", "--ppl-data", text_file, "--seqlen", 32, "--baseline",
                      baseline)
        _one_line(result, message)
        assert "not reachable" not in result.output
    _passes_checks(_run("eval", model_dir, "--tasks", "none", "--ppl-data", text_file, "--seqlen", 32, "--baseline",
                        model_dir))


def test_unknown_tasks_are_refused_before_weights_load(no_weights, model_dir):
    _one_line(_run("eval", model_dir, "--tasks", "arc_easy,no_such_task", "--ppl-data", "none"),
              "unknown lm-eval task(s): no_such_task")


# ---- the model, the calibration path, the target ----------------------------------------------------


def test_a_one_layer_model_is_named_as_the_problem(no_weights, tokenizer, text_file, tmp_path):
    one = tmp_path / "one-layer"
    tiny_model("llama", layers=1).save_pretrained(one)
    tokenizer.save_pretrained(one)
    result = _compress(one, text_file)
    _one_line(result, "the model has 1 decoder layer: too few to merge or drop")
    assert "--protect" not in result.output


def test_calibration_path_says_what_it_is(no_weights, model_dir, text_file, tmp_path):
    _one_line(_compress(model_dir, tmp_path), f"calibration/eval text '{tmp_path}' is a directory")
    _one_line(_compress(model_dir, "/dev/null"), "calibration/eval text '/dev/null' is not a regular file")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_line(_compress(model_dir, empty), "is empty")


@pytest.mark.parametrize("method", ["come", "shortgpt", "reverse-order", "replaceme"])
def test_a_target_protect_makes_unreachable_is_refused_before_weights_load(no_weights, model_dir, text_file,
                                                                            method):
    result = _compress(model_dir, text_file, "--method", method, "--protect", "0,1,2,3", "--sparsity", 0.5)
    _one_line(result, f"--method {method} with --protect 0,1,2,3 can remove at most")
    _passes_checks(_compress(model_dir, text_file, "--method", method, "--protect", "0,1"))


def test_unreachable_target_in_the_api_is_refused_before_compute(tokenizer):
    calib = token_windows(corpus(), tokenizer, 8, 32, seed=0)
    cfg = CompressConfig(sparsity=0.5, device="cpu", protect=[0, 1, 2, 3])
    with pytest.raises(ComeError, match="can remove at most 1; lower --sparsity or protect fewer layers"):
        compress(tiny_model("llama"), tokenizer, cfg, calib=calib)


def test_a_truncated_gguf_is_one_line(no_weights, text_file, tmp_path):
    import numpy as np

    gguf = pytest.importorskip("gguf")
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_tensor("token_embd.weight", np.ones((300, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    whole = path.read_bytes()
    for cut in (200, len(whole) // 2):
        path.write_bytes(whole[:cut])
        _one_line(_compress(path, text_file), "is truncated or not a GGUF file")
