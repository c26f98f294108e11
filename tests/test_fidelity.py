"""Fidelity to a reference model (fidelity.py): KL of a model to itself is 0; the statistics
equal a brute-force full-vocabulary computation; a stored reference equals a fresh one; the
perplexity of the same pass is the usual one; `come eval --reference` reports it (`come
compare`'s KL column: tests/test_compare.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from come.cli.app import app
from come.errors import ComeError
from come.evaluation.evaluate import perplexity
from come.scoring.fidelity import ReferenceLogprobs, compact, paired_fidelity, score_windows, token_stats

runner = CliRunner()


def _windows(n: int = 4, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def _perturbed(model, scale: float, seed: int):
    """A copy of `model` with noise on its weights: close to it, not equal."""
    import copy

    other, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    return other


def _brute(ref_model, model, windows) -> dict[str, torch.Tensor]:
    """Per-token KL(ref || model), top-1 agreement and NLL difference over the full vocabulary, float64."""
    kl, top1, dnll = [], [], []
    with torch.no_grad():
        for w in windows:
            p = torch.log_softmax(ref_model(input_ids=w[None]).logits[0, :-1].double(), -1)
            q = torch.log_softmax(model(input_ids=w[None]).logits[0, :-1].double(), -1)
            kl.append((p.exp() * (p - q)).sum(-1))
            top1.append((p.argmax(-1) == q.argmax(-1)).double())
            tgt = w[1:, None]
            dnll.append(p.gather(-1, tgt)[:, 0] - q.gather(-1, tgt)[:, 0])
    return {"kl": torch.cat(kl), "top1": torch.cat(top1), "nll_delta": torch.cat(dnll)}


def test_a_model_against_itself_has_zero_kl_and_full_agreement(tmp_path):
    model, windows = tiny_model("llama"), _windows()
    ref = ReferenceLogprobs.build(model, windows, tmp_path / "ref", "self")
    ppl, fid = score_windows(model, windows, ref)
    assert fid["kl"]["max"] < 1e-5 and fid["kl"]["mean"] < 1e-6
    assert fid["top1"] == 1.0 and abs(fid["nll_delta"]) < 1e-6
    assert fid["tokens"] == windows.shape[0] * (windows.shape[1] - 1)
    assert ppl == pytest.approx(perplexity(model, windows), rel=1e-6)


def test_statistics_equal_a_full_vocabulary_computation(tmp_path):
    ref_model, windows = tiny_model("llama", seed=0), _windows()
    model = _perturbed(ref_model, 0.1, seed=1)
    brute = _brute(ref_model, model, windows)
    exact = ReferenceLogprobs.build(ref_model, windows, tmp_path / "exact", "dense", top_k=0)
    _, fid = score_windows(model, windows, exact)
    kl = brute["kl"]
    close = {"rel": 1e-3, "abs": 1e-6}  # the model's logits are float32; the brute force float64
    assert fid["kl"]["mean"] == pytest.approx(float(kl.mean()), **close)
    assert fid["kl"]["max"] == pytest.approx(float(kl.max()), **close)
    for name, q in (("median", 0.5), ("p90", 0.9), ("p99", 0.99)):
        assert fid["kl"][name] == pytest.approx(float(torch.quantile(kl, q)), **close)
    assert fid["top1"] == pytest.approx(float(brute["top1"].mean()))
    assert 0.0 < fid["top1"] < 1.0  # two different models: the statistic is not trivially 0 or 1
    assert fid["nll_delta"] == pytest.approx(float(brute["nll_delta"].mean()), abs=1e-5)
    per_window = kl.view(len(windows), -1).mean(-1)
    assert fid["per_window"]["kl"] == pytest.approx(per_window.tolist(), **close)
    # the compact reference keeps fewer tokens and never reports more than the full KL
    compacted = ReferenceLogprobs.build(ref_model, windows, tmp_path / "compact", "dense", top_k=30)
    assert compacted.window(0)["idx"].numel() < exact.window(0)["idx"].numel()
    _, approx = score_windows(model, windows, compacted)
    assert approx["kl"]["max"] <= fid["kl"]["max"] + 1e-6
    assert 0.0 < approx["kl"]["mean"] < fid["kl"]["mean"]


def test_the_bucket_bounds_the_full_kl_from_below():
    g = torch.Generator().manual_seed(3)
    ref = torch.log_softmax(torch.randn(40, 500, generator=g) * 3, -1)
    logits = torch.randn(40, 500, generator=g) * 3
    q = torch.log_softmax(logits.double(), -1)
    full = (ref.double().exp() * (ref.double() - q)).sum(-1)
    targets = torch.randint(0, 500, (40,), generator=g)
    nll = -ref.gather(-1, targets[:, None])[:, 0]
    gaps = []
    for top_k in (0, 500, 400, 100, 10):
        stats = token_stats({**compact(ref, top_k), "nll": nll}, logits, targets)
        assert bool((stats["kl"] <= full + 1e-6).all())
        gaps.append(float((full - stats["kl"]).mean()))
    assert gaps[0] < 1e-6 and gaps[1] < 1e-6 and 0 < gaps[2] < gaps[3] < gaps[4]  # exact at all; coarser: further below


def test_a_stored_reference_equals_a_fresh_one(tmp_path):
    ref_model, windows = tiny_model("llama", seed=0), _windows()
    model = _perturbed(ref_model, 0.1, seed=2)
    first = ReferenceLogprobs.build(ref_model, windows, tmp_path / "a", "dense")
    again = ReferenceLogprobs(tmp_path / "a")  # read back from disk only
    fresh = ReferenceLogprobs.build(ref_model, windows, tmp_path / "b", "dense")
    assert score_windows(model, windows, again) == score_windows(model, windows, fresh)
    assert score_windows(model, windows, first)[1]["kl"]["mean"] > 1e-4
    with pytest.raises(ComeError, match="other tokens"):
        score_windows(model, _windows(seed=9), again)
    with pytest.raises(ComeError, match="not a reference written by come"):
        ReferenceLogprobs(tmp_path)


def test_paired_difference_over_windows():
    a = {"reference": "d", "top_k": 8, "tokens": 6, "per_window": {"kl": [1.0, 2.0, 3.0]}}
    b = {"reference": "d", "top_k": 8, "tokens": 6, "per_window": {"kl": [0.5, 1.0, 2.5]}}
    diff, se = paired_fidelity(a, b)
    d = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)
    assert diff == pytest.approx(float(d.mean())) and se == pytest.approx(float(d.std()) / math.sqrt(3))
    assert paired_fidelity(a, {**b, "reference": "other"}) is None


def test_eval_reference_cli(tmp_path, model_dir, text_file, tokenizer):
    from come.models.checkpoint import save_checkpoint

    other = tmp_path / "other"
    save_checkpoint(tiny_model("llama", seed=5), tokenizer, None, other)
    args = ["eval", str(other), "--reference", str(model_dir), "--tasks", "none", "--ppl-data", str(text_file),
            "--seqlen", "32", "--ppl-windows", "3", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "res.json")])
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "res.json").read_text())
    fid = res["fidelity"]
    assert fid["reference"] == str(model_dir) and fid["tokens"] == 3 * 31 and fid["kl"]["mean"] > 1e-4
    assert len(fid["per_window"]["kl"]) == 3 and "top-1 agreement" in result.output
    self_ = runner.invoke(app, ["eval", str(model_dir), *args[2:], "--out", str(tmp_path / "self.json")])
    assert self_.exit_code == 0, self_.output
    assert json.loads((tmp_path / "self.json").read_text())["fidelity"]["kl"]["mean"] < 1e-6
    none = runner.invoke(app, [*args[:4], "--ppl-data", "none", "--device", "cpu"])
    assert none.exit_code == 2 and "--reference" in none.output
