"""`--merge-item m`: m adjacent layers merged into one stock-shaped layer per step: the
concatenation identities for three layers, windows in the loop and the Plan, the budget
(the last merge takes only the layers still to go), and one-line refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from typer.testing import CliRunner

from come import CompressConfig, ComeError, compress, load_plan
from come.cli.app import app
from come.engine.runner import LayerRunner
from come.merging.merge import concat_merge_many
from come.models.adapters import get_adapter
from come.models.budget import count_params, merge_windows, merges_needed
from come.models.checkpoint import load_model, save_checkpoint
from come.models.data import token_windows
from come.recovery.distill import check_pair
from come.scoring.pair_scoring import choose_window_units, eligible_pairs
from come.scoring.selection import joint_counts, joint_split, share_counts, split_counts, split_ratio, split_shares

from conftest import corpus, tiny_model
from layer_utils import parallel, rel_err, reload_equal, run_layer

TOL = 1e-10
pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(family):
    model = tiny_model(family, dtype=torch.float64)
    adapter = get_adapter(model.config)
    torch.manual_seed(1)
    x = torch.randn(2, 12, model.config.hidden_size, dtype=torch.float64)
    return model, adapter, adapter.attn_shape(model.config), x


def _same_qk_norm(adapter, layers):
    """Shared per-head q/k norms (Qwen3) are mixed, not concatenated: exact when all agree."""
    if adapter.qk_norm:
        with torch.no_grad():
            for lay in layers[1:]:
                lay.self_attn.q_norm.weight.copy_(layers[0].self_attn.q_norm.weight)
                lay.self_attn.k_norm.weight.copy_(layers[0].self_attn.k_norm.weight)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "phi3", "granite"])
def test_keep_all_units_of_three_equals_them_in_parallel(family):
    """A layer three times as wide holding every unit of layers 1, 2, 3 computes the sum of
    their attention and FFN residual updates on the same input."""
    model, adapter, shape, x = _setup(family)
    layers = adapter.decoder_layers(model)[1:4]
    _same_qk_norm(adapter, layers)
    ws = [adapter.read_layer(lay) for lay in layers]
    kv, d_ff = shape.n_kv_heads, ws[0].down.shape[1]
    merged = concat_merge_many(ws, shape, [list(range(kv))] * 3, [list(range(d_ff))] * 3, [0.2, 0.3, 0.5])
    cfg = copy.deepcopy(model.config)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size = 3 * shape.n_heads, 3 * kv, 3 * d_ff
    triple = type(layers[0])(cfg, layer_idx=0).to(torch.float64)
    adapter.write_layer(triple, merged)
    want = parallel(model, layers, x)
    assert rel_err(run_layer(model, triple, x), want) < TOL
    assert rel_err(parallel(model, layers[:2], x), want) > 1e-3  # the third layer's share is not negligible


def _silence(layer):
    """Layer writes nothing: its attention output and down projections are zero."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("middle", [0, 1, 2])
def test_joint_choice_keeps_the_one_live_layer_of_three_whole(family, middle, tokenizer):
    """Two of three layers zeroed: the joint top-N over the three ranks only the live layer's
    units, and the stock-shaped merge reproduces that layer exactly."""
    model, adapter, shape, x = _setup(family)
    layers = adapter.decoder_layers(model)[1:4]
    for i, lay in enumerate(layers):
        if i != middle:
            _silence(lay)
    runner = LayerRunner(model, adapter, torch.device("cpu"), torch.device("cpu"))
    h = [b.double() for b in runner.embed(list(token_windows(corpus(), tokenizer, 4, 16, seed=0).split(2)))]
    stats = [runner.run(lay, h, True, position=1 + i)[1] for i, lay in enumerate(layers)]
    ws = [adapter.read_layer(lay) for lay in layers]
    cfg = CompressConfig(device="cpu").resolved()
    choice = choose_window_units(ws, stats, shape, cfg, 3)
    kv, d_ff = shape.n_kv_heads, ws[0].down.shape[1]
    assert choice.kv == [list(range(kv)) if i == middle else [] for i in range(3)]
    assert choice.ffn == [list(range(d_ff)) if i == middle else [] for i in range(3)]
    assert choice.shares == [1.0 if i == middle else 0.0 for i in range(3)]
    out = copy.deepcopy(layers[0])
    adapter.write_layer(out, concat_merge_many(ws, shape, choice.kv, choice.ffn, choice.shares))
    assert rel_err(run_layer(model, out, x), run_layer(model, layers[middle], x)) < TOL


