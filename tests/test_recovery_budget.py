"""benchmarks/recovery_budget.py --quick: the equal-budget recovery table's code path on a tiny
model: every row compressed, distilled per budget and scored against the dense model, each
point written as it is scored, a rerun keeping what was written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import recovery_budget  # noqa: E402
from _common import read_block  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_benchmarks_table_equals_the_committed_json():
    block = read_block(recovery_budget.BENCHMARKS_MD, recovery_budget.START, recovery_budget.END)
    assert block == recovery_budget.markdown(recovery_budget.RESULTS / "smollm2-135m" / "0.3"), \
        "BENCHMARKS.md's recovery table is stale: run python benchmarks/recovery_budget.py --table --write"


def _points(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (results / "quick" / "0.3").glob("*.json")}


def test_quick_writes_each_point_as_scored_and_a_rerun_keeps_them(tmp_path, model_dir, text_file, monkeypatch, capsys):
    args = ["--quick", "--model", str(model_dir), "--text", str(text_file), "--results", str(tmp_path / "results"),
            "--cache", str(tmp_path / "cache")]
    scored, real = [], recovery_budget.score_on

    def stop_at_the_third_point(*a, **kw):  # the dense reference's pass, then 2 points of the first row
        if len(scored) == 3:
            raise KeyboardInterrupt
        scored.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(recovery_budget, "score_on", stop_at_the_third_point)
    with pytest.raises(KeyboardInterrupt):
        recovery_budget.main(args)
    monkeypatch.undo()
    first = _points(tmp_path / "results")
    assert [p["budget"] for p in first["come-sp"]["points"]] == [0, 1024]  # each point on disk once scored

    recovery_budget.main(args)
    rows = _points(tmp_path / "results")
    protocol = recovery_budget.quick_protocol(str(text_file))
    assert set(rows) == {r["file"] for r in recovery_budget.rows(protocol, protocol["peer"])}
    assert rows["come-sp"]["points"][:2] == first["come-sp"]["points"]  # kept, not run again (its seconds too)
    for name, row in rows.items():
        points = row["points"]
        assert [p["budget"] for p in points] == [0, 1024, 2048], name
        assert all(p["tokens"] >= p["budget"] and p["kl"] > 0 for p in points), name
        assert len(points[-1]["fidelity"]["per_window"]["kl"]) == protocol["kl"]["windows"]
    assert rows["reverse-order-last"]["distill"]["train"] == "last:2,head"
    assert rows["reverse-order-last"]["groups"][-1] == [5]  # reverse order keeps the final layer
    assert rows["come-mp"]["distill"]["mode"] == "mp" and rows["peer-sp"]["spec"] == "sleb:refit=ls"
    for name in ("come-sp", "reverse-order-last"):
        assert rows[name]["points"][-1]["kl"] < rows[name]["points"][0]["kl"], name  # the budget bought something

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*.json")}
    recovery_budget.main(args)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*.json")} == stamps
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text())
    with pytest.raises(SystemExit, match="was made with other protocol: remove it or pass another --results"):
        recovery_budget.main([*args[:3], "--text", str(other), *args[5:]])

    png = tmp_path / "curves.png"
    recovery_budget.main([*args, "--table", "--plot", str(png)])
    out = capsys.readouterr().out
    for name, row in rows.items():
        line = next(x for x in out.splitlines() if x.startswith(f"| {row['row']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1].strip("*").startswith(f"{row['points'][0]['kl']:.4f}"), name
    for budget in (0, 1024, 2048):  # the lowest KL of each budget is the one in bold
        best = min(rows.values(), key=lambda r: next(p["kl"] for p in r["points"] if p["budget"] == budget))
        assert f"**{next(p['kl'] for p in best['points'] if p['budget'] == budget):.4f}**" in out
    assert png.stat().st_size > 10_000


def test_task_docs_trains_written_points_again_to_add_their_tasks(tmp_path, model_dir, text_file, task_dir, capsys):
    """A point written without tasks is trained again for them: the same KL (deterministic on one
    thread), now with per-document tasks; the dense model's go to dense.json, which is not a row;
    the table gives each row's accuracy and its paired difference from the most accurate row."""
    from come.evaluation.evaluate import average, paired_delta

    args = ["--quick", "--model", str(model_dir), "--text", str(text_file), "--results", str(tmp_path / "results"),
            "--cache", str(tmp_path / "cache"), "--rows", "come-sp,shortgpt-refit-sp", "--budgets", "1024"]
    recovery_budget.main(args)
    before = _points(tmp_path / "results")
    assert all("tasks" not in p for r in before.values() for p in r["points"])
    with_tasks = [*args, "--task-docs", "4", "--tasks", "arc_easy", "--task-data", str(task_dir)]
    recovery_budget.main(with_tasks)
    after = _points(tmp_path / "results")
    assert set(after) == {"come-sp", "shortgpt-refit-sp", "dense"}
    assert after["dense"]["task_docs"] == 4 and after["dense"]["tasks"]["arc_easy"]["n"] == 4
    for name in ("come-sp", "shortgpt-refit-sp"):
        for old, new in zip(before[name]["points"], after[name]["points"], strict=True):
            assert new["budget"] == old["budget"] and new["kl"] == old["kl"], name  # the same model again
            assert new["task_docs"] == 4 and len(new["tasks"]["arc_easy"]["per_doc"]["acc_norm"]) == 4
    assert "run again for its tasks" in capsys.readouterr().err

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*.json")}
    recovery_budget.main(with_tasks)  # nothing left to do
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*.json")} == stamps

    target = tmp_path / "B.md"
    target.write_text(f"# B\n\n{recovery_budget.START}\nold\n{recovery_budget.END}\n")
    recovery_budget.main([*args, "--table", "--write", str(target)])
    out = capsys.readouterr().out
    assert read_block(target, recovery_budget.START, recovery_budget.END) == out.strip("\n")
    assert "acc at 1.024K" in out and "Δ acc vs best at 1.024K ± SE" in out
    at = {name: {p["budget"]: p for p in after[name]["points"]} for name in ("come-sp", "shortgpt-refit-sp")}
    accs = {name: average(pts[1024]["tasks"]) for name, pts in at.items()}
    best = max(accs, key=accs.get)
    worse = min(accs, key=accs.get)
    line = next(x for x in out.splitlines() if x.startswith(f"| {after[worse]['row']} |"))
    if accs[worse] < accs[best]:
        d = paired_delta(at[worse][1024]["tasks"], at[best][1024]["tasks"])
        assert f"{d[0]:+.3f} ± {d[1]:.3f}" in line
    assert f"the dense model {average(after['dense']['tasks']):.3f}" in out and "chance 0.250" in out
    with pytest.raises(SystemExit, match="--task-docs needs a positive count and --task-data"):
        recovery_budget.main([*args, "--task-docs", "4"])
