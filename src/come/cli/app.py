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

from ..errors import ComeError
from ..service import EVAL_PREFIX, compare_to, compress_to
from ..settings.config import OFFICIAL, CompressConfig, EvalConfig, LoadOptions, official_settings
from ..settings.distill_config import OFFICIAL as DISTILL_OFFICIAL
from ..settings.distill_config import DistillConfig, train_set
from ..settings.registry import default_methods
from ..settings.threads import choose_wait_policy
from .commands import Typer, with_options

# decided at import, before a command loads torch (threads.py: why it matters); the options
# objects and the service above import none at import (config.py, service.py)
_WAIT_POLICY = choose_wait_policy()

MODEL_ARG = typer.Argument(..., metavar="MODEL", help="Hub id, local HF directory, or .gguf file.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing --out that come wrote (never anything else).")


def _out_dir(what: str):
    return typer.Option(..., "--out", "-o", help=f"Output directory ({what}).")


app = Typer(add_completion=False, no_args_is_help=True, help="Compress LLMs by layer concatenation (CoMe).")
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
    for own_handler in ("huggingface_hub", "datasets"):  # they print each record themselves: not twice
        logging.getLogger(own_handler).propagate = False
    changed, decision = _WAIT_POLICY
    logging.getLogger("come").log(logging.INFO if changed else logging.DEBUG, decision)


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


def _unless_given(ctx: typer.Context, preset: dict) -> dict:
    """The preset's settings except those typed on the command line (or set by env var): an
    explicit option wins, so `--official --split search` is the authors' CoMe-P, not their bi split."""
    def given(name: str) -> bool:
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    return {k: v for k, v in preset.items() if not given(k)}


def _flags(preset: dict) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in preset.items())


def _official_help() -> str:
    return (f"The authors' choices: {_flags(OFFICIAL)} (with --split search, their CoMe-P: --pair-score "
            "angular-all-tokens). Options you give win.")


def _official_distill_help() -> str:
    return f"The paper's recovery loss: {_flags(DISTILL_OFFICIAL)}. Options you give win."


