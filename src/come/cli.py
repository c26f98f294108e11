"""The `come` command line: parses, calls the API, prints. No math here."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from functools import wraps
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from .config import OFFICIAL, CompressConfig
from .errors import ComeError
from .tasks import DEFAULT_TASKS, TASK_DATA_ENV

PPL_WINDOWS_HELP = "Score only the first N perplexity windows (default all)."
PPL_HELP = "wikitext2 | ptb | c4 (the papers' test texts) | boolq-passages | none | a local .txt/.jsonl."

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress LLMs by layer concatenation (CoMe).")
err = Console(stderr=True)
_debug = {"on": False}


@app.callback()
def main(verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug logging."),
         debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")) -> None:
    _debug["on"] = debug
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "datasets", "lm_eval"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def one_line_errors(fn):
    """ComeError -> one line on stderr and exit code 2 (the traceback only with --debug)."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ComeError as exc:
            if _debug["on"]:
                raise
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)

    return wrapper


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ComeError(f"expected comma-separated layer indices, got {text!r}") from None


@app.command()
@one_line_errors
def compress(
    model: str = typer.Argument(..., help="Hub id, local HF directory, or .gguf file."),
    out: str = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    sparsity: float = typer.Option(0.3, help="Fraction of ALL params to remove, in (0, 0.9]."),
    method: str = typer.Option("come", help="come | shortgpt | replaceme | laco | average (peers on the same plumbing)."),
    refit: Optional[str] = typer.Option(None, help="ls | none; default ls for come, none for the peers."),
    refit_holdout: float = typer.Option(0.1, help="Calibration share that picks the ridge / vetoes a refit."),
    refit_input: str = typer.Option("compressed", help="compressed | dense: the refit's input states."),
    select: str = typer.Option("angle", help="replaceme: angle (published block) | bi (ShortGPT's layers)."),
    calib: str = typer.Option("wikitext2", help="wikitext2, c4, or a local .txt/.jsonl file."),
    nsamples: int = typer.Option(128, help="Calibration windows."),
    seqlen: int = typer.Option(2048, help="Tokens per calibration window."),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(4, help="Calibration windows per forward."),
    device: str = typer.Option("auto", help="cuda | cpu | auto (layers visit it one at a time)."),
    dtype: str = typer.Option("auto", help="bf16 | fp16 | fp32 | auto (as stored)."),
    pair_score: Optional[str] = typer.Option(None, help="bi-all-tokens (default for come) | angular (last token, OFFICIAL; "
                                             "default for laco, average) | error | merge-error."),
    split: str = typer.Option("joint", help="joint (top-N units of both layers) | bi (OFFICIAL share from block influence)."),
    skew: float = typer.Option(1.0, help="Exponent p of the bi split rule."),
    min_max: float = typer.Option(0.0, help="bi split: raise the larger side's share to at least this."),
    norm: str = typer.Option("fold", help="fold (exact) | average (OFFICIAL)."),
    head_score: str = typer.Option("channel", help="channel (sum of channel scores) | exact."),
    no_repeat: bool = typer.Option(False, help="Never merge an already merged layer again."),
    protect: str = typer.Option("", help="Comma-separated original layers never merged."),
    max_cache_gb: float = typer.Option(32.0, help="Host memory for cached calibration activations."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
    official: bool = typer.Option(False, help="The authors' choices: " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in OFFICIAL.items()) + "."),
) -> None:
    """Compress MODEL to --sparsity with progressive concatenation merges; write a stock HF checkpoint."""
    from .checkpoint import check_output_dir, load_config, load_model, load_tokenizer, meta_model, save_checkpoint
    from .data import read_text, token_windows
    from .pipeline import compress as run_compress, merge_budget

    cfg = CompressConfig(sparsity=sparsity, method=method, refit=refit, refit_holdout=refit_holdout,
                         refit_input=refit_input, select=select, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                         batch_size=batch_size, device=device, pair_score=pair_score, split=split, skew=skew,
                         min_max=min_max, norm=norm, head_score=head_score, no_repeat=no_repeat,
                         protect=_int_list(protect), max_cache_gb=max_cache_gb)
    if official:
        cfg = replace(cfg, **OFFICIAL)
    cfg.validate()
    check_output_dir(out, overwrite)
    merge_budget(meta_model(load_config(model)), sparsity)
    text = read_text(calib)
    tokenizer = load_tokenizer(model)
    ids = token_windows(text, tokenizer, nsamples, seqlen, seed)
    lm, _ = load_model(model, dtype, tokenizer)
    lm, plan = run_compress(lm, tokenizer, cfg, calib=ids, model_name=model)
    path = save_checkpoint(lm, tokenizer, plan, out, overwrite)
    print_summary(plan)
    err.print(f"wrote {path}")


