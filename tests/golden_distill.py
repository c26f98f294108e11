"""Golden distillation runs: the log (losses, learning rates, held-out KL / perplexity;
no timings) and a hash of the student's output weights of `come.distill` on a tiny
compressed LLaMA in the branches a refactor can break: sp, mp, LoRA, the MSE layer loss
with every layer trained, and a run resumed from its checkpoint. Recorded BEFORE distill.py
was split into modules, so the split code can be held to them byte for byte
(tests/test_golden_distill.py). The "mse" run was re-recorded once, on purpose, when
normalized_mse became a mean of per-window terms (the other runs stayed byte-identical). The
settings of every run gained two pairs, ["shard", false] and ["max_memory_gb", null], when
--shard and --max-memory-gb were added (issue 39); nothing else in the file changed.

    python tests/golden_distill.py   # rewrite tests/golden/distill.json from this checkout

On another CPU instruction set / torch build the test compares every number to 1e-4 instead.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch

from golden_runs import GOLDEN, machine, tiny_calib, weights_record
from conftest import corpus, make_tokenizer, tiny_model

FILE = GOLDEN / "distill.json"
BASE = dict(seqlen=32, batch_size=4, eval_windows=8, device="cpu", warmup=0.1, lr=3e-3, steps=3,
            layer_loss="kl")  # recorded when kl was the default
RUNS: dict[str, dict] = {
    "sp": {"mode": "sp", "grad_accum": 2, "eval_every": 2},
    "mp": {"mode": "mp"},
    "lora": {"mode": "sp", "lora_r": 2, "lora_dropout": 0.1, "lr": 1e-2},
    "mse": {"mode": "sp", "layer_loss": "mse", "train": "all", "temperature": 2.0, "kl_chunk": 48},
}
RESUME = {"mode": "mp", "steps": 4, "save_every": 2}  # run whole, then resume from its step-2 checkpoint
TIMING_KEYS = {"train_time_s", "tokens_per_s"}
PATH_KEYS = ("data", "checkpoint_dir")  # temporary paths: recorded relative to the run's folder


def log_record(log: dict, root: Path) -> dict:
    """The log without timings; settings as ordered pairs (to_dict's field order is part of
    the log file) with paths made relative to `root`."""
    settings = [[k, str(Path(v).relative_to(root)) if k in PATH_KEYS and v is not None else v]
                for k, v in log["settings"].items()]
    return {**{k: v for k, v in log.items() if k not in TIMING_KEYS}, "settings": settings}


def student_pair(tokenizer):
    """(teacher, compressed student, plan): 6 layers -> 4, the authors' BI split pinned."""
    from come import CompressConfig, compress

    teacher = tiny_model("llama")
    cfg = CompressConfig(sparsity=0.3, device="cpu", split="bi")
    student, plan = compress(copy.deepcopy(teacher), tokenizer, cfg, calib=tiny_calib(tokenizer))
    return teacher, student, plan


def _distill(pair, tokenizer, root: Path, overrides: dict) -> dict:
    from come import DistillConfig, distill

    teacher, student, plan = pair
    torch.manual_seed(0)  # recorded when LoRA dropout drew from the global RNG; distill now seeds it (seed 0 + process 0: the same stream)
    cfg = DistillConfig(data=str(root / "train.txt"), **{**BASE, **overrides})
    out, log = distill(copy.deepcopy(teacher), copy.deepcopy(student), tokenizer, plan, cfg)
    return {"log": log_record(log, root), "weights": weights_record(out)}


def distill_records(tokenizer) -> dict:
    """Every run in RUNS, plus RESUME's whole and resumed runs, on one thread (float
    reductions then do not depend on the machine's core count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pair = student_pair(tokenizer)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "train.txt").write_text(corpus())
            out = {name: _distill(pair, tokenizer, root, overrides) for name, overrides in RUNS.items()}
            resume = {**RESUME, "checkpoint_dir": str(root / "checkpoints")}
            out["resume-whole"] = _distill(pair, tokenizer, root, resume)
            out["resume"] = _distill(pair, tokenizer, root, {**resume, "resume": True})
    finally:
        torch.set_num_threads(threads)
    return out


def main() -> None:
    GOLDEN.mkdir(exist_ok=True)
    FILE.write_text(json.dumps({"machine": machine(), "runs": distill_records(make_tokenizer())}, indent=0) + "\n")


if __name__ == "__main__":
    main()
