"""Several sparsities from one run (`--sparsity 0.1,0.2,0.3`): each level's model, config and
Plan equal a separate run's at that level, for every method; the list is checked before any
weight loads; the CLI writes one stock checkpoint per level."""

from __future__ import annotations

import json

import pytest
import transformers
from typer.testing import CliRunner

from come import CompressConfig, ComeError, compress
from come.cli.app import app
from come.methods import get_method, method_names
from come.settings.plan import PLAN_FILE, load_plan
from come.settings.specs import method_list

from conftest import tiny_model
from golden_runs import _strip, tiny_calib, weights_record

LEVELS = [0.1, 0.2, 0.3]  # 1, 2 and 3 of the tiny model's 6 layers


def _record(model, plan) -> dict:
    """Everything a level's output is, taken at once (the run goes on with the model)."""
    return {"plan": _strip(json.loads(plan.to_json())), "weights": weights_record(model)["sha256"],
            "config": model.config.to_dict()}


@pytest.mark.parametrize("method", [m for m in method_names() if m != "auto"])  # auto: one level (test_auto.py)
def test_each_level_equals_its_own_run(method, tokenizer, one_thread):
    calib = tiny_calib(tokenizer)

    def run(sparsity, on_level=None):
        cfg = CompressConfig(sparsity=sparsity, method=method, device="cpu", batch_size=4)
        return compress(tiny_model("llama"), tokenizer, cfg, calib=calib, on_level=on_level)

    got = {}
    last = run(LEVELS, on_level=lambda m, p: got.setdefault(p.target_sparsity, _record(m, p)))
    got[LEVELS[-1]] = _record(*last)
    assert list(got) == LEVELS
    shared, separate, greedy = 0, 0, getattr(get_method(method), "greedy", False)
    for sparsity in LEVELS:
        want = _record(*run(sparsity))
        if greedy:  # one removal order, computed at the first level, serves every level
            shared += got[sparsity]["plan"].pop("layer_forwards")
            separate += want["plan"].pop("layer_forwards")
        assert got[sparsity] == want, sparsity
    assert shared < separate or not greedy
    assert [r["config"]["num_hidden_layers"] for r in got.values()] == [5, 4, 3]


def test_one_level_in_a_list_is_a_plain_run(tokenizer):
    cfg = CompressConfig(sparsity=[0.3], device="cpu").resolved()
    assert cfg.sparsity == 0.3 and cfg.levels() == [0.3]
    assert cfg.to_dict() == CompressConfig(device="cpu").resolved().to_dict()


def test_a_list_needs_somewhere_to_go(tokenizer):
    with pytest.raises(ComeError, match="on_level"):
        compress(tiny_model("llama"), tokenizer, CompressConfig(sparsity=LEVELS, device="cpu"),
                 calib=tiny_calib(tokenizer))


@pytest.mark.parametrize("text, message", [
    ("0.2,0.1", "ascending, each once"), ("0.1,0.1", "ascending, each once"), ("0.1,0.95", "must be in (0, 0.9]"),
    ("0,0.2", "must be in (0, 0.9]"), ("0.1,x", "takes a number or an ascending comma-separated list"),
    ("0.1,,0.2", "takes a number"),
])
def test_bad_lists_are_one_line_errors_before_loading(text, message, model_dir, text_file, tmp_path, monkeypatch):
    import come.models.checkpoint

    monkeypatch.setattr(come.models.checkpoint, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", str(model_dir), "--out", str(out), "--calib", str(text_file),
                                      "--sparsity", text, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_compare_takes_levels_its_rows_can_run():
    assert [s.label for s in method_list("come,shortgpt", CompressConfig(sparsity=LEVELS))] == ["come", "shortgpt"]
    with pytest.raises(ComeError, match="--merge-item 3 takes one --sparsity"):
        method_list("come:merge_item=3", CompressConfig(sparsity=LEVELS))


def test_cli_writes_every_level(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    args = ["compress", str(model_dir), "--calib", str(text_file), "--nsamples", "8", "--seqlen", "32",
            "--device", "cpu", "--method", "shortgpt"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--sparsity", "0.1,0.2,0.3"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["sparsity-0.10", "sparsity-0.20", "sparsity-0.30"]
    assert result.output.count("wrote ") == 3
    single = tmp_path / "single"
    assert CliRunner().invoke(app, [*args, "--out", str(single), "--sparsity", "0.2"]).exit_code == 0
    for level, layers in zip(LEVELS, (5, 4, 3)):
        path = out / f"sparsity-{level:.2f}"
        assert {"config.json", "model.safetensors", PLAN_FILE, "README.md", "tokenizer.json"} <= \
            {p.name for p in path.iterdir()}
        plan = load_plan(path)
        assert plan.target_sparsity == plan.settings["sparsity"] == level and plan.num_layers_after == layers
        assert transformers.AutoModelForCausalLM.from_pretrained(path).config.num_hidden_layers == layers
    # the 0.2 level is the file a run at 0.2 alone writes
    assert (out / "sparsity-0.20" / "model.safetensors").read_bytes() == (single / "model.safetensors").read_bytes()
    again = CliRunner().invoke(app, [*args, "--out", str(out), "--sparsity", "0.1,0.2,0.3"])
    assert again.exit_code == 2 and "--overwrite" in again.output
