"""The math identities of method.md, each able to fail: folding, concatenation, GQA, biases."""

from __future__ import annotations

import copy
from dataclasses import fields

import pytest
import torch
import transformers

from come.merging.merge import concat_merge, concat_merge_many, fold_norms, linear_combination, query_heads
from come.models.adapters import get_adapter

from conftest import tiny_model
from layer_utils import masked, parallel, rel_err, run_layer

TOL = 1e-10
FLOAT32_NORMS = {"gemma2": 1e-6, "gemma3": 1e-6}  # Gemma's RMSNorm applies its gain in float32 in any dtype


def _tol(family) -> float:
    return FLOAT32_NORMS.get(family, TOL)


def _setup(family, **overrides):
    model = tiny_model(family, dtype=torch.float64, **overrides)
    adapter = get_adapter(model.config)
    torch.manual_seed(1)
    x = torch.randn(2, 12, model.config.hidden_size, dtype=torch.float64)
    return model, adapter, adapter.attn_shape(model.config), x


def _skip_post_norms(adapter, layer):
    """A block under a post-norm adds g * u / rms(u): the concatenation of two blocks is not
    their sum, so the parallel identities below do not hold (test_families.py pins what does)."""
    if adapter.read_layer(layer).attn_post_norm is not None:
        pytest.skip("post-norm family: a concatenated block is not the sum of its parts")


def _same_qk_norm(adapter, layers, model):
    """Shared per-head q/k norms (Qwen3) cannot be concatenated, only mixed; the exact
    identities hold when both sides carry the same ones."""
    if adapter.qk_norm:
        with torch.no_grad():
            for lay in layers[1:]:
                lay.self_attn.q_norm.weight.copy_(layers[0].self_attn.q_norm.weight)
                lay.self_attn.k_norm.weight.copy_(layers[0].self_attn.k_norm.weight)


def test_fold_norms_is_exact(family):
    model, adapter, _, x = _setup(family)
    layer = adapter.decoder_layers(model)[2]
    w = adapter.read_layer(layer)
    if w.attn_norm is None:
        pytest.skip("no pre-norms to fold (OLMo-2)")
    folded = copy.deepcopy(layer)
    adapter.write_layer(folded, fold_norms(w))
    back = adapter.read_layer(folded)
    assert torch.all(back.gain(back.attn_norm) == 1) and torch.all(back.gain(back.ffn_norm) == 1)
    assert not torch.allclose(w.attn_norm, back.attn_norm)
    assert rel_err(run_layer(model, folded, x), run_layer(model, layer, x)) < _tol(family)


