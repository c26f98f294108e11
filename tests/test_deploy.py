"""The compressed output in the clients people deploy with: llama.cpp's own converter turns
it into a GGUF, and llama.cpp runs it like transformers does (greedy text identical,
perplexity equal to 0.1%).

Needs the real SmolLM2, llama.cpp's `convert_hf_to_gguf.py` (COME_LLAMA_CPP = a llama.cpp
source tree, e.g. `vendor/llama.cpp` of the llama-cpp-python sdist; its LLaMA converter imports
sentencepiece) and, for the runtime half, `llama_cpp` (llama-cpp-python compiles llama.cpp:
~30 min on 2 cores, so CI skips it) or that tree's built llama-quantize and llama-perplexity
(the 4-bit half). README "Deploy" shows the commands.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.real]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import deploy_quant  # noqa: E402

PROMPT = "The capital of France is"
TEXT = Path("/usr/share/common-licenses/GPL-3")


def _llama_cpp_tree() -> Path:
    root = Path(os.environ.get("COME_LLAMA_CPP", ""))
    if not (root / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp round trip: set COME_LLAMA_CPP to a llama.cpp source tree with convert_hf_to_gguf.py "
                    "(e.g. vendor/llama.cpp of the llama-cpp-python sdist: pip download --no-binary :all: "
                    "--no-deps llama-cpp-python)")
    return root


def _built(tool: str) -> Path:
    path = _llama_cpp_tree() / "build" / "bin" / tool
    if not path.is_file():
        pytest.skip(f"llama.cpp's {tool} is not built: in COME_LLAMA_CPP, cmake -B build -DLLAMA_CURL=OFF && "
                    "cmake --build build --target llama-quantize llama-perplexity")
    return path


@pytest.fixture(scope="module")
def compressed(smollm2_dir, tmp_path_factory) -> Path:
    _llama_cpp_tree()  # skip before the minute of compression when the converter is absent
    if not TEXT.is_file():
        pytest.skip(f"calibration text {TEXT} absent")
    out = tmp_path_factory.mktemp("deploy") / "smol-come"
    subprocess.run([sys.executable, "-m", "come.cli.app", "compress", str(smollm2_dir), "--out", str(out),
                    "--sparsity", "0.2", "--calib", str(TEXT), "--nsamples", "8", "--seqlen", "128",
                    "--device", "cpu"], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def gguf(compressed) -> Path:
    root = _llama_cpp_tree()
    path = compressed.parent / "smol-come.f32.gguf"
    env = {**os.environ, "PYTHONPATH": str(root / "gguf-py")}
    run = subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(compressed),
                          "--outtype", "f32", "--outfile", str(path)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return path


def _reference(model_dir: Path, **extra):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **extra).eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir), **extra)


def _window(tokenizer, n: int = 256) -> list[int]:
    return tokenizer(TEXT.read_text())["input_ids"][:n]


def _nll(logits: torch.Tensor, ids: list[int]) -> float:
    """Mean next-token NLL of `ids` given per-position logits [len(ids), vocab]."""
    target = torch.tensor(ids[1:])
    return torch.nn.functional.cross_entropy(logits[:-1].double(), target).item()


def test_the_gguf_reads_back_as_the_same_model(compressed, gguf):
    """llama.cpp's converter keeps every weight: transformers' GGUF reader gives the same logits."""
    model, tok = _reference(compressed)
    back, _ = _reference(gguf.parent, gguf_file=gguf.name)
    assert back.config.num_hidden_layers == model.config.num_hidden_layers < 30
    ids = torch.tensor([_window(tok)])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_llama_cpp_runs_it_like_transformers(compressed, gguf):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp not importable: pip install llama-cpp-python (compiles llama.cpp)")
    from llama_cpp import Llama

    model, tok = _reference(compressed)
    llm = Llama(model_path=str(gguf), n_ctx=512, logits_all=True, verbose=False, seed=0)

    prompt = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    llm.reset()
    llm.eval(prompt)
    got = []
    for _ in range(16):
        nxt = int(llm.scores[llm.n_tokens - 1].argmax())
        got.append(nxt)
        llm.eval([nxt])
    assert got == want, (tok.decode(got), tok.decode(want))

    ids = _window(tok)
    llm.reset()
    llm.eval(ids)
    nll_cpp = _nll(torch.from_numpy(llm.scores[: len(ids)].copy()), ids)
    with torch.no_grad():
        nll_hf = _nll(model(torch.tensor([ids])).logits[0], ids)
    assert abs(nll_cpp - nll_hf) / nll_hf < 1e-3, (nll_cpp, nll_hf)


def test_llama_cpp_quantizes_it_to_4_bits_and_runs_it(gguf):
    """llama-quantize takes the compressed model to Q4_K_M, and llama.cpp runs the 4-bit file:
    close to the full-precision file it came from (KL, top token, perplexity on GPL-3)."""
    quantize, perplexity = _built("llama-quantize"), _built("llama-perplexity")
    q4 = gguf.with_name("smol-come.Q4_K_M.gguf")
    subprocess.run([quantize, gguf, q4, "Q4_K_M", "1"], check=True, capture_output=True)
    assert q4.stat().st_size < gguf.stat().st_size / 4
    base, common = gguf.with_name("base.kld"), ["-c", "128", "-t", "1"]
    run = subprocess.run([perplexity, "-m", gguf, "-f", TEXT, "--chunks", "8", "--kl-divergence-base", base, *common],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    full = deploy_quant.parse_base(run.stderr + run.stdout)
    run = subprocess.run([perplexity, "-m", q4, "--kl-divergence-base", base, "--kl-divergence", *common],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    four = deploy_quant.parse_kl(run.stderr + run.stdout)
    assert four["chunks"] == full["chunks"] == 8
    assert 0 < four["kl"] < 0.2 and four["same_top"] > 80
    assert abs(math.log(four["ppl"] / full["ppl"])) < 0.1, (four, full)
