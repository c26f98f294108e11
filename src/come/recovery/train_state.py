"""What a distillation run keeps on disk: the resumable training state in OUT/checkpoints/step_N,
and the final result (checkpoint + Plan + distill_log.json) written atomically.

A checkpoint is written into a hidden sibling, checkpoints/.step_N.tmp-*, and renamed to
step_N once whole; its last file, come_checkpoint.json, records the step, the settings that
define the run (DistillConfig.run_settings, the compute precision, the process count) and the
files it holds. --resume takes the newest complete step_N, says which ones it skipped
(no record, a file missing, not step_<number>), and refuses settings that differ from the
record's, naming each one, before any weight loads (resume_point, which the CLI calls first).
A temporary directory left by a killed run is removed by the next run that uses the folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from torch import nn

from ..errors import ComeError
from ..models.outputs import CHECKPOINTS
from ..settings.plan import Plan

RECORD = "come_checkpoint.json"  # written last: a step_N without it is incomplete
_STEP = re.compile(r"step_(\d+)")
_TEMP = ".step_*.tmp-*"

_log = logging.getLogger("come")
_warned: set[tuple[Path, str]] = set()


class TrainState:
    """What a checkpoint holds: the trainable layers, optimizer, schedule, step and log.
    Registered with accelerate, so save_state / load_state carry it (with the RNG states)."""

    def __init__(self, layers: dict[int, nn.Module], optimizer, scheduler, log: dict, run: dict | None = None,
                 shards=None):
        self.layers, self.optimizer, self.scheduler, self.log, self.step = layers, optimizer, scheduler, log, 0
        self.run = run or {}  # what defines the run ("settings", "precision", "processes"): each RECORD holds it
        self.shards = shards  # with --shard, a sharding.ShardedCheckpoint: the layers and optimizer go through DCP

    def state_dict(self) -> dict:
        if self.shards is not None:
            return {"step": self.step, "log": self.log, "scheduler": self.scheduler.state_dict()}
        return {"step": self.step, "log": self.log, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "layers": {k: layer.state_dict() for k, layer in self.layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        try:  # other layers or tensors (--train, --lora-r changed) would fail deep inside torch
            if self.shards is None:
                for k, layer in self.layers.items():
                    layer.load_state_dict(state["layers"][k])
                self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError):
            raise ComeError("the checkpoint was written with another --train or --lora-r: "
                            "resume with the same settings, or start over without --resume") from None
        self.step, self.log = state["step"], state["log"]
        self.scheduler.load_state_dict(state["scheduler"])


def _inspect(directory: str | Path) -> tuple[list[tuple[Path, dict]], list[str]]:
    """(complete checkpoints as (path, record), oldest first; why each other step_* was skipped)."""
    complete, skipped = [], []
    for path in Path(directory).glob("step_*"):
        name = _STEP.fullmatch(path.name)
        try:
            record = json.loads((path / RECORD).read_text()) if name else None
        except (OSError, ValueError):
            record = None
        if not name:
            skipped.append(f"{path.name} (not a step_<number> checkpoint)")
        elif not (path / RECORD).exists():
            skipped.append(f"{path.name} (incomplete: no {RECORD})")
        elif not isinstance(record, dict) or not record.get("files"):
            skipped.append(f"{path.name} (unreadable {RECORD})")
        elif record.get("step") != int(name[1]):
            skipped.append(f"{path.name} (its {RECORD} is step {record.get('step')}'s)")
        elif missing := [f for f in record["files"] if not (path / f).is_file()]:
            skipped.append(f"{path.name} (incomplete: {missing[0]} missing)")
        else:
            complete.append((path, record))
    return sorted(complete, key=lambda c: c[1]["step"]), sorted(skipped)


def _newest(directory: str | Path) -> tuple[Path, dict]:
    complete, skipped = _inspect(directory)
    if not complete:
        skipped_ = f" (skipped {', '.join(skipped)})" if skipped else ""
        raise ComeError(f"--resume: no complete checkpoint in {directory}{skipped_}; run without --resume")
    for reason in skipped:
        if (Path(directory), reason) not in _warned:  # once, though the CLI looks before distill() does
            _warned.add((Path(directory), reason))
            _log.warning("--resume: skipping %s", Path(directory) / reason)
    return complete[-1]


def latest_checkpoint(directory: str | Path) -> Path:
    """The newest complete step_N in `directory`; incomplete or misnamed ones are skipped with a warning."""
    return _newest(directory)[0]


def last_complete(directory: str | Path) -> Path | None:
    """The newest complete step_N in `directory`, None when there is none (no warning: nothing is resumed)."""
    complete, _ = _inspect(directory)
    return complete[-1][0] if complete else None


def _show(value) -> str:
    return "unset" if value is None else str(value)


def resume_point(directory: str | Path, cfg, **facts) -> Path:
    """The checkpoint --resume continues from: the newest complete one, made with the same
    run-defining settings as `cfg` (DistillConfig; its RUN_CONTROL fields may change) and,
    where given, the same `facts` ("precision", "processes"). A difference is a one-line
    ComeError naming each option with its recorded and its new value. Reads no weights."""
    path, record = _newest(directory)
    old, new = record.get("settings", {}), cfg.run_settings()
    changes = [f"--{k.replace('_', '-')} {_show(old.get(k))} (now {_show(new.get(k))})"
               for k in [*new, *(k for k in old if k not in new)] if old.get(k) != new.get(k)]
    changes += [f"{k} {_show(record.get(k))} (now {_show(v)})" for k, v in facts.items()
                if k in record and record[k] != v]
    if changes:
        raise ComeError(f"--resume: {path} was made with other settings: {'; '.join(changes)}; "
                        "resume with the settings it was made with, or start over without --resume")
    return path


def remove_stale(directory: str | Path) -> None:
    """Remove the temporary checkpoints a killed run left (never read: a checkpoint is whole or absent)."""
    for tmp in Path(directory).glob(_TEMP):
        shutil.rmtree(tmp, ignore_errors=True)
        _log.info("removed %s: an unfinished checkpoint left by an interrupted run", tmp)


def restore(accelerator, state: TrainState, cfg) -> None:
    """Clear what a killed run left unfinished in cfg.checkpoint_dir and, with cfg.resume, load
    the newest complete checkpoint made with the same run (the RNG states with it)."""
    path = None
    if cfg.resume:  # checked first: a refused resume changes nothing
        facts = {k: state.run[k] for k in ("precision", "processes") if k in state.run}
        path = resume_point(cfg.checkpoint_dir, cfg, **facts)
    if cfg.checkpoint_dir and accelerator.is_main_process:
        remove_stale(cfg.checkpoint_dir)
    if path is None:
        return
    accelerator.load_state(str(path))
    if state.shards is not None:
        state.shards.load(path)
    state.log["resumed_from"] = state.step
    _log.info("resumed from %s (step %d of %d)", path, state.step, state.log["steps"])


def write_checkpoint(accelerator, state: TrainState, directory: str) -> None:
    """Write checkpoint step_N atomically (into a temporary sibling, its RECORD last, then
    renamed) and keep only it: each one holds the whole training state."""
    directory, name = Path(directory), f"step_{state.step}"
    tmp = None
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=directory)
    if accelerator.num_processes > 1:  # every process writes its RNG state into the same folder
        from accelerate.utils import broadcast_object_list

        tmp = broadcast_object_list([tmp])[0]
    tmp = Path(tmp)
    try:
        accelerator.save_state(str(tmp))
        if state.shards is not None:  # each process writes its own shards
            state.shards.save(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = sorted(p.name for p in tmp.iterdir())
            record = {"step": state.step, **state.run, "files": files}
            (tmp / RECORD).write_text(json.dumps(record, indent=1, allow_nan=False))  # strict JSON
            if (directory / name).exists():  # an incomplete one (a complete one would be this very state)
                shutil.rmtree(directory / name)
            os.replace(tmp, directory / name)
            for old in directory.glob("step_*"):
                if old.name != name and _STEP.fullmatch(old.name):
                    shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()


def write_output(student: nn.Module, tokenizer, plan: Plan, log_dict: dict, out: str | Path) -> Path:
    """Write the distilled checkpoint + Plan + distill_log.json to `out` atomically.

    `out` may already hold the run's checkpoints/ (carried into the result) and, with
    --overwrite or --resume, an older come output (replaced; the CLI checked `out` before the
    run): save_checkpoint assembles the result in a temporary sibling and swaps it in with
    SIGINT / SIGTERM held."""
    from ..models.checkpoint import save_checkpoint

    return save_checkpoint(student, tokenizer, plan, out, overwrite=True, distill_log=log_dict, keep=(CHECKPOINTS,))
