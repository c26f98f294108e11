"""What only Mixture-of-Experts layers have (test_adapters.py, test_profile.py and
test_families.py run the MoE families through the contract every family passes): the expert
score is what removing the expert changes, kept experts carry their router rows, Qwen2-MoE's
shared expert comes whole from the side keeping more experts, a dense and an MoE FFN refuse
to merge, `keep_layers` keeps which layers are MoE, and the refit's one hidden x hidden map
folded into every expert's down projection is exact."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
import transformers

from come.engine.cache import ActivationCache
from come.engine.runner import LayerRunner
from come.errors import ComeError
from come.merging.layer_refit import refit_layer, write_down_proj
from come.merging.merge import concat_merge, fold_norms, linear_combination
from come.models.adapters import get_adapter
from come.models.data import token_windows

from conftest import MOE_FAMILIES, corpus, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batches(tokenizer) -> list[torch.Tensor]:
    return list(token_windows(corpus(), tokenizer, 8, 32, seed=0).split(4))


def _runner(model):
    adapter = get_adapter(model.config)
    return adapter, LayerRunner(model, adapter, torch.device("cpu"), torch.device("cpu"))


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_expert_score_is_what_removing_the_expert_changes(family, batches):
    """E_t ||w_e expert_e(x)||_1 from the profiler's hook equals the mean L1 change of the MLP's
    output when expert e's down projection is zeroed (which leaves the routing alone)."""
    model = tiny_model(family)
    adapter, runner = _runner(model)
    h = runner.embed(batches)
    layer = adapter.decoder_layers(model)[0]
    seen = []
    hook = adapter.mlp(layer).register_forward_pre_hook(lambda _m, a: seen.append(a[0]) and None)
    try:
        _, stats = runner.run(layer, h, True, position=0)
    finally:
        hook.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).unsqueeze(0)
    mlp = adapter.mlp(layer)
    with torch.no_grad():
        full = mlp(x)
        removed = []
        for e in range(adapter.ffn_output_proj(layer).in_features):
            without = copy.deepcopy(mlp)
            without.experts.down_proj[e].zero_()
            removed.append(float((full - without(x)).abs().sum(dtype=torch.float64)) / x.shape[1])
    assert stats.ffn_abs_mean.numel() == 0 and min(removed) > 0
    torch.testing.assert_close(stats.expert_out_l1, torch.tensor(removed, dtype=torch.float64), rtol=1e-4, atol=0)


def test_kept_experts_carry_their_router_rows_and_the_shared_expert_follows_the_majority():
    """Experts, their (folded) router rows, in A's then B's order; Qwen2-MoE's shared expert and
    its gate whole from the side keeping more experts."""
    model = tiny_model("qwen2_moe", dtype=torch.float64)
    adapter = get_adapter(model.config)
    shape = adapter.attn_shape(model.config)
    wa, wb = (adapter.read_layer(lay) for lay in adapter.decoder_layers(model)[1:3])
    fa, fb = fold_norms(wa), fold_norms(wb)
    kv = list(range(shape.n_kv_heads))
    for ffn_a, ffn_b, shared in (([0, 2, 3], [1], fa), ([3], [0, 2], fb)):
        merged = concat_merge(wa, wb, shape, kv, [], ffn_a, ffn_b, 0.5)
        assert torch.equal(merged.router, torch.cat([fa.router[ffn_a], fb.router[ffn_b]]))
        assert torch.equal(merged.down, torch.cat([fa.down[ffn_a], fb.down[ffn_b]]))
        assert torch.equal(merged.gate, torch.cat([fa.gate[ffn_a], fb.gate[ffn_b]]))
        for name in ("shared_gate", "shared_up", "shared_down", "shared_expert_gate"):
            assert torch.equal(getattr(merged, name), getattr(shared, name)), name