def test_window_rules_reduce_to_the_pair_rules():
    torch.manual_seed(0)
    a, b = torch.rand(7), torch.rand(7)
    for n in range(8):
        assert tuple(joint_counts([a, b], n)) == joint_split(a, b, n)
    for r in (0.0, 0.3, 0.5, 0.51, 0.9, 1.0):
        assert tuple(share_counts(10, [r, 1.0 - r])) == split_counts(10, r)
    assert split_shares([0.2, 0.6])[0] == pytest.approx(split_ratio(0.2, 0.6))
    assert split_shares([0.2, 0.6], 2.0, 0.9, 3)[0] == pytest.approx(split_ratio(0.2, 0.6, 2.0, 0.9, 3))
    shares = split_shares([0.1, 0.2, 0.3], min_max=0.9, n_original=3)
    assert max(shares) == pytest.approx(0.9 ** 0.5) and sum(shares) == pytest.approx(1.0)
    assert sum(share_counts(11, shares)) == 11 and sum(joint_counts([a, b, torch.rand(3)], 9)) == 9


def test_merge_windows_and_eligible_windows():
    assert merge_windows(8, 2) == [2] * 8
    assert merge_windows(8, 3) == [3, 3, 3, 3]
    assert merge_windows(7, 3) == [3, 3, 3, 2]  # the last merge removes only the layer still to go
    assert merge_windows(5, 4) == [4, 3] and merge_windows(0, 3) == []
    cfg = CompressConfig(protect=[3], no_repeat=True)
    groups = [[0], [1], [2, 3], [4], [5], [6]]
    assert eligible_pairs(groups, cfg, 3) == [False, False, False, True]
    assert eligible_pairs(groups, CompressConfig(), 3) == [True] * 4


