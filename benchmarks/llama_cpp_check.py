#!/usr/bin/env python3
"""A compressed model in llama.cpp against transformers: perplexity on GPL-2 (first 512
tokens) and 16 greedy tokens, for each GGUF made by llama.cpp's convert_hf_to_gguf.py.

    python benchmarks/llama_cpp_check.py smol-come smol-come.f32.gguf smol-come.f16.gguf

Needs `llama_cpp` (pip install llama-cpp-python; it compiles llama.cpp). tests/test_deploy.py
asserts the same agreement; this prints the figures README's "Deploy" quotes.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from llama_cpp import Llama
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "The capital of France is"
TEXT = Path("/usr/share/common-licenses/GPL-2")


def _ppl(logits: torch.Tensor, ids: list[int]) -> float:
    return math.exp(F.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:])).item())


def _greedy(llm: Llama, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        llm.eval([out[-1]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="the compressed HF directory")
    ap.add_argument("gguf", nargs="+", help="its GGUF conversions")
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(TEXT.read_text())["input_ids"][:512]
    prompt = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        ref = _ppl(model(torch.tensor([ids])).logits[0], ids)
        want = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    print(f"| client | GPL-2 ppl (512 tokens) | vs transformers | 16 greedy tokens |\n|---|---|---|---|")
    print(f"| transformers (fp32) | {ref:.4f} | | {tok.decode(want)!r} |")
    for path in args.gguf:
        llm = Llama(model_path=path, n_ctx=1024, logits_all=True, verbose=False)
        llm.eval(ids)
        ppl = _ppl(torch.from_numpy(llm.scores[: len(ids)].copy()), ids)
        same = _greedy(llm, prompt, 16) == want
        print(f"| llama.cpp {Path(path).name} | {ppl:.4f} | {100 * (ppl / ref - 1):+.3f}% | "
              f"{'identical' if same else 'DIFFERENT'} |")


if __name__ == "__main__":
    main()