@pytest.mark.parametrize("norm", ["fold", "average"])
def test_self_merge_by_unit_id_reproduces_layer(family, norm):
    model, adapter, shape, x = _setup(family)
    layer = adapter.decoder_layers(model)[1]
    w = adapter.read_layer(layer)
    kv, d_ff = shape.n_kv_heads, w.down.shape[1]
    merged = concat_merge(w, w, shape, list(range(kv // 2)), list(range(kv // 2, kv)),
                          list(range(d_ff // 3)), list(range(d_ff // 3, d_ff)), r_a=0.5, norm=norm)
    out = copy.deepcopy(layer)
    adapter.write_layer(out, merged)
    assert rel_err(run_layer(model, out, x), run_layer(model, layer, x)) < _tol(family)


def test_keep_all_units_equals_parallel(family):
    model, adapter, shape, x = _setup(family)
    a, b = adapter.decoder_layers(model)[1:3]
    _skip_post_norms(adapter, a)
    _same_qk_norm(adapter, [a, b], model)
    wa, wb = adapter.read_layer(a), adapter.read_layer(b)
    kv, d_ff = shape.n_kv_heads, wa.down.shape[1]
    merged = concat_merge(wa, wb, shape, list(range(kv)), list(range(kv)), list(range(d_ff)), list(range(d_ff)), 0.5)
    cfg = copy.deepcopy(model.config)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size = 2 * shape.n_heads, 2 * kv, 2 * d_ff
    double = type(a)(cfg, layer_idx=0).to(torch.float64)
    adapter.write_layer(double, merged)
    assert rel_err(run_layer(model, double, x), parallel(model, [a, b], x)) < TOL


def test_partial_merge_keeps_whole_kv_groups_and_their_biases(family):
    """kv group 1 of A with group 0 of B, some channels of each: the merged layer must equal
    A and B run in parallel with every other head / channel silenced. A wrong GQA pairing
    (tiling the head mask, as the official code does) or a bias left behind fails this."""
    model, adapter, shape, x = _setup(family)
    a, b = adapter.decoder_layers(model)[3:5]
    _skip_post_norms(adapter, a)
    _same_qk_norm(adapter, [a, b], model)
    wa, wb = adapter.read_layer(a), adapter.read_layer(b)
    d_ff = wa.down.shape[1]
    ffn_a, ffn_b = list(range(0, d_ff, 2)), list(range(1, d_ff, 2))
    merged = concat_merge(wa, wb, shape, [1], [0], ffn_a, ffn_b, r_a=0.5)
    out = copy.deepcopy(a)
    adapter.write_layer(out, merged)
    ref = parallel(model, [masked(a, query_heads([1], shape.n_rep), ffn_a, shape.head_dim),
                           masked(b, query_heads([0], shape.n_rep), ffn_b, shape.head_dim)], x)
    assert rel_err(run_layer(model, out, x), ref) < TOL


def test_query_heads_are_contiguous_per_kv_group():
    assert query_heads([1], 3) == [3, 4, 5]
    assert query_heads([2, 0], 2) == [4, 5, 0, 1]


def test_qwen2_biases_present_and_moved():
    model, adapter, shape, _ = _setup("qwen2")
    wa = adapter.read_layer(adapter.decoder_layers(model)[0])
    assert wa.q_bias is not None and wa.k_bias is not None and wa.v_bias is not None
    merged = concat_merge(wa, wa, shape, [1], [0], [0], list(range(1, wa.down.shape[1])), 0.5)
    hd = shape.head_dim
    torch.testing.assert_close(merged.k_bias[:hd], (wa.k_bias * 1)[hd:2 * hd])
    torch.testing.assert_close(merged.q_bias[: shape.n_rep * hd], wa.q_bias[shape.n_rep * hd: 2 * shape.n_rep * hd])


def test_write_layer_rejects_wrong_shape():
    from come.errors import ComeError

    model, adapter, shape, _ = _setup("llama")
    layer = adapter.decoder_layers(model)[0]
    w = adapter.read_layer(layer)
    bad = concat_merge(w, w, shape, [0], [], list(range(10)), [], 1.0)
    with pytest.raises(ComeError, match="shape"):
        adapter.write_layer(layer, bad)


def test_unknown_architecture_is_one_line_error():
    from come.errors import ComeError

    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2)
    with pytest.raises(ComeError, match="unsupported architecture 'gpt2'.*llama, mistral, qwen2, qwen3"):
        get_adapter(cfg)


@pytest.mark.parametrize("norm", ["fold", "average"])
def test_a_merge_of_bf16_layers_is_the_merge_of_their_float64_copies(family, norm):
    """Merges read layers in the model's dtype (views) and convert a field, and of it the kept
    rows, at a time: the bytes must be those of converting the whole layers first (bf16 ->
    float64 is exact; the pre-norm gains, Gemma's 1 + w included, in float64)."""
    model = tiny_model(family, dtype=torch.bfloat16)
    adapter = get_adapter(model.config)
    shape = adapter.attn_shape(model.config)
    with torch.no_grad():  # norm weights off their init, so a gain computed in bf16 would round
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    layers = [adapter.read_layer(layer, copy=False) for layer in adapter.decoder_layers(model)[1:4]]
    d_ff = layers[0].ffn_units
    kv, ffn = [[1], [0], []], [list(range(0, d_ff, 3)), list(range(1, d_ff, 2)), [d_ff - 1]]
    wide = [w.map(torch.Tensor.double) for w in layers]
    for merged, reference in ((concat_merge_many(layers, shape, kv, ffn, [0.5, 0.3, 0.2], norm),
                               concat_merge_many(wide, shape, kv, ffn, [0.5, 0.3, 0.2], norm)),
                              (linear_combination(layers, [0.6, -0.2, 0.6]), linear_combination(wide, [0.6, -0.2, 0.6]))):
        for f in fields(reference):
            got, want = getattr(merged, f.name), getattr(reference, f.name)
            assert (got is None) == (want is None), f.name
            assert want is None or (got.dtype == torch.float64 and torch.equal(got, want)), f.name
