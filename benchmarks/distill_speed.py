#!/usr/bin/env python3
"""Training tokens/s of `come.distill` (modes sp and mp) vs plain causal-LM fine-tuning of the
same student (next-token cross-entropy; same trainable layers, batch, seqlen, AdamW, device
and precision), all measured in one run: median step time after warm-up steps.

    python benchmarks/distill_speed.py --model ~/.cache/come/smollm2-135m --steps 6 --seqlen 256 --batch-size 2
    python benchmarks/distill_speed.py --model DIR --device cuda --steps 20 --seqlen 2048 --batch-size 4
    python benchmarks/distill_speed.py --quick

The student is the teacher compressed by `come.compress` (a small random calibration and
--refit none: the student's shape, all that speed depends on, is the same with the refit).
Target (issue): distill >= 0.6x plain fine-tuning tokens/s. On CUDA (bf16 autocast) it
also prints the model FLOPs utilisation against --peak-tflops (989: H100 SXM dense bf16).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from come import CompressConfig, DistillConfig, compress, distill
from come.adapters import get_adapter
from _common import add_model_args, load, sync

FLOPS = ("model FLOPs per token, matmul weights only (2 per weight forward, 2 more for the activation gradient "
         "and 2 for the weight gradient where they are needed; attention scores and the KL chunks' recomputation "
         "not counted): plain = 2·Ls + 2·P + 2·T + 4·H; sp = 2·Lt + 2·Ls + 2·P + 2·T + 6·H·(n_s - k0); "
         "mp = 2·Lt + 6·T + 6·H·n_train, with Lt / Ls the teacher / student decoder weights, T the trainable ones, "
         "P the student's from the first trainable layer k0 on (gradients flow through them), H the LM head's, "
         "n_s the student's layers, n_train the trainable ones (sp: a KL through both heads at every layer "
         "after k0 and at the end; mp: one per trainable layer; with --layer-loss mse the head only at sp's end: "
         "6·H instead of 6·H·(n_s - k0), and none in mp)")


@contextmanager
def step_times(device: str):
    """Timestamps of every optimizer step taken inside the block (torch's global post-step
    hook), so distill's own loop is timed without touching it."""
    stamps: list[float] = []

    def tick(*_):
        sync(device)
        stamps.append(time.perf_counter())

    handle = register_optimizer_step_post_hook(tick)
    try:
        yield stamps
    finally:
        handle.remove()


