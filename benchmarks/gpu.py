#!/usr/bin/env python3
"""One GPU (H100 / H200), minutes a call: `come` on random-weight LLaMA-2-7B-, TinyLlama-1.1B-
and LLaMA-2-13B-shaped models in bf16, built from their configs (nothing is downloaded;
torch, transformers, accelerate and this checkout's src are all it needs: benchmarks/gpu.sh
puts src on the path). --rows picks what runs, in the order given. Minutes on one H100,
estimated from the H200's 2026-12-04 run (228 s for the default; the 7B compressed in 90 s
there, and its instrumented run took 126 s), not measured:

    llama-2-7b   the 7B shape's rows below                                           ~2.5-3
    llama-1.1b   the 1.1B shape's rows below                                         ~0.7
    distill      distill sp and mp / plain fine-tuning on the 1.1B shape             ~0.8
    profile      a compress of the 7B with every come function and every             ~2.5-3
                 host<->device copy timed (gpu_peak_phase.py, a child process):
                 the top --top phases by own seconds, with their calls and peaks
    streamed     a LLaMA-2-13B shape written to disk in bf16 (26 GB, under           ~5 (--nsamples 8),
                 --scratch: streamed.py make), compressed with its weights mapped    ~7 (16 x 2048)
                 from the files and its layers visiting the GPU (streamed.py run:
                 come.compress_to, --dtype auto, in a child process), one dense
                 pass of the mapped model, the output (18 GB) reloaded; the disk's
                 speed is the unknown

The default, llama-2-7b,llama-1.1b,distill, is the 2026-12-04 run; `all` runs every row
(over 10 minutes: split it). For each shape:

- compress time (come, default settings, --sparsity) / one dense calibration pass through the
  same layer-at-a-time pipeline (embedding, then every layer once: the floor of any
  calibrated method on it);
- peak GPU memory during compress / its prediction (_common.gpu_prediction; formula printed);
- prefill and decode tokens/s of the compressed model / the dense one (KV cache, batch --batch);
and, on the 1.1B shape (the one benchmarks/distill_speed.py builds; it runs as a child
process), training tokens/s of distill sp and mp / plain fine-tuning, each with its MFU. The
streamed row: compress time / one dense pass (both the pipeline's own seconds), peak anonymous
memory and peak RSS of the compress process / the model's bytes on disk (sampled from /proc),
peak GPU memory / the memory plan's device prediction, and the output's layers after reloading
(with a forward on 8 tokens) / compress's.

It writes --json (rewritten after every row, so a run stopped early keeps what it measured)
and prints a table.

    bash benchmarks/gpu.sh                                   # the 2026-12-04 run
    bash benchmarks/gpu.sh --rows llama-2-7b,profile         # ~5.5 min
    bash benchmarks/gpu.sh --rows streamed --nsamples 8      # ~5 min; 45 GB of disk under --scratch
    bash benchmarks/gpu.sh --quick --rows all --scratch /tmp # the same code on the CPU, tiny shapes (CI)

--json PATH: the rows; beside it, PATH's stem + .profile.json and .streamed.json (the children's
own JSON) and the streamed children's logs.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from come import CompressConfig, compress
from _common import (GPU_FORMULA, LLAMA2_7B, LLAMA2_13B, LLAMA_1B, TINY_GQA, dense_pass, generation_speed,
                     gpu_prediction, model_shape, random_llama, word_text)

SHAPES = {"llama-2-7b": LLAMA2_7B, "llama-1.1b": LLAMA_1B}
# --quick: the same two roles (multi-head attention, grouped-query attention), tiny
QUICK_SHAPES = {
    "llama-2-7b": ("tiny mha", dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)),
    "llama-1.1b": ("tiny gqa", TINY_GQA),
}
ROWS = (*SHAPES, "distill", "profile", "streamed")
DEFAULT_ROWS = "llama-2-7b,llama-1.1b,distill"
DISTILL_RUNS = ("plain fine-tuning", "distill sp", "distill mp")
MFU = "MFU = model GFLOP/token (distill_speed.py's count, printed there) x tokens/s / --peak-tflops"


class Report:
    """The rows measured so far, written to the JSON after each one."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header, self.rows, self.t0 = path, header, [], time.perf_counter()

    def add(self, model: str, what: str, value: float | None, baseline: float, unit: str, **extra) -> None:
        self.rows.append({"model": model, "row": what, "value": value, "baseline": baseline,
                          "ratio": None if value is None else value / baseline, "unit": unit,
                          "at_s": time.perf_counter() - self.t0, **extra})
        self.path.write_text(json.dumps({**self.header, "rows": self.rows}, indent=1) + "\n")
        print(f"[{self.rows[-1]['at_s']:.0f}s] {model}: {what}: {_num(value)} / {_num(baseline)} {unit}", flush=True)


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def bench_shape(label: str, shape: dict, a: argparse.Namespace, report: Report) -> None:
    """Dense decode, the floor, compress (time, peak GPU memory), compressed decode."""
    torch.manual_seed(0)
    model = random_llama(shape, torch.bfloat16, a.device)  # initialised where it runs: seconds for a 7B on a GPU
    speed = [generation_speed(model, a.batch, a.prompt, a.new, a.repeats, a.device)]
    model.to("cpu")  # where compress keeps a model: layers visit the device one at a time
    calib = torch.randint(0, shape["vocab_size"], (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(sparsity=a.sparsity, device=a.device, batch_size=a.batch_size)
    floor = dense_pass(model, calib, cfg)
    predicted = gpu_prediction({**model_shape(model), "batch_size": a.batch_size, "seqlen": a.seqlen,
                                "refit": cfg.resolved().refit})
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _, plan = compress(model, None, cfg, calib=calib)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else None
    report.add(label, f"compress come {a.sparsity:g} / one dense calibration pass", seconds, floor, "s",
               layers=[plan.num_layers_before, plan.num_layers_after], layer_forwards=plan.layer_forwards,
               calibration=[a.nsamples, a.seqlen])
    report.add(label, "peak GPU memory in compress / predicted", None if peak is None else peak / 2**30,
               predicted["total"] / 2**30, "GiB", predicted_phases_gib={k: v / 2**30 for k, v in predicted.items()})
    model.to(a.device)
    speed.append(generation_speed(model, a.batch, a.prompt, a.new, a.repeats, a.device))
    for i, what in enumerate(("prefill", "decode")):
        report.add(label, f"{what} tokens/s compressed / dense", speed[1][i], speed[0][i], "tokens/s",
                   params=sum(p.numel() for p in model.parameters()))
    del model
    if cuda:
        torch.cuda.empty_cache()


def _script(name: str, *args: str) -> str:
    """benchmarks/NAME run as a child process (its own GPU memory); its stdout."""
    return subprocess.run([sys.executable, str(Path(__file__).with_name(name)), *args], stdout=subprocess.PIPE,
                          text=True, check=True).stdout


def bench_distill(a: argparse.Namespace, report: Report) -> None:
    """benchmarks/distill_speed.py in a child process, its table read back."""
    args = ["--quick"] if a.quick else ["--random-llama-1b", "--device", a.device, "--steps", str(a.steps),
                                        "--seqlen", str(a.seqlen), "--batch-size", str(a.batch_size)]
    out = _script("distill_speed.py", *args, "--sparsity", str(a.sparsity), "--peak-tflops", str(a.peak_tflops),
                  "--layer-loss", a.layer_loss)
    table = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                               for line in out.splitlines() if line.startswith("| "))}
    label = "distill_speed --quick" if a.quick else "llama-1.1b"
    plain = float(table[DISTILL_RUNS[0]][0])
    for run in DISTILL_RUNS:
        tok_s, gflop = float(table[run][0]), float(table[run][2])
        report.add(label, f"{run} training tokens/s / plain fine-tuning", tok_s, plain, "tokens/s",
                   layer_loss=a.layer_loss, gflop_per_token=gflop, mfu=gflop * 1e9 * tok_s / (a.peak_tflops * 1e12))


