"""`come compress` end to end through the CLI, and its bad-input contract: one line, exit 2,
nothing written."""

from __future__ import annotations

from pathlib import Path

import transformers
from typer.testing import CliRunner

from come.cli.app import app
from come.settings.plan import PLAN_FILE, load_plan


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


COMMANDS = ("compress", "eval", "compare", "distill")


def _help(*args):
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    return result.output


def test_help_reads_cleanly():
    """No `<bool>` beside on/off flags (they take no value), MODEL rather than typer's {MODEL},
    no doubled negation (--no-no-repeat); --teacher says it takes a .gguf."""
    for args in [(), *((c,) for c in COMMANDS)]:
        text = _help(*args)
        for bad in ("<bool>", "{model}", "{MODEL}", "--no-no-"):
            assert bad not in text, (args, bad)
    for command in ("compress", "eval", "compare"):
        assert f" {command} [OPTIONS] MODEL " in _help(command)
    assert ".gguf" in _help("distill").split("--teacher")[1].split("--student")[0]
    assert "Did you mean 'compress'" in CliRunner().invoke(app, ["compres"]).output


def test_flags_that_default_on_get_a_plain_off_switch():
    from dataclasses import dataclass

    import typer

    from come.cli.commands import Typer, with_options
    from come.settings.options import option

    @dataclass
    class Switches:
        no_repeat: bool = option(True, "Never repeat.")
        refit: bool = option(True, "Refit.")

    demo = Typer()

    @demo.callback()
    def main() -> None:
        pass

    @demo.command()
    @with_options(s=Switches)
    def run(*, s: Switches) -> None:
        print(s)

    params = typer.main.get_command(demo).commands["run"].params
    flags = {o for p in params for o in (*p.opts, *p.secondary_opts)}
    assert flags == {"--no-repeat", "--repeat", "--refit", "--no-refit"}
    assert "no_repeat=False" in CliRunner().invoke(demo, ["run", "--repeat"]).output


def test_cli_starts_without_torch():
    """`come --help` and a command's help (its options generated from the options objects,
    --method's choices from the registry) load neither torch nor transformers, which take
    seconds: the settings floor imports none (config.py)."""
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from come.cli.app import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0 and 'distill' in r.output, r.output; "
            "r = CliRunner().invoke(app, ['compress', '--help']); assert r.exit_code == 0 and 'shortgpt' in r.output; "
            "heavy = ('torch', 'transformers', 'lm_eval', 'datasets', 'matplotlib'); "
            "print(sorted(m for m in heavy if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_eval_table_keeps_task_names_whole_at_80_columns(monkeypatch, capsys):
    from come.cli.app import print_eval
    from come.settings.tasks import DEFAULT_TASKS

    monkeypatch.setenv("COLUMNS", "80")
    tasks = {t: {"acc": 0.41, "acc_norm": 0.43, "n": 100, "split": "validation",
                 "usual_split": "test" if t.startswith(("arc", "openbook")) else "validation"} for t in DEFAULT_TASKS}
    retention = {"tasks": {t: {"acc": 98.0, "acc_norm": 97.0} for t in DEFAULT_TASKS}, "average": 97.5,
                 "perplexity": 120.0}
    print_eval("smol-come", {"tasks": tasks, "average": 0.43, "perplexity": 19.1, "retention": retention,
                             "settings": {"ppl_data": "boolq-passages", "ppl_tokens": 32768}})
    text = capsys.readouterr().out
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    assert all(f"│ {t} " in text for t in DEFAULT_TASKS) and "validation" in text and "(no test)" in text


def test_eval_without_task_data_names_the_variable(model_dir, monkeypatch):
    """Offline and no COME_TASK_DATA: one error line (tasks or perplexity text), naming it."""
    from come.settings.hub import hf_offline

    monkeypatch.delenv("COME_TASK_DATA", raising=False)
    with hf_offline():
        for args in (["--tasks", "arc_easy", "--ppl-data", "none"], ["--tasks", "none"]):
            result = _run("eval", model_dir, "--limit", 2, "--seqlen", 64, *args)
            errors = [line for line in result.output.splitlines() if "error" in line.lower()]
            assert result.exit_code == 2 and "Traceback" not in result.output, result.output
            assert len(errors) == 1 and "COME_TASK_DATA" in errors[0], result.output
