"""The progressive loop end to end on tiny models of every family."""

from __future__ import annotations


import pytest
import torch

from come import CompressConfig, ComeError, compress, load_plan
from come.models.budget import count_params, merges_needed
from come.models.data import token_windows

from conftest import corpus, tiny_model
from layer_utils import reload_equal


def _calib(tokenizer, n=8, seqlen=32):
    return token_windows(corpus(), tokenizer, n, seqlen, seed=0)


def _compress(family, tokenizer, **cfg):
    model = tiny_model(family)
    cfg = CompressConfig(**{"sparsity": 0.3, "device": "cpu", "batch_size": 4, **cfg})
    return compress(model, tokenizer, cfg, calib=_calib(tokenizer))


def test_compress_every_family(family, tokenizer, tmp_path):
    dense = tiny_model(family)
    total, per_layer = count_params(dense), count_params(dense.model.layers[0])
    model, plan = _compress(family, tokenizer)
    n_merges = merges_needed(total, per_layer, 0.3)
    assert len(model.model.layers) == model.config.num_hidden_layers == 6 - n_merges == plan.num_layers_after
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(6 - n_merges))
    assert sum(plan.groups, []) == list(range(6))  # contiguous groups covering every original layer, in order
    assert plan.params_after == count_params(model)
    assert plan.achieved_sparsity == pytest.approx(1 - plan.params_after / total)
    assert plan.achieved_sparsity >= 0.3 > plan.achieved_sparsity - per_layer / total
    if hasattr(model.config, "layer_types"):
        assert len(model.config.layer_types) == model.config.num_hidden_layers
    for m in plan.merges:
        assert len(m.kv_a) + len(m.kv_b) == model.config.num_key_value_heads
        assert len(m.ffn_a) + len(m.ffn_b) == model.config.intermediate_size

    ids = _calib(tokenizer, 2, 16)
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
    _, out = reload_equal(model, tokenizer, plan, tmp_path / "out", ids)
    assert load_plan(out).groups == plan.groups


@pytest.mark.parametrize("pair_score", ["angular", "bi-all-tokens"])
def test_only_layers_after_the_merge_are_rerun(tokenizer, pair_score):
    """After a merge at l, layers from l on re-run, for either pair score (the all-token
    pair (l - 1, l) reads layer l - 1's cached input and layer l's new output)."""
    kw = dict(sparsity=0.3, protect=[0], pair_score=pair_score)  # protect 0: merges away from the input
    model, plan = _compress("llama", tokenizer, refit="none", **kw)
    assert all(m.position >= 1 for m in plan.merges)
    expected = 6  # first pass: every layer
    n = 6
    for m in plan.merges[:-1]:
        n -= 1
        expected += n - m.position  # re-run from the merged layer to the end
    assert plan.layer_forwards == expected
    naive = sum(6 - i for i in range(len(plan.merges)))
    assert plan.layer_forwards < naive
    _, refit_plan = _compress("llama", tokenizer, **kw)
    # one refit pass per merge; each but the last stands in for its layer's re-profiling (KeptPass)
    assert refit_plan.layer_forwards == expected + len(plan.merges) - (len(plan.merges) - 1)


def test_strided_cache_gives_the_same_plan(tokenizer):
    _, full = _compress("qwen2", tokenizer, sparsity=0.45, refit="none")
    _, strided = _compress("qwen2", tokenizer, sparsity=0.45, refit="none", max_cache_gb=1e-9)
    assert [(m.position, m.kv_a, m.kv_b, m.ffn_a, m.ffn_b) for m in strided.merges] == \
        [(m.position, m.kv_a, m.kv_b, m.ffn_a, m.ffn_b) for m in full.merges]
    assert strided.layer_forwards > full.layer_forwards


def test_refit_tokens_are_bounded_by_the_cache_budget(tokenizer):
    """The dense states the refit needs at every boundary take at most half of --max-cache-gb:
    past that the refit uses fewer calibration batches, and below 2 batches it refuses."""
    model = tiny_model("llama")
    batch_bytes = 2 * 32 * model.config.hidden_size * 4  # batch 2 x 32 tokens x hidden x fp32
    two_batches = 2.5 * 2 * (6 + 1) * batch_bytes / 2**30  # room for 2 of the 4 batches at 7 boundaries
    _, all_plan = _compress("llama", tokenizer, batch_size=2)
    _, bounded = _compress("llama", tokenizer, batch_size=2, max_cache_gb=two_batches)
    assert {m.refit["tokens"] for m in all_plan.merges} == {8 * 32}
    assert {m.refit["tokens"] for m in bounded.merges} == {4 * 32}
    with pytest.raises(ComeError, match="at least 2 calibration batches.*--max-cache-gb") as e:
        _compress("llama", tokenizer, batch_size=2, max_cache_gb=two_batches / 2)
    assert "\n" not in str(e.value)
    _compress("llama", tokenizer, batch_size=2, max_cache_gb=two_batches / 2, refit="none")  # no dense states needed


def test_bi_all_tokens_and_options(tokenizer):
    model, plan = _compress("mistral", tokenizer, pair_score="bi-all-tokens", split="joint", head_score="exact",
                            norm="average")
    assert plan.num_layers_after < 6
    assert all(s is not None for m in plan.merges for s in m.pair_scores)


def test_protect_and_no_repeat(tokenizer):
    _, plan = _compress("llama", tokenizer, sparsity=0.15, protect=[2, 3], no_repeat=True)
    for group in plan.groups:
        assert len(group) <= 2
        assert not ({2, 3} & set(group)) or len(group) == 1
    with pytest.raises(ComeError, match="with --no-repeat can remove at most 3; lower --sparsity or drop --no-repeat"):
        _compress("llama", tokenizer, sparsity=0.6, no_repeat=True)


@pytest.mark.parametrize("sparsity", [0.0, 0.95, -0.1])
def test_sparsity_out_of_range(tokenizer, sparsity):
    with pytest.raises(ComeError, match="--sparsity must be in"):
        _compress("llama", tokenizer, sparsity=sparsity)


def test_unreachable_target(tokenizer):
    with pytest.raises(ComeError, match="needs .* merges but the model has only 6 layers"):
        _compress("llama", tokenizer, sparsity=0.9)


def test_too_few_tokens(tokenizer):
    with pytest.raises(ComeError, match="fewer than --nsamples"):
        token_windows("short text", tokenizer, 4, 32, 0)


def test_layers_run_on_another_device_than_they_live(tokenizer):
    """The sequential pipeline: with --device cpu and a model on 'meta'-free CPU this is a no-op,
    but layers are moved back home after their pass: nothing is left on the compute device."""
    model, _ = _compress("llama", tokenizer)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
