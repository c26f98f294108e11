"""Every bad input is one line and exit code 2, checked before weights load and before any
compute, with nothing written; non-finite weights never reach a checkpoint; outputs are
normal directories and a killed run's leftovers are cleaned."""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from come import CompressConfig, ComeError, compress
from come.cli.app import app
from come.models.data import token_windows

from conftest import corpus, tiny_model

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _compress(model_dir, calib, out, *extra):
    return _run("compress", model_dir, "--out", out, "--calib", calib, "--nsamples", 8, "--seqlen", 32,
                "--device", "cpu", "--sparsity", 0.15, *extra)


def _one_line(result, pattern: str, *must_not_exist: Path):
    assert result.exit_code == 2, result.output
    assert pattern in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    for p in must_not_exist:
        assert not p.exists(), p


def test_output_locations_are_checked_first(model_dir, text_file, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line(_compress(model_dir, text_file, afile / "out"), "is a file, not a directory", afile / "out")
    _one_line(_compress(model_dir, text_file, "/proc/come-out"), "cannot write in /proc")
    _one_line(_run("compare", model_dir, "--out", afile / "r", "--calib", text_file, "--tasks", "none",
                   "--ppl-data", "none"), "is a file, not a directory")
    _one_line(_run("eval", model_dir, "--out", tmp_path, "--tasks", "none", "--ppl-data", "none"), "is a directory")
    _one_line(_run("distill", "--teacher", model_dir, "--student", model_dir, "--out", afile / "d"),
              "is a file, not a directory")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".come-probe")] == []


