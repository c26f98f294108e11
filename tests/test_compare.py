"""`come compare`: every method on the same calibration, one report whose table equals the
eval results it came from."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from come.cli import app

runner = CliRunner()


def test_compare_report(tmp_path, model_dir, text_file):
    out = tmp_path / "report"
    result = runner.invoke(app, ["compare", str(model_dir), "--out", str(out), "--sparsity", "0.3",
                                 "--methods", "come,shortgpt,laco,average", "--calib", str(text_file),
                                 "--nsamples", "8", "--seqlen", "32", "--device", "cpu", "--tasks", "none",
                                 "--ppl-data", str(text_file), "--eval-seqlen", "64"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["dense", "come", "shortgpt", "laco", "average"]
    for name in ("come", "shortgpt", "laco", "average"):
        assert rows[name]["layers"] < rows["dense"]["layers"]
        assert rows[name]["achieved_sparsity"] >= 0.3
    from come.checkpoint import load_model
    from come.evaluate import evaluate

    dense, tok = load_model(str(model_dir))
    direct = evaluate(dense, tok, tasks=[], ppl_data=str(text_file), seqlen=64)
    assert rows["dense"]["perplexity"] == direct["perplexity"]
    md = (out / "report.md").read_text()
    for r in report["rows"]:
        assert f"| {r['method']} |" in md and f"{r['perplexity']:.2f}" in md
    assert {"accuracy.png", "merge_map.png", "pair_scores.png"} <= {p.name for p in out.iterdir()}
    bad = runner.invoke(app, ["compare", str(model_dir), "--out", str(tmp_path / "r2"), "--methods", "come,magic",
                              "--calib", str(text_file), "--tasks", "none", "--ppl-data", "none"])
    assert bad.exit_code == 2 and "unknown magic" in bad.output
