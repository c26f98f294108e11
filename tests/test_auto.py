"""`--method auto` (methods/auto.py): it never keeps a deliberately broken candidate, keeps the
candidate with the lowest held-out KL and writes the very model that candidate builds on ALL
the calibration windows, records every candidate in the Plan, takes every registered method as a candidate,
and refuses what it cannot honour before any work."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from come import CompressConfig, compress
from come.cli.app import app
from come.engine.compression import run_method
from come.errors import ComeError
from come.methods import REGISTRY, method_names
from come.methods.auto import HOLDOUT
from come.methods.base import Method

runner = CliRunner()


class Broken(Method):
    """ShortGPT, then every weight negated: a candidate far from the dense model."""

    name = "broken"
    summary = "test only"
    compared_by_default = False

    def compress(self, model, tokenizer, cfg, calib, model_name, levels=None):
        own = replace(cfg, method="shortgpt")
        out, plan = run_method(REGISTRY["shortgpt"], model, tokenizer, own, calib, model_name)
        with torch.no_grad():
            for p in out.parameters():
                p.mul_(-1.0)
        return out, plan


def _calib(n: int = 16, t: int = 24) -> torch.Tensor:
    return torch.randint(1, 300, (n, t), generator=torch.Generator().manual_seed(0))


def test_auto_never_keeps_the_broken_candidate_and_keeps_the_best(tokenizer, monkeypatch):
    monkeypatch.setitem(REGISTRY, "broken", Broken())
    model, calib = tiny_model("llama"), _calib()
    cfg = CompressConfig(method="auto", sparsity=0.3, device="cpu", candidates="broken,shortgpt:refit=ls,come",
                         nsamples=len(calib), seqlen=calib.shape[1])
    out, plan = compress(copy.deepcopy(model), tokenizer, cfg, calib=calib)
    auto = plan.settings["auto"]
    kl = {c["spec"]: c["kl"] for c in auto["candidates"]}
    assert list(kl) == ["broken", "shortgpt:refit=ls", "come"]
    assert auto["chosen"] == min(kl, key=kl.get) != "broken" and kl["broken"] > max(kl["shortgpt:refit=ls"], kl["come"])
    n_held = max(1, round(len(calib) * HOLDOUT))
    assert auto["holdout_windows"] == n_held and auto["holdout_tokens"] == n_held * (calib.shape[1] - 1)
    # the model kept is the chosen recipe's own, built on every calibration window (held-out ones too)
    from come.settings.specs import method_list

    shared = replace(cfg, candidates=CompressConfig().candidates)
    spec = method_list(auto["chosen"], shared)[0]
    again, again_plan = compress(copy.deepcopy(model), tokenizer, spec.config(shared), calib=calib)
    assert again_plan.groups == plan.groups and plan.method == "auto"
    assert auto["settings"]["method"] == spec.method and auto["settings"] == again_plan.settings
    for a, b in zip(out.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_every_registered_method_is_a_candidate(tokenizer):
    names = [n for n in method_names() if n != "auto"]
    cfg = CompressConfig(method="auto", sparsity=0.3, device="cpu", candidates=",".join(names), nsamples=16,
                         seqlen=24)
    _, plan = compress(tiny_model("llama"), tokenizer, cfg, calib=_calib())
    assert [c["spec"] for c in plan.settings["auto"]["candidates"]] == names
    assert all(c["kl"] >= 0 and c["seconds"] >= 0 for c in plan.settings["auto"]["candidates"])


@pytest.mark.parametrize("overrides, message", [
    ({"refit": "ls"}, "--method auto ignores --refit: drop --refit .each candidate has its own"),
    ({"pair_score": "error"}, "--method auto ignores it"),
    ({"split": "bi"}, "--method auto ignores it"),
    ({"candidates": "come,auto"}, "cannot be its own candidate"),
    ({"candidates": "come,magic"}, "--candidates: unknown method 'magic'"),
    ({"candidates": "shortgpt:split=bi"}, "--candidates shortgpt:split=bi: --split is read by"),
    ({"sparsity": [0.1, 0.2]}, "one --sparsity"),
    ({"nsamples": 1}, "--nsamples >= 2"),
])
def test_auto_refuses_before_any_work(overrides, message):
    with pytest.raises(ComeError, match=message):
        CompressConfig(method="auto", **overrides).resolved()


def test_compress_cli_with_auto(tmp_path, model_dir, text_file):
    out = tmp_path / "auto"
    result = runner.invoke(app, ["compress", str(model_dir), "--out", str(out), "--method", "auto", "--candidates",
                                 "shortgpt,shortgpt:refit=ls", "--sparsity", "0.3", "--calib", str(text_file),
                                 "--nsamples", "16", "--seqlen", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "come_plan.json").read_text())
    assert plan["method"] == "auto" and len(plan["settings"]["auto"]["candidates"]) == 2
    assert plan["settings"]["auto"]["settings"]["method"] == "shortgpt"
