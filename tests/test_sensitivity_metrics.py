"""`--sensitivity l1|taylor|magnitude`: each unit metric pinned on cases with a known answer
(magnitude: the path-norm definition, zeroed and doubled units; taylor: the whole stock
model's autograd gradient and central finite differences of the calibration loss, zeroed
units), each compressing tiny LLaMA, Qwen2, Qwen3 (and an MoE) to a stock checkpoint that
reloads, the real SmolLM2 with taylor, and bad settings refused in one line."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
import transformers
from typer.testing import CliRunner

from come import CompressConfig, compress
from come.cli.app import app
from come.engine.preparation import prepare
from come.evaluation.evaluate import perplexity
from come.models.adapters import get_adapter
from come.models.checkpoint import load_model, save_checkpoint
from come.models.data import eval_windows, token_windows
from come.scoring.pair_scoring import unit_scores
from come.scoring.sensitivity import attn_path_norm, ffn_path_norm, output_taylor, taylor_unit_sensitivity

from conftest import corpus, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 4
gen = torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def calib(tokenizer):
    return token_windows(corpus(), tokenizer, 8, 24, seed=0)


# ---- magnitude: the L1 path norm ------------------------------------------------------------


def brute_ffn_path_norm(gate, up, down, j):
    """Sum over every input -> gate/up -> output path through channel j of the product of the
    weights' absolute values, path by path."""
    return sum(abs(float(gate[j, i])) * abs(float(up[j, k])) * abs(float(down[o, j]))
               for i, k, o in itertools.product(range(gate.shape[1]), range(up.shape[1]), range(down.shape[0])))


def test_ffn_path_norm_is_the_path_sum_zero_for_a_silent_channel_higher_when_doubled():
    gate, up, down = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((5, 4), (5, 4), (3, 5)))
    s = ffn_path_norm(gate, up, down)
    assert s.shape == (5,)
    for j in range(5):
        assert float(s[j]) == pytest.approx(brute_ffn_path_norm(gate, up, down, j), rel=1e-12)
    down[:, 1] = 0  # channel 1 writes nothing
    gate[2], up[2], down[:, 2] = 2 * gate[2], 2 * up[2], 2 * down[:, 2]  # channel 2 twice as large
    s2 = ffn_path_norm(gate, up, down)
    assert s2[1] == 0 and float(s2[2]) == pytest.approx(8 * float(s[2]), rel=1e-12) and s2[2] > s[2]
    assert torch.equal(s2[[0, 3, 4]], s[[0, 3, 4]])


def test_path_norms_see_the_norm_gains_as_folded_weights():
    """A pre-norm gain scores like the same gain folded into the input rows (what a merge
    with --norm fold writes), a post-norm gain like the output columns scaled by it."""
    gate, up, down = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((6, 4), (6, 4), (4, 6)))
    g, g_out = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5 for _ in range(2))
    torch.testing.assert_close(ffn_path_norm(gate, up, down, g, g_out),
                               ffn_path_norm(gate * g, up * g, g_out[:, None] * down), rtol=1e-12, atol=0)
    v, o = torch.randn(2 * 3, 4, generator=gen, dtype=torch.float64), torch.randn(4, 4 * 3, generator=gen,
                                                                                   dtype=torch.float64)
    torch.testing.assert_close(attn_path_norm(v, o, 4, 2, g, g_out), attn_path_norm(v * g, g_out[:, None] * o, 4, 2),
                               rtol=1e-12, atol=0)


def test_attn_path_norm_sums_the_value_paths_of_each_kv_group():
    n_heads, n_kv, hd, hidden = 4, 2, 3, 5
    v, o = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((n_kv * hd, hidden),
                                                                                 (hidden, n_heads * hd)))
    want = torch.zeros(n_kv, dtype=torch.float64)
    for h, c in itertools.product(range(n_heads), range(hd)):
        g = h // (n_heads // n_kv)  # repeat_kv: query heads g * n_rep .. g * n_rep + n_rep - 1 share KV head g
        want[g] += float(v[g * hd + c].abs().sum()) * float(o[:, h * hd + c].abs().sum())
    torch.testing.assert_close(attn_path_norm(v, o, n_heads, n_kv), want, rtol=1e-12, atol=0)
    o[:, 2 * hd:] = 0  # the query heads of group 1 write nothing
    assert attn_path_norm(v, o, n_heads, n_kv)[1] == 0


def test_moe_path_norm_sums_each_experts_channels():
    gate, up, down = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((3, 5, 4), (3, 5, 4),
                                                                                           (3, 4, 5)))
    want = torch.stack([ffn_path_norm(gate[e], up[e], down[e]).sum() for e in range(3)])
    torch.testing.assert_close(ffn_path_norm(gate, up, down), want, rtol=1e-12, atol=0)