@app.command()
@one_line_errors
@with_options(cfg=CompressConfig, load=LoadOptions)
def compress(
    ctx: typer.Context,
    model: str = MODEL_ARG,
    out: str = _out_dir("written atomically"),
    overwrite: bool = OVERWRITE,
    official: bool = typer.Option(False, "--official", help=_official_help()),
    *,
    cfg: CompressConfig,
    load: LoadOptions,
) -> None:
    """Compress MODEL to --sparsity with progressive concatenation merges; write a stock HF checkpoint
    (several --sparsity levels: one per level, OUT/sparsity-0.10, ..., from one run)."""

    def written(plan, path) -> None:
        print_summary(plan)
        err.print(f"wrote {path}")

    if official:
        cfg = replace(cfg, **_unless_given(ctx, official_settings(cfg.split, cfg.method)))
    compress_to(model, out, cfg, overwrite, load.dtype, written)


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
@with_options(evaluation=EvalConfig, load=LoadOptions)
def eval_(
    model: str = MODEL_ARG,
    device: str = typer.Option("auto", help="cuda | cpu | auto (the whole model moves there)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Write the results JSON here."),
    overwrite: bool = OVERWRITE,
    baseline: Optional[str] = typer.Option(None, help="Dense model (evaluated the same way) or its results JSON: adds retention."),
    reference: Optional[str] = typer.Option(None, help="Reference model (the dense one): adds per-token KL(reference || "
                                            "model) (mean, median, p90, p99, max), top-1 agreement and the NLL "
                                            "difference on the perplexity windows, per window in the JSON."),
    *,
    evaluation: EvalConfig,
    load: LoadOptions,
) -> None:
    """Zero-shot tasks (lm-eval) and perplexity of MODEL; with --baseline, each metric as % of the dense one."""
    import contextlib
    import json
    import tempfile
    from pathlib import Path

    from ..evaluation.evaluate import retention
    from ..models.checkpoint import load_config
    from ..models.outputs import write_text_atomic
    from ..models.preflight import check_output_file
    from ..settings.device import resolve_device
    from ..settings.hub import hf_offline

    evaluation.check()
    resolve_device(device)
    if reference and evaluation.evaluate_kwargs()["ppl_data"] is None:
        raise ComeError("--reference compares next-token distributions on the perplexity windows; drop --ppl-data none")
    if out is not None:
        check_output_file(out, overwrite, inputs={"MODEL": model, "--baseline": baseline, "--reference": reference,
                                                  "--ppl-data": evaluation.ppl_data, "--task-data": evaluation.task_data})
    if not evaluation.task_list() and evaluation.evaluate_kwargs()["ppl_data"] is None:
        raise ComeError("nothing to measure: --tasks none and --ppl-data none; give tasks, a perplexity text or both")
    evaluation.check_model(load_config(model))
    if reference:
        evaluation.check_model(load_config(reference))
    dense = _baseline_results(baseline, evaluation) if baseline else None
    with hf_offline() if evaluation.task_data else contextlib.nullcontext(), \
            tempfile.TemporaryDirectory(prefix="come-reference-") as ref_dir:
        ref = _reference(reference, device, load.dtype, evaluation, ref_dir) if reference else None
        results = _evaluate_model(model, device, load.dtype, evaluation, ref)
        if baseline and dense is None:
            dense = _evaluate_model(baseline, device, load.dtype, evaluation)
    if dense is not None:
        results["retention"] = retention(results, dense)
    print_eval(model, results)
    if out is not None:
        try:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(Path(out), json.dumps(results, indent=2) + "\n")
        except OSError as exc:
            raise ComeError(f"cannot write {out}: {exc.strerror or exc}; choose another --out") from None
        err.print(f"wrote {out}")
        from ..models.model_card import add_eval_to_card

        if add_eval_to_card(model, results):
            err.print(f"updated the evaluation section of {Path(model) / 'README.md'}")


def _baseline_results(baseline: str, evaluation: EvalConfig) -> dict | None:
    """--baseline checked before any evaluation: a results JSON, read and checked now, or a
    dense model (None: evaluated after MODEL), its config read now."""
    import json
    from pathlib import Path

    from ..evaluation.evaluate import check_results
    from ..models.checkpoint import load_config
    from ..models.model_card import looks_like_hub_id

    path = Path(baseline)
    if path.suffix == ".json":
        try:
            return check_results(json.loads(path.read_text()), f"--baseline {baseline}")
        except (OSError, ValueError) as exc:
            raise ComeError(f"cannot read --baseline results {baseline}: {exc}") from None
    if path.is_file() and path.suffix != ".gguf":
        raise ComeError(f"--baseline {baseline} is a file but neither a results JSON (.json, from `come eval --out`) "
                        "nor a .gguf model")
    if not path.exists() and not looks_like_hub_id(baseline):
        raise ComeError(f"--baseline {baseline}: no such file or directory; give the dense model (a directory, "
                        ".gguf or Hub id) or its results JSON")
    evaluation.check_model(load_config(baseline))
    return None


def _on_device(name: str, device: str, dtype: str):
    """(model, tokenizer) loaded and moved to the device."""
    from ..models.checkpoint import load_model
    from ..settings.device import resolve_device

    lm, tokenizer = load_model(name, dtype)
    try:
        lm.to(resolve_device(device))
    except (RuntimeError, ValueError) as exc:
        raise ComeError(f"cannot use --device {device}: {str(exc).splitlines()[0]}") from None
    return lm, tokenizer


def _evaluate_model(name: str, device: str, dtype: str, evaluation: EvalConfig, reference=None) -> dict:
    """Load one model, evaluate it, let it go (so a baseline never shares memory with it)."""
    from ..evaluation.evaluate import evaluate

    lm, tokenizer = _on_device(name, device, dtype)
    results = evaluate(lm, tokenizer, **evaluation.evaluate_kwargs(), reference=reference)
    results["settings"]["model"] = name
    return results


