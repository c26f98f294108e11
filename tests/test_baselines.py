"""ShortGPT and ReplaceMe on come's plumbing."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from come import CompressConfig, compress
from come.baselines import absorb, angle_block, lowest_bi_layers
from come.checkpoint import save_checkpoint
from come.data import token_windows

from conftest import corpus, tiny_model


def test_absorb_groups():
    assert absorb([2, 3], 6) == [[0], [1, 2, 3], [4], [5]]
    assert absorb([0, 1, 4], 6) == [[0, 1, 2], [3, 4], [5]]


def test_selection_rules():
    assert lowest_bi_layers([0.5, 0.1, 0.3, 0.05], 2, []) == [1, 3]
    assert lowest_bi_layers([0.5, 0.1, 0.3, 0.05], 2, [3]) == [1, 2]
    base = torch.randn(4, 8)
    states = [torch.randn(4, 8), base, base + 1e-3, base + 2e-3, torch.randn(4, 8)]
    assert angle_block(states, 2, []) == [1, 2]


@pytest.mark.parametrize("method,extra", [("shortgpt", {}), ("shortgpt", {"refit": "ls"}),
                                          ("replaceme", {}), ("replaceme", {"select": "bi"})])
def test_baseline_end_to_end(tokenizer, tmp_path, method, extra):
    dense = tiny_model("llama")
    calib = token_windows(corpus(), tokenizer, 16, 32, seed=0)
    model, plan = compress(copy.deepcopy(dense), tokenizer,
                           CompressConfig(method=method, sparsity=0.3, device="cpu", **extra), calib=calib)
    assert plan.method == method
    assert sum(plan.groups, []) == list(range(6))
    assert plan.achieved_sparsity >= 0.3
    refits = [m.refit for m in plan.merges]
    if method == "replaceme" or extra.get("refit") == "ls":
        assert all(r is not None and r["heldout_err_after"] <= r["heldout_err_before"] for r in refits)
    else:
        assert all(r is None for r in refits)
        # plain drop: kept layers are bit-identical to the dense ones
        removed = {i for m in plan.merges for i in m.group_b}
        kept = [next(i for i in g if i not in removed) for g in plan.groups]
        for new, old in zip(model.model.layers, [dense.model.layers[i] for i in kept]):
            assert torch.equal(new.mlp.down_proj.weight, old.mlp.down_proj.weight)
    out = save_checkpoint(model, tokenizer, plan, tmp_path / "o")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == plan.num_layers_after


def test_replaceme_drops_a_layer_that_writes_nothing_without_change(tokenizer):
    """A layer whose output projections are zero has BI 0: it is the one dropped, and the
    model's logits do not move (the map stays the identity)."""
    dense = tiny_model("llama")
    with torch.no_grad():
        dense.model.layers[3].self_attn.o_proj.weight.zero_()
        dense.model.layers[3].mlp.down_proj.weight.zero_()
    calib = token_windows(corpus(), tokenizer, 16, 32, seed=0)
    model, plan = compress(copy.deepcopy(dense), tokenizer,
                           CompressConfig(method="replaceme", select="bi", sparsity=0.12, device="cpu"), calib=calib)
    assert plan.groups[2] == [2, 3]
    ids = calib[:2]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_rdsc_and_average_operators(tokenizer):
    """On two single layers LaCo's RDSC is theta_A + (theta_B - theta_A) = theta_B exactly;
    averaging gives the mean of every tensor."""
    from come.merge import rdsc_coefficients

    assert rdsc_coefficients(3) == [-1.0, 1.0, 1.0]
    dense = tiny_model("llama")
    calib = token_windows(corpus(), tokenizer, 16, 32, seed=0)
    for method in ("laco", "average"):
        model, plan = compress(copy.deepcopy(dense), tokenizer,
                               CompressConfig(method=method, sparsity=0.12, device="cpu"), calib=calib)
        m = plan.merges[0]
        assert m.operator == {"laco": "rdsc", "average": "average"}[method]
        a, b = dense.model.layers[m.group_a[0]], dense.model.layers[m.group_b[0]]
        got = model.model.layers[m.position].mlp.up_proj.weight
        want = b.mlp.up_proj.weight if method == "laco" else (a.mlp.up_proj.weight + b.mlp.up_proj.weight) / 2
        torch.testing.assert_close(got, want)
    w = [torch.ones(2), 2 * torch.ones(2), 4 * torch.ones(2)]
    assert torch.equal(sum(c * t for c, t in zip(rdsc_coefficients(3), w)), 5 * torch.ones(2))
