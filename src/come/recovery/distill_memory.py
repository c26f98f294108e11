"""The memory plan of a distillation run, from the two configs, the Plan and the settings alone
(before any weight loads): the bytes each process holds for the teacher, the student, the
training state (gradients, AdamW moments) and the activations, given the mode, the trainable
layers, the batch, the precision, the process count and --shard. A run whose plan exceeds
--max-memory-gb is refused in one line that names what to lower.

The weights and the training state are exact (tests/test_distill_shard.py counts the bytes a
run holds and finds these numbers). The activations (`activations`) are the larger of a
training step's (the boundary states it keeps, what autograd saves through each layer, counted
tensor by tensor for LLaMA-style layers with SDPA attention, one KL chunk or the backward's
working set) and the held-out pass's. The total adds them to the rest: a bound on the peak, by
up to the gradients' size (an sp step's gradients arrive as its backward frees the
activations); measured peaks are 0.87-1.03 of it (tests/test_distill_memory.py, docs/memory.md).
Not counted: the framework's first-use memory, FSDP's gathered layer, what the allocator keeps.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from ..models.adapters import get_adapter
from ..models.budget import count_params
from ..models.checkpoint import loaded_dtype
from ..errors import ComeError
from ..settings.distill_config import DistillConfig, train_set

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
                bf16: bool, head: bool = False, acts: Activations | None = None) -> dict[str, int]:
    """Bytes per process: the teacher; the student (its trainable layers, and with `head` its
    LM head, in fp32, as distill trains them); gradients and AdamW's two moments (fp32) of
    what trains; with `acts`, the activations' peak (each process holds its own). Without bf16
    both models compute in fp32. With `shard` each decoder layer counts 1/processes (FSDP pads
    a tensor's first dimension to a multiple of it: at most a row more); the head is never
    sharded (--shard refuses to train it)."""
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
    if acts is not None:
        plan["activations"] = acts.peak
    plan["total"] = sum(plan.values())
    return plan


class Activations(NamedTuple):
    """Bytes a step holds beside the weights and the training state, by what holds them (`activations`)."""

    states: int  # kept through the step: the teacher's targets, the student's final state, loss buffers
    saved: int  # what autograd saves for the backward through the student's layers
    chunk: int  # one KL chunk's full-vocabulary arrays
    step_kl: bool  # whether the training step computes a KL (all but mp with the mse loss)
    backward: int  # the backward's own working set: a layer's gradients (and its recomputed activations)
    evaluation: int  # the held-out pass (no autograd): both models' final states and a KL chunk

    @property
    def step(self) -> int:
        """The training step: the KL chunk is freed before the backward starts."""
        return self.states + self.saved + max(self.chunk * self.step_kl, self.backward)

    @property
    def peak(self) -> int:
        """The training step, or the held-out pass where that is more (mp with the mse loss)."""
        return max(self.step, self.evaluation)

    def describe(self) -> str:
        """The parts, for the plan's log line: which one to lower is read off it."""
        parts = [f"kept states {self.states / _GB:.3g}", f"saved for backward {self.saved / _GB:.3g}"]
        parts += [f"KL chunk {self.chunk / _GB:.3g}"] if self.step_kl else []
        parts += [f"backward {self.backward / _GB:.3g}"]
        return (f"{', '.join(parts)} GB; the held-out pass "
                f"{f'{self.evaluation / _GB:.3g} GB, more' if self.evaluation > self.step else 'less'}")


def _ffn_width(config) -> int:
    """FFN activations per token of a layer: the dense width, or the top-k experts' (and a shared expert's)."""
    top_k = getattr(config, "num_experts_per_tok", None)
    if not top_k:
        return config.intermediate_size
    expert = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return top_k * expert + (getattr(config, "shared_expert_intermediate_size", None) or 0)


def _layer_saved(config, trains: bool, size: int, stream: int) -> int:
    """Bytes per token that autograd saves through one decoder layer whose input needs a gradient
    (LLaMA-style, SDPA attention; `size`: bytes of a matmul's output, 2 under bf16 autocast, else
    4; `stream`: of the residual stream): both RMSNorms' inputs and reciprocal RMS (fp32); SDPA's
    query, key, value, output and log-sum-exp (fp32 a head); the FFN's gate, activation and up. A layer
    that trains also keeps what its weights' gradients need: each norm's normalised state, the
    projections' inputs (under bf16 autocast its fp32 weights make each of q, k, v, gate, up
    save its own bf16 copy of its input), the down projection's input."""
    shape, hidden, ffn = get_adapter(config).attn_shape(config), config.hidden_size, _ffn_width(config)
    saved = (2 * (hidden + 1) * 4 + 2 * (shape.n_heads + shape.n_kv_heads) * shape.head_dim * size
             + shape.n_heads * 4 + 3 * ffn * size)
    if trains:
        saved += 2 * hidden * stream + (5 if size == 2 else 2) * hidden * size + ffn * size
    return saved


def activations(teacher_config, student_config, groups: list[list[int]], trainable: list[int], cfg: DistillConfig,
                bf16: bool) -> Activations:
    """The activations of one step of `cfg` (its mode, --batch-size x --seqlen tokens, --kl-chunk,
    --layer-loss, --gradient-checkpointing, --train) per process, from the configs alone; `groups`:
    the Plan's, `trainable`: the student layers that train.

    - states: the teacher's boundary states that the step keeps as targets (sp: one per layer-loss
      point and the final one; mp: each trainable layer's input and output), the student's final
      state, and per sp layer-loss point the buffer its backward reads (mse: the fp32 difference;
      kl: the seeded gradient), each tokens x hidden in the residual stream's dtype; with a trained
      head, its fp32 gradient twice (summed over the chunks, and one chunk's).
    - saved: sp: `_layer_saved` for every student layer from the first trainable one (the layers
      after it need their inputs' gradients too); with --gradient-checkpointing only each of those
      layers' input. mp: one trainable layer, whose input (the teacher's state) needs no gradient.
      Under bf16 autocast also the bf16 copy of those layers' fp32 weights (the trained ones,
      and all where the checkpoint is fp32).
    - chunk: a KL chunk (min(--kl-chunk, tokens) x vocabulary) holds 6 fp32 arrays at its peak
      (both log-softmaxes, the student's logits, exp of the teacher's, the difference, its
      product), measured also under bf16 autocast. The step has none in mp with the mse loss.
    - backward: the gradients in flight through one layer, 3 FFN-wide tensors a token (measured
      2.3-3.3), and with --gradient-checkpointing (sp) the largest layer's `_layer_saved`,
      recomputed; the KL chunk is gone by then, so the step holds the larger of the two.
    - evaluation: the held-out pass, under no_grad: both models' final states and a KL chunk,
      for min(--batch-size, --eval-windows) windows.
    The FFN's width is its intermediate size, or in an MoE layer the top-k experts' and a shared one's.
    """
    size = 2 if bf16 else 4
    stream_t, stream = (loaded_dtype(c).itemsize if bf16 else 4 for c in (teacher_config, student_config))
    hidden, vocab = student_config.hidden_size, student_config.vocab_size
    tokens, held_out = cfg.batch_size * cfg.seqlen, min(cfg.batch_size, cfg.eval_windows) * cfg.seqlen
    state = tokens * hidden  # elements of one boundary state
    chunk = min(cfg.kl_chunk, tokens) * vocab * 6 * 4
    evaluation = held_out * hidden * (stream_t + stream) + min(cfg.kl_chunk, held_out) * vocab * 6 * 4
    kl_points = cfg.layer_loss == "kl"
    backward = 3 * _ffn_width(student_config) * size * tokens
    weights = _layer_counts(student_config)[0] if bf16 else [0] * len(groups)
    casts = {k: weights[k] * 2 * (k in trainable or stream == 4) for k in range(len(groups))}  # bf16 weight copies
    layer = {k: _layer_saved(student_config, k in trainable, size, stream) * tokens + casts[k] for k in casts}
    if cfg.mode == "mp":
        bounds = {groups[k][0] for k in trainable} | {groups[k][-1] + 1 for k in trainable}
        states = len(bounds) * state * stream_t + state * (stream if kl_points else 4)
        return Activations(states, max(layer[k] for k in trainable) - state * 4, chunk, kl_points, backward,
                           evaluation)
    points = range(trainable[0], len(groups) - 1) if cfg.layer_weight else range(0)
    states = ((len(points) + 1) * stream_t  # the targets
              + 2 * stream  # the final state and the final KL's gradient
              + len(points) * (stream if kl_points else 4)) * state
    if train_set(cfg.train).head:  # the head's gradient summed over the chunks, and one chunk's
        states += 2 * vocab * hidden * 4
    path = range(trainable[0], len(groups))  # the layers the backward runs through
    if cfg.gradient_checkpointing:
        return Activations(states, len(path) * state * stream + sum(casts[k] for k in path), chunk, True,
                           max(layer[k] for k in path) + backward, evaluation)
    return Activations(states, sum(layer[k] for k in path), chunk, True, backward, evaluation)


def check_memory(plan: dict[str, int], cfg: DistillConfig, processes: int, acts: Activations | None = None,
                 say: bool = True) -> None:
    """Log the plan (where `say`); refuse it in one line when it does not fit cfg.max_memory_gb per
    process, naming what to lower: the activations' levers first where they are planned."""
    parts = ", ".join(f"{k} {v / _GB:.3g} GB" for k, v in plan.items())
    if say:
        _log.info("memory plan per process (%d process%s%s, %s): %s%s", processes, "" if processes == 1 else "es",
                  ", sharded" if cfg.shard else "", cfg.mode, parts,
                  f" (activations: {acts.describe()})" if acts is not None else "")
    if cfg.max_memory_gb is None or plan["total"] <= cfg.max_memory_gb * _GB:
        return
    fixes = []
    if acts is not None:
        fixes.append(f"lower --batch-size or --seqlen (activations {acts.peak / _GB:.3g} GB)")
        fixes.append(f"lower --kl-chunk (one chunk {acts.chunk / _GB:.3g} GB)")
        if cfg.mode == "sp" and not cfg.gradient_checkpointing:
            fixes.append(f"add --gradient-checkpointing (saved for backward {acts.saved / _GB:.3g} GB)")
    state = sum(v for k, v in plan.items() if k not in ("activations", "total")) / _GB
    fixes.append(f"{'add processes with' if cfg.shard else 'run on several processes with'} --shard (weights and "
                 f"training state {state:.3g} GB)")
    raise ComeError(f"the run needs {plan['total'] / _GB:.3g} GB per process ({parts}), more than --max-memory-gb "
                    f"{cfg.max_memory_gb:g}: {', '.join(fixes[:-1])}{', or ' if fixes[1:] else ''}{fixes[-1]}")
