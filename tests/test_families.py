"""The families beyond LLaMA's layout (Gemma 2, Gemma 3 text, Phi-3/Phi-4, OLMo-2, Granite, and
the Mixture-of-Experts ones: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), through what the adapter
contract (test_adapters.py) does not reach: the merge identities that stay EXACT under their
post-norms, 1 + w norms, fused projections, multipliers and routers; a zeroed layer merged
away losslessly by the merge-error pair choice; the refit under a post-norm checked on the
true output; compressed models with sliding layers that reload, keep each merged layer's
attention type and generate the same with and without a KV cache; and every registered
method end to end on every one of them."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import transformers

from come import CompressConfig, compress
from come.engine.cache import ActivationCache
from come.engine.runner import LayerRunner
from come.merging.layer_refit import refit_layer, write_down_proj
from come.merging.merge import concat_merge
from come.methods import method_names
from come.models.adapters import get_adapter
from come.models.budget import count_params, merges_needed
from come.models.checkpoint import save_checkpoint
from come.models.data import token_windows
from come.scoring.pair_scoring import unit_scores

from conftest import FAMILIES, MOE_FAMILIES, corpus, tiny_model
from layer_utils import rel_err, run_layer

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = ("gemma2", "gemma3", "phi3", "olmo2", "granite", *sorted(MOE_FAMILIES))
WINDOW = 8  # below the calibration windows (32 tokens) and prompt + generation (16 + 8): sliding bites
TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2  # s s f s s f
MIXED = {  # each family with its attention layout made to matter
    "gemma2": {"sliding_window": WINDOW, "layer_types": TYPES},
    "gemma3": {"sliding_window": WINDOW, "layer_types": TYPES},  # + a rotary base per type
    "phi3": {"sliding_window": WINDOW},  # every layer slides
    "olmo2": {},
    "granite": {},
    "mixtral": {"sliding_window": WINDOW},  # every layer slides
    "qwen2_moe": {"use_sliding_window": True, "sliding_window": WINDOW, "layer_types": TYPES},
    "qwen3_moe": {"use_sliding_window": True, "sliding_window": WINDOW},  # every layer slides
    "olmoe": {},
}
# what a merge takes from the side that gives the FFN (an MoE layer's router and shared expert too)
FFN_FIELDS = ("gate", "up", "down", "ffn_norm", "ffn_post_norm", "down_bias", "router", "shared_gate", "shared_up",
              "shared_down", "shared_expert_gate")
TOL = {"gemma2": 1e-6, "gemma3": 1e-6, "olmo2": 1e-6,  # their RMSNorms compute in float32 in any dtype
       **{f: 1e-6 for f in MOE_FAMILIES}}  # their routers' softmax computes in float32 in any dtype


@pytest.fixture(params=NEW)
def new_family(request):
    return request.param


@pytest.fixture(params=sorted(FAMILIES) + sorted(MOE_FAMILIES))
def family(request):
    """Every family: an MoE layer's units are its experts, and the same identities hold."""
    return request.param


@pytest.fixture(scope="module")
def calib(tokenizer) -> torch.Tensor:
    return token_windows(corpus(), tokenizer, 8, 32, seed=0)


def _merged_layer(adapter, template, merged):
    out = copy.deepcopy(template)
    adapter.write_layer(out, merged)
    return out


