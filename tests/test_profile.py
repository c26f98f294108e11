"""The profiler runs every decoder layer exactly as the model's own forward runs it: the
same mask and position embeddings, per layer type, on models that mix sliding and full
attention, also after layers are removed (the type follows the CURRENT position)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from come.engine.cache import ActivationCache
from come.engine.runner import LayerRunner
from come.errors import ComeError
from come.merging.layer_refit import refit_layer
from come.models.adapters import get_adapter
from come.models.data import token_windows

from conftest import FAMILIES, MOE_FAMILIES, corpus, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW, SEQLEN = 8, 32  # calibration windows longer than the sliding window: the masks differ
SLIDING = {
    "llama": {},  # no sliding attention in the family
    "mistral": {"sliding_window": WINDOW},  # every layer slides: one mask
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},  # f f s s s s
    "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW,
              "layer_types": ["full_attention", "sliding_attention"] * 3},  # f s f s f s
    "gemma2": {"sliding_window": WINDOW, "layer_types": ["full_attention", "sliding_attention"] * 3},  # f s f s f s
    "gemma3": {"sliding_window": WINDOW, "layer_types": ["full_attention", "sliding_attention"] * 3},  # + rotary per type
    "phi3": {"sliding_window": WINDOW},  # every layer slides: one mask
    "olmo2": {},  # no sliding attention in the family
    "granite": {},  # no sliding attention in the family
    "mixtral": {"sliding_window": WINDOW},  # every layer slides: one mask
    "qwen2_moe": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 4},  # s f s f f f
    "qwen3_moe": {"use_sliding_window": True, "sliding_window": WINDOW},  # every layer slides: one mask
    "olmoe": {},  # no sliding attention in the family
}
KEEP = [0, 2, 3, 4, 5]  # qwen2: sliding layer 2 moves to full position 1; qwen3, gemma: full 2 to sliding 1
EXACT = {"rtol": 0.0, "atol": 0.0}  # the same ops on the same tensors


@pytest.fixture(params=sorted(FAMILIES) + sorted(MOE_FAMILIES))
def family(request):
    """Every family, Mixture-of-Experts ones included (their statistics hook the experts)."""
    return request.param


@pytest.fixture(scope="module")
def batches(tokenizer) -> list[torch.Tensor]:
    """Two calibration batches of 2 x SEQLEN tokens (built once: the corpus takes half a second)."""
    return list(token_windows(corpus(), tokenizer, 4, SEQLEN, 0).split(2))


def _setup(family: str):
    model = tiny_model(family, **SLIDING[family])
    adapter = get_adapter(model.config)
    return model, adapter, LayerRunner(model, adapter, torch.device("cpu"), torch.device("cpu"))


def _stock(model, adapter, batches) -> tuple[list[list], list[list]]:
    """Per layer, per batch: the input and output the model's own forward gives it."""
    layers = adapter.decoder_layers(model)
    ins, outs = [[] for _ in layers], [[] for _ in layers]

    def record(k: int, args, out) -> None:  # returns None: the hook must not replace the output
        ins[k].append(args[0])
        outs[k].append(out[0] if isinstance(out, tuple) else out)

    hooks = [layer.register_forward_hook(lambda _m, args, out, k=k: record(k, args, out))
             for k, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return ins, outs


def _profiled(runner, adapter, model, h) -> list[list]:
    """Per layer: its outputs in the profiler, run layer after layer from the embeddings."""
    outs = []
    for k, layer in enumerate(adapter.decoder_layers(model)):
        h, _ = runner.run(layer, h, k == 0, position=k)
        outs.append(h)
    return outs


def test_configs_mix_attention_types():
    """The families that can mix sliding and full layers do here (else the tests below prove little)."""
    assert sorted(FAMILIES | MOE_FAMILIES) == sorted(SLIDING)
    for family in ("qwen2", "qwen3", "gemma2", "gemma3", "qwen2_moe"):
        assert len(set(tiny_model(family, **SLIDING[family]).config.layer_types)) == 2, family
    for family in ("mistral", "phi3", "mixtral", "qwen3_moe"):
        assert tiny_model(family, **SLIDING[family]).config.sliding_window == WINDOW


def test_layers_run_as_the_model_runs_them(family, batches):
    model, adapter, runner = _setup(family)
    real = list(adapter.decoder_layers(model))
    h = runner.embed(batches)
    assert all(a is b for a, b in zip(adapter.decoder_layers(model), real, strict=True))  # put back
    ins, want = _stock(model, adapter, batches)
    torch.testing.assert_close(h, ins[0], **EXACT)
    for k, got in enumerate(_profiled(runner, adapter, model, h)):
        torch.testing.assert_close(got, want[k], **EXACT, msg=lambda m, k=k: f"layer {k}: {m}")


def test_after_layers_are_removed(family, batches):
    """Embedded once on the full model (as the pipeline does), run after keep_layers."""
    model, adapter, runner = _setup(family)
    h = runner.embed(batches)
    adapter.keep_layers(model, KEEP)
    _, want = _stock(model, adapter, batches)
    for k, got in enumerate(_profiled(runner, adapter, model, h)):
        torch.testing.assert_close(got, want[k], **EXACT, msg=lambda m, k=k: f"position {k}: {m}")


def test_collect_refit_runs_the_layer_as_the_model_does(family, batches):
    """collect_refit's forward gives the stock output, so a layer fitted to its own output is exact."""
    model, adapter, runner = _setup(family)
    runner.embed(batches)
    ins, want = _stock(model, adapter, batches)
    for k, layer in enumerate(adapter.decoder_layers(model)):
        seen = []
        hook = layer.register_forward_hook(
            lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out) and None)
        try:
            features = "channels" if adapter.experts(layer) is None else "mlp_out"  # MoE: the map (layer_refit.py)
            train, hold, _ = runner.collect_refit(layer, ins[k], want[k], [False, True], features, position=k)
        finally:
            hook.remove()
        torch.testing.assert_close(seen, want[k], **EXACT, msg=lambda m, k=k: f"layer {k}: {m}")
        assert train.n > 0 and hold.n > 0