def median_step(stamps: list[float], warmup: int) -> float:
    """Median seconds between consecutive optimizer steps, the first `warmup` steps excluded."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][warmup - 1:]
    if not gaps:
        raise SystemExit("no timed step: raise --steps")
    return statistics.median(gaps)


def finetune(student: nn.Module, trainable: list[int], windows: torch.Tensor, steps: int, batch_size: int, lr: float,
             device: str, bf16: bool) -> None:
    """Plain causal-LM fine-tuning of the layers distill trains, set up as distill sets them up
    (frozen rest, trainable layers in fp32, bf16 autocast or fp32, AdamW, global clip at 1)."""
    student.to(device, None if bf16 else torch.float32).requires_grad_(False).train()
    layers = get_adapter(student.config).decoder_layers(student)
    params = [p for k in trainable for p in layers[k].float().requires_grad_(True).parameters()]
    opt = torch.optim.AdamW(params, lr=lr)
    for step in range(steps):
        ids = windows[step * batch_size:(step + 1) * batch_size].to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = student(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # distill reads its loss every step too


def flops_per_token(teacher: nn.Module, student: nn.Module, trainable: list[int], layer_loss: str = "kl") -> dict[str, int]:
    """Each run's model FLOPs per token, counted as FLOPS says (with --layer-loss mse only
    sp's final logits go through the LM head)."""
    adapter = get_adapter(student.config)

    def weights(layers) -> int:
        return sum(p.numel() for layer in layers for p in layer.parameters())

    s_layers = adapter.decoder_layers(student)
    lt, ls = weights(adapter.decoder_layers(teacher)), weights(s_layers)
    t, p = weights(s_layers[k] for k in trainable), weights(s_layers[trainable[0]:])
    h = adapter.lm_head(student).weight.numel()
    kl = layer_loss == "kl"
    return {"plain fine-tuning": 2 * ls + 2 * p + 2 * t + 4 * h,
            "distill sp": 2 * lt + 2 * ls + 2 * p + 2 * t + 6 * h * ((len(s_layers) - trainable[0]) if kl else 1),
            "distill mp": 2 * lt + 6 * t + 6 * h * len(trainable) * kl}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (>= 1)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--layer-loss", choices=["kl", "mse"], default="kl", help="come distill --layer-loss")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device peak dense bf16 TFLOP/s (MFU on CUDA)")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.warmup, a.seqlen, a.batch_size = 4, 2, 64, 2
        torch.set_num_threads(1)  # tiny matmuls: on a loaded CPU, spinning intra-op threads make steps 50x noisier
    if a.warmup < 1:
        raise SystemExit("--warmup must be >= 1 (the first step's time is not measurable)")
    teacher, name = load(a)
    vocab = teacher.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, vocab, (8, min(a.seqlen, 128)), generator=gen)
    ccfg = CompressConfig(sparsity=a.sparsity, device=a.device, refit="none")
    student, plan = compress(copy.deepcopy(teacher), None, ccfg, calib=calib)
    trainable = [k for k, g in enumerate(plan.groups) if len(g) > 1]  # distill's default --train merged
    n_steps, bf16 = a.warmup + a.steps, a.device == "cuda"
    train = torch.randint(0, vocab, (n_steps * a.batch_size, a.seqlen), generator=gen)
    held_out = torch.randint(0, vocab, (a.batch_size, a.seqlen), generator=gen)

    rows = []
    for run in ("plain fine-tuning", "distill sp", "distill mp"):
        model = copy.deepcopy(student)
        with step_times(a.device) as stamps:
            if run == "plain fine-tuning":
                finetune(model, trainable, train, n_steps, a.batch_size, DistillConfig.lr, a.device, bf16)
            else:
                cfg = DistillConfig(mode=run.split()[1], steps=n_steps, seqlen=a.seqlen, batch_size=a.batch_size,
                                    device=a.device, dtype="bf16" if bf16 else "fp32", eval_windows=a.batch_size,
                                    layer_loss=a.layer_loss)
                distill(teacher, model, None, plan, cfg, windows=(train, held_out))
        rows.append((run, a.batch_size * a.seqlen / median_step(stamps, a.warmup)))
        del model
    flops = flops_per_token(teacher, student, trainable, a.layer_loss)

    print(f"\n{name}: {plan.num_layers_before} -> {plan.num_layers_after} layers (sparsity {a.sparsity}), trainable "
          f"student layers {trainable}; {a.device}, {'bf16 autocast' if bf16 else 'fp32'}, batch {a.batch_size} x "
          f"seqlen {a.seqlen}, AdamW, --layer-loss {a.layer_loss}; median of {a.steps} steps after {a.warmup} warm-up\n")
    print("| run | tokens/s | x plain fine-tuning (target >= 0.6) | model GFLOP/token | MFU (bf16) |")
    print("|---|---|---|---|---|")
    for run, tok_s in rows:
        mfu = f"{flops[run] * tok_s / (a.peak_tflops * 1e12):.1%}" if a.device == "cuda" else "n/a (cpu)"
        print(f"| {run} | {tok_s:.0f} | {tok_s / rows[0][1]:.2f} | {flops[run] / 1e9:.3f} | {mfu} |")
    print(f"\nGFLOP/token = {FLOPS}.")
    if a.device == "cuda":
        print(f"MFU = GFLOP/token x tokens/s / {a.peak_tflops:g} TFLOP/s (--peak-tflops).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
