"""`--split search` (CoMe-P, the paper's Alg. 2): every candidate split of the chosen pair is
scored by the calibration NLL of the merged model, computed from the cached layer inputs
exactly as the whole merged model would compute it; the best one is merged and recorded."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import tiny_model

from come import CompressConfig, compress
from come.engine.preparation import prepare
from come.errors import ComeError
from come.merging.merge import concat_merge
from come.models.adapters import get_adapter
from come.scoring.pair_scoring import choose_units, read_pair
from come.scoring.split_search import split_grid
from come.settings.plan import PLAN_FILE, load_plan

pytestmark = pytest.mark.usefixtures("one_thread")

PAIR = 2  # the test model's layer PAIR + 1 writes nothing; every other layer is protected


@pytest.fixture(scope="module")
def setup():
    """A tiny LLaMA whose layer 3 adds nothing to the residual stream (zero o_proj and
    down_proj), a confident LM head, and calibration text sampled from the model itself (so
    the model as it is has the lowest NLL on it and any lost unit of layer 2 costs)."""
    model = tiny_model("llama")
    layer = model.model.layers[PAIR + 1]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.mul_(30)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (8, 1), generator=gen)
    with torch.no_grad():
        for _ in range(31):
            probs = model(ids).logits[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return model, ids


def _cfg(**kw) -> CompressConfig:
    return CompressConfig(**{"sparsity": 0.05, "device": "cpu", "refit": "none", "split": "search",
                             "protect": [0, 1, 4, 5], **kw})


def _nll(model, ids) -> float:
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    return float(F.cross_entropy(logits.flatten(0, 1).double(), ids[:, 1:].flatten(), reduction="mean"))


def test_search_drops_the_layer_that_adds_nothing(setup, tokenizer):
    model, ids = setup
    out, plan = compress(copy.deepcopy(model), tokenizer, _cfg(), calib=ids)
    (merge,) = plan.merges
    assert merge.position == PAIR and merge.r_a == 1.0  # keep A whole = drop B
    assert len(merge.kv_b) == 0 and len(merge.ffn_b) == 0
    with torch.no_grad():
        torch.testing.assert_close(out(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
    # the candidates are on the Plan: r over the grid, each with its score
    rs = [r for r, _ in merge.split_search["candidates"]]
    assert merge.split_search["score"] == "nll" and rs == split_grid(20) and rs[0] == 0.0 and rs[-1] == 1.0
    assert min(merge.split_search["candidates"], key=lambda c: c[1])[0] == 1.0


def test_every_candidate_nll_is_the_whole_merged_models(setup, tokenizer):
    """Brute force: each candidate merge applied to a deep copy of the model (write_layer +
    keep_layers), whole-model NLL on the calibration windows, equals the searched score."""
    model, ids = setup
    cfg = _cfg(granularity=4).resolved()
    _, plan = compress(copy.deepcopy(model), tokenizer, cfg, calib=ids)
    searched = plan.merges[0].split_search["candidates"]
    assert [r for r, _ in searched] == [0.0, 0.25, 0.5, 0.75, 1.0]
    run = prepare(copy.deepcopy(model), tokenizer, cfg, ids, "", False)
    run.cache.refresh()
    adapter, shape = get_adapter(model.config), get_adapter(model.config).attn_shape(model.config)
    a, b = read_pair(adapter, model, PAIR)
    for r, score in searched:
        c = choose_units(a, b, run.cache.stats[PAIR], run.cache.stats[PAIR + 1], shape, cfg, 2, r)
        merged = copy.deepcopy(model)
        adapter.write_layer(adapter.decoder_layers(merged)[PAIR],
                            concat_merge(a, b, shape, c.kv_a, c.kv_b, c.ffn_a, c.ffn_b, c.r_a, cfg.norm))
        adapter.keep_layers(merged, [i for i in range(6) if i != PAIR + 1])
        assert score == pytest.approx(_nll(merged, ids), abs=1e-5), r
    assert plan.layer_forwards == 6 + 5 * 3  # the profile, then 3 layers (2, 4, 5) per candidate


def test_granularity_one_tries_the_two_drops_and_the_plan_round_trips(setup, tokenizer, tmp_path):
    from come.models.checkpoint import save_checkpoint

    model, ids = setup
    out, plan = compress(copy.deepcopy(model), tokenizer, _cfg(granularity=1), calib=ids)
    assert [r for r, _ in plan.merges[0].split_search["candidates"]] == [0.0, 1.0]
    path = save_checkpoint(out, tokenizer, plan, tmp_path / "out")
    assert load_plan(path).merges[0].split_search == plan.merges[0].split_search


def test_error_score_ranks_by_the_merged_layers_output_error(setup, tokenizer):
    """--split-score error: no dense cache is asked for by --refit none, yet the search has it."""
    model, ids = setup
    _, plan = compress(copy.deepcopy(model), tokenizer, _cfg(split_score="error", granularity=4, batch_size=2),
                       calib=ids)
    (merge,) = plan.merges
    errors = dict(map(tuple, merge.split_search["candidates"]))
    assert merge.split_search["score"] == "error" and merge.r_a == 1.0
    assert errors[1.0] < 1e-5 < min(errors[r] for r in (0.0, 0.25, 0.5, 0.75))


def test_plans_without_a_search_keep_their_json():
    from come.settings.plan import MergeRecord, Plan

    rec = MergeRecord(0, 0, [0], [1], "concat", [], [], [], [], 0.5, 0.1, 0.1, 0.1, [0.1], 10, 9)
    assert "split_search" not in Plan("m", "come", {}, 2, merges=[rec]).to_json()


@pytest.mark.parametrize("kw, message", [
    ({"split": "search", "granularity": 0}, "--granularity must be >= 1"),
    ({"granularity": 5}, "add --split search"),
    ({"split_score": "error"}, "add --split search"),
    ({"split": "search", "skew": 2.0}, "--skew and --min-max"),
    ({"split": "search", "split_score": "loss"}, "--split-score must be one of"),
])
def test_bad_search_settings_are_one_line_errors(kw, message):
    with pytest.raises(ComeError, match=message):
        CompressConfig(**kw).resolved()


def test_cli_split_search_writes_a_stock_checkpoint(model_dir, text_file, tmp_path):
    from test_cli import _compress_args, _run

    out = tmp_path / "out"
    result = _run(*_compress_args(model_dir, text_file, out, "--sparsity", 0.15, "--split", "search",
                                  "--granularity", 4))
    assert result.exit_code == 0, result.output
    plan = load_plan(out / PLAN_FILE)
    assert plan.settings["split"] == "search" and plan.settings["granularity"] == 4
    assert all(len(m.split_search["candidates"]) == 5 for m in plan.merges)
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == plan.num_layers_after


def test_explicit_options_win_over_official(model_dir, text_file, tmp_path):
    """`--official --split search` is the authors' CoMe-P: their norms, no refit, the search the
    user asked for (not --official's bi split) and their CoMe-P pair score (angle over all tokens)."""
    from test_cli import _compress_args, _run

    out = tmp_path / "out"
    result = _run(*_compress_args(model_dir, text_file, out, "--sparsity", 0.15, "--official", "--split", "search",
                                  "--granularity", 2))
    assert result.exit_code == 0, result.output
    cfg = load_plan(out / PLAN_FILE).settings
    assert (cfg["split"], cfg["norm"], cfg["refit"], cfg["pair_score"]) == ("search", "average", "none", "angular-all-tokens")


def test_angular_all_tokens_is_the_authors_score_on_the_stock_forward(setup, tokenizer):
    """Pair (k, k+1) scores the mean over every calibration token of arccos(clamp(cos, 0, 1)) / pi
    between the state entering k and the one leaving k+1, as the model's own forward gives them."""
    model, ids = setup
    _, plan = compress(copy.deepcopy(model), tokenizer, _cfg(split="joint", pair_score="angular-all-tokens",
                                                              protect=[]), calib=ids)
    states = []  # the state entering each layer, then the last layer's output (hooks on the stock forward)
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw: states.append(a[0] if a else kw["hidden_states"]),
                                             with_kwargs=True) for layer in model.model.layers]
    hooks.append(model.model.layers[-1].register_forward_hook(
        lambda m, a, out: states.append(out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    want = []
    for k in range(model.config.num_hidden_layers - 1):
        cos = F.cosine_similarity(states[k].double(), states[k + 2].double(), dim=-1).clamp(0, 1)
        want.append(float((torch.arccos(cos) / torch.pi).mean()))
    assert plan.merges[0].pair_scores == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert plan.settings["pair_score"] == "angular-all-tokens"


def test_nll_pair_score_is_the_merged_models_loss_and_finds_the_lossless_merge(setup, tokenizer):
    """`--pair-score nll` (the posterior pair choice, issue 19 item 5): the score of the pair
    merged is the calibration NLL of the model that merge leaves (recomputed here by the
    whole model), and on text the model wrote itself the pairs holding the empty layer 3
    score the dense model's own NLL (their merge is lossless) and win; no layer is protected."""
    model, ids = setup
    cfg = CompressConfig(sparsity=0.05, device="cpu", refit="none", pair_score="nll")
    merged, plan = compress(copy.deepcopy(model), tokenizer, cfg, calib=ids)
    (m,) = plan.merges
    assert PAIR + 1 in m.group_a + m.group_b
    assert m.pair_score == min(m.pair_scores) == pytest.approx(_nll(merged, ids), rel=1e-5)
    assert m.pair_scores[PAIR] == pytest.approx(_nll(model, ids), rel=1e-5)
    assert m.pair_scores[PAIR + 1] == pytest.approx(_nll(model, ids), rel=1e-5)
    assert sum(s > m.pair_score * (1 + 1e-4) for s in m.pair_scores) == len(m.pair_scores) - 2