def test_cache_and_refit_use_each_position_type(family, batches):
    """ActivationCache.refresh / inputs_at and refit_layer (also on a scratch copy, as the
    error pair scores use it) hand the runner the position: a dense layer refitted to its
    own dense output has no error."""
    model, adapter, runner = _setup(family)
    cfg = SimpleNamespace(pair_score="bi", head_score="channel", refit_holdout=0.5)
    cache = ActivationCache(model, adapter, runner, cfg, runner.embed(batches), stride=100, dense_batches=2)
    cache.refresh()
    ins, want = _stock(model, adapter, batches)
    for k, layer in enumerate(adapter.decoder_layers(model)):
        torch.testing.assert_close(cache.dense[k + 1], want[k], **EXACT)
        torch.testing.assert_close(cache.inputs_at(k), ins[k], **EXACT)
        assert refit_layer(cache, k, [k], "compressed", solve=False).err_before < 1e-6, k
        assert refit_layer(cache, k, [k], "dense", layer=copy.deepcopy(layer), solve=False).err_before < 1e-6, k


def test_a_kept_refit_pass_stands_in_for_the_layer_pass(family, batches):
    """refit_layer(keep=True) keeps its pass where the layer's output is x1 + down(a) (no
    post-norm, not MoE): after the refit's write, the re-profiling reads from it the very
    outputs and statistics a layer pass gives, bit for bit. Elsewhere it keeps nothing."""
    model, adapter, runner = _setup(family)
    cfg = SimpleNamespace(pair_score="bi", head_score="exact", refit_holdout=0.5, max_cache_gb=1.0)
    cache = ActivationCache(model, adapter, runner, cfg, runner.embed(batches), stride=1, dense_batches=2)
    cache.refresh()
    kept = []
    for k, layer in enumerate(adapter.decoder_layers(model)):
        cache.kept_pass = None
        refit_layer(cache, k, [k], "compressed", keep=True)
        kept.append(cache.kept_pass is not None)
        if not kept[-1]:
            continue
        assert cache.kept_pass.holds_for(k, cache.inputs_at(k)) and not cache.kept_pass.holds_for(k + 1, cache.inputs_at(k))
        with torch.no_grad():  # what the refit writes: a new down projection
            adapter.ffn_output_proj(layer).weight.mul_(0.5).add_(0.01)
        got, got_st = cache.kept_pass.finish(runner, layer)
        want, want_st = runner.run(layer, cache.inputs_at(k), True, "exact", position=k)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), k
        for field in ("attn_abs_mean", "ffn_abs_mean", "head_out_l1"):
            assert torch.equal(getattr(got_st, field), getattr(want_st, field)), (k, field)
        assert got_st.bi == want_st.bi, k
    # kept in every layer of the families whose FFN output adds as it is, in none of the others
    assert kept == [family in ("llama", "mistral", "phi3", "qwen2", "qwen3")] * len(kept)


def test_a_kept_pass_needs_room_in_the_cache_budget(batches):
    """The kept activations count against --max-cache-gb: with no room, nothing is kept."""
    model, adapter, runner = _setup("llama")
    cfg = SimpleNamespace(pair_score="bi", head_score="channel", refit_holdout=0.5, max_cache_gb=1e-6)
    cache = ActivationCache(model, adapter, runner, cfg, runner.embed(batches), stride=1, dense_batches=2)
    cache.refresh()
    refit_layer(cache, 1, [1], "compressed", keep=True)
    assert cache.kept_pass is None
    cache.cfg.max_cache_gb = 1.0
    refit_layer(cache, 1, [1], "compressed", keep=True)
    assert cache.kept_pass is not None
    cache.forget_after(0)  # layer 0 changed: the pass over layer 1 no longer holds
    assert cache.kept_pass is None


def test_mixed_types_need_the_position(batches):
    """Without a position the runner cannot know the mask of a mixed model: it refuses to guess."""
    model, adapter, runner = _setup("qwen3")
    h = runner.embed(batches)
    with pytest.raises(ComeError, match="mixes attention types"):
        runner.run(adapter.decoder_layers(model)[1], h, False)
