"""`--refit-attn` (issue 41 item 2): the attention output projection re-solved in closed form
before the down projection, kept only where the pair beats the down projection alone on
held-out error."""

from __future__ import annotations

import copy

import pytest
import torch

from come import CompressConfig, compress
from come.engine.runner import LayerRunner
from come.errors import ComeError
from come.merging.refit import fit, sq_error
from come.models.adapters import get_adapter
from come.models.data import token_windows

from conftest import corpus, tiny_model


def _calib(tokenizer):
    return token_windows(corpus(), tokenizer, 16, 32, seed=0)


def test_a_layer_refit_against_its_own_output_keeps_its_attention_projection(tokenizer):
    """Target = the layer's own output, the FFN's output held: W_o reproduces it exactly, so its
    held-out error is 0, and the ridge solution (pulled toward W_o) reproduces it too: the
    statistics are posed right. (The heads' outputs are close to collinear on 512 tokens, so
    the solution's weights may move along them by 0.2% without changing the output.)"""
    model = tiny_model("qwen2")  # o_proj has no bias in Qwen2; its q/k/v biases run inside z
    adapter = get_adapter(model.config)
    runner = LayerRunner(model, adapter, torch.device("cpu"), torch.device("cpu"))
    h = runner.embed(list(_calib(tokenizer).split(4)))
    layer = adapter.decoder_layers(model)[2]
    y, _ = runner.run(layer, h, False)
    train, hold = runner.collect_attn_refit(layer, h, y, [False, False, False, True])
    w0 = layer.self_attn.o_proj.weight.detach().clone()
    res = fit(train, hold, w0)
    assert res.err_before < 1e-6  # float32 rounding of y - h - u (the target subtracts the stream and the FFN)
    w = ridge(train, hold, w0)
    assert sq_error(train, w) / train.yy < 1e-6 and sq_error(hold, w) / hold.yy < 1e-6


def ridge(train, hold, w0):
    from come.merging.refit import ridge_solve

    return ridge_solve((train, hold), w0, 1e-3)


@pytest.mark.parametrize("method", ["come", "shortgpt"])
def test_the_attention_refit_is_kept_only_where_it_beats_the_down_projection_alone(tokenizer, method):
    dense = tiny_model("llama")
    calib = token_windows(corpus(), tokenizer, 8, 32, seed=0)
    kw = dict(method=method, sparsity=0.3, device="cpu", batch_size=2, refit="ls")
    _, plain = compress(copy.deepcopy(dense), tokenizer, CompressConfig(**kw), calib=calib)
    _, both = compress(copy.deepcopy(dense), tokenizer, CompressConfig(**kw, refit_attn=True), calib=calib)
    assert both.settings["refit_attn"] and not plain.settings["refit_attn"]
    records = [m.refit for m in both.merges]
    assert records and all("attn" in r for r in records) and not any("attn" in m.refit for m in plain.merges)
    for r in records:
        a = r["attn"]
        if a["kept"]:
            assert a["heldout_err_with_attn"] < a["heldout_err_down_only"]
            assert r["heldout_err_after"] == a["heldout_err_with_attn"]
        else:
            assert r["heldout_err_after"] == a["heldout_err_down_only"]
    # the first refit sees the same model either way: its down-only error is the plain run's
    assert records[0]["attn"]["heldout_err_down_only"] == pytest.approx(plain.merges[0].refit["heldout_err_after"])
    assert any(r["attn"]["kept"] for r in records)


def test_refit_attn_needs_a_refit_and_skips_post_norm_attention(tokenizer):
    with pytest.raises(ComeError, match="--refit-attn shape the refit; add --refit ls"):
        CompressConfig(method="shortgpt", refit_attn=True).resolved()
    dense = tiny_model("gemma3")  # its attention output is normalized before it adds
    cfg = CompressConfig(method="shortgpt", sparsity=0.3, device="cpu", batch_size=4, refit="ls", refit_attn=True)
    _, plan = compress(dense, tokenizer, cfg, calib=_calib(tokenizer))
    assert all(m.refit["attn"] == {"kept": False, "reason": "post-norm"} for m in plan.merges)