def print_summary(plan) -> None:
    """Final table: layers and params before/after, then every merge."""
    top = Table(title=f"come: {plan.model}", show_header=True)
    for col in ("", "before", "after"):
        top.add_column(col)
    top.add_row("layers", str(plan.num_layers_before), str(plan.num_layers_after))
    top.add_row("params", f"{plan.params_before / 1e6:.2f}M", f"{plan.params_after / 1e6:.2f}M")
    top.add_row("removed", "", f"{100 * plan.achieved_sparsity:.2f}% (target {100 * plan.target_sparsity:.1f}%)")
    top.add_row("layer-forwards", "", str(plan.layer_forwards))
    top.add_row("wall time", "", f"{plan.wall_time_s:.1f}s")
    merges = Table(title="merges", show_header=True)
    for col in ("step", "position", "original A", "original B", "kv A+B", "ffn A+B", "r_A", "pair score"):
        merges.add_column(col)
    for m in plan.merges:
        merges.add_row(str(m.step + 1), str(m.position), str(m.group_a), str(m.group_b),
                       f"{len(m.kv_a)}+{len(m.kv_b)}", f"{len(m.ffn_a)}+{len(m.ffn_b)}", f"{m.r_a:.3f}",
                       f"{m.pair_score:.4g}")
    con = Console(file=sys.stdout)
    con.print(top)
    con.print(merges)


