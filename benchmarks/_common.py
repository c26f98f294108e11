"""Helpers shared by the benchmark scripts: the models they load and the options naming them.

Every script imports from here and from `come`, never from another script (the scripts
run as `python benchmarks/NAME.py`, so this directory is on sys.path).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers
from torch import nn


def llama_1b() -> nn.Module:
    """TinyLlama-1.1B's shape (22 layers, hidden 2048, 32q/4kv, FFN 5632), random weights."""
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                   num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def tiny_llama(num_hidden_layers: int = 8) -> nn.Module:
    """The toy LLaMA every script's --quick uses (seconds, no download)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def add_model_args(ap: argparse.ArgumentParser, device: bool = True) -> None:
    """The options naming a model (and, with `device`, a device), the same in every script
    that calls `load`."""
    ap.add_argument("--model", help="local HF dir (e.g. ~/.cache/come/smollm2-135m)")
    ap.add_argument("--random-llama-1b", action="store_true", help="TinyLlama-1.1B's shape, random weights")
    if device:
        ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny random LLaMA, seconds")


def load(a: argparse.Namespace) -> tuple[nn.Module, str]:
    """(model on CPU, its name) from --quick, --random-llama-1b or --model (add_model_args)."""
    if a.quick:
        return tiny_llama(), "tiny LLaMA (8 layers, hidden 128)"
    if a.random_llama_1b:
        return llama_1b(), "random LLaMA 1.1B"
    if not a.model:
        raise SystemExit("give --model DIR, --random-llama-1b or --quick")
    from come.checkpoint import load_model

    return load_model(a.model)[0], Path(a.model).name


def sync(device: str) -> None:
    """Wait for the device's queued work, so a timestamp taken next covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
