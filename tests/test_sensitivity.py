"""Sensitivity scores agree with brute-force ablation; selection rules behave as documented."""

from __future__ import annotations

import pytest
import torch

from come.engine.runner import LayerRunner
from come.models.adapters import get_adapter
from come.scoring.selection import choose_pair, joint_split, skip_scores, split_counts, split_ratio
from come.scoring.sensitivity import channel_abs_sum, channel_sensitivity, head_sensitivity, top_units

from conftest import tiny_model
from layer_utils import masked, run_layer


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _profiled_layer(**overrides):
    model = tiny_model("llama", dtype=torch.float64, **overrides)
    adapter = get_adapter(model.config)
    runner = LayerRunner(model, adapter, torch.device("cpu"), torch.device("cpu"))
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    h = runner.embed(list(ids.split(2)))
    layer = adapter.decoder_layers(model)[1]
    _, stats = runner.run(layer, h, want_stats=True, head_score="exact")
    return model, adapter, layer, torch.cat(h), stats


def _ablation(model, layer, x, make) -> torch.Tensor:
    """E_t ||layer(x) - layer_without_unit(x)||_1 for every unit."""
    with torch.no_grad():
        base = run_layer(model, layer, x)
        return torch.tensor([float((run_layer(model, make(u), x) - base).abs().sum(-1).mean()) for u in range(make.n)])


def test_ffn_channel_sensitivity_matches_ablation():
    model, adapter, layer, x, stats = _profiled_layer(intermediate_size=64)
    d_ff = layer.mlp.down_proj.weight.shape[1]
    s = channel_sensitivity(stats.ffn_abs_mean, layer.mlp.down_proj.weight)

    def make(j):
        return masked(layer, list(range(model.config.num_attention_heads)), [c for c in range(d_ff) if c != j], 16)
    make.n = d_ff
    assert spearman(s, _ablation(model, layer, x, make)) > 0.9


@pytest.mark.parametrize("exact", [False, True])
def test_head_sensitivity_matches_ablation(exact):
    """Head ablation also changes the FFN's input, so this is not a tautology."""
    model, adapter, layer, x, stats = _profiled_layer(num_attention_heads=16, num_key_value_heads=16, head_dim=8,
                                                      hidden_size=128)
    n_heads = 16
    s = stats.head_out_l1 if exact else head_sensitivity(
        channel_sensitivity(stats.attn_abs_mean, layer.self_attn.o_proj.weight), n_heads)
    d_ff = layer.mlp.down_proj.weight.shape[1]

    def make(h):
        return masked(layer, [i for i in range(n_heads) if i != h], list(range(d_ff)), 8)
    make.n = n_heads
    assert spearman(s, _ablation(model, layer, x, make)) > 0.9


def test_top_units_in_original_order():
    assert top_units(torch.tensor([0.1, 5.0, 0.3, 4.0, 2.0]), 3) == [1, 3, 4]
    assert top_units(torch.tensor([1.0, 2.0]), 0) == []


def test_split_counts_sum_and_remainder_to_larger_share():
    assert split_counts(3, 0.5) == (2, 1)
    assert split_counts(3, 0.4) == (1, 2)
    assert split_counts(1536, 0.525) == (807, 729)
    for r in torch.linspace(0, 1, 21).tolist():
        n_a, n_b = split_counts(7, r)
        assert n_a + n_b == 7 and n_a >= 0 and n_b >= 0


def test_split_ratio_rules():
    assert split_ratio(1.0, 3.0) == pytest.approx(0.25)
    assert split_ratio(1.0, 3.0, p=2) == pytest.approx(0.1)
    assert split_ratio(1.0, 1.0, min_max=0.8) == pytest.approx(0.8)
    # a deeper group (3 original layers) relaxes the floor to 0.8 ** (1/2)
    assert split_ratio(1.0, 1.0, min_max=0.8, n_original=3) == pytest.approx(0.8 ** 0.5)
    assert split_ratio(9.0, 1.0, min_max=0.8) == pytest.approx(0.9)


def test_joint_split_takes_global_top():
    assert joint_split(torch.tensor([5.0, 1.0, 4.0]), torch.tensor([3.0, 2.0, 0.5]), 3) == (2, 1)


def test_skip_scores_pick_the_pair_that_changes_least():
    torch.manual_seed(0)
    base = torch.randn(8, 16)
    # pair (k, k+1) compares the state entering k with the one leaving k+1 (= entering k+2)
    states = [torch.randn(8, 16), base, torch.randn(8, 16), base + 0.01, torch.randn(8, 16)]
    scores = skip_scores(states)
    assert len(scores) == 3
    assert choose_pair(scores, [True] * 3) == 1
    assert choose_pair(scores, [True, False, True]) in (0, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_abs_sum_matches_one_float64_pass(dtype):
    """The blocked sum is the plain float64 sum of |x| over every leading dim, to rounding
    (300 rows: the last block is short)."""
    x = (torch.randn(3, 100, 37, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 37)).to(dtype)
    want = x.abs().double().sum(dim=(0, 1))
    got = channel_abs_sum(x)
    assert got.dtype == torch.float64 and got.shape == (37,)
    assert torch.allclose(got, want, rtol=1e-13, atol=0)