def test_broken_model_directories(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model_dir / "config.json").read_text())
    _one_line(_compress(no_weights, text_file, out), "has config.json but no weights", out)
    for name, mangle in {"truncated": lambda b: b[: len(b) // 2], "garbage": lambda b: b"not a safetensors file"}.items():
        broken = tmp_path / name
        broken.mkdir()
        for f in model_dir.iterdir():
            data = f.read_bytes()
            (broken / f.name).write_bytes(mangle(data) if f.name == "model.safetensors" else data)
        _one_line(_compress(broken, text_file, out), "truncated or not a safetensors file", out)
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((model_dir / f).read_bytes())
    _one_line(_compress(no_tok, text_file, out), "no tokenizer files", out)


def test_bad_calibration_text(model_dir, tmp_path):
    out = tmp_path / "out"
    cases = {"null.jsonl": ('{"text": null}\n', '"text" must be a string, got NoneType'),
             "int.jsonl": ('{"text": 5}\n', '"text" must be a string, got int')}
    for name, (content, msg) in cases.items():
        (tmp_path / name).write_text(content)
        _one_line(_compress(model_dir, tmp_path / name, out), msg, out)
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    _one_line(_compress(model_dir, tmp_path / "latin1.jsonl", out), "is not UTF-8 text", out)
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 64)
    _one_line(_compress(model_dir, tmp_path / "weights.bin", out), "is a binary file", out)


def test_ranges_against_the_model(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    _one_line(_compress(model_dir, text_file, out, "--protect", "99,-1"), "--protect 99,-1: the model has layers 0..5",
              out)
    _one_line(_run("compress", model_dir, "--out", out, "--calib", text_file, "--nsamples", 2, "--seqlen", 1024),
              "exceeds the model's context of 256 positions", out)
    _one_line(_compress(model_dir, text_file, out, "--protect", "0,1,2,3,4,5"), "nothing can merge", out)
    if not torch.cuda.is_available():
        _one_line(_compress(model_dir, text_file, out, "--device", "cuda"), "CUDA is not available", out)
        _one_line(_run("compare", model_dir, "--out", out, "--methods", "come,shortgpt:device=cuda", "--calib",
                       text_file, "--tasks", "none", "--ppl-data", "none"), "CUDA is not available", out)
    for flag in ("--limit", "--ppl-windows"):
        _one_line(_run("eval", model_dir, "--tasks", "none", "--ppl-data", text_file, flag, 0), ">= 1")


def test_corrupt_plans(model_dir, tmp_path):
    from come.settings.plan import load_plan

    bad = tmp_path / "come_plan.json"
    for content in ("{not json", json.dumps({"model": "m", "method": "come", "settings": {}, "num_layers_before": 6,
                                             "colour": "red"})):
        bad.write_text(content)
        with pytest.raises(ComeError, match="is not a valid come Plan") as e:
            load_plan(bad)
        assert "\n" not in str(e.value)


def _nan_model():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = float("nan")
    return model


@pytest.mark.parametrize("refit", ["ls", "none"])
def test_non_finite_weights_are_refused(tokenizer, refit):
    calib = token_windows(corpus(), tokenizer, 8, 32, seed=0)
    with pytest.raises(ComeError, match="input model: tensor model.layers.2.mlp.up_proj.weight holds NaN"):
        compress(_nan_model(), tokenizer, CompressConfig(sparsity=0.15, device="cpu", refit=refit), calib=calib)


def test_the_cli_writes_nothing_for_a_nan_model(tokenizer, text_file, tmp_path):
    src = tmp_path / "nan-model"
    _nan_model().save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    result = _compress(src, text_file, out, "--refit", "none")  # found once the weights are loaded, before compute
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "holds NaN or inf" in result.output.strip().splitlines()[-1] and "profiling" not in result.output
    assert not out.exists()


def test_plan_is_always_valid_json(tokenizer):
    """An ineligible pair's score is inf: the Plan writes null, which strict JSON readers take."""
    calib = token_windows(corpus(), tokenizer, 8, 32, seed=0)
    _, plan = compress(tiny_model("llama"), tokenizer,
                       CompressConfig(sparsity=0.15, device="cpu", pair_score="error", protect=[0]), calib=calib)
    assert any(s == float("inf") for m in plan.merges for s in m.pair_scores)

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    data = json.loads(plan.to_json(), parse_constant=refuse)
    assert None in data["merges"][0]["pair_scores"]


def test_outputs_are_normal_directories_and_leftovers_are_cleaned(tokenizer, tmp_path):
    from come.models.checkpoint import save_checkpoint

    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-999999999-abcdefgh"  # a pid that is not running (test_data_safety.py: other names)
    stale.mkdir()
    (stale / "model.safetensors").write_text("half")
    umask = os.umask(0o022)
    try:
        save_checkpoint(tiny_model("llama", layers=2), tokenizer, None, out)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert not stale.exists()
    live = tmp_path / f".out.tmp-{os.getpid()}-livelive"  # this process: a run in progress
    live.mkdir()
    shutil.rmtree(out)  # a checkpoint without a Plan is no come output: --overwrite would be refused
    save_checkpoint(tiny_model("llama", layers=2), tokenizer, None, out)
    assert live.exists()


def test_qwen2_window_layers_follow_the_merges(tokenizer):
    """Qwen2 slides from layer `max_window_layers` on: after merges it still counts the same
    layers, so transformers (and vLLM / llama.cpp, which read the number) agree with layer_types."""
    import transformers

    dense = tiny_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=3)
    assert dense.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    calib = token_windows(corpus(), tokenizer, 8, 32, seed=0)
    model, plan = compress(copy.deepcopy(dense), tokenizer, CompressConfig(sparsity=0.3, device="cpu"), calib=calib)
    cfg = model.config
    rebuilt = transformers.Qwen2Config(**{**cfg.to_dict(), "layer_types": None})
    assert rebuilt.layer_types == cfg.layer_types
    assert cfg.layer_types == [dense.config.layer_types[g[0]] for g in plan.groups]


def test_eval_perplexity_default_is_offline_with_task_data():
    from come import EvalConfig

    assert EvalConfig().evaluate_kwargs()["ppl_data"] == "wikitext2"
    assert EvalConfig(task_data="DIR").evaluate_kwargs()["ppl_data"] == "boolq-passages"
    assert EvalConfig(task_data="DIR", ppl_data="none").evaluate_kwargs()["ppl_data"] is None


@pytest.fixture
def no_hub(monkeypatch):
    """The Hub unreachable (a name that never resolves), the probe's memo cleared both ways."""
    from come.settings.hub import hub_reachable

    monkeypatch.setenv("HF_ENDPOINT", "https://come-offline.invalid")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


def test_offline_hub_names_fail_at_once(no_hub, model_dir, text_file, tmp_path):
    """Offline, a Hub model id or a named dataset is one line in seconds, not ~30 s of retries."""
    import time

    import huggingface_hub.constants as hub

    start = time.monotonic()
    _one_line(_compress("someorg/not-a-model", text_file, tmp_path / "a"), "Hub is unreachable", tmp_path / "a")
    _one_line(_compress(model_dir, "wikitext2", tmp_path / "b"), "Hub is unreachable", tmp_path / "b")
    assert time.monotonic() - start < 20
    assert not hub.HF_HUB_OFFLINE and "HF_HUB_OFFLINE" not in os.environ  # cache-only mode was undone
