"""Closed-form refit: the math, the held-out guard, and its place in the pipeline."""

from __future__ import annotations

import copy

import pytest
import torch

from come import CompressConfig, ComeError, compress
from come.engine.runner import LayerRunner
from come.merging.refit import NormalEquations, fit, fit_map, gram, ridge_solve, sq_error
from come.models.adapters import get_adapter
from come.models.data import token_windows

from conftest import corpus, tiny_model


def _eq(f, t):
    eq = NormalEquations.empty(f.shape[1], t.shape[1])
    eq.add(f, t, t)
    return eq


def test_streamed_accumulation_equals_one_batch():
    g = torch.Generator().manual_seed(0)
    f, t = torch.randn(300, 12, generator=g), torch.randn(300, 5, generator=g)
    whole = _eq(f, t)
    streamed = NormalEquations.empty(12, 5)
    for fb, tb in zip(f.split(70), t.split(70)):
        streamed.add(fb, tb, tb)
    assert streamed.n == whole.n == 300
    torch.testing.assert_close(streamed.ff, whole.ff, rtol=1e-5, atol=1e-4)
    w0 = torch.zeros(5, 12)
    torch.testing.assert_close(ridge_solve(streamed, w0, 1e-3), ridge_solve(whole, w0, 1e-3), rtol=1e-4, atol=1e-5)
    w = torch.randn(5, 12, generator=g)
    assert sq_error(whole, w) == pytest.approx(float(((f @ w.T - t) ** 2).sum()), rel=1e-5)


def test_solving_two_statistics_equals_solving_their_formed_sum():
    """fit's final solve passes (train, held-out) without forming their sum (a d_ff^2 float64
    copy fewer at compress's GPU peak): bit for bit the solve of the formed sum, and of the
    old A = F^T F + lam' * eye."""
    g = torch.Generator().manual_seed(3)
    parts = [_eq(torch.randn(90, 16, generator=g), torch.randn(90, 7, generator=g)) for _ in range(2)]
    formed = NormalEquations(parts[0].ff + parts[1].ff, parts[0].ft + parts[1].ft, 0.0, 0.0, 180)
    w0 = torch.randn(7, 16, generator=g)
    before = [(p.ff.clone(), p.ft.clone()) for p in parts]
    for lam in (1e-3, 1.0):
        assert torch.equal(ridge_solve(parts, w0, lam), ridge_solve(formed, w0, lam))
        scale = lam * float(formed.ff.diagonal().mean())
        a = formed.ff + scale * torch.eye(16, dtype=torch.float64)
        old = torch.cholesky_solve(formed.ft + scale * w0.double().T, torch.linalg.cholesky(a)).T
        assert torch.equal(ridge_solve(formed, w0, lam), old)
    assert all(torch.equal(p.ff, ff) and torch.equal(p.ft, ft) for p, (ff, ft) in zip(parts, before))  # untouched


