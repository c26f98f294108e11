#!/usr/bin/env python3
"""Training tokens/s of `come.distill` (modes sp and mp) vs plain causal-LM fine-tuning of the
same student (next-token cross-entropy; same trainable layers, batch, seqlen, AdamW, device
and precision), all measured in one run: median step time after warm-up steps, the three
runs interleaved --repeats times (a slow spell of a shared machine hits every row alike),
each row's fastest repeat reported, every repeat and the load average printed below, and
tokens per CPU-second of this process (what a loaded CPU's time-slicing does not inflate;
with --threads 1 it is the work done).

    python benchmarks/distill_speed.py --model ~/.cache/come/smollm2-135m --steps 2 --warmup 1 --seqlen 128 \\
        --batch-size 2 --threads 1 --layer-loss kl          # BENCHMARKS.md; and --layer-loss mse
    python benchmarks/distill_speed.py --model DIR --device cuda --steps 20 --seqlen 2048 --batch-size 4
    python benchmarks/distill_speed.py --quick
    python benchmarks/distill_speed.py --model DIR --steps 1 --profile   # where one step's time goes

The student is the teacher compressed by `come.compress` (a small random calibration and
--refit none: the student's shape, all that speed depends on, is the same with the refit),
or --student, a compression made beforehand. Targets (issue 21): distill sp >= 0.6x and
mp >= 0.8x plain fine-tuning tokens/s. On CUDA (bf16 autocast) it also prints the model
FLOPs utilisation against --peak-tflops (989: H100 SXM dense bf16). --profile runs
torch.profiler over the first step after warm-up of each run and prints its operators by
self time, and that time split into LM-head matmuls, other full-vocabulary operators and
the rest.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from come import CompressConfig, DistillConfig, compress
from come.models.adapters import get_adapter
from come.recovery.distill import distill
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
def step_times(device: str, profile_after: int | None = None):
    """(wall, process CPU) timestamps of every optimizer step taken inside the block (torch's
    global post-step hook), so distill's own loop is timed without touching it. With
    `profile_after`, the step after that many steps runs under torch.profiler; the block
    yields (stamps, profiles)."""
    stamps: list[tuple[float, float]] = []
    profiles: list = []

    def tick(*_):
        sync(device)
        stamps.append((time.perf_counter(), time.process_time()))
        if profile_after is not None and len(stamps) == profile_after + 1:
            profiles[-1].stop()
        if profile_after is not None and len(stamps) == profile_after:
            profiles.append(torch.profiler.profile(activities=_activities(device), record_shapes=True))
            profiles[-1].start()

    handle = register_optimizer_step_post_hook(tick)
    try:
        yield stamps, profiles
    finally:
        handle.remove()


def _activities(device: str) -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    return acts + [torch.profiler.ProfilerActivity.CUDA] if device.startswith("cuda") else acts


def median_step(stamps: list[tuple[float, float]], warmup: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds between consecutive optimizer steps, the first `warmup` steps excluded."""
    gaps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])][warmup - 1:]
    if not gaps:
        raise SystemExit("no timed step: raise --steps")
    return statistics.median(g[0] for g in gaps), statistics.median(g[1] for g in gaps)


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


