"""Every benchmark script runs in --quick mode and prints its ratio table; the scripts share
helpers only through benchmarks/_common.py, never by importing one another."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _table(out: str) -> dict[str, list[str]]:
    """The printed markdown table's body: first cell -> the other cells."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows[1:]}


def _imported_modules(path: Path) -> set[str]:
    """Top-level names of the modules `path` imports, anywhere in it (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_benchmarks_import_only_common():
    scripts = {p.stem: p for p in BENCH.glob("*.py")}
    assert "_common" in scripts and {"compress_speed", "memory", "distill_speed", "inference", "gpu"} <= set(scripts)
    for name, path in scripts.items():
        siblings = _imported_modules(path) & (set(scripts) - {"_common"})
        assert not siblings, f"benchmarks/{name}.py imports benchmark script(s) {sorted(siblings)}: use _common.py"
    assert "_common" in _imported_modules(BENCH / "distill_speed.py")  # the check sees the scripts' imports


def test_compress_speed_model_flags():
    """compress_speed takes the shared model options but, running on the CPU only, no --device."""
    out = _run(str(BENCH / "compress_speed.py"), "--help")
    assert all(flag in out for flag in ("--model", "--random-llama-1b", "--quick", "--no-naive", "--repeats", "--reprofile"))
    assert "--device" not in out


def test_compress_speed_quick():
    out = _run(str(BENCH / "compress_speed.py"), "--quick")
    assert "x floor" in out and "naive re-profile" in out and "faster" in out and "calibration passes" in out
    assert "come full re-profile (+ refit)" in out and "come window W=4 drift 0.2 (+ refit)" in out


def test_inference_quick():
    out = _run(str(BENCH / "inference.py"), "--quick")
    assert "decode x dense" in out and "| compressed |" in out


@pytest.mark.real
def test_quality_quick(smollm2_dir, text_file):
    out = _run(str(BENCH / "quality.py"), "--model", str(smollm2_dir), "--calib", str(text_file), "--heldout",
               str(text_file), "--unseen", str(text_file), "--quick", "--rows", "dense,shortgpt,come", "--distill", "come", "--distill-steps", "2")
    assert "| shortgpt |" in out and "x ShortGPT" in out
    rows = _table(out)
    assert list(rows) == ["dense", "shortgpt", "come", "come + sp"]
    assert rows["come + sp"][3:5] == rows["come"][3:5]  # same params and layers: distillation only trains


def test_memory_quick(tmp_path):
    out = _run(str(BENCH / "memory.py"), "--quick", "--json", str(tmp_path / "mem.json"))
    assert "peak RSS / model" in out and "GPU / predicted" in out
    table = _table(out)
    rows = json.loads((tmp_path / "mem.json").read_text())
    assert [r["run"] for r in rows] == list(table) == ["come (+ refit)", "come --refit none", "shortgpt"]
    for r in rows:
        assert r["peak_rss"] > r["model_bytes"] > 0 and r["peak_rss"] >= r["load_peak_rss"] >= r["base_rss"]
        assert r["layers_after"] < r["n_layers"] and r["gpu_peak"] is None  # --quick runs on the CPU
        assert float(table[r["run"]][4]) == pytest.approx(r["peak_rss"] / r["model_bytes"], abs=0.01)
        assert 0.8 < float(table[r["run"]][3]) < 1.5  # the prediction accounts for the peak
    refit, plain, _ = (r["host_pred"] for r in rows)
    n_layers = rows[1]["n_layers"]
    assert plain["boundaries"] == n_layers + 1 and plain["stride"] == 1  # every layer input cached once
    assert plain["dense_batches"] == 0 and refit["dense_batches"] == 2  # --quick: 8 samples / batch 4, all fit
    # + re-profiled copies of the dense states, at most one more per layer
    assert plain["cache"] < refit["cache"] <= 2 * n_layers * plain["cache"] / (n_layers + 1)
    assert refit["refit"] > 0 and plain["refit"] == 0


def test_distill_speed_quick():
    out = _run(str(BENCH / "distill_speed.py"), "--quick")
    table = _table(out)
    assert list(table) == ["plain fine-tuning", "distill sp", "distill mp"]
    plain = float(table["plain fine-tuning"][0])
    for tok_s, ratio, gflop, mfu in table.values():
        assert float(tok_s) > 0 and float(gflop) > 0 and mfu == "n/a (cpu)"
        assert float(ratio) == pytest.approx(float(tok_s) / plain, abs=0.01)
    # distillation also runs the teacher: more model FLOPs per token than plain fine-tuning
    assert float(table["distill sp"][2]) > float(table["plain fine-tuning"][2])
    assert "MFU = " not in out and "plain = 2·Ls" in out


# What a bare GPU machine with torch, transformers and accelerate lacks of this environment
BARE_MISSING = ("typer", "rich", "lm_eval", "datasets", "peft", "sklearn", "scipy", "matplotlib", "pandas")


def test_gpu_quick(tmp_path):
    """benchmarks/gpu.sh --quick --rows all: the GPU benchmark's code path on the CPU, with what a
    bare GPU machine lacks hidden (None in sys.modules reads as not installed, to transformers
    too): every row, each number finite; only the GPU memory measurements are absent on the CPU.
    The profile's phases share the instrumented run's time; the streamed row's model, written to
    disk and compressed from its mapped file, reloads with its layers and a finite forward."""
    bare, scratch = tmp_path / "bare", tmp_path / "scratch"
    bare.mkdir()
    scratch.mkdir()
    (bare / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({BARE_MISSING!r}))\n")
    env = {**os.environ, "PYTHONPATH": str(bare), "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--quick", "--rows", "all", "--top", "6", "--scratch",
                          str(scratch), "--json", str(tmp_path / "gpu.json")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    rows = {(r["model"], r["row"].split(" / ")[0]): r for r in report["rows"]}
    per_shape = ("compress come 0.3", "peak GPU memory in compress", "prefill tokens/s compressed",
                 "decode tokens/s compressed")
    distill = [f"{run} training tokens/s" for run in ("plain fine-tuning", "distill sp", "distill mp")]
    profile = [r for (m, _), r in rows.items() if m == "tiny gqa profile"]
    streamed = ("compress come 0.3 (weights mapped from disk)", "peak anonymous memory in compress",
                "peak RSS in compress", "peak GPU memory in compress", "output reloads: layers")
    assert list(rows) == [(m, w) for m in ("tiny mha", "tiny gqa") for w in per_shape] + \
        [("distill_speed --quick", w) for w in distill] + [("tiny gqa profile", r["row"].split(" / ")[0])
                                                           for r in profile] + [("tiny streamed", w) for w in streamed]
    body = [line for line in out.stdout.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0][2:] for line in body] == [m for m, _ in rows]  # the printed table has every row
    for (model, what), r in rows.items():
        gpu_only = what == "peak GPU memory in compress"
        numbers = [r["baseline"]] + ([] if gpu_only else [r["value"], r["ratio"]]) + ([r["mfu"]] if "mfu" in r else [])
        assert all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in numbers), r
        assert r["baseline"] > 0 and (r["value"] is None) == gpu_only, r
    assert rows[("tiny mha", "compress come 0.3")]["layers"][1] < rows[("tiny mha", "compress come 0.3")]["layers"][0]
    assert rows[("distill_speed --quick", distill[0])]["ratio"] == 1.0
    # distillation is timed with come distill's default layer loss, and each row says which
    assert {rows[("distill_speed --quick", w)]["layer_loss"] for w in distill} == {"mse"}
    # the profile: the top phases by own seconds, largest first, within the instrumented run
    assert len(profile) == 6 and sum(r["value"] for r in profile) <= profile[0]["baseline"]
    assert [r["value"] for r in profile] == sorted((r["value"] for r in profile), reverse=True)
    assert all(r["calls"] >= 1 for r in profile) and "LayerRunner.run: own seconds" in {r["row"].split(" / ")[0]
                                                                                          for r in profile}
    # the streamed row: merged, reloaded with the layers compress left, its scratch models removed
    compressed, anon, rss, _, reload = (rows[("tiny streamed", w)] for w in streamed)
    assert compressed["layers"][1] < compressed["layers"][0] == 12 and compressed["write_model_s"] > 0
    assert reload["ratio"] == 1.0 and reload["value"] == reload["modules"] and reload["logits_finite"] is True
    assert 0 < anon["value"] <= rss["value"] and anon["baseline"] == rss["baseline"]
    assert anon["predicted_host_parts_gb"]["weights"] > 0
    assert not list(scratch.iterdir()) and (tmp_path / "gpu.streamed.json").is_file()


def test_paired_across_runs(tmp_path):
    def row(method, arc, wino):
        per_task = {"arc_easy": {"acc": None, "acc_norm": sum(arc) / 4, "per_doc": {"acc_norm": arc}},
                    "winogrande": {"acc": sum(wino) / 4, "acc_norm": None, "per_doc": {"acc": wino}}}
        return {"method": method, "average": (sum(arc) + sum(wino)) / 8, "per_task": per_task}

    (tmp_path / "a.json").write_text(json.dumps([row("shortgpt", [1, 0, 1, 0], [1, 0, 0, 0]),
                                                 row("come", [1, 1, 1, 0], [1, 1, 0, 0])]))
    (tmp_path / "b.json").write_text(json.dumps([row("come", [0, 0, 0, 0], [0, 0, 0, 0]),  # a.json's come wins
                                                 row("come:x=y", [1, 0, 1, 0], [1, 0, 0, 0]), {"method": "no tasks"}]))
    table = _table(_run(str(BENCH / "paired.py"), str(tmp_path / "a.json"), str(tmp_path / "b.json")))
    assert list(table) == ["shortgpt", "come", "come:x=y"]
    assert table["shortgpt"] == ["0.375", "-"]
    assert table["come"] == ["0.625", "+0.250 ± 0.177"]  # two tasks, each diff [0,1,0,0]: sqrt(2 * 0.25/4) / 2
    assert table["come:x=y"] == ["0.375", "+0.000 ± 0.000"]
    bad = subprocess.run([sys.executable, str(BENCH / "paired.py"), str(tmp_path / "b.json")], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "--ref 'shortgpt'" in bad.stderr


def test_gpu_peak_phase_quick(tmp_path):
    """The tracer wraps come's functions (the compress runs through them) and reports two phase
    tables, by own seconds and by peak memory; the own seconds add up to the run's time."""
    out = _run(str(BENCH / "gpu_peak_phase.py"), "--quick", "--json", str(tmp_path / "phases.json"))
    calls = int(out.split(" calls;")[0].split()[-1])
    assert calls > 100 and "calls around the overall peak" in out
    phases = json.loads((tmp_path / "phases.json").read_text())
    assert len(phases["time"]) == len(phases["peak"]) == 8  # --top phases
    assert phases["calls"] == calls and sum(r["own_s"] for r in phases["time"]) <= phases["total_s"]
    # the compress itself is wrapped: nearly all its wall time is in a phase
    assert 0.9 * phases["wall_s"] <= phases["total_s"] <= phases["wall_s"]
    assert {"LayerRunner.run", "merging.refit.ridge_solve"} <= {r["phase"] for r in phases["time"]}