def _calib(tokenizer, n=8, seqlen=32):
    return token_windows(corpus(), tokenizer, n, seqlen, seed=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_compress_with_merge_item_3_to_a_stock_checkpoint(family, tokenizer, tmp_path):
    dense = tiny_model(family)
    total, per_layer = count_params(dense), count_params(dense.model.layers[0])
    n_remove = merges_needed(total, per_layer, 0.45)
    cfg = CompressConfig(sparsity=0.45, device="cpu", merge_item=3)
    model, plan = compress(copy.deepcopy(dense), tokenizer, cfg, calib=_calib(tokenizer))
    assert n_remove >= 3 and plan.num_layers_after == len(model.model.layers) == 6 - n_remove
    assert len(plan.merges) == len(merge_windows(n_remove, 3)) < n_remove
    assert sorted(i for g in plan.groups for i in g) == list(range(6))  # every original layer exactly once
    assert [i for g in plan.groups for i in g] == list(range(6))  # contiguous, in order
    n_kv, d_ff = model.config.num_key_value_heads, model.config.intermediate_size
    for m, span in zip(plan.merges, merge_windows(n_remove, 3)):
        if span == 2:
            assert m.sides is None and len(m.kv_a) + len(m.kv_b) == n_kv
            continue
        assert len(m.sides) == 3 and m.group_a + m.group_b == [i for s in m.sides for i in s["group"]]
        assert sum(len(s["kv"]) for s in m.sides) == n_kv and sum(len(s["ffn"]) for s in m.sides) == d_ff
        assert sum(s["share"] for s in m.sides) == pytest.approx(1.0)
    assert plan.achieved_sparsity >= 0.45 > plan.achieved_sparsity - per_layer / total
    reloaded, out = reload_equal(model, tokenizer, plan, tmp_path / "out", _calib(tokenizer, 2, 16))
    saved = load_plan(out)
    assert saved.groups == plan.groups and [m.sides for m in saved.merges] == [m.sides for m in plan.merges]
    check_pair(dense.config, reloaded.config, saved)  # distill reads the Plan's groups


def test_merge_item_2_writes_the_plan_it_always_wrote(tokenizer):
    _, plan = compress(tiny_model("llama"), tokenizer, CompressConfig(sparsity=0.3, device="cpu"),
                       calib=_calib(tokenizer))
    assert all(m.sides is None for m in plan.merges) and '"sides"' not in plan.to_json()


@pytest.mark.parametrize("kw", [dict(split="bi"), dict(pair_score="angular"), dict(method="laco"),
                                dict(method="average"), dict(no_repeat=True, refit="none")])
def test_windows_with_other_settings_and_methods(kw, tokenizer):
    model, plan = compress(tiny_model("qwen2"), tokenizer, CompressConfig(sparsity=0.3, device="cpu", merge_item=3,
                                                                         **kw), calib=_calib(tokenizer))
    assert [i for g in plan.groups for i in g] == list(range(6)) and plan.merges[0].sides is not None
    assert len(plan.merges[0].group_a + plan.merges[0].group_b) == 3
    if kw.get("no_repeat"):
        assert all(len(s["group"]) == 1 for m in plan.merges for s in m.sides or [])


@pytest.mark.parametrize("kw, message", [
    (dict(merge_item=1), "--merge-item must be >= 2"),
    (dict(merge_item=3, method="mka"), "--method mka merges two layers"),
    (dict(merge_item=3, method="shortgpt"), "--method shortgpt ignores it: drop --merge-item"),
    (dict(merge_item=3, split="search"), "with --split search"),
    (dict(merge_item=3, pair_score="error"), "with --pair-score error"),
    (dict(merge_item=3, pair_score="nll"), "with --pair-score nll"),
    (dict(merge_item=3, sparsity=[0.1, 0.2]), "takes one --sparsity"),
])
def test_bad_merge_item_settings(kw, message):
    with pytest.raises(ComeError, match=message) as e:
        CompressConfig(**{"device": "cpu", **kw}).resolved()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("args, message", [
    (["--merge-item", "1"], "--merge-item must be >= 2"),
    (["--merge-item", "0"], "--merge-item must be >= 2"),
    (["--merge-item", "3", "--method", "mka"], "merges two layers at a time"),
    (["--merge-item", "3", "--sparsity", "0.1,0.2"], "takes one --sparsity"),
])
def test_cli_refuses_in_one_line(args, message, model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", str(model_dir), "--out", str(out), "--calib", str(text_file),
                                      "--nsamples", "8", "--seqlen", "32", "--device", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


@pytest.mark.real
def test_smollm2_merge_item_3(smollm2_dir, tmp_path):
    model, tok = load_model(str(smollm2_dir))
    calib = token_windows(corpus(4000), tok, 4, 64, seed=0)
    cfg = CompressConfig(sparsity=0.25, device="cpu", merge_item=3, nsamples=4, seqlen=64, batch_size=2)
    model, plan = compress(model, tok, cfg, calib=calib)
    assert plan.num_layers_after == 30 - 10 == len(model.model.layers)  # 0.25 * 134.5M / 3.54M -> 10 layers
    assert len(plan.merges) == 5 and all(len(m.sides) == 3 for m in plan.merges)
    assert [i for g in plan.groups for i in g] == list(range(30))
    out = save_checkpoint(model, tok, plan, tmp_path / "smol-m3")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
