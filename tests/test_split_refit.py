"""`--split search --split-score refit` (issue 41, "merge where it pays"): every candidate of
the pair, the two drops (r = 0, r = 1), the grid's merges and the joint split's merge, is
scored by the held-out error of its refit after the solve, the refit the loop then applies."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from come import CompressConfig, compress
from come.models.adapters import get_adapter
from come.errors import ComeError
from come.merging.layer_refit import refit_layer
from come.merging.merge import concat_merge
from come.scoring.pair_scoring import choose_units, read_pair
from come.engine.preparation import prepare

pytestmark = pytest.mark.usefixtures("one_thread")

PAIR = 2  # every other layer is protected: the one merge is current layers 2, 3


@pytest.fixture(scope="module")
def model_ids():
    model = tiny_model("llama", seed=1)
    ids = torch.randint(0, model.config.vocab_size, (16, 32), generator=torch.Generator().manual_seed(0))
    return model, ids


def _cfg(**kw) -> CompressConfig:
    return CompressConfig(**{"sparsity": 0.05, "device": "cpu", "split": "search", "split_score": "refit",
                             "granularity": 4, "batch_size": 4, "protect": [0, 1, 4, 5], **kw}).resolved()


def _refit_of(model, ids, tokenizer, cfg, layer) -> float:
    """Brute force: a fresh run's cache of the dense model, `layer` written at position PAIR in
    place of the pair, its refit solved against the pair's dense output: the held-out error."""
    run = prepare(copy.deepcopy(model), tokenizer, cfg, ids, "", True)
    run.cache.refresh()
    return refit_layer(run.cache, PAIR, [PAIR, PAIR + 1], cfg.refit_input, layer=layer).err_after


@pytest.fixture(scope="module")
def searched(model_ids, tokenizer):
    model, ids = model_ids
    _, plan = compress(copy.deepcopy(model), tokenizer, _cfg(), calib=ids)
    (merge,) = plan.merges
    return merge


