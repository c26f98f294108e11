"""`come compare`: every method on the same calibration, one report whose table equals the
eval results it came from."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from come.cli.app import app
from come.scoring.fidelity import ReferenceWriter

runner = CliRunner()


def _compare(model_dir, text_file, out, methods: str, eval_seqlen: int, windows: int):
    """`come compare` at 30% on the tiny model, perplexity (and KL) only."""
    return runner.invoke(app, ["compare", str(model_dir), "--out", str(out), "--sparsity", "0.3", "--methods", methods,
                               "--calib", str(text_file), "--nsamples", "8", "--seqlen", "32", "--device", "cpu",
                               "--tasks", "none", "--ppl-data", str(text_file), "--eval-seqlen", str(eval_seqlen),
                               "--ppl-windows", str(windows)])


def test_compare_report(tmp_path, model_dir, text_file):
    out = tmp_path / "report"
    result = _compare(model_dir, text_file, out, "come,shortgpt,laco,average,shortgpt:refit=ls", 64, 2)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["dense", "come", "shortgpt", "laco", "average", "shortgpt:refit=ls"]
    # the override changes the operator's recovery, not the layers chosen
    assert rows["shortgpt:refit=ls"]["groups"] == rows["shortgpt"]["groups"]
    assert rows["shortgpt:refit=ls"]["perplexity"] != rows["shortgpt"]["perplexity"]
    for name in ("come", "shortgpt", "laco", "average"):
        assert rows[name]["layers"] < rows["dense"]["layers"]
        assert rows[name]["achieved_sparsity"] >= 0.3
    from come.evaluation.evaluate import evaluate
    from come.models.checkpoint import load_model

    dense, tok = load_model(str(model_dir))
    direct = evaluate(dense, tok, tasks=[], ppl_data=str(text_file), seqlen=64, ppl_windows=2)
    assert rows["dense"]["perplexity"] == direct["perplexity"]
    assert direct["perplexity"] != evaluate(dense, tok, tasks=[], ppl_data=str(text_file), seqlen=64)["perplexity"]
    md = (out / "report.md").read_text()
    for r in report["rows"]:
        assert f"| {r['method']} |" in md and f"{r['perplexity']:.2f}" in md
    # --tasks none: no accuracy figure, and nothing in the text about task scores
    assert {p.name for p in out.glob("*.png")} == {"merge_map.png", "pair_scores.png"}
    assert "docs per task" not in md and "Task scores" not in md and "retention" not in md
    assert "| vs come (± paired SE)" not in md and "| KL vs come (± paired SE)" in md  # no task delta; the KL one
    bad = runner.invoke(app, ["compare", str(model_dir), "--out", str(tmp_path / "r2"), "--methods", "come,magic",
                              "--calib", str(text_file), "--tasks", "none", "--ppl-data", "none"])
    assert bad.exit_code == 2 and "unknown method 'magic'" in bad.output


def test_method_overrides_parse_and_validate():
    from come.errors import ComeError
    from come.settings.config import CompressConfig
    from come.settings.specs import method_list

    specs = method_list("come, come:refit=none, shortgpt:refit=ls:max-cache-gb=2, come:no_repeat=true")
    cfgs = [s.config(CompressConfig(refit="ls")).resolved() for s in specs]
    assert [s.label for s in specs] == ["come", "come:refit=none", "shortgpt:refit=ls:max-cache-gb=2",
                                        "come:no_repeat=true"]
    assert [c.refit for c in cfgs] == ["ls", "none", "ls", "ls"]  # a method's own default unless overridden
    assert cfgs[2].max_cache_gb == 2.0 and cfgs[3].no_repeat is True
    for text, msg in [("come:refit=maybe", "--refit must be one of"), ("come:colour=red", "bad override"),
                      ("come:sparsity=0.5", "bad override"), ("come:skew=high", "takes a number"),
                      ("come:no_repeat=1", "true or false"), ("come,come", "listed twice"), (" , ", "none given"),
                      ("laco:pair_score=error", "--pair-score error")]:
        try:
            method_list(text)
        except ComeError as e:
            assert msg in str(e) and "\n" not in str(e), (text, e)
        else:
            raise AssertionError(f"{text} was accepted")


def _record(step, position, scores, operator="concat", group_b=(1,)):
    from come.settings.plan import MergeRecord

    return MergeRecord(step=step, position=position, group_a=[position], group_b=list(group_b), operator=operator,
                       kv_a=[], kv_b=[], ffn_a=[], ffn_b=[], r_a=0.5, bi_a=0.1, bi_b=0.1, pair_score=min(scores),
                       pair_scores=scores, params_before=10, params_after=8)


def _rows(tasks):
    def row(method, score, delta):
        per_task = {t: {"score": score, "acc": score, "acc_norm": score, "n": 10} for t in tasks}
        average = score if tasks else None
        return {"method": method, "tasks": per_task, "average": average, "perplexity": 20.0 + score,
                "params": 134_520_000, "layers": 30, "compress_s": None if method == "dense" else 12.3,
                "retention_pct": 100.0 * score / 0.5 if tasks else None,
                "delta": {"vs": "come", "average": delta, "se": 0.01} if tasks and delta is not None else None}

    return [row("dense", 0.5, 0.1), row("come", 0.4, None), row("shortgpt", 0.3, -0.1)]


def _plans():
    from come.settings.plan import Plan

    come = Plan("m", "come", {"pair_score": "bi-all-tokens"}, 6, groups=[[0, 1, 2], [3], [4], [5]],
                merges=[_record(0, 1, [1.0, 0.1, 0.2, 0.3, 0.2]), _record(1, 0, [0.9, 0.2, 0.25, 0.3])])
    shortgpt = Plan("m", "shortgpt", {"pair_score": "angular"}, 6, groups=[[0], [1, 2], [3, 4], [5]],
                    merges=[_record(k, k, [1.0, 0.3, 0.1, 0.4, 0.05, 0.5], "drop", (i,)) for k, i in ((1, 2), (2, 4))])
    return {"come": come, "shortgpt": shortgpt}


def _table_heads(md: str) -> list[str]:
    head = next(line for line in md.splitlines() if line.startswith("| method"))
    return [c.strip() for c in head.strip("|").split("|")]


def test_report_text_matches_its_table(tmp_path):
    """With tasks: task columns, average, vs, retention, each explained, and the accuracy bars.
    Without: only perplexity, params, layers and time, no note or figure about the rest."""
    from come.evaluation.report import write_report

    for tasks in (["arc_easy", "boolq"], []):
        out = tmp_path / ("tasks" if tasks else "none")
        write_report(out, _rows(tasks), tasks, _plans(), "Model m; eval: ...")
        md = (out / "report.md").read_text()
        heads = _table_heads(md)
        with_tasks = bool(tasks)
        assert heads[:1 + len(tasks)] == ["method", *tasks]
        assert ("average" in heads) is ("Task scores" in md) is with_tasks
        assert ("vs come (± paired SE)" in heads) is ("vs come:" in md) is with_tasks
        assert ("retention %" in heads) is ("retention:" in md) is with_tasks
        assert heads[-4:] == ["perplexity", "params", "layers", "time (s)"]
        assert "| dense | " in md and "134.52M" in md and "| 12.3 |" in md
        linked = {line[line.index("(") + 1:-1] for line in md.splitlines() if line.startswith("![")}
        assert linked == {p.name for p in out.glob("*.png")}
        assert ("accuracy.png" in linked) is with_tasks and {"merge_map.png", "pair_scores.png"} <= linked


def test_pair_score_colours_are_not_set_by_one_large_score():
    """Layer 0's large score would make every other cell one colour: the scale stops at a
    percentile, so the rest of the scores spread over it."""
    import numpy as np

    from come.evaluation.plots import _robust_norm, dropped_layers

    grid = np.array([[1.0, 0.10, 0.12, 0.14, 0.16, 0.18, 0.20, 0.22, 0.24, 0.26, 0.28, np.nan]])
    norm = _robust_norm(grid)
    assert norm.vmin == 0.10 and norm.vmax < 0.5
    spread = norm(grid[0, 1:11])
    assert spread.max() - spread.min() > 0.8
    assert dropped_layers(_plans()["shortgpt"]) == {2, 4} and dropped_layers(_plans()["come"]) == set()


def test_compare_scores_every_row_against_one_reference_pass(tmp_path, model_dir, text_file, monkeypatch):
    built = []
    monkeypatch.setattr(ReferenceWriter, "close", lambda self, close=ReferenceWriter.close: built.append(self.count)
                        or close(self))
    out = tmp_path / "report"
    result = _compare(model_dir, text_file, out, "shortgpt,shortgpt:refit=ls", 32, 3)
    assert result.exit_code == 0, result.output
    assert built == [3]  # one reference, from the dense row's own perplexity pass
    rows = {r["method"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert rows["dense"]["fidelity"] is None
    a, b = rows["shortgpt"]["fidelity"], rows["shortgpt:refit=ls"]["fidelity"]
    assert a["kl"]["mean"] > 0 and a["kl"]["mean"] != b["kl"]["mean"]
    diff = rows["shortgpt:refit=ls"]["kl_delta"]
    assert diff["vs"] == "shortgpt" and diff["kl"] == pytest.approx(b["kl"]["mean"] - a["kl"]["mean"])
    md = (out / "report.md").read_text()
    assert "KL to dense" in md and f"{a['kl']['mean']:.4f}" in md and "KL vs shortgpt" in md
