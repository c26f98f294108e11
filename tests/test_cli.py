"""`come compress` end to end through the CLI, and its bad-input contract: one line, exit 2,
nothing written."""

from __future__ import annotations

from pathlib import Path

import transformers
from typer.testing import CliRunner

from come.cli import app
from come.plan import PLAN_FILE, load_plan


runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _compress_args(model_dir, text_file, out, *extra):
    return ["compress", model_dir, "--out", out, "--calib", text_file, "--nsamples", 8, "--seqlen", 32,
            "--device", "cpu", *extra]


def test_cli_compress_writes_stock_checkpoint(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    result = _run(*_compress_args(model_dir, text_file, out, "--sparsity", 0.3))
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", PLAN_FILE, "tokenizer.json"} <= {p.name for p in out.iterdir()}
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers < 6
    assert "merges" in result.output and "layers" in result.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    # a second run into the same directory needs --overwrite
    again = _run(*_compress_args(model_dir, text_file, out))
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert _run(*_compress_args(model_dir, text_file, out, "--overwrite")).exit_code == 0


def test_official_restores_the_authors_choices(model_dir, text_file, tmp_path):
    """Default: our decisions (joint split, exact norm folding, refit, all-token pair score);
    --official: the authors' code (BI split, averaged norms, no refit, last-token angular
    pair score), recorded in the Plan."""
    want = {"": ("joint", "fold", "ls", "bi-all-tokens"), "--official": ("bi", "average", "none", "angular")}
    for flag, settings in want.items():
        out = tmp_path / f"out{flag}"
        result = _run(*_compress_args(model_dir, text_file, out, "--sparsity", 0.15, *([flag] if flag else [])))
        assert result.exit_code == 0, result.output
        cfg = load_plan(out / PLAN_FILE).settings
        assert (cfg["split"], cfg["norm"], cfg["refit"], cfg["pair_score"]) == settings


def _assert_clean_error(result, pattern: str, out: Path):
    assert result.exit_code == 2, result.output
    assert pattern in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_bad_inputs_are_one_line_errors(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    _assert_clean_error(_run(*_compress_args(model_dir, text_file, out, "--sparsity", 0.95)), "--sparsity", out)
    _assert_clean_error(_run(*_compress_args(model_dir, tmp_path / "nope.txt", out)), "not found", out)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    _assert_clean_error(_run(*_compress_args(model_dir, empty, out)), "is empty", out)
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    _assert_clean_error(_run(*_compress_args(model_dir, short, out)), "fewer than --nsamples", out)
    _assert_clean_error(_run(*_compress_args(model_dir, text_file, out, "--sparsity", 0.9)), "lower --sparsity", out)
    _assert_clean_error(_run(*_compress_args(tmp_path / "no-model", text_file, out)), "cannot load model", out)
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2)).save_pretrained(gpt2)
    _assert_clean_error(_run(*_compress_args(gpt2, text_file, out)), "unsupported architecture", out)
    _assert_clean_error(_run(*_compress_args(model_dir, text_file, out, "--pair-score", "magic")), "--pair-score", out)
    _assert_clean_error(_run(*_compress_args(model_dir, text_file, out, "--skew", 2)), "add --split bi", out)


def test_interrupted_write_leaves_nothing(model_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def boom(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", boom)
    result = _run(*_compress_args(model_dir, text_file, out))
    assert result.exit_code != 0
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
