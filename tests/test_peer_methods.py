"""The peers of the CoMe paper's table that need their own pass over the model: SLEB (greedy
removal by calibration loss), Taylor+ and Magnitude+ (Kim et al.'s one-shot block scores with
the first four and last two blocks spared), each checked against a brute-force computation
on the whole model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

from come import CompressConfig, compress
from come.engine.dense_profile import DenseProfile
from come.engine.preparation import prepare
from come.errors import ComeError
from come.methods.magnitude import least_important_plus, magnitude_importance, spared_blocks
from come.methods.sleb import candidate_losses, sleb_order
from come.methods.taylor import taylor_importance
from come.models.adapters import get_adapter
from come.models.checkpoint import save_checkpoint
from come.models.data import token_windows

from conftest import corpus, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 4


@pytest.fixture(scope="module")
def calib(tokenizer):
    return token_windows(corpus(), tokenizer, 16, 32, seed=0)


def dense_profile(model, tokenizer, calib, **cfg):
    """The profile `select` gets: the dense model profiled once (dropping.py)."""
    run = prepare(model, tokenizer, CompressConfig(method="sleb", device="cpu", batch_size=BATCH, **cfg).resolved(),
                  calib, "", keep_dense=False)
    run.cache.refresh()
    return DenseProfile(run.cache)


def sum_nll(model, ids):
    logits = model(ids).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


def mean_nll(model, calib) -> float:
    """The whole model's mean next-token NLL over every predicted calibration token."""
    with torch.no_grad():
        total = sum(float(sum_nll(model, ids)) for ids in calib.split(BATCH))
    return total / (calib.shape[0] * (calib.shape[1] - 1))


def without(model, drop: list[int]):
    """A copy of `model` with original layers `drop` deleted (the stock model, renumbered)."""
    out = copy.deepcopy(model)
    get_adapter(out.config).keep_layers(out, [i for i in range(out.config.num_hidden_layers) if i not in drop])
    return out


@pytest.fixture(scope="module")
def idle_layer_model(one_thread, calib):
    """A tiny LLaMA whose layer 3 writes nothing (zero o_proj and down_proj, kept zero), the
    others trained on the calibration windows until each of them matters: removing any of
    them raises the calibration loss, removing layer 3 leaves it as it is."""
    model = tiny_model("llama")
    idle = [model.model.layers[3].self_attn.o_proj.weight, model.model.layers[3].mlp.down_proj.weight]
    with torch.no_grad():
        for p in idle:
            p.zero_().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(100):
        ids = calib[(4 * step) % len(calib):][:4]
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for p in idle:
        p.requires_grad_(True)
    return model.eval()


# ---- SLEB -----------------------------------------------------------------------------


def test_sleb_removes_a_layer_that_writes_nothing_first_and_the_logits_do_not_move(tokenizer, calib,
                                                                                   idle_layer_model):
    dense = idle_layer_model
    profile = dense_profile(dense, tokenizer, calib)
    losses = candidate_losses(profile, list(range(6)))
    # one phase: 5 prefix passes + 5 + 4 + 3 + 2 + 1 suffix passes (the prefix is shared)
    assert profile.forwards == 20
    assert min(losses, key=losses.get) == 3
    assert losses[3] == pytest.approx(mean_nll(dense, calib), rel=1e-6)  # skipping it changes nothing
    assert len(dense.model.layers) == 6  # scoring never edits the model
    model, plan = compress(copy.deepcopy(dense), tokenizer, CompressConfig(method="sleb", sparsity=0.12, device="cpu"),
                           calib=calib)
    assert plan.groups[2] == [2, 3] and plan.num_layers_after == 5
    ids = calib[:2]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_sleb_scores_and_greedy_order_match_brute_force(tokenizer, calib):
    """Every candidate's loss is the NLL of the stock model with that layer deleted; the
    second removal is re-scored with the first one gone (here it differs from the second
    best of the first round, so a one-shot ranking would fail)."""
    dense = tiny_model("qwen3", seed=0)
    profile = dense_profile(dense, tokenizer, calib)
    kept, order = list(range(6)), []
    for _ in range(2):
        got = candidate_losses(profile, kept)
        want = {c: mean_nll(without(dense, order + [c]), calib) for c in kept}
        assert got.keys() == want.keys()
        for c in kept:
            assert got[c] == pytest.approx(want[c], rel=1e-5, abs=1e-5)
        order.append(min(want, key=want.get))
        kept.remove(order[-1])
    first_round = candidate_losses(profile, list(range(6)))
    assert sorted(first_round, key=first_round.get)[:2] != order  # the re-scoring matters here
    assert sleb_order(profile, 2) == order


def test_sleb_honours_protect_and_refuses_an_unreachable_target(tokenizer, calib, idle_layer_model):
    """--protect keeps a layer out of the candidates; a target the unprotected layers cannot
    reach is refused before any layer runs (the one reachability check, CompressConfig's)."""
    profile = dense_profile(copy.deepcopy(idle_layer_model), tokenizer, calib)
    assert 3 not in sleb_order(profile, 1, protect=[3])
    assert 3 not in candidate_losses(profile, list(range(6)), protect=[3])
    cfg = CompressConfig(method="sleb", sparsity=0.2, device="cpu", protect=[0, 1, 2, 3, 4])
    with pytest.raises(ComeError, match="can remove at most 1"):
        compress(copy.deepcopy(idle_layer_model), tokenizer, cfg, calib=calib)


