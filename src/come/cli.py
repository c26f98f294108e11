"""The `come` command line: parses, calls the API, prints. No math here."""

from __future__ import annotations

import logging
import sys
from functools import wraps
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from .config import CompressConfig
from .errors import ComeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress LLMs by layer concatenation (CoMe).")
err = Console(stderr=True)
_debug = {"on": False}


@app.callback()
def main(verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug logging."),
         debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")) -> None:
    _debug["on"] = debug
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "datasets"):
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
    calib: str = typer.Option("wikitext2", help="wikitext2, c4, or a local .txt/.jsonl file."),
    nsamples: int = typer.Option(128, help="Calibration windows."),
    seqlen: int = typer.Option(2048, help="Tokens per calibration window."),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(4, help="Calibration windows per forward."),
    device: str = typer.Option("auto", help="cuda | cpu | auto (layers visit it one at a time)."),
    dtype: str = typer.Option("auto", help="bf16 | fp16 | fp32 | auto (as stored)."),
    pair_score: str = typer.Option("angular", help="angular (last token, OFFICIAL) | bi-all-tokens."),
    split: str = typer.Option("bi", help="bi (OFFICIAL share from block influence) | joint (top-N of both)."),
    skew: float = typer.Option(1.0, help="Exponent p of the split rule."),
    min_max: float = typer.Option(0.0, help="Raise the larger side's share to at least this."),
    norm: str = typer.Option("fold", help="fold (exact) | average (OFFICIAL)."),
    head_score: str = typer.Option("channel", help="channel (sum of channel scores) | exact."),
    no_repeat: bool = typer.Option(False, help="Never merge an already merged layer again."),
    protect: str = typer.Option("", help="Comma-separated original layers never merged."),
    max_cache_gb: float = typer.Option(32.0, help="Host memory for cached calibration activations."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
) -> None:
    """Compress MODEL to --sparsity with progressive concatenation merges; write a stock HF checkpoint."""
    from .checkpoint import check_output_dir, load_config, load_model, load_tokenizer, meta_model, save_checkpoint
    from .data import read_text, token_windows
    from .pipeline import compress as run_compress, merge_budget

    cfg = CompressConfig(sparsity=sparsity, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                         batch_size=batch_size, device=device, pair_score=pair_score, split=split, skew=skew,
                         min_max=min_max, norm=norm, head_score=head_score, no_repeat=no_repeat,
                         protect=_int_list(protect), max_cache_gb=max_cache_gb)
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


if __name__ == "__main__":
    app()
