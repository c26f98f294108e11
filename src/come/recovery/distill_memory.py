"""The memory plan of a distillation run, from the two configs and the Plan alone (before any
weight loads): the bytes each process holds for the teacher, the student and the training
state (gradients, AdamW moments), given the mode's trainable layers, the precision, the
process count and --shard. A run whose plan exceeds --max-memory-gb is refused in one line.

What it counts is exact for the weights and the training state (tests/test_distill_shard.py
counts the bytes a run holds and finds these numbers); activations, the KL chunk's logits
and the framework's own memory are not counted, so the plan is a floor, not a peak.
"""

from __future__ import annotations

import logging

import torch

from ..models.adapters import get_adapter
from ..models.budget import count_params
from ..models.checkpoint import loaded_dtype
from ..errors import ComeError

_log = logging.getLogger("come")
_GB = 1e9


def _layer_counts(config) -> tuple[list[int], int, int]:
    """(parameters of each decoder layer, of the LM head, of the rest), from a model built on
    the meta device (no memory, no weights read); tied tensors counted once, a tied head's
    matrix as the head's."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = [count_params(layer) for layer in get_adapter(config).decoder_layers(model)]
    head = count_params(model.get_output_embeddings())
    return layers, head, count_params(model) - sum(layers) - head


def memory_plan(teacher_config, student_config, trainable: list[int], processes: int, shard: bool,
                bf16: bool, head: bool = False) -> dict[str, int]:
    """Bytes per process: the teacher; the student (its trainable layers, and with `head` its
    LM head, in fp32, as distill trains them); gradients and AdamW's two moments (fp32) of
    what trains. Without bf16 both models compute in fp32. With `shard` each decoder layer
    counts 1/processes (FSDP pads a tensor's first dimension to a multiple of it: at most a
    row more); the head is never sharded (--shard refuses to train it)."""
    split = processes if shard else 1
    plan = {}
    for name, config in (("teacher", teacher_config), ("student", student_config)):
        layers, head_n, rest = _layer_counts(config)
        size = loaded_dtype(config).itemsize if bf16 else 4
        trained = trainable if name == "student" else []
        head_trains = head and name == "student"
        plan[name] = (rest * size + head_n * (4 if head_trains else size)
                      + sum(n * (4 if k in trained else size) for k, n in enumerate(layers)) // split)
        if name == "student":
            plan["gradients + AdamW"] = (sum(layers[k] for k in trainable) * 4 * 3 // split
                                         + head_n * head_trains * 4 * 3)
    plan["total"] = sum(plan.values())
    return plan


def check_memory(plan: dict[str, int], max_memory_gb: float | None, processes: int, shard: bool,
                 say: bool = True) -> None:
    """Log the plan (where `say`); refuse it in one line when it does not fit `max_memory_gb` per process."""
    parts = ", ".join(f"{k} {v / _GB:.3g} GB" for k, v in plan.items())
    if say:
        _log.info("memory plan per process (%d process%s%s; activations not counted): %s", processes,
              "" if processes == 1 else "es", ", sharded" if shard else "", parts)
    if max_memory_gb is not None and plan["total"] > max_memory_gb * _GB:
        hint = "add processes with --shard" if shard else "run on several processes with --shard"
        raise ComeError(f"the run needs {plan['total'] / _GB:.3g} GB per process for weights and training state "
                        f"({parts}), more than --max-memory-gb {max_memory_gb:g}: {hint}")