# ---- Taylor+ ----------------------------------------------------------------------------


def brute_force_taylor(model, calib) -> list[float]:
    """Per layer, sum over its weights of |W * dL/dW|, L the mean next-token NLL, by
    autograd through the whole stock model."""
    layers = model.model.layers
    weights = [[p for n, p in layer.named_parameters() if not n.endswith("bias")] for layer in layers]
    flat = [p for ws in weights for p in ws]
    n_tokens = calib.shape[0] * (calib.shape[1] - 1)
    loss = sum(sum_nll(model, ids) for ids in calib.split(BATCH)) / n_tokens
    grads = iter(torch.autograd.grad(loss, flat))
    return [sum(float((p.detach() * next(grads)).abs().sum(dtype=torch.float64)) for p in ws) for ws in weights]


@pytest.mark.parametrize("max_cache_gb", [32.0, 3e-4])  # every layer input cached; every third one
def test_taylor_importance_is_the_whole_model_gradient_and_leaves_the_weights(tokenizer, calib, max_cache_gb):
    dense = tiny_model("qwen2")  # biases: not part of the score
    profile = dense_profile(dense, tokenizer, calib, max_cache_gb=max_cache_gb)
    assert sorted(profile.states) == ([0, 1, 2, 3, 4, 5, 6] if max_cache_gb > 1 else [0, 3, 6])
    weights = {n: p.detach().clone() for n, p in dense.named_parameters()}
    got = taylor_importance(profile)
    for n, p in dense.named_parameters():
        assert torch.equal(p, weights[n]), n
        assert p.grad is None and p.requires_grad, n
    want = brute_force_taylor(dense, calib)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-6)


# ---- Magnitude+ and the "+" rule ------------------------------------------------------------


def test_magnitude_importance_is_the_l1_norm_of_the_block_weights():
    model = tiny_model("qwen3")
    adapter = get_adapter(model.config)
    fields = ("q", "k", "v", "o", "gate", "up", "down", "attn_norm", "ffn_norm", "q_norm", "k_norm")
    want = [sum(float(getattr(adapter.read_layer(layer), f).double().abs().sum()) for f in fields)
            for layer in model.model.layers]
    assert magnitude_importance(model.model.layers) == pytest.approx(want, rel=1e-12)
    biased = tiny_model("qwen2")
    with torch.no_grad():
        before = magnitude_importance(biased.model.layers)
        biased.model.layers[2].self_attn.q_proj.bias.mul_(100)  # biases do not count
        assert magnitude_importance(biased.model.layers) == before


def test_the_plus_rule_spares_the_first_four_and_last_two_blocks():
    assert spared_blocks(32) == {0, 1, 2, 3, 30, 31}
    rising = [float(i) for i in range(12)]  # block 0 least important
    assert least_important_plus(rising, 3) == [4, 5, 6]
    assert least_important_plus(rising, 3, protect=[5]) == [4, 6, 7]
    falling = rising[::-1]
    assert least_important_plus(falling, 2) == [8, 9]  # not 10, 11: spared
    # too shallow for the rule: spared blocks last, least important first
    assert least_important_plus([5.0, 1.0, 2.0, 3.0, 9.0, 8.0, 0.5, 7.0], 3) == [4, 5, 6]
    assert least_important_plus(rising, 3, protect=list(range(10))) == [10, 11]  # short: the loop's check names it


# ---- end to end -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sleb", "taylor", "magnitude"])
def test_peer_methods_compress_end_to_end_with_protect_and_refit(tokenizer, calib, tmp_path, method):
    dense = tiny_model("llama", layers=12)
    model, plan = compress(copy.deepcopy(dense), tokenizer, CompressConfig(
        method=method, sparsity=0.3, device="cpu", protect=[5], refit="ls"), calib=calib)
    removed = sorted(i for m in plan.merges for i in m.group_b)
    assert plan.method == method and len(removed) == 12 - plan.num_layers_after == 4
    assert sum(plan.groups, []) == list(range(12)) and 5 not in removed
    if method != "sleb":
        assert not set(removed) & spared_blocks(12)
    assert plan.layer_forwards > 12
    assert all(m.refit is not None and m.refit["heldout_err_after"] <= m.refit["heldout_err_before"]
               for m in plan.merges)
    out = save_checkpoint(model, tokenizer, plan, tmp_path / method)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = calib[:2]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_a_selection_outside_the_promise_is_the_methods_bug():
    """The one-shot loop takes only what `select` promises (n distinct unprotected layers): the
    user's target was checked before any work, so anything else is a bug, named as one."""
    from come.methods import get_method

    method, cfg = get_method("shortgpt"), CompressConfig(method="shortgpt", protect=[2])
    assert method.checked([4, 1], 2, 6, cfg) == [1, 4]
    for bad in ([1], [1, 1], [1, 2], [1, 6]):
        with pytest.raises(RuntimeError, match="a bug in the method"):
            method.checked(bad, 2, 6, cfg)
