"""The activations in `come distill`'s memory plan (recovery/distill_memory.py): a layer's term is
the bytes autograd saves through it, the terms follow the settings that size them, a run too big
for its activations is refused in one line naming what to lower before any weight loads, and a
child process's measured peak is what the plan says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from come.cli.app import app
from come.models.checkpoint import save_checkpoint
from come.recovery.distill_memory import _layer_saved, activations, memory_plan
from come.settings.distill_config import DistillConfig
from come.settings.plan import Plan

from conftest import corpus, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = [[0], [1, 2], [3], [4, 5]]  # merged layers 1 and 3 train (--train merged); layer 2 is frozen between them
SHAPE = dict(vocab_size=2000, hidden_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, max_position_embeddings=512)


def _configs(**shape):
    return tiny_config("llama", **{**SHAPE, **shape}), tiny_config("llama", layers=len(GROUPS), **{**SHAPE, **shape})


@pytest.fixture(scope="module")
def dirs(tokenizer, tmp_path_factory) -> Path:
    """A random 6-layer teacher and a random 4-layer student with a Plan that maps them (GROUPS),
    as HF folders, and a training text: what `come distill` reads, built in-process."""
    root = tmp_path_factory.mktemp("distill-memory")
    torch.manual_seed(0)
    teacher, student = (transformers.AutoModelForCausalLM.from_config(c) for c in _configs())
    plan = Plan(model="teacher", method="come", settings={}, num_layers_before=6, num_layers_after=len(GROUPS),
                groups=GROUPS)
    save_checkpoint(teacher, tokenizer, None, root / "teacher")
    save_checkpoint(student, tokenizer, plan, root / "student")
    (root / "train.txt").write_text(corpus())
    return root


def _saved_per_layer(model, trainable: list[int], ids: torch.Tensor, bf16: bool) -> dict[int, int]:
    """Bytes of the distinct tensors autograd saves in each decoder layer of a forward (parameters
    left out: the plan counts them as weights)."""
    layers = model.model.layers
    model.requires_grad_(False).train()
    for k in trainable:
        layers[k].requires_grad_(True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where, seen = [None], {}
    hooks = [layer.register_forward_pre_hook(lambda _m, _a, k=k: where.__setitem__(0, k)) for k, layer in
             enumerate(layers)]  # and the final norm's (distill drops its output) to none
    hooks.append(model.model.norm.register_forward_pre_hook(lambda *_: where.__setitem__(0, None)))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen and where[0] is not None:
            seen[storage.data_ptr()] = (where[0], storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model.model(input_ids=ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    per_layer = dict.fromkeys(range(len(layers)), 0)
    for k, nbytes in seen.values():
        per_layer[k] += nbytes
    return per_layer


@pytest.mark.parametrize("bf16, stored", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)])
def test_a_layers_term_is_what_autograd_saves_through_it(bf16, stored):
    """Counted tensor by tensor (saved-tensor hooks) on a random LLaMA: every layer after the
    first trainable one saves what `_layer_saved` says, trained (layer 3) or frozen (layer 2):
    in fp32, and under bf16 autocast with the weights stored in fp32 or in bf16 (the trained
    layers in fp32, as distill trains them)."""
    torch.manual_seed(0)
    config = _configs()[1]
    model = transformers.AutoModelForCausalLM.from_config(config).to(stored)
    tokens, trainable = 2 * 64, [1, 3]
    for k in trainable:
        model.model.layers[k].float()
    saved = _saved_per_layer(model, trainable, torch.randint(0, 300, (2, 64)), bf16)
    size, stream = (2 if bf16 else 4), stored.itemsize
    # under bf16 autocast each projection saves the bf16 copy of its fp32 weight (the plan counts the
    # layer's parameters, its norms' too: 2 x hidden more)
    copies = [sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear)) * 2
              * (bf16 and next(layer.parameters()).dtype == torch.float32) for layer in model.model.layers]
    assert saved[0] == 0  # before the first trainable layer nothing needs a gradient
    assert saved[2] == tokens * _layer_saved(config, False, size, stream) + copies[2]
    assert saved[3] == tokens * _layer_saved(config, True, size, stream) + copies[3]