def _reference(name: str, device: str, dtype: str, evaluation: EvalConfig, directory: str):
    """The reference model's next-token distributions on the perplexity windows, kept in
    `directory` (one pass; the model is let go before the evaluated one loads)."""
    from ..evaluation.evaluate import perplexity_windows
    from ..scoring.fidelity import ReferenceLogprobs

    lm, tokenizer = _on_device(name, device, dtype)
    kw = evaluation.evaluate_kwargs()
    windows = perplexity_windows(tokenizer, kw["ppl_data"], kw["task_data"], kw["seqlen"], kw["ppl_windows"])
    return ReferenceLogprobs.build(lm, windows, directory, name)


def print_eval(model: str, results: dict) -> None:
    """Per-task table (split noted when the usual one was missing), then average and
    perplexity; retention columns when a baseline was given."""
    def num(x):
        return "-" if x is None else f"{x:.4f}"

    def pct(x):
        return "-" if x is None else f"{x:.1f}%"

    ret = results.get("retention")
    table = Table(title=f"come eval: {model}")
    # no cell is ever cut: only the split wraps, between words, so 7 columns fit in 80
    longest_split = max((len(r["split"]) for r in results["tasks"].values()), default=0)
    for col in ("task", "split", "n", "acc", "acc_norm") + (("acc\n% dense", "acc_norm\n% dense") if ret else ()):
        table.add_column(col, no_wrap=col != "split", min_width=longest_split if col == "split" else None)
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
    if fid := results.get("fidelity"):
        kl = fid["kl"]
        for label, value in ((f"KL to {fid['reference']} (mean)", kl["mean"]), ("KL median / p90 / p99 / max",
                             f"{kl['median']:.4f} / {kl['p90']:.4f} / {kl['p99']:.4f} / {kl['max']:.4f}"),
                             ("top-1 agreement", fid["top1"]), ("NLL - reference NLL", fid["nll_delta"])):
            summary.add_row(label, value if isinstance(value, str) else f"{value:.4f}", *(["-"] if ret else []))
    con = Console(file=sys.stdout)
    if results["tasks"]:
        con.print(table)
    con.print(summary)


def _methods_help() -> str:
    return (f"Comma list of methods (default: {default_methods()}); a row may override any compress option, each "
            "once: come:refit=none:split=bi:pair-score=angular (the paper's pure merge), shortgpt:refit=ls. A "
            "method-specific option given here (--split, --pair-score, --select, ...) applies to the rows whose method "
            "reads it and leaves the others at their defaults; a row's override its method does not read is refused.")


@app.command("compare")
@one_line_errors
# compare has no memory cap: compress's plan does not count its copies and evaluations
@with_options(cfg=(CompressConfig, "", ("method", "max_memory_gb")), evaluation=(EvalConfig, EVAL_PREFIX, ()),
              load=LoadOptions)
def compare_(
    model: str = MODEL_ARG,
    out: str = _out_dir("report.md, report.json, plots"),
    overwrite: bool = OVERWRITE,
    methods: Optional[str] = typer.Option(None, help=_methods_help()),
    *,
    cfg: CompressConfig,
    evaluation: EvalConfig,
    load: LoadOptions,
) -> None:
    """Compress MODEL with each method (same calibration and seed), evaluate all and the dense model, write a report
    (several --sparsity levels: a row per method and level, and a plot against parameters)."""
    from ..evaluation.report import markdown_table

    rows = compare_to(model, out, cfg, methods, evaluation, overwrite, load.dtype)
    Console(file=sys.stdout).print(markdown_table(rows, list(rows[0]["tasks"])), soft_wrap=True)
    err.print(f"wrote {out}/report.md")


