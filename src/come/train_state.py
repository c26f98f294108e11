"""What a distillation run keeps on disk: the resumable training state in OUT/checkpoints/step_N,
and the final result (checkpoint + Plan + distill_log.json) written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import nn

from .errors import ComeError
from .plan import Plan

LOG_FILE = "distill_log.json"
CHECKPOINTS = "checkpoints"


class TrainState:
    """What a checkpoint holds: the trainable layers, optimizer, schedule, step and log.
    Registered with accelerate, so save_state / load_state carry it (with the RNG states)."""

    def __init__(self, layers: dict[int, nn.Module], optimizer, scheduler, log: dict):
        self.layers, self.optimizer, self.scheduler, self.log, self.step = layers, optimizer, scheduler, log, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "log": self.log, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "layers": {k: layer.state_dict() for k, layer in self.layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        try:  # other layers or tensors (--train, --lora-r changed) would fail deep inside torch
            for k, layer in self.layers.items():
                layer.load_state_dict(state["layers"][k])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError):
            raise ComeError("the checkpoint was written with another --train or --lora-r: "
                            "resume with the same settings, or start over without --resume") from None
        self.step, self.log = state["step"], state["log"]
        self.scheduler.load_state_dict(state["scheduler"])


def latest_checkpoint(directory: str | Path) -> Path:
    """The highest step_N in `directory` (the CLI checks it exists before loading any weights)."""
    found = sorted(Path(directory).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    if not found:
        raise ComeError(f"--resume: no checkpoint in {directory}; run without --resume")
    return found[-1]


def write_checkpoint(accelerator, state: TrainState, directory: str) -> None:
    """Write checkpoint step_N and keep only it (each one holds the whole training state)."""
    path = Path(directory) / f"step_{state.step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        for old in Path(directory).glob("step_*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)


def write_output(student: nn.Module, tokenizer, plan: Plan, log_dict: dict, out: str | Path) -> Path:
    """Write the distilled checkpoint + Plan + distill_log.json to `out` atomically.

    `out` may already hold the run's checkpoints/ (kept, moved into the result) and, with
    --overwrite, an older result (replaced): everything is assembled in a sibling first."""
    from .checkpoint import save_checkpoint

    out = Path(out)
    staging = save_checkpoint(student, tokenizer, plan, out.with_name(f".{out.name}.distilled"), overwrite=True)
    (staging / LOG_FILE).write_text(json.dumps(log_dict, indent=1))
    if (out / CHECKPOINTS).is_dir():
        os.replace(out / CHECKPOINTS, staging / CHECKPOINTS)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out
