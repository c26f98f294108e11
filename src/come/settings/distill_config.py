"""The settings of `come distill`: one options object shared by the CLI and the Python API,
recorded in distill_log.json."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import ClassVar, Literal, get_args

from ..errors import ComeError
from .options import SEEDS, Options, check_choices, check_context, check_ranges, count, option

Mode = Literal["sp", "mp"]
LayerLoss = Literal["kl", "mse"]
Precision = Literal["auto", "bf16", "fp32"]


def _short_count(n: int) -> str:
    """20_000_000 -> '20M': how the CLI shows a token count (options.count reads it back)."""
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


@dataclass(frozen=True)
class TrainSet:
    """What --train names: the decoder layers that train ("merged", "all", or the `last` K at
    the end of the student) and whether the LM head trains with them."""

    layers: Literal["merged", "all", "last"]
    last: int = 0
    head: bool = False


_TRAIN_FORMS = "merged, all, last:K or last:K,head (K >= 1)"


def train_set(text: str) -> TrainSet:
    """Parse --train ('merged', 'all', 'last:3', 'last:3,head'); a bad value is one line naming the fix."""
    if text in ("merged", "all"):
        return TrainSet(text)
    kind, colon, rest = text.partition(":")
    if kind != "last" or not colon:
        raise ComeError(f"--train must be {_TRAIN_FORMS}, got {text!r}")
    count_, *extra = rest.split(",")
    if extra not in ([], ["head"]):
        raise ComeError(f"--train {text}: only ',head' may follow last:K; write last:{count_} or last:{count_},head")
    if not count_.isdigit() or int(count_) < 1:
        raise ComeError(f"--train {text}: K must be a whole number >= 1 (the last K decoder layers train), "
                        "e.g. last:3")
    return TrainSet("last", int(count_), bool(extra))


OFFICIAL = {"layer_loss": "kl"}  # the paper's recovery loss (`come distill --official`)


@dataclass
class DistillConfig(Options):
    """Settings of `come distill` (shared by the CLI and the Python API, saved in distill_log.json)."""

    cli_panel: ClassVar[str] = "Distillation"
    # How a run is carried out, not what it learns: free to change on --resume (a new device or
    # memory knob may move the result in the last float bits). Every other field defines the run,
    # and --resume refuses a change (train_state.resume_point).
    RUN_CONTROL: ClassVar[tuple[str, ...]] = ("resume", "checkpoint_dir", "save_every", "eval_every", "device",
                                              "kl_chunk", "gradient_checkpointing", "max_memory_gb")

    mode: Mode = option("sp", "sp: all trainable layers at once, full loss | mp: each layer alone on the teacher's "
                        "activations.", choices=get_args(Mode))
    data: str = option("wikitext2", "Training text: wikitext2, c4, or a local .txt/.jsonl file.")
    eval_data: str | None = option(None, "Held-out text; default: the last --eval-windows windows of --data.")
    eval_windows: int = option(16, "Held-out windows for KL / perplexity.", bounds=">= 1")
    steps: int | None = option(None, "Optimizer steps (overrides --tokens).", bounds=">= 1")
    tokens: int = option(20_000_000, "Training tokens (all processes), e.g. 20M; ignored with --steps.",
                         parse=count, show=_short_count, bounds=">= 1")
    seqlen: int = option(2048, "Tokens per window.", bounds=">= 2")
    batch_size: int = option(4, "Windows per micro-batch and process.", bounds=">= 1")
    grad_accum: int = option(1, "Micro-batches per optimizer step.", bounds=">= 1")
    lr: float = option(1e-4, "Peak learning rate (AdamW).", bounds="> 0")
    warmup: float = option(0.03, "Share of steps in linear warmup, then cosine decay.", bounds="[0, 1)")
    weight_decay: float = option(0.0, "AdamW weight decay.", bounds=">= 0")
    max_grad_norm: float = option(1.0, "Gradient-norm clip: per trainable layer in mp (layers stay independent), "
                                  "global in sp.", bounds="> 0")
    temperature: float = option(1.0, "Softmax temperature of every KL term.", bounds="> 0")
    layer_loss: LayerLoss = option("mse", "mse (DECISION, BENCHMARKS.md \"Which layer loss\"): normalized MSE between "
                                          "the student's and the teacher's hidden states | kl (OFFICIAL, the paper's "
                                          "hierarchical KL): through final norm + LM head at every point.",
                                   choices=get_args(LayerLoss))
    layer_weight: float = option(1.0, "lambda: weight of the summed layer losses (sp).", bounds=">= 0")
    train: str = option("merged", "merged (layers standing for > 1 original layer) | all | last:K (the last K "
                        "decoder layers, K >= 1; reverse-order pruning's recovery) | last:K,head (and the LM head; "
                        "sp only, no --shard; a head tied to the input embedding trains as that one matrix, so the "
                        "embedding moves too; with --lora-r the head trains in full, the adapters go on the layers).")
    lora_r: int = option(0, "LoRA rank: train only rank-r adapters on the trainable layers' projections, "
                         "merged into the weights on save (0: full fine-tuning).", bounds=">= 0")
    lora_alpha: float | None = option(None, "LoRA scale: update = alpha / r * B A (default 2r).", bounds="> 0")
    lora_dropout: float = option(0.0, "Dropout on the LoRA adapters' input.", bounds="[0, 1)")
    kl_chunk: int = option(2048, "Tokens per KL chunk (full-vocab logits of one chunk at a time).", bounds=">= 1")
    gradient_checkpointing: bool = option(False, "Recompute layer activations in backward (sp memory).")
    shard: bool = option(False, "Split every decoder layer of the student (weights, gradients, AdamW state) and of "
                         "the teacher over the processes (FSDP2); needs >= 2 processes (torchrun).")
    max_memory_gb: float | None = option(None, "Refuse, before loading, a run whose memory plan (weights, "
                                         "gradients + AdamW and a step's activations per process, logged at "
                                         "start) exceeds this.",
                                         bounds="> 0")
    device: str = option("auto", "cuda | cpu | auto.")
    dtype: Precision = option("auto", "Compute precision: auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32.",
                              choices=get_args(Precision))
    save_every: int = option(0, "Checkpoint into OUT/checkpoints every N steps (0: never).", bounds=">= 0")
    eval_every: int = option(0, "Held-out KL / perplexity every N steps (always at start and end).", bounds=">= 0")
    checkpoint_dir: str | None = option(None, "Where checkpoints go (the CLI: OUT/checkpoints).", cli=False)
    resume: bool = option(False, "Continue from the newest complete OUT/checkpoints/step_N, with the settings it "
                          "was made with.")
    seed: int = option(0, "Data order, LoRA init and dropout.", bounds=SEEDS)

    def validate(self) -> None:
        """Refuse bad settings with one-line errors before any weight or text loads; reads only."""
        check_choices(self)
        check_ranges(self)
        if (self.save_every or self.resume) and not self.checkpoint_dir:
            raise ComeError("checkpoints (--save-every, --resume) need a checkpoint directory")
        if self.lora_r == 0 and (self.lora_alpha is not None or self.lora_dropout):  # they need a rank
            raise ComeError("--lora-alpha and --lora-dropout need --lora-r > 0")
        if self.shard and self.lora_r:
            raise ComeError("--shard does not train LoRA adapters: drop --lora-r (or --shard)")
        head = train_set(self.train).head
        if head and self.mode == "mp":
            raise ComeError(f"--train {self.train} needs --mode sp: in mp each layer trains alone on its teacher "
                            "layer's output, which gives the LM head no target; use --mode sp, or drop ',head'")
        if head and self.shard:
            raise ComeError(f"--train {self.train} with --shard: sharded runs train decoder layers only (the LM "
                            "head stays whole in every process); drop ',head', or --shard")

    def bf16(self, device_type: str) -> bool:
        """Whether the run computes under bf16 autocast on a device of this type."""
        return self.dtype == "bf16" or (self.dtype == "auto" and device_type == "cuda")

    def check_model(self, config) -> None:
        """The training windows fit the models' context (on a config, before weights load)."""
        check_context(config, self.seqlen)

    def check_student(self, config) -> None:
        """--train last:K leaves at least one of the student's layers frozen (on its config, before weights load)."""
        spec, n = train_set(self.train), config.num_hidden_layers
        if spec.last >= n:
            raise ComeError(f"--train {self.train} asks for the last {spec.last} of the student's {n} decoder layers: "
                            f"K must be below {n} (use --train all to train every layer)")

    def total_steps(self, processes: int) -> int:
        """Optimizer steps: `steps`, or enough to see `tokens` across `processes` data-parallel workers."""
        return self.steps or math.ceil(self.tokens / (self.batch_size * self.grad_accum * processes * self.seqlen))

    def to_dict(self) -> dict:
        return asdict(self)

    def run_settings(self) -> dict:
        """The settings that define the run (all but RUN_CONTROL; --tokens only without --steps),
        text files by absolute path: what a checkpoint records and --resume must match."""
        out = {k: v for k, v in asdict(self).items() if k not in self.RUN_CONTROL}
        if self.steps is not None:
            del out["tokens"]
        for key in ("data", "eval_data"):
            if out[key] is not None and os.path.isfile(out[key]):
                out[key] = os.path.abspath(out[key])
        return out