@app.command("distill")
@one_line_errors
@with_options(cfg=DistillConfig)
def distill_(
    ctx: typer.Context,
    teacher: str = typer.Option(..., help="The original model: Hub id, local HF directory, or .gguf file."),
    student: str = typer.Option(..., help="A `come compress` output directory."),
    out: str = _out_dir("checkpoints/ inside; result written atomically"),
    plan: Optional[str] = typer.Option(None, help="come_plan.json, when the student directory has none."),
    overwrite: bool = OVERWRITE,
    official: bool = typer.Option(False, "--official", help=_official_distill_help()),
    *,
    cfg: DistillConfig,
) -> None:
    """Recover a compressed STUDENT by hierarchical distillation from its TEACHER (CoMe-sp / CoMe-mp)."""
    import shutil
    from pathlib import Path

    from accelerate import PartialState

    from ..models.checkpoint import load_config, load_model, load_tokenizer
    from ..models.data import training_windows
    from ..models.preflight import check_output_dir
    from ..recovery.distill import check_pair, check_tokenizers, process_count, trainable_layers
    from ..recovery.distill import distill as run_distill
    from ..recovery.distill_memory import activations, check_memory, memory_plan
    from ..recovery.sharding import check_processes
    from ..recovery.train_state import CHECKPOINTS, resume_point, write_output
    from ..settings.device import resolve_device
    from ..settings.plan import load_plan

    if official:
        cfg = replace(cfg, **_unless_given(ctx, DISTILL_OFFICIAL))
    ckpt = Path(out) / CHECKPOINTS
    cfg = replace(cfg, checkpoint_dir=str(ckpt))
    cfg.validate()
    resume = cfg.resume
    # --resume continues the run OUT holds: its checkpoints/ stay, an older result is replaced
    check_output_dir(out, overwrite or resume, inputs={"--teacher": teacher, "--student": student, "--plan": plan,
                                                       "--data": cfg.data, "--eval-data": cfg.eval_data},
                     kept=(CHECKPOINTS,) if resume else ())
    processes = process_count(cfg.device)
    if resume:
        resume_point(ckpt, cfg, processes=processes)
    check_processes(cfg, processes)
    the_plan = load_plan(plan or student)
    configs = load_config(teacher), load_config(student)
    check_pair(*configs, the_plan)
    cfg.check_student(configs[1])
    for config in configs:
        cfg.check_model(config)
    tokenizer = load_tokenizer(student)
    check_tokenizers(load_tokenizer(teacher), tokenizer)
    windows = training_windows(cfg, tokenizer)
    trainable, bf16 = trainable_layers(the_plan.groups, cfg.train), cfg.bf16(resolve_device(cfg.device).type)
    acts = activations(*configs, the_plan.groups, trainable, cfg, bf16)
    needs = memory_plan(*configs, trainable, processes, cfg.shard, bf16, train_set(cfg.train).head, acts)
    check_memory(needs, cfg, processes, acts, PartialState().is_main_process)
    if not resume:
        shutil.rmtree(ckpt, ignore_errors=True)
    t_model, _ = load_model(teacher, tokenizer=tokenizer)
    s_model, _ = load_model(student, tokenizer=tokenizer)
    s_model, log = run_distill(t_model, s_model, tokenizer, the_plan, cfg, windows)
    if PartialState().is_main_process:
        write_output(s_model, tokenizer, the_plan, log, out)
        first, last = log["eval"][0], log["eval"][-1]
        table = Table(title=f"come distill ({cfg.mode}): {student}")
        for col in ("", "before", "after"):
            table.add_column(col)
        table.add_row("held-out KL to teacher", f"{first['kl']:.4f}", f"{last['kl']:.4f}")
        table.add_row(f"held-out ppl (teacher {log['teacher_ppl']:.3f})", f"{first['ppl']:.3f}", f"{last['ppl']:.3f}")
        table.add_row("tokens seen", "", f"{log['tokens_seen']:,} ({log['tokens_per_s']:.0f} tokens/s)")
        table.add_row("training processes", "", str(log["processes"]))
        Console(file=sys.stdout).print(table)
        err.print(f"wrote {out}")


if __name__ == "__main__":
    app()