def test_refit_recovers_exact_linear_map_and_is_noop_at_optimum():
    g = torch.Generator().manual_seed(1)
    w_true = torch.randn(6, 20, dtype=torch.float64, generator=g)
    f = torch.randn(400, 20, dtype=torch.float64, generator=g)
    train, hold = _eq(f[:300], f[:300] @ w_true.T), _eq(f[300:], f[300:] @ w_true.T)
    res = fit(train, hold, torch.zeros(6, 20))
    assert res.kept and res.err_after < 1e-4 * res.err_before
    torch.testing.assert_close(res.weight, w_true, rtol=1e-3, atol=1e-3)
    at_optimum = fit(train, hold, w_true)  # W0 already reproduces the target
    torch.testing.assert_close(at_optimum.weight.double(), w_true, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_refit_never_raises_heldout_error(seed):
    """Training and held-out rows from different maps: a refit that would hurt is vetoed."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(4, 30, dtype=torch.float64, generator=g)
    f_tr, f_ho = torch.randn(40, 30, generator=g), torch.randn(40, 30, generator=g)
    train = _eq(f_tr, f_tr @ torch.randn(4, 30, generator=g).T.float())
    hold = _eq(f_ho, f_ho @ w0.T.float() + 0.01 * torch.randn(40, 4, generator=g))
    res = fit(train, hold, w0)
    assert res.err_after <= res.err_before
    assert sq_error(hold, res.weight) <= sq_error(hold, w0) * (1 + 1e-9)


def test_refit_bad_input():
    with pytest.raises(ComeError, match="at least"):
        fit(_eq(torch.randn(5, 3), torch.randn(5, 2)), _eq(torch.randn(5, 3), torch.randn(5, 2)), torch.zeros(2, 3))
    nan, inf = float("nan"), float("inf")
    bad = [(torch.tensor([[nan, 0.0, 1.0]]), torch.zeros(1, 2)),  # NaN feature
           (torch.tensor([[inf, 0.0, 1.0]]), torch.zeros(1, 2)),  # inf feature
           (torch.zeros(1, 3), torch.tensor([[nan, 0.0]])),  # NaN target on all-zero features
           (torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.0, inf]]))]  # inf target
    for feats, target in bad:
        eq = NormalEquations.empty(3, 2)
        with pytest.raises(ComeError, match="non-finite"):
            eq.add(feats, target, torch.zeros(1, 2))
        assert eq.n == 0 and eq.ff.abs().sum() == 0  # nothing half-accumulated


def test_layer_refit_to_its_own_output_keeps_its_weights(tokenizer):
    """Target = the layer's own output: the refit is a no-op at the optimum."""
    model = tiny_model("llama", dtype=torch.float64)
    adapter = get_adapter(model.config)
    runner = LayerRunner(model, adapter, torch.device("cpu"), torch.device("cpu"))
    ids = token_windows(corpus(), tokenizer, 8, 32, 0)
    h = runner.embed(list(ids.split(2)))
    layer = adapter.decoder_layers(model)[2]
    y, _ = runner.run(layer, h, False)
    train, hold, _ = runner.collect_refit(layer, h, y, [False, False, False, True])
    w0 = layer.mlp.down_proj.weight.detach().clone()
    res = fit(train, hold, w0)
    assert res.err_before < 1e-12
    torch.testing.assert_close(res.weight.to(w0.dtype), w0, rtol=1e-5, atol=1e-6)


def _calib(tokenizer):
    return token_windows(corpus(), tokenizer, 16, 32, seed=0)


def _ppl_proxy(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


@pytest.mark.parametrize("pair_score", ["angular", "error"])
def test_refit_in_pipeline_records_and_brings_model_closer_to_dense(tokenizer, pair_score):
    dense = tiny_model("qwen2")
    calib = _calib(tokenizer)
    kw = dict(sparsity=0.3, device="cpu", batch_size=4, pair_score=pair_score)
    _, plain = compress(copy.deepcopy(dense), tokenizer, CompressConfig(refit="none", **kw), calib=calib)
    _, fitted = compress(copy.deepcopy(dense), tokenizer, CompressConfig(**kw), calib=calib)
    assert plain.settings["refit"] == "none" and fitted.settings["refit"] == "ls"
    for m in fitted.merges:
        r = m.refit
        assert set(r) >= {"kept", "lam", "heldout_err_before", "heldout_err_after", "seconds", "solve_seconds"}
        assert r["seconds"] >= r["solve_seconds"]  # the whole step (layer pass, accumulation) holds its solves
        assert r["heldout_err_after"] <= r["heldout_err_before"]
    assert all(m.refit is None for m in plain.merges)


def test_error_pair_score_may_choose_degenerate_splits(tokenizer):
    _, plan = compress(tiny_model("llama"), tokenizer,
                       CompressConfig(sparsity=0.3, device="cpu", batch_size=4, pair_score="error"), calib=_calib(tokenizer))
    assert all(0.0 <= m.r_a <= 1.0 for m in plan.merges)
    assert all(m.pair_score == min(s for s in m.pair_scores) for m in plan.merges)


def test_merge_error_scores_the_merge_before_its_refit(tokenizer):
    """merge-error ranks pairs by the unfitted merge's error (what `error` gives with no
    refit) and still refits the chosen merge; `error` ranks by the error after the refit."""
    calib = _calib(tokenizer)
    kw = dict(sparsity=0.3, device="cpu", batch_size=4)
    runs = {name: compress(tiny_model("llama"), tokenizer, CompressConfig(**kw, **opts), calib=calib)[1]
            for name, opts in {"raw": dict(pair_score="error", refit="none"), "merge": dict(pair_score="merge-error"),
                               "fitted": dict(pair_score="error")}.items()}
    first = {name: plan.merges[0] for name, plan in runs.items()}
    assert first["merge"].pair_scores == pytest.approx(first["raw"].pair_scores)
    assert (first["merge"].position, first["merge"].r_a) == (first["raw"].position, first["raw"].r_a)
    assert all(m.refit is not None for m in runs["merge"].merges)
    assert all(f <= r + 1e-12 for f, r in zip(first["fitted"].pair_scores, first["raw"].pair_scores))
    assert any(f < r for f, r in zip(first["fitted"].pair_scores, first["raw"].pair_scores))


def test_replaceme_map_recovers_an_exactly_linear_block(tokenizer):
    """Target layer = the same layer with its FFN output passed through a linear map M:
    the block is exactly linear in the MLP output, so the fitted map is M and the folded
    down projection is M @ W0."""
    model = tiny_model("llama", dtype=torch.float64)
    adapter = get_adapter(model.config)
    runner = LayerRunner(model, adapter, torch.device("cpu"), torch.device("cpu"))
    h = runner.embed(list(token_windows(corpus(), tokenizer, 8, 32, 0).split(2)))
    layer = adapter.decoder_layers(model)[1]
    w0 = layer.mlp.down_proj.weight.detach().clone()
    m_true = torch.eye(64, dtype=torch.float64) + 0.1 * torch.randn(64, 64, dtype=torch.float64)
    target_layer = copy.deepcopy(layer)
    with torch.no_grad():
        target_layer.mlp.down_proj.weight.copy_(m_true @ w0)
    y, _ = runner.run(target_layer, h, False)
    train, hold, _ = runner.collect_refit(layer, h, y, [False, False, False, True], features="mlp_out")
    res = fit_map(train, hold, w0)
    assert res.kept and res.err_after < 1e-3 * res.err_before
    torch.testing.assert_close(res.weight, m_true @ w0, rtol=5e-2, atol=5e-3)  # fp32 Gram products


@pytest.mark.parametrize("n", [48, 700])  # below and above the blocked path's width
def test_gram_is_f_transpose_f(n):
    """The block-triangle Gram is F^T F, both triangles (each entry the same dot product)."""
    f = torch.randn(300, n, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(gram(f), f.T @ f, rtol=1e-5, atol=1e-4)