def test_magnitude_unit_scores_read_only_the_weights():
    """unit_scores with magnitude needs no statistics: the layer's own weights and norm gains."""
    model = tiny_model("qwen3")
    adapter = get_adapter(model.config)
    shape = adapter.attn_shape(model.config)
    w = adapter.read_layer(model.model.layers[2]).map(lambda t: t.double())
    kv, ffn = unit_scores(None, w, shape, "channel", "magnitude")
    assert kv.shape == (shape.n_kv_heads,) and ffn.shape == (w.down.shape[1],)
    torch.testing.assert_close(ffn, ffn_path_norm(w.gate * w.ffn_norm, w.up * w.ffn_norm, w.down), rtol=1e-12, atol=0)


# ---- taylor: the first-order change of the calibration loss ---------------------------------


def mean_nll(model, calib) -> torch.Tensor:
    """The stock model's mean next-token NLL over every predicted calibration token."""
    total = 0.0
    for ids in calib.split(BATCH):
        logits = model(ids).logits[:, :-1]  # in the model's dtype: float64 for finite differences
        total = total + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    return total / (calib.shape[0] * (calib.shape[1] - 1))


def profiled(model, tokenizer, calib, **cfg):
    """The cache of a taylor run after its first refresh and backward (pipeline.py's step)."""
    cfg = CompressConfig(device="cpu", batch_size=BATCH, sensitivity="taylor", refit="none", **cfg).resolved()
    run = prepare(model, tokenizer, cfg, calib, "", keep_dense=False)
    run.cache.refresh()
    run.cache.unit_gradients()
    return run.cache


@pytest.mark.parametrize("max_cache_gb", [32.0, 1e-4])  # every layer input cached; a few of them
def test_unit_taylor_is_the_whole_model_gradient_and_leaves_the_weights(tokenizer, calib, max_cache_gb):
    model = tiny_model("qwen2")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    cache = profiled(model, tokenizer, calib, max_cache_gb=max_cache_gb)
    assert (len(cache.states) == 7) == (max_cache_gb > 1)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
        assert p.grad is None and p.requires_grad, n
    assert not any(h.requires_grad for hs in cache.states.values() for h in hs)  # the cache holds plain states
    outs = [p for lay in model.model.layers for p in (lay.self_attn.o_proj.weight, lay.mlp.down_proj.weight)]
    grads = iter(torch.autograd.grad(mean_nll(model, calib), outs))
    for st, lay in zip(cache.stats, model.model.layers):
        for got, p in ((st.attn_taylor, lay.self_attn.o_proj.weight), (st.ffn_taylor, lay.mlp.down_proj.weight)):
            want = (p.detach().double() * next(grads).double()).sum(dim=0)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)


def _slope(model, calib, param, index, h=1e-2) -> float:
    """dL/ds at s = 1 of L with the slice `index` of `param` scaled by s, i.e. the slice's sum
    of W dL/dW, by central differences with Richardson extrapolation (error O(h^4)). Not
    smaller steps: transformers' RMSNorm computes in float32 even in a float64 model, and its
    rounding is noise in L that a small step divides up."""
    def central(step):
        with torch.no_grad():
            keep = param[index].clone()
            param[index] = keep * (1 + step)
            up = float(mean_nll(model, calib))
            param[index] = keep * (1 - step)
            down = float(mean_nll(model, calib))
            param[index] = keep
        return (up - down) / (2 * step)
    return (4 * central(h) - central(2 * h)) / 3


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_taylor_unit_scores_are_the_loss_slope_of_each_unit_and_a_silent_unit_scores_zero(family, tokenizer, calib):
    """float64: a unit's signed Taylor sum is dL/ds of the whole stock model's loss with the
    unit's output weights scaled by s (autograd, to rounding; finite differences, to their
    truncation); its score the absolute value of that; a unit writing nothing scores 0."""
    model = tiny_model(family, dtype=torch.float64)
    adapter = get_adapter(model.config)
    shape = adapter.attn_shape(model.config)
    position = 3
    layer = adapter.decoder_layers(model)[position]
    o, down = adapter.unit_output_weights(layer)
    hd, n_rep = shape.head_dim, shape.n_rep
    with torch.no_grad():  # silence KV group 0 and FFN unit 1 (channel, or expert)
        o[:, :n_rep * hd] = 0
        if down.ndim == 2:
            down[:, 1] = 0
        else:
            down[1] = 0
    cache = profiled(model, tokenizer, calib)
    st = cache.stats[position]
    w = adapter.read_layer(layer).map(lambda t: t.double())
    kv, ffn = unit_scores(st, w, shape, "channel", "taylor")
    assert kv[0] == 0 and ffn[1] == 0 and kv[1] > 0 and ffn.sum() > 0
    group1 = (slice(None), slice(n_rep * hd, 2 * n_rep * hd))
    unit0 = (slice(None), 0) if down.ndim == 2 else (0,)
    g_o, g_down = torch.autograd.grad(mean_nll(model, calib), [o, down])
    want_kv, want_ffn = float((o.detach() * g_o)[group1].sum()), float((down.detach() * g_down)[unit0].sum())
    assert float(st.attn_taylor[group1[1]].sum()) == pytest.approx(want_kv, rel=1e-6)
    assert float(kv[1]) == pytest.approx(abs(want_kv), rel=1e-6)
    assert float(st.ffn_taylor[0]) == pytest.approx(want_ffn, rel=1e-6)
    assert float(ffn[0]) == abs(float(st.ffn_taylor[0]))
    assert float(st.ffn_taylor[0]) == pytest.approx(_slope(model, calib, down, unit0), rel=1e-2)