def bench_profile(a: argparse.Namespace, report: Report) -> None:
    """benchmarks/gpu_peak_phase.py in a child process: a compress of the 7B shape (--quick: the
    tiny one) at the 7B row's default calibration (16 x 2048 tokens, batch 4, whatever
    --nsamples says) with every come function and every host<->device copy timed; its top
    phases by own seconds, each over the instrumented run's wall time (the share)."""
    path = Path(a.json).with_suffix(".profile.json")
    _script("gpu_peak_phase.py", *(["--quick"] if a.quick else []), "--sparsity", str(a.sparsity),
            "--top", str(a.top), "--json", str(path))
    prof = json.loads(path.read_text())
    label = f"{QUICK_SHAPES['llama-1.1b'][0] if a.quick else 'llama-2-7b'} profile"
    for r in prof["time"]:
        report.add(label, f"{r['phase']}: own seconds / instrumented compress", r["own_s"], prof["wall_s"], "s",
                   calls=r["calls"], peak_gib=r["peak_gib"], calibration=prof["calibration"])


def bench_streamed(a: argparse.Namespace, report: Report) -> None:
    """benchmarks/streamed.py make and run as child processes: a random-weight LLaMA-2-13B shape
    (--quick: the tiny one) written to disk in bf16 with a word-level tokenizer of LLaMA-2's
    vocabulary size, compressed with its weights mapped from the file and its layers visiting
    the device, one dense pass through the same pipeline, the output reloaded. The models (26 +
    18 GB for the 13B) go in a folder of its own under --scratch, removed at the end."""
    shape, vocab = ("tiny", 1000) if a.quick else ("llama2-13b", LLAMA2_13B["vocab_size"])
    path = Path(a.json).with_suffix(".streamed.json")
    scratch = Path(tempfile.mkdtemp(prefix="come-streamed-", dir=a.scratch))
    try:
        (scratch / "calib.txt").write_text(word_text(vocab, 2 * a.nsamples * a.seqlen))
        t0 = time.perf_counter()
        _script("streamed.py", "make", "--out", str(scratch / "model"), "--shape", shape, "--vocab", str(vocab),
                "--device", a.device)
        write_s = time.perf_counter() - t0
        _script("streamed.py", "run", "--model", str(scratch / "model"), "--out", str(scratch / "come"),
                "--device", a.device, "--calib", str(scratch / "calib.txt"), "--sparsity", str(a.sparsity),
                "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--batch-size", str(a.batch_size),
                "--max-cache-gb", str(CompressConfig().max_cache_gb), "--json", str(path))
    finally:
        shutil.rmtree(scratch)
    row = json.loads(path.read_text())
    failed = [k for k in ("compress", "dense", "reload") if row.get(k, {}).get("rc") != 0]
    if failed:
        raise SystemExit(f"streamed row: {', '.join(failed)} failed; see {path.with_suffix('')}.*.log")
    c, weights = row["compress"], row["weights_gb"]
    done, back = c["result"], row["reload"]["result"]
    label = f"{shape} streamed"
    report.add(label, f"compress come {a.sparsity:g} (weights mapped from disk) / one dense pass", done["plan_wall_s"],
               row["dense_pass_s"], "s", layers=done["layers"], layer_forwards=done["layer_forwards"],
               process_wall_s=c["wall_s"], write_model_s=write_s, calibration=[a.nsamples, a.seqlen])
    report.add(label, "peak anonymous memory in compress / the model's weights", c["peak_anon_gb"], weights, "GB",
               predicted_host_gb=done["predicted_host_gb"], predicted_host_parts_gb=done["predicted_host_parts_gb"])
    report.add(label, "peak RSS in compress / the model's weights", c["peak_rss_gb"] or done["maxrss_gb"], weights,
               "GB")
    report.add(label, "peak GPU memory in compress / the memory plan's device prediction", done["device_peak_gb"],
               done["predicted_device_gb"], "GB", predicted_phases_gb=done["predicted_device_phases_gb"])
    report.add(label, "output reloads: layers / compress's layers after", back["layers"], done["layers"][1],
               "layers", logits_finite=back["logits_finite"], modules=back["modules"], reload_s=back["reload_s"])