def test_a_dense_and_an_moe_layer_do_not_merge():
    """Qwen-MoE's mlp_only_layers are dense: their channels are no experts, so no stock layer
    holds both; weight-space merges refuse too."""
    model = tiny_model("qwen3_moe", dtype=torch.float64, mlp_only_layers=[2])
    adapter = get_adapter(model.config)
    shape = adapter.attn_shape(model.config)
    moe, dense = (adapter.read_layer(lay) for lay in adapter.decoder_layers(model)[1:3])
    assert moe.router is not None and dense.router is None
    with pytest.raises(ComeError, match="dense-FFN layer with an MoE layer") as e:
        concat_merge(moe, dense, shape, [0], [1], [0, 1], [0], 0.5)
    assert "\n" not in str(e.value)
    with pytest.raises(ComeError, match="dense-FFN layer with an MoE layer"):
        linear_combination([dense, moe], [0.5, 0.5])


def test_keep_layers_keeps_which_layers_are_moe(tmp_path):
    """MoE every second layer, the last one dense by name: after removals the config names the
    dense layers by their NEW index, so the saved model reloads with each layer's own FFN."""
    model = tiny_model("qwen2_moe", decoder_sparse_step=2, mlp_only_layers=[5])  # MoE: 1, 3
    adapter = get_adapter(model.config)
    layers = adapter.decoder_layers(model)
    assert [adapter.experts(lay) is not None for lay in layers] == [False, True, False, True, False, False]
    ids = torch.randint(1, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    adapter.keep_layers(model, [0, 1, 3, 4])
    assert model.config.mlp_only_layers == [0, 3] and model.config.decoder_sparse_step == 1
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert [adapter.experts(lay) is not None for lay in adapter.decoder_layers(reloaded)] == [False, True, True, False]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_moe_refit_is_one_map_folded_into_every_expert(batches):
    """The MoE refit fits a hidden x hidden map M of the FFN's output and writes M D_e for every
    expert e and the shared expert: the FFN then outputs M times what it did, exactly (the
    routing reads the FFN's input), and the layer's true held-out error falls. The router and
    the experts' input projections are untouched."""
    model = tiny_model("qwen2_moe")
    adapter, runner = _runner(model)
    cfg = SimpleNamespace(pair_score="bi", head_score="channel", refit_holdout=0.5)
    cache = ActivationCache(model, adapter, runner, cfg, runner.embed(batches), stride=100, dense_batches=2)
    cache.refresh()
    layer = adapter.decoder_layers(model)[2]
    w = adapter.read_layer(layer)
    adapter.write_layer(layer, dataclasses.replace(w, down=1.5 * w.down, shared_down=0.5 * w.shared_down))
    spoiled = copy.deepcopy(adapter.mlp(layer))
    res = refit_layer(cache, 2, [2], "dense")
    assert res.kept and res.err_after < res.err_before and res.weight.shape == (64, 64)
    write_down_proj(adapter, layer, res.weight)
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(adapter.mlp(layer)(x), spoiled(x) @ res.weight.float().T, rtol=1e-4, atol=1e-5)
    after = adapter.read_layer(layer)
    assert all(torch.equal(getattr(after, f), getattr(w, f)) for f in ("router", "gate", "up", "shared_expert_gate"))
    assert refit_layer(cache, 2, [2], "dense", solve=False).err_before < res.err_before


@pytest.mark.parametrize("family", sorted(MOE_FAMILIES))
def test_magnitude_importance_counts_the_experts(family):
    """Magnitude+ / Taylor+ sum over a block's matrices: fused 3-D expert tensors included."""
    from come.methods.magnitude import block_weights, magnitude_importance

    model = tiny_model(family)
    layer = model.model.layers[0]
    counted = {id(p) for p in block_weights(layer)}
    assert all(id(p) in counted for p in layer.parameters() if p.ndim >= 2)
    before = magnitude_importance([layer])[0]
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "experts" in name:
                p.zero_()
    assert magnitude_importance([layer])[0] < before
