"""The real Gemma-3-270m base model (Gemma 3: pre+post norms, q/k norms, 5 sliding : 1 full
attention, a rotary base per layer type) from the four PyPI packages in ../shared/assets'
recipe: compresses, reloads with plain transformers, generates the same with and without
a KV cache past the 512-token sliding window, and keeps `layer_types` consistent."""

from __future__ import annotations

import pytest
import torch
import transformers

from come import CompressConfig, compress
from come.evaluation.evaluate import perplexity
from come.models.checkpoint import load_model, save_checkpoint
from come.models.data import eval_windows, token_windows

from conftest import corpus

pytestmark = [pytest.mark.real, pytest.mark.slow]

TEXT = ("The Nile is a major north-flowing river in northeastern Africa. It flows into the Mediterranean Sea. "
        "The Nile is the longest river in Africa and has historically been considered the longest river in the "
        "world. The river's water resources are shared by eleven countries. ") * 20


def _attention_types(model) -> list[str]:
    """Each decoder layer's attention type as its module was built (mask and rotary base follow it)."""
    return [layer.self_attn.layer_type for layer in model.model.layers]


def test_gemma3_compress_reload_generate(gemma3_dir, tmp_path):
    torch.manual_seed(0)
    model, tok = load_model(str(gemma3_dir))
    cfg = model.config
    assert cfg.model_type == "gemma3_text" and cfg.num_hidden_layers == 18 and cfg.sliding_window == 512
    dense_types = list(cfg.layer_types)
    assert dense_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    windows = eval_windows(TEXT, tok, 64)[:4]
    dense_ppl = perplexity(model, windows)
    calib = token_windows(corpus(4000) + TEXT, tok, 8, 64, seed=0)
    # 0.04 of 268.1M params (168M of them the embedding) -> 2 merges of 5.6M-param layers
    model, plan = compress(model, tok, CompressConfig(sparsity=0.04, device="cpu"), calib=calib)
    assert plan.num_layers_after == 16 and sorted(sum(plan.groups, [])) == list(range(18))
    ppl = perplexity(model, windows)
    assert torch.isfinite(torch.tensor(ppl)) and ppl < 10 * dense_ppl, (dense_ppl, ppl)

    # layer_types: one per kept layer, each merged layer has its first source layer's type,
    # and every module (mask, window, rotary base, KV-cache index) agrees with the config
    types = list(model.config.layer_types)
    assert len(types) == model.config.num_hidden_layers == len(model.model.layers) == 16
    assert types == [dense_types[g[0]] for g in plan.groups]
    assert _attention_types(model) == types
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(16))
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [
        512 if t == "sliding_attention" else None for t in types]

    # a prompt longer than the sliding window, so the sliding layers' cache drops keys
    prompt = tok(TEXT, return_tensors="pt").input_ids[:, :530]
    assert prompt.shape[1] == 530
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached, uncached)

    out = save_checkpoint(model, tok, plan, tmp_path / "gemma-come")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded).__name__ == "Gemma3ForCausalLM"
    assert reloaded.config.num_hidden_layers == 16 and list(reloaded.config.layer_types) == types
    assert _attention_types(reloaded) == types
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
        greedy = dict(max_new_tokens=6, do_sample=False)
        assert torch.equal(reloaded.generate(ids, **greedy), model.generate(ids, **greedy))