def test_each_score_is_its_merge_refit_from_scratch_and_the_kept_one_is_the_loops_refit(model_ids, tokenizer,
                                                                                        searched):
    model, ids = model_ids
    cfg = _cfg()
    record = searched.split_search
    assert record["score"] == "refit" and [r for r, _ in record["candidates"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    adapter = get_adapter(model.config)
    shape = adapter.attn_shape(model.config)
    run = prepare(copy.deepcopy(model), tokenizer, cfg, ids, "", True)
    run.cache.refresh()
    a, b = read_pair(adapter, model, PAIR)
    r, score = record["candidates"][2]
    c = choose_units(a, b, run.cache.stats[PAIR], run.cache.stats[PAIR + 1], shape, cfg, 2, r)
    layer = copy.deepcopy(adapter.decoder_layers(model)[PAIR])
    adapter.write_layer(layer, concat_merge(a, b, shape, c.kv_a, c.kv_b, c.ffn_a, c.ffn_b, c.r_a, cfg.norm))
    assert score == pytest.approx(_refit_of(model, ids, tokenizer, cfg, layer), rel=1e-6)
    # the loop's refit of the merge it kept (after the merge is in the model) re-solves the same problem
    kept = min([*record["candidates"], record["joint"]], key=lambda c: c[1])[1]
    assert searched.refit["kept"] and searched.refit["heldout_err_after"] == pytest.approx(kept, rel=1e-6)


def test_the_drops_are_drop_plus_refit_of_that_side(model_ids, tokenizer, searched):
    """r = 1 keeps A whole (B dropped): A's own layer, refit; r = 0: B's layer at A's position, refit."""
    model, ids = model_ids
    layers = get_adapter(model.config).decoder_layers(model)
    scores = dict(map(tuple, searched.split_search["candidates"]))
    for r, kept in ((1.0, layers[PAIR]), (0.0, layers[PAIR + 1])):
        assert scores[r] == pytest.approx(_refit_of(model, ids, tokenizer, _cfg(), copy.deepcopy(kept)), rel=1e-4), r


def test_the_search_is_never_worse_than_either_drop_or_the_joint_merge(searched):
    record = searched.split_search
    scores = dict(map(tuple, record["candidates"]))
    best = min([*record["candidates"], record["joint"]], key=lambda c: c[1])
    assert best[1] <= min(scores[0.0], scores[1.0], record["joint"][1])
    assert searched.r_a == best[0]
    took = "joint" if best is record["joint"] else {0.0: "drop A", 1.0: "drop B"}.get(best[0], "merge")
    assert record["took"] == took
    # the drops themselves are no free lunch here: some candidate's refit differs from another's
    assert len({round(s, 9) for s in scores.values()}) > 1


def test_refit_score_without_a_refit_is_one_line_before_any_work():
    with pytest.raises(ComeError, match=r"^--split-score refit scores each candidate after its refit; drop --refit "
                                        r"none, or use --split-score nll / error$"):
        CompressConfig(split="search", split_score="refit", refit="none").resolved()


def test_cli_refuses_it_before_the_weights_load(model_dir, text_file, tmp_path):
    from test_cli import _compress_args, _run

    out = tmp_path / "out"
    result = _run(*_compress_args(model_dir, text_file, out, "--split", "search", "--split-score", "refit",
                                  "--refit", "none"))
    assert result.exit_code == 2 and "--split-score refit" in result.output and not out.exists()


# ---- --split refit: the channels chosen by the refit's objective (channel_selection.py)

def _ridge_objective(f, t, w0, subset, scale) -> float:
    """min_W ||F_S W^T - T||^2 + scale ||W - W0_S||^2, solved directly on the subset."""
    fs, w0s = f[:, subset], w0[:, subset]
    a = fs.T @ fs + scale * torch.eye(len(subset), dtype=torch.float64)
    w = torch.linalg.solve(a, fs.T @ t + scale * w0s.T).T
    return float(((fs @ w.T - t) ** 2).sum() + scale * ((w - w0s) ** 2).sum())


def _equations(f, t):
    from come.merging.refit import NormalEquations

    eq = NormalEquations.empty(f.shape[1], t.shape[1])
    eq.add(f, t, t)
    eq.ff, eq.ft = f.T @ f, f.T @ t  # exact float64 statistics (add's products are float32)
    return eq


def test_elimination_is_greedy_backward_selection_by_direct_solves():
    """One channel at a time, the closed-form downdates remove exactly the channel whose
    removal a direct ridge solve on each remaining subset says costs least."""
    from come.scoring.channel_selection import eliminate

    gen = torch.Generator().manual_seed(0)
    f = torch.randn(200, 10, dtype=torch.float64, generator=gen) @ torch.randn(10, 10, dtype=torch.float64,
                                                                                generator=gen)
    t = f[:, :3] @ torch.randn(3, 4, dtype=torch.float64, generator=gen) + 0.5 * torch.randn(200, 4, generator=gen,
                                                                                             dtype=torch.float64)
    w0 = torch.randn(4, 10, dtype=torch.float64, generator=gen)
    eq, lam = _equations(f, t), 0.1
    scale = lam * float(eq.ff.diagonal().mean())
    alive = list(range(10))
    while len(alive) > 4:
        alive.remove(min(alive, key=lambda j: _ridge_objective(f, t, w0, [i for i in alive if i != j], scale)))
    assert eliminate(eq, w0, 4, lam=lam, block=1) == sorted(alive)


def test_elimination_keeps_the_channels_the_target_needs():
    from come.scoring.channel_selection import eliminate

    gen = torch.Generator().manual_seed(1)
    f = torch.randn(300, 8, dtype=torch.float64, generator=gen)
    t = f[:, [1, 4, 6]] @ torch.randn(3, 5, dtype=torch.float64, generator=gen)
    assert eliminate(_equations(f, t), torch.zeros(5, 8, dtype=torch.float64), 3, lam=1e-3, block=2) == [1, 4, 6]


def test_split_refit_keeps_joints_kv_and_d_ff_channels_of_both(model_ids, tokenizer):
    model, ids = model_ids
    cfg = dict(sparsity=0.05, device="cpu", batch_size=4, protect=[0, 1, 4, 5])
    _, plan = compress(copy.deepcopy(model), tokenizer, CompressConfig(split="refit", **cfg), calib=ids)
    _, joint = compress(copy.deepcopy(model), tokenizer, CompressConfig(**cfg), calib=ids)
    (m,), (j,) = plan.merges, joint.merges
    assert (m.kv_a, m.kv_b) == (j.kv_a, j.kv_b)
    d_ff = model.config.intermediate_size
    assert len(m.ffn_a) + len(m.ffn_b) == d_ff and m.r_a == len(m.ffn_a) / d_ff
    assert (m.ffn_a, m.ffn_b) != (j.ffn_a, j.ffn_b)  # the refit's objective is not the sensitivity ranking
    assert plan.settings["split"] == "refit" and m.refit["kept"]


@pytest.mark.parametrize("kw, message", [
    ({"split": "refit", "refit": "none"}, "^--split refit keeps the FFN channels the refit needs most"),
    ({"split": "refit", "merge_item": 3}, "^--split refit chooses the channels of a pair"),
])
def test_split_refit_refusals_are_one_line(kw, message):
    with pytest.raises(ComeError, match=message):
        CompressConfig(**kw).resolved()


def test_split_refit_on_an_moe_model_is_refused_on_its_config():
    cfg = CompressConfig(split="refit", seqlen=32).resolved()
    with pytest.raises(ComeError, match="^--split refit picks FFN channels; an MoE model's units are experts"):
        cfg.check_model(tiny_model("qwen2_moe").config)
