"""The scoreboard (benchmarks/scoreboard.py): its quick mode runs the locked protocol's code
path on a tiny model, writes one JSON per row and seed as each finishes, skips what is written,
and its tables are generated from the JSON; BENCHMARKS.md's scoreboard block is exactly what
the committed JSON files generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import scoreboard  # noqa: E402
from _common import read_block  # noqa: E402


def test_benchmarks_block_equals_the_committed_json():
    block = read_block(scoreboard.BENCHMARKS_MD, scoreboard.START, scoreboard.END)
    assert block == scoreboard.markdown(scoreboard.RESULTS, scoreboard.PROTOCOL), \
        "BENCHMARKS.md's scoreboard is stale: run python benchmarks/scoreboard.py tables"


def test_quick_run_writes_rows_and_tables_from_them(tmp_path, model_dir, text_file):
    results, cache = tmp_path / "results", tmp_path / "cache"
    args = [sys.executable, str(BENCH / "scoreboard.py"), "run", "--quick", "--model", str(model_dir), "--text",
            str(text_file), "--results", str(results), "--cache", str(cache)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1",
                                                                                  **__import__("os").environ})
    assert done.returncode == 0, done.stderr[-2000:]
    protocol = scoreboard.quick_protocol(str(text_file))
    rows = sorted((results / "quick").glob("*/*.json"))
    want = {f"{scoreboard._slug(r)}-seed{s}.json" for r in protocol["models"]["quick"]["rows"]
            for s in protocol["calibration"]["seeds"]}
    assert {p.name for p in rows} == want
    row = json.loads(rows[0].read_text())
    for name, (split, _, n) in scoreboard._texts(protocol).items():
        fid = row["texts"][name]["fidelity"]
        assert row["texts"][name]["split"] == split and len(fid["per_window"]["kl"]) <= n and fid["kl"]["mean"] > 0
        assert fid["top_k"] == protocol["kl"]["top_k"]
    seeds = {json.loads(p.read_text())["seed"]: json.loads(p.read_text()) for p in rows if p.name.startswith("come-")}
    assert seeds[0]["texts"]["wiki-test"]["fidelity"] != seeds[1]["texts"]["wiki-test"]["fidelity"]  # other calibration
    stamps = {p: p.stat().st_mtime_ns for p in rows}
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and {p: p.stat().st_mtime_ns for p in rows} == stamps  # written rows are kept
    md = scoreboard.markdown(results, protocol)
    for p in rows:
        r = json.loads(p.read_text())
        if r["seed"] == 0:
            assert f"{r['texts']['wiki-test']['fidelity']['kl']['mean']:.4f}" in md and r["row"] in md
    best = min((json.loads(p.read_text()) for p in rows if json.loads(p.read_text())["seed"] == 0),
               key=lambda r: r["texts"]["wiki-test"]["fidelity"]["kl"]["mean"])
    assert f"| **{best['row']}** |" in md
    auto = json.loads((results / "quick" / "0.3" / "auto-seed0.json").read_text())["auto"]
    assert f"chose {auto['chosen']}" in md and len(auto["candidates"]) == 3
    target = tmp_path / "B.md"
    target.write_text(f"# B\n\n{scoreboard.START}\nold\n{scoreboard.END}\n\nrest\n")
    scoreboard.write_tables(results, protocol, target)
    assert target.read_text() == f"# B\n\n{scoreboard.START}\n{md}\n{scoreboard.END}\n\nrest\n"


def _row(label: str, kl: list[float], layers: int, tasks: dict | None) -> dict:
    fid = {"kl": {"mean": sum(kl) / len(kl)}, "top1": 0.5, "per_window": {"kl": kl}}
    texts = {t: {"tokens": 255 * len(kl), "ppl": 10.0, "fidelity": fid} for t in ("wiki-decision", "wiki-test", "legal")}
    return {"row": label, "layers": layers, "compress_s": 1.0, "texts": texts, "tasks": {"test": tasks} if tasks else {}}


def test_a_row_without_tasks_has_no_accuracy_and_is_never_the_most_accurate():
    def arc(docs):
        return {"arc_easy": {"acc": sum(docs) / len(docs), "acc_norm": sum(docs) / len(docs),
                             "per_doc": {"acc": docs, "acc_norm": docs}}}

    dense = {**_row("dense", [0.0, 0.0], 30, arc([1.0, 1.0, 1.0, 0.0])), "texts": {
        t: {"tokens": 510, "ppl": 5.0, "fidelity": None} for t in ("wiki-decision", "wiki-test", "legal")}}
    entry = {"dense": dense, "rows": {"A": {0: _row("A", [1.0, 1.2], 20, None)},  # lowest KL, no tasks
                                      "B": {0: _row("B", [2.0, 2.2], 20, arc([1.0, 0.0, 1.0, 0.0]))},
                                      "C": {0: _row("C", [3.0, 3.2], 20, arc([1.0, 0.0, 0.0, 0.0]))}}}
    lines = scoreboard.table("m", 0.25, entry, scoreboard.PROTOCOL).splitlines()
    cells = {line.split("|")[1].strip().strip("*"): [c.strip() for c in line.strip("|").split("|")]
             for line in lines if line.startswith("| ") and not line.startswith("| recipe")}
    assert cells["A"][-4:-1] == ["-", "-", "-"]
    assert cells["B"][-4:-1] == ["**0.500**", "best", f"{100 * 0.5 / 0.75:.1f}"]
    assert cells["C"][-3] == "-0.250 ± 0.250"  # paired over the 4 documents: one differs