def where_the_time_goes(prof, vocab: int, device: str) -> str:
    """One profiled step's self time split three ways: matrix products with a full-vocabulary
    operand (the LM heads), other operators on full-vocabulary tensors (softmax, KL), the rest."""
    cuda = device.startswith("cuda")
    parts = {"head": [0.0, 0], "vocab": [0.0, 0], "rest": [0.0, 0]}
    for e in prof.key_averages(group_by_input_shape=True):
        wide = any(vocab in shape for shape in e.input_shapes if isinstance(shape, list))
        part = parts["head" if wide and e.key in ("aten::mm", "aten::addmm") else "vocab" if wide else "rest"]
        part[0] += (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6
        part[1] += e.count
    total = sum(p[0] for p in parts.values())
    (head, n_head), (wide, _), (rest, _) = parts.values()
    return (f"{total:.2f} s of operator self time: LM-head matrix products {head:.2f} s ({head / total:.0%}, {n_head} "
            f"calls), other full-vocabulary operators {wide:.2f} s ({wide / total:.0%}), the rest {rest:.2f} s "
            f"({rest / total:.0%})")


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
    ap.add_argument("--student", help="a `come compress` output of the model to time instead (skips the compression)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (>= 1)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--layer-loss", choices=["kl", "mse"], default="kl", help="come distill --layer-loss")
    ap.add_argument("--repeats", type=int, default=1, help="run the 3 rows N times, interleaved; report the fastest")
    ap.add_argument("--profile", type=int, nargs="?", const=25, default=0, metavar="ROWS",
                    help="profile the first timed step of each run and print its top ROWS operators (default 25); "
                    "the profiler slows that step, so time with another run")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; 1 makes CPU time = work)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device peak dense bf16 TFLOP/s (MFU on CUDA)")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.warmup, a.seqlen, a.batch_size = 4, 2, 64, 2
        a.threads = 1  # tiny matmuls: on a loaded CPU, spinning intra-op threads make steps 50x noisier
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.warmup < 1 or a.repeats < 1:
        raise SystemExit("--warmup must be >= 1 (the first step's time is not measurable), --repeats >= 1")
    teacher, name = load(a)
    vocab = teacher.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, vocab, (8, min(a.seqlen, 128)), generator=gen)
    if a.student:
        from come.models.checkpoint import load_model
        from come.settings.plan import load_plan

        student, plan = load_model(a.student)[0], load_plan(a.student)
    else:
        ccfg = CompressConfig(sparsity=a.sparsity, device=a.device, refit="none")
        student, plan = compress(copy.deepcopy(teacher), None, ccfg, calib=calib)
    trainable = [k for k, g in enumerate(plan.groups) if len(g) > 1]  # distill's default --train merged
    n_steps, bf16 = a.warmup + a.steps, a.device == "cuda"
    train = torch.randint(0, vocab, (n_steps * a.batch_size, a.seqlen), generator=gen)
    held_out = torch.randint(0, vocab, (a.batch_size, a.seqlen), generator=gen)

    runs = ("plain fine-tuning", "distill sp", "distill mp")
    tok_s: dict[str, list[float]] = {run: [] for run in runs}
    tok_cpu_s: dict[str, list[float]] = {run: [] for run in runs}  # per CPU-second of this process
    load_avg = [os.getloadavg()[0]]
    for _ in range(a.repeats):
        for run in runs:
            model = copy.deepcopy(student)  # outside the timer
            with step_times(a.device, a.warmup if a.profile else None) as (stamps, profiles):
                if run == "plain fine-tuning":
                    finetune(model, trainable, train, n_steps, a.batch_size, DistillConfig.lr, a.device, bf16)
                else:
                    cfg = DistillConfig(mode=run.split()[1], steps=n_steps, seqlen=a.seqlen, batch_size=a.batch_size,
                                        device=a.device, dtype="bf16" if bf16 else "fp32", eval_windows=a.batch_size,
                                        layer_loss=a.layer_loss)
                    distill(teacher, model, None, plan, cfg, windows=(train, held_out))
            wall, cpu = median_step(stamps, a.warmup)
            tok_s[run].append(a.batch_size * a.seqlen / wall)
            tok_cpu_s[run].append(a.batch_size * a.seqlen / cpu)
            for prof in profiles:
                sort = "self_cuda_time_total" if a.device == "cuda" else "self_cpu_time_total"
                print(f"\n{run}: one step under torch.profiler, operators (by input shapes) by self time\n")
                print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=a.profile))
                print(f"{run}: {where_the_time_goes(prof, vocab, a.device)}")
            del model
        load_avg.append(os.getloadavg()[0])
    flops = flops_per_token(teacher, student, trainable, a.layer_loss)

    print(f"\n{name}: {plan.num_layers_before} -> {plan.num_layers_after} layers (sparsity {a.sparsity}), trainable "
          f"student layers {trainable}; {a.device}, {'bf16 autocast' if bf16 else 'fp32'}, batch {a.batch_size} x "
          f"seqlen {a.seqlen}, AdamW, --layer-loss {a.layer_loss}; median of {a.steps} steps after {a.warmup} warm-up, "
          f"fastest of {a.repeats} interleaved repeats\n")
    print("| run | tokens/s | x plain fine-tuning (target: sp >= 0.6, mp >= 0.8) | model GFLOP/token | MFU (bf16) |")
    print("|---|---|---|---|---|")
    best = {run: max(values) for run, values in tok_s.items()}
    for run in runs:
        mfu = f"{flops[run] * best[run] / (a.peak_tflops * 1e12):.1%}" if a.device == "cuda" else "n/a (cpu)"
        print(f"| {run} | {best[run]:.0f} | {best[run] / best[runs[0]]:.2f} | {flops[run] / 1e9:.3f} | {mfu} |")
    every = "; ".join(f"{run} {', '.join(f'{v:.0f}' for v in tok_s[run])}" for run in runs)
    print(f"\nevery repeat, tokens/s: {every}")
    fastest_cpu = {run: max(values) for run, values in tok_cpu_s.items()}
    print("tokens per CPU-second of this process (time-slicing by other processes does not count), fastest: "
          + "; ".join(f"{run} {fastest_cpu[run]:.1f} ({fastest_cpu[run] / fastest_cpu[runs[0]]:.2f}x)" for run in runs))
    print(f"1-minute load average before and after each repeat: {', '.join(f'{v:.2f}' for v in load_avg)} "
          f"({os.cpu_count()} CPUs)")
    print(f"\nGFLOP/token = {FLOPS}.")
    if a.device == "cuda":
        print(f"MFU = GFLOP/token x tokens/s / {a.peak_tflops:g} TFLOP/s (--peak-tflops).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