def print_table(report: Report, a: argparse.Namespace) -> None:
    print(f"\n{report.header['device']}, bf16, calibration {a.nsamples} x {a.seqlen} tokens (batch {a.batch_size}), "
          f"decode batch {a.batch} x prompt {a.prompt} + {a.new} tokens (median of {a.repeats}); "
          f"distill --layer-loss {a.layer_loss}; "
          f"{report.rows[-1]['at_s']:.0f} s in all\n")
    print("| model | measurement | value | baseline | ratio | unit | MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in report.rows:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else ""
        print(f"| {r['model']} | {r['row']} | {_num(r['value'])} | {_num(r['baseline'])} | {_num(r['ratio'])} | "
              f"{r['unit']} | {mfu} |")
    print(f"\nPredicted GPU memory = the largest phase of compress: embedding pass (embedding weights + a batch's "
          f"hidden states), layer pass (2 layers + activations, {GPU_FORMULA}; with the refit + accumulators) or "
          f"refit solve (_common.gpu_prediction).\n{MFU} ({a.peak_tflops:g} TFLOP/s).")


def _rows(text: str) -> list[str]:
    rows = list(ROWS) if text == "all" else list(dict.fromkeys(r.strip() for r in text.split(",")))
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise argparse.ArgumentTypeError(f"unknown row(s) {unknown}: give a comma-separated list of {', '.join(ROWS)}, "
                                         "or all")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the same code on the CPU with tiny shapes, seconds")
    ap.add_argument("--json", default="gpu_bench.json", help="where the rows go")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--nsamples", type=int, default=16, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration and training window")
    ap.add_argument("--batch-size", type=int, default=4, help="calibration and training windows per step")
    ap.add_argument("--batch", type=int, default=4, help="decode batch")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=64, help="decoded tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed distill / fine-tuning steps")
    ap.add_argument("--layer-loss", choices=["mse", "kl"], default="mse",
                    help="come distill --layer-loss timed (mse: come's default; kl: the paper's)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 / H200 SXM: 989)")
    ap.add_argument("--rows", default=DEFAULT_ROWS, type=_rows,
                    help=f"what runs, in this order: comma-separated of {', '.join(ROWS)}, or all")
    ap.add_argument("--top", type=int, default=12, help="the profile's phases kept")
    ap.add_argument("--scratch", default=".", help="where the streamed row writes its models (on disk, not memory)")
    a = ap.parse_args()
    if a.quick:
        a.device = "cpu"
        a.nsamples, a.seqlen, a.prompt, a.new, a.repeats = 8, 64, 16, 4, 1
        torch.set_num_threads(1)  # tiny matmuls: spinning intra-op threads only slow them on a loaded CPU
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU (--quick runs its code on the CPU)")
    else:
        a.device = "cuda"
    device = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu ({platform.machine()})"
    report = Report(Path(a.json), {"device": device, "quick": a.quick, "settings": vars(a),
                                   "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                                   "gpu_formula": GPU_FORMULA, "mfu": MFU})
    for row in a.rows:
        if row in SHAPES:
            bench_shape(*(QUICK_SHAPES[row] if a.quick else (row, SHAPES[row])), a, report)
        else:
            {"distill": bench_distill, "profile": bench_profile, "streamed": bench_streamed}[row](a, report)
    print_table(report, a)
    bad = {f"{r['model']}: {r['row']}" for r in report.rows for k in ("value", "baseline", "ratio")
           if r[k] is not None and not math.isfinite(r[k])}
    if bad:
        print("non-finite numbers in: " + "; ".join(sorted(bad)), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