# ---- the merge math ------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["a", "b"])
def test_keeping_every_unit_of_one_side_reproduces_that_layer(family, side):
    """Keep-all of A (r_a = 1) is A, keep-all of B (r_a = 0) is B: norms folded (1 + w for
    Gemma), post-norm gains, shared or whole-projection q/k norms, fused rows all follow; an
    MoE layer's experts with their router rows, and Qwen2-MoE's shared expert."""
    model = tiny_model(family, dtype=torch.float64)
    adapter = get_adapter(model.config)
    shape = adapter.attn_shape(model.config)
    a, b = adapter.decoder_layers(model)[1:3]
    wa, wb = adapter.read_layer(a), adapter.read_layer(b)
    kv, ch = list(range(shape.n_kv_heads)), list(range(wa.ffn_units))
    merged = (concat_merge(wa, wb, shape, kv, [], ch, [], 1.0) if side == "a"
              else concat_merge(wa, wb, shape, [], kv, [], ch, 0.0))
    kept = a if side == "a" else b
    x = torch.randn(2, 12, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = run_layer(model, _merged_layer(adapter, kept, merged), x)
    assert rel_err(got, run_layer(model, kept, x)) < TOL.get(family, 1e-10)


def test_each_block_from_one_side_is_exact(family):
    """Attention wholly from A, FFN wholly from B: the merged layer is A's attention block
    followed by B's FFN block, post-norm gains included (they follow each block's units)."""
    model = tiny_model(family, dtype=torch.float64)
    adapter = get_adapter(model.config)
    shape = adapter.attn_shape(model.config)
    a, b = adapter.decoder_layers(model)[1:3]
    wa, wb = adapter.read_layer(a), adapter.read_layer(b)
    merged = concat_merge(wa, wb, shape, list(range(shape.n_kv_heads)), [], [], list(range(wb.ffn_units)), 1.0)
    ffn_of_b = dataclasses.replace(wa, **{f: getattr(wb, f) for f in FFN_FIELDS})
    x = torch.randn(2, 12, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = run_layer(model, _merged_layer(adapter, a, merged), x)
    want = run_layer(model, _merged_layer(adapter, a, ffn_of_b), x)
    assert rel_err(got, want) < TOL.get(family, 1e-10)


def test_self_merge_with_units_reordered_reproduces_the_layer(family):
    """A merged with itself, KV groups and channels taken in another order, is A: every row
    that belongs to a head moves with it (fused rows, biases, OLMo-2's whole-projection q/k
    norm weights, whose RMS does not care about the order; an expert's router row, so the
    router picks the same experts under their new ids)."""
    model = tiny_model(family, dtype=torch.float64)
    adapter = get_adapter(model.config)
    shape = adapter.attn_shape(model.config)
    layer = adapter.decoder_layers(model)[3]
    w = adapter.read_layer(layer)
    d_ff = w.ffn_units
    merged = concat_merge(w, w, shape, [1], [0], list(range(d_ff // 2, d_ff)), list(range(d_ff // 2)), 0.5)
    x = torch.randn(2, 12, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = run_layer(model, _merged_layer(adapter, layer, merged), x)
    assert rel_err(got, run_layer(model, layer, x)) < TOL.get(family, 1e-10)


def test_post_norm_gains_weigh_the_unit_scores():
    """A unit's score is what it writes to the residual stream: a post-norm's gain scales it."""
    model = tiny_model("gemma3", dtype=torch.float64)
    adapter = get_adapter(model.config)
    shape = adapter.attn_shape(model.config)
    w = adapter.read_layer(adapter.decoder_layers(model)[2])
    stats = SimpleNamespace(attn_abs_mean=torch.rand(w.o.shape[1], dtype=torch.float64),
                            ffn_abs_mean=torch.rand(w.down.shape[1], dtype=torch.float64))
    kv, ffn = unit_scores(stats, w, shape, "channel")
    doubled = dataclasses.replace(w, attn_post_norm=2 * w.gain(w.attn_post_norm) - w.norm_offset)
    kv2, ffn2 = unit_scores(stats, doubled, shape, "channel")
    torch.testing.assert_close(kv2, 2 * kv)
    assert torch.equal(ffn2, ffn)


# ---- the pipeline --------------------------------------------------------------------------------


def _zero(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else 0 * t


def _one_merge(model) -> float:
    """The sparsity one layer's removal reaches."""
    adapter = get_adapter(model.config)
    total, per_layer = count_params(model), count_params(adapter.decoder_layers(model)[0])
    sparsity = per_layer / total
    assert merges_needed(total, per_layer, sparsity) == 1 and merges_needed(total, per_layer, 2 * sparsity) == 2
    return sparsity


def test_a_zeroed_layer_merges_away_losslessly(new_family, tokenizer, calib):
    """Layer 2 writes nothing (for Gemma: a full layer between sliding 1 and 3). The
    merge-error pair choice measures each candidate at the position it would take: merging 2
    into 1 keeps layer 1 as it is (exact); merging 3 into 2's full slot changes 3's mask (and
    Gemma 3's rotary base). So the model after one merge computes the dense logits."""
    dense = tiny_model(new_family, **MIXED[new_family])
    adapter = get_adapter(dense.config)
    layer = adapter.decoder_layers(dense)[2]
    w = adapter.read_layer(layer)  # what writes to the stream: o_proj, down_proj (every expert's, the shared one)
    adapter.write_layer(layer, dataclasses.replace(w, o=0 * w.o, down=0 * w.down, shared_down=_zero(w.shared_down)))
    cfg = CompressConfig(sparsity=_one_merge(dense), pair_score="merge-error", refit="none", device="cpu", batch_size=4)
    model, plan = compress(copy.deepcopy(dense), tokenizer, cfg, calib=calib)
    (merge,) = plan.merges
    assert 2 in merge.group_a + merge.group_b
    if "layer_types" in MIXED[new_family]:
        assert plan.groups[1] == [1, 2] and model.config.layer_types == TYPES[:2] + TYPES[3:]
    ids = calib[:2]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("refit_family", ["gemma3", "olmo2", "granite"])
def test_refit_error_is_the_true_error(refit_family, tokenizer, calib):
    """Under a post-norm the refit holds each token's 1 / rms fixed; the error it then reports
    is the written layer's TRUE held-out error, below the error before. Under Granite's
    residual multiplier the fit stays linear; the written layer's error falls too."""
    model = tiny_model(refit_family)
    adapter = get_adapter(model.config)
    runner = LayerRunner(model, adapter, torch.device("cpu"), torch.device("cpu"))
    cfg = SimpleNamespace(pair_score="bi", head_score="channel", refit_holdout=0.5)
    cache = ActivationCache(model, adapter, runner, cfg, runner.embed(list(calib.split(4))), stride=100,
                            dense_batches=2)
    cache.refresh()
    layer = adapter.decoder_layers(model)[2]
    with torch.no_grad():  # spoil the down projection (not by a scale: a post-norm ignores it)
        w = adapter.ffn_output_proj(layer).weight
        w.add_(0.5 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    res = refit_layer(cache, 2, [2], "dense")
    assert res.kept and res.err_after < res.err_before
    write_down_proj(adapter, layer, res.weight)
    true = refit_layer(cache, 2, [2], "dense", solve=False).err_before
    assert true < res.err_before
    if adapter.read_layer(layer).ffn_post_norm is not None:
        assert true == pytest.approx(res.err_after, rel=1e-3)


def test_compressed_model_reloads_and_generates(new_family, tokenizer, calib, tmp_path):
    """Two merges with sliding layers whose window the text exceeds: every merged layer takes
    its first original layer's (A's) attention type, the kept layers are renumbered, the
    checkpoint reloads to the same logits, and generation with a KV cache equals without."""
    dense = tiny_model(new_family, **MIXED[new_family])
    types = getattr(dense.config, "layer_types", None)
    model, plan = compress(copy.deepcopy(dense), tokenizer,
                           CompressConfig(sparsity=2 * _one_merge(dense), device="cpu", batch_size=4), calib=calib)
    assert plan.num_layers_after == 4 and sum(plan.groups, []) == list(range(6))
    layers = get_adapter(model.config).decoder_layers(model)
    assert [lay.self_attn.layer_idx for lay in layers] == list(range(4))
    if types is not None:
        assert model.config.layer_types == [types[g[0]] for g in plan.groups]
    ids = calib[:2, :16]
    with torch.no_grad():
        logits = model(ids).logits
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))
    out = save_checkpoint(model, tokenizer, plan, tmp_path / "o")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 4
    assert getattr(reloaded.config, "layer_types", None) == getattr(model.config, "layer_types", None)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


@pytest.mark.parametrize("method", method_names())
def test_every_method_on_every_family(new_family, method, tokenizer, calib, tmp_path):
    """`come compress --method M` end to end (the API the command calls, then its checkpoint)."""
    dense = tiny_model(new_family, **MIXED[new_family])
    model, plan = compress(dense, tokenizer, CompressConfig(method=method, sparsity=_one_merge(dense), device="cpu",
                                                            batch_size=4), calib=calib)
    assert plan.method == method and plan.num_layers_after == 5
    if hasattr(model.config, "layer_types"):
        assert len(model.config.layer_types) == 5
    out = save_checkpoint(model, tokenizer, plan, tmp_path / "o")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(reloaded(calib[:2]).logits, model(calib[:2]).logits)