def test_output_taylor_and_unit_grouping():
    w, g = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    t = output_taylor(w, g)
    torch.testing.assert_close(t, (w * g).sum(0).double())
    # units are contiguous blocks, the sign summed within a unit before the absolute value
    assert torch.equal(taylor_unit_sensitivity(torch.tensor([1.0, -1.0, 2.0, 3.0]), 2),
                       torch.tensor([0.0, 5.0], dtype=torch.float64))
    experts_w, experts_g = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    torch.testing.assert_close(output_taylor(experts_w, experts_g), (experts_w * experts_g).sum((1, 2)).double())


# ---- end to end --------------------------------------------------------------------------------


@pytest.mark.parametrize("family,metric", [(f, m) for f in ("llama", "qwen2", "qwen3") for m in ("l1", "taylor",
                                                                                                  "magnitude")]
                         + [("qwen3_moe", "taylor"), ("qwen3_moe", "magnitude")])
def test_each_metric_compresses_to_a_stock_checkpoint(family, metric, tokenizer, calib, tmp_path):
    dense = tiny_model(family)
    model, plan = compress(copy.deepcopy(dense), tokenizer,
                           CompressConfig(sparsity=0.3, device="cpu", batch_size=BATCH, sensitivity=metric),
                           calib=calib)
    assert plan.settings["sensitivity"] == metric
    assert plan.num_layers_after < 6 and sum(plan.groups, []) == list(range(6))
    out = save_checkpoint(model, tokenizer, plan, tmp_path / "o")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = calib[:2, :16]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_metrics_choose_differently_on_one_model(tokenizer, calib):
    """The three metrics are three rankings: on the same model they keep other units."""
    dense = tiny_model("llama")
    kept = {}
    for metric in ("l1", "taylor", "magnitude"):
        _, plan = compress(copy.deepcopy(dense), tokenizer, CompressConfig(sparsity=0.15, device="cpu",
                                                                           batch_size=BATCH, sensitivity=metric),
                           calib=calib)
        kept[metric] = [(m.ffn_a, m.ffn_b) for m in plan.merges]
    assert len({repr(v) for v in kept.values()}) == 3


def _cli(model_dir, text_file, tmp_path, *extra):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(a) for a in ("compress", model_dir, "--out", out, "--calib", text_file,
                                                       "--nsamples", 8, "--seqlen", 32, "--device", "cpu", *extra)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()
    return result.output


def test_bad_sensitivity_settings_are_one_line_errors(model_dir, text_file, tmp_path):
    assert "--sensitivity" in _cli(model_dir, text_file, tmp_path, "--sensitivity", "fisher")
    assert "--head-score exact" in _cli(model_dir, text_file, tmp_path, "--sensitivity", "taylor",
                                        "--head-score", "exact")
    assert "--method laco ignores it: drop --sensitivity" in _cli(model_dir, text_file, tmp_path, "--sensitivity", "magnitude", "--method", "laco")


@pytest.mark.real
def test_smollm2_compresses_with_taylor(smollm2_dir, tmp_path):
    model, tok = load_model(str(smollm2_dir))
    text = corpus(4000)
    windows = eval_windows(text[:6000], tok, 64)[:4]
    dense_ppl = perplexity(model, windows)
    cfg = CompressConfig(sparsity=0.25, sensitivity="taylor", nsamples=4, seqlen=64, batch_size=2, device="cpu")
    model, plan = compress(model, tok, cfg, calib=token_windows(text, tok, 4, 64, seed=0))
    assert plan.settings["sensitivity"] == "taylor" and plan.achieved_sparsity >= 0.25
    ppl = perplexity(model, windows)
    assert torch.isfinite(torch.tensor(ppl)) and ppl < 100 * dense_ppl, (dense_ppl, ppl)
    out = save_checkpoint(model, tok, plan, tmp_path / "smol-taylor")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