@app.command("eval")
@one_line_errors
def eval_(
    model: str = typer.Argument(..., help="Hub id, local HF directory, or .gguf file."),
    task_data: Optional[str] = typer.Option(None, envvar=TASK_DATA_ENV, help="Offline task data: DIR/<dataset>/<config|none>/<split>/ "
                                            "(datasets.save_to_disk); nothing then reaches the network."),
    tasks: str = typer.Option(",".join(DEFAULT_TASKS), help="Comma-separated lm-eval tasks, or none."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N documents of each task."),
    skip: int = typer.Option(0, help="Start at document N of each task (choose settings on other documents than you report)."),
    batch_size: int = typer.Option(8, help="lm-eval requests per forward."),
    ppl_data: str = typer.Option("wikitext2", help=PPL_HELP),
    seqlen: int = typer.Option(2048, help="Tokens per perplexity window."),
    ppl_windows: Optional[int] = typer.Option(None, help=PPL_WINDOWS_HELP),
    device: str = typer.Option("auto", help="cuda | cpu | auto (the whole model moves there)."),
    dtype: str = typer.Option("auto", help="bf16 | fp16 | fp32 | auto (as stored)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Write the results JSON here."),
    baseline: Optional[str] = typer.Option(None, help="Dense model (evaluated the same way) or its results JSON: adds retention."),
) -> None:
    """Zero-shot tasks (lm-eval) and perplexity of MODEL; with --baseline, each metric as % of the dense one."""
    import contextlib
    import json
    from pathlib import Path

    from .evaluate import check_inputs, retention
    from .tasks import hf_offline, parse_tasks

    names = parse_tasks(tasks)
    ppl = None if ppl_data == "none" else ppl_data
    check_inputs(names, task_data, ppl, limit, seqlen, batch_size, ppl_windows, skip)
    dense = None
    if baseline and baseline.endswith(".json"):
        try:
            dense = json.loads(Path(baseline).read_text())
        except (OSError, ValueError) as exc:
            raise ComeError(f"cannot read --baseline results {baseline}: {exc}") from None
    with hf_offline() if task_data else contextlib.nullcontext():
        options = dict(tasks=names, task_data=task_data, limit=limit, ppl_data=ppl, seqlen=seqlen,
                       batch_size=batch_size, ppl_windows=ppl_windows, skip=skip)
        results = _evaluate_model(model, device, dtype, options)
        if baseline and dense is None:
            dense = _evaluate_model(baseline, device, dtype, options)
    if dense is not None:
        results["retention"] = retention(results, dense)
    print_eval(model, results)
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
        err.print(f"wrote {out}")


def _evaluate_model(name: str, device: str, dtype: str, options: dict) -> dict:
    """Load one model, move it to the device, evaluate it, let it go (so a baseline never
    shares memory with it)."""
    import torch

    from .checkpoint import load_model
    from .evaluate import evaluate

    lm, tokenizer = load_model(name, dtype)
    target = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        lm.to(target)
    except (RuntimeError, ValueError) as exc:
        raise ComeError(f"cannot use --device {device}: {str(exc).splitlines()[0]}") from None
    results = evaluate(lm, tokenizer, **options)
    results["settings"]["model"] = name
    return results


def print_eval(model: str, results: dict) -> None:
    """Per-task table (split noted when the usual one was missing), then average and
    perplexity; retention columns when a baseline was given."""
    def num(x):
        return "-" if x is None else f"{x:.4f}"

    def pct(x):
        return "-" if x is None else f"{x:.1f}%"

    ret = results.get("retention")
    table = Table(title=f"come eval: {model}")
    for col in ("task", "split", "n", "acc", "acc_norm") + (("acc % dense", "acc_norm % dense") if ret else ()):
        table.add_column(col)
    for task, r in results["tasks"].items():
        split = r["split"] if r["split"] == r["usual_split"] else f"{r['split']} (no {r['usual_split']})"
        row = [task, split, str(r["n"]), num(r["acc"]), num(r["acc_norm"])]
        if ret:
            row += [pct(ret["tasks"].get(task, {}).get(m)) for m in ("acc", "acc_norm")]
        table.add_row(*row)
    summary = Table(show_header=True)
    for col in ("", "value") + (("% dense",) if ret else ()):
        summary.add_column(col)
    ppl_label = f"perplexity ({results['settings']['ppl_data']}, {results['settings']['ppl_tokens']} tokens)"
    for label, key in (("average (paper metrics)", "average"), (ppl_label, "perplexity")):
        value = results[key]
        summary.add_row(label, "-" if value is None else f"{value:.4f}", *([pct(ret[key])] if ret else []))
    con = Console(file=sys.stdout)
    if results["tasks"]:
        con.print(table)
    con.print(summary)


@app.command("compare")
@one_line_errors
def compare_(
    model: str = typer.Argument(..., help="Hub id, local HF directory, or .gguf file."),
    out: str = typer.Option(..., "--out", "-o", help="Report directory (report.md, report.json, plots)."),
    sparsity: float = typer.Option(0.3, help="Fraction of ALL params to remove, in (0, 0.9]."),
    methods: str = typer.Option("come,shortgpt,laco,average", help="Comma list of come, shortgpt, replaceme, laco, average; a row may override options: "
                              "come:refit=none:split=bi:pair-score=angular (the paper's pure merge), shortgpt:refit=ls."),
    calib: str = typer.Option("wikitext2", help="Calibration: wikitext2, c4, or a local .txt/.jsonl file."),
    nsamples: int = typer.Option(128, help="Calibration windows."),
    seqlen: int = typer.Option(2048, help="Tokens per calibration window."),
    seed: int = typer.Option(0),
    pair_score: Optional[str] = typer.Option(None, help="Pair score of every row: angular | bi-all-tokens | error | "
                                             "merge-error (default: each method's own, as in compress)."),
    device: str = typer.Option("auto", help="cuda | cpu | auto."),
    dtype: str = typer.Option("auto", help="bf16 | fp16 | fp32 | auto."),
    task_data: Optional[str] = typer.Option(None, envvar=TASK_DATA_ENV, help="Offline task data directory."),
    tasks: str = typer.Option(",".join(DEFAULT_TASKS), help="Comma-separated lm-eval tasks, or none."),
    limit: Optional[int] = typer.Option(None, help="First N documents of each task."),
    eval_batch_size: int = typer.Option(8, help="lm-eval requests per forward."),
    ppl_data: str = typer.Option("wikitext2", help=PPL_HELP),
    eval_seqlen: int = typer.Option(2048, help="Tokens per perplexity window."),
    ppl_windows: Optional[int] = typer.Option(None, help=PPL_WINDOWS_HELP),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
) -> None:
    """Compress MODEL with each method (same calibration and seed), evaluate all and the dense model, write a report."""
    from pathlib import Path

    from .checkpoint import check_output_dir, load_config, load_model, load_tokenizer, meta_model
    from .compare import compare, method_list
    from .data import read_text, token_windows
    from .evaluate import check_inputs
    from .pipeline import merge_budget
    from .report import markdown_table
    from .tasks import parse_tasks

    task_list = parse_tasks(tasks)
    ppl = None if ppl_data == "none" else ppl_data
    cfg = CompressConfig(sparsity=sparsity, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, device=device,
                         pair_score=pair_score)
    chosen = method_list(methods, cfg)
    check_output_dir(out, overwrite)
    check_inputs(task_list, task_data, ppl, limit, eval_seqlen, eval_batch_size, ppl_windows)
    merge_budget(meta_model(load_config(model)), sparsity)
    tokenizer = load_tokenizer(model)
    ids = token_windows(read_text(calib), tokenizer, nsamples, seqlen, seed)
    lm, _ = load_model(model, dtype, tokenizer)
    eval_kwargs = {"tasks": task_list, "task_data": task_data, "limit": limit, "ppl_data": ppl, "seqlen": eval_seqlen,
                   "batch_size": eval_batch_size, "ppl_windows": ppl_windows}
    rows = compare(lm, tokenizer, cfg, chosen, ids, Path(out), eval_kwargs, model_name=model, overwrite=overwrite)
    Console(file=sys.stdout).print(markdown_table(rows, list(rows[0]["tasks"])), soft_wrap=True)
    err.print(f"wrote {out}/report.md")


def _count(text: str) -> int:
    """'20M' -> 20_000_000 (K, M, B suffixes; plain integers too)."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}
    t = text.strip().upper()
    try:
        return int(float(t[:-1]) * scale[t[-1]]) if t and t[-1] in scale else int(t)
    except ValueError:
        raise ComeError(f"--tokens must be a count such as 20M, 500K or 1000000, got {text!r}") from None


@app.command("distill")
@one_line_errors
def distill_(
    teacher: str = typer.Option(..., help="The original model: Hub id or local HF directory."),
    student: str = typer.Option(..., help="A `come compress` output directory."),
    out: str = typer.Option(..., "--out", "-o", help="Output directory (checkpoints/ inside; result written atomically)."),
    plan: Optional[str] = typer.Option(None, help="come_plan.json, when the student directory has none."),
    mode: str = typer.Option("sp", help="sp: all trainable layers at once, full loss | mp: each layer alone on the teacher's activations."),
    data: str = typer.Option("wikitext2", help="Training text: wikitext2, c4, or a local .txt/.jsonl file."),
    eval_data: Optional[str] = typer.Option(None, help="Held-out text; default: the last --eval-windows windows of --data."),
    eval_windows: int = typer.Option(16, help="Held-out windows for KL / perplexity."),
    tokens: str = typer.Option("20M", help="Training tokens (all processes), e.g. 20M; ignored with --steps."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (overrides --tokens)."),
    seqlen: int = typer.Option(2048, help="Tokens per window."),
    batch_size: int = typer.Option(4, help="Windows per micro-batch and process."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(1e-4, help="Peak learning rate (AdamW)."),
    warmup: float = typer.Option(0.03, help="Share of steps in linear warmup, then cosine decay."),
    temperature: float = typer.Option(1.0, help="Softmax temperature of every KL term."),
    layer_loss: str = typer.Option("kl", help="kl (through final norm + LM head) | mse (normalized, on hidden states)."),
    layer_weight: float = typer.Option(1.0, help="lambda: weight of the summed layer losses (sp)."),
    train: str = typer.Option("merged", help="merged (layers standing for > 1 original layer) | all."),
    lora_r: int = typer.Option(0, help="LoRA rank: train only rank-r adapters on the trainable layers' projections, "
                               "merged into the weights on save (0: full fine-tuning)."),
    lora_alpha: Optional[float] = typer.Option(None, help="LoRA scale: update = alpha / r * B A (default 2r)."),
    lora_dropout: float = typer.Option(0.0, help="Dropout on the LoRA adapters' input."),
    kl_chunk: int = typer.Option(2048, help="Tokens per KL chunk (full-vocab logits of one chunk at a time)."),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute layer activations in backward (sp memory)."),
    device: str = typer.Option("auto", help="cuda | cpu | auto."),
    dtype: str = typer.Option("auto", help="Compute precision: auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32."),
    save_every: int = typer.Option(0, help="Checkpoint into OUT/checkpoints every N steps (0: never)."),
    eval_every: int = typer.Option(0, help="Held-out KL / perplexity every N steps (always at start and end)."),
    resume: bool = typer.Option(False, help="Continue from the latest OUT/checkpoints/step_N."),
    seed: int = typer.Option(0, help="Data order and LoRA init."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
) -> None:
    """Recover a compressed STUDENT by hierarchical distillation from its TEACHER (CoMe-sp / CoMe-mp)."""
    import shutil
    from pathlib import Path

    from accelerate import PartialState

    from .checkpoint import check_output_dir, load_config, load_model, load_tokenizer
    from .distill import CHECKPOINTS, DistillConfig, check_pair, check_tokenizers, latest_checkpoint, load_windows, write_output
    from .distill import distill as run_distill
    from .plan import load_plan

    ckpt = Path(out) / CHECKPOINTS
    cfg = DistillConfig(mode=mode, data=data, eval_data=eval_data, eval_windows=eval_windows, steps=steps,
                        tokens=_count(tokens), seqlen=seqlen, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                        warmup=warmup, temperature=temperature, layer_loss=layer_loss, layer_weight=layer_weight,
                        train=train, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        kl_chunk=kl_chunk, gradient_checkpointing=gradient_checkpointing, device=device,
                        dtype=dtype, save_every=save_every, eval_every=eval_every, checkpoint_dir=str(ckpt),
                        resume=resume, seed=seed)
    cfg.validate()
    if resume:
        latest_checkpoint(ckpt)
    else:
        check_output_dir(out, overwrite)
    the_plan = load_plan(plan or student)
    check_pair(load_config(teacher), load_config(student), the_plan)
    tokenizer = load_tokenizer(student)
    check_tokenizers(load_tokenizer(teacher), tokenizer)
    windows = load_windows(cfg, tokenizer)
    if not resume:
        shutil.rmtree(ckpt, ignore_errors=True)
    t_model, _ = load_model(teacher, tokenizer=tokenizer)
    s_model, _ = load_model(student, tokenizer=tokenizer)
    s_model, log = run_distill(t_model, s_model, tokenizer, the_plan, cfg, windows)
    if PartialState().is_main_process:
        write_output(s_model, tokenizer, the_plan, log, out)
        first, last = log["eval"][0], log["eval"][-1]
        table = Table(title=f"come distill ({mode}): {student}")
        for col in ("", "before", "after"):
            table.add_column(col)
        table.add_row("held-out KL to teacher", f"{first['kl']:.4f}", f"{last['kl']:.4f}")
        table.add_row(f"held-out ppl (teacher {log['teacher_ppl']:.3f})", f"{first['ppl']:.3f}", f"{last['ppl']:.3f}")
        table.add_row("tokens seen", "", f"{log['tokens_seen']:,} ({log['tokens_per_s']:.0f} tokens/s)")
        Console(file=sys.stdout).print(table)
        err.print(f"wrote {out}")


if __name__ == "__main__":
    app()
