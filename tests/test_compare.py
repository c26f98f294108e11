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
                                 "--methods", "come,shortgpt,laco,average,shortgpt:refit=ls", "--calib", str(text_file),
                                 "--nsamples", "8", "--seqlen", "32", "--device", "cpu", "--tasks", "none",
                                 "--ppl-data", str(text_file), "--eval-seqlen", "64", "--ppl-windows", "2"])
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
    from come.checkpoint import load_model
    from come.evaluate import evaluate

    dense, tok = load_model(str(model_dir))
    direct = evaluate(dense, tok, tasks=[], ppl_data=str(text_file), seqlen=64, ppl_windows=2)
    assert rows["dense"]["perplexity"] == direct["perplexity"]
    assert direct["perplexity"] != evaluate(dense, tok, tasks=[], ppl_data=str(text_file), seqlen=64)["perplexity"]
    md = (out / "report.md").read_text()
    for r in report["rows"]:
        assert f"| {r['method']} |" in md and f"{r['perplexity']:.2f}" in md
    assert {"accuracy.png", "merge_map.png", "pair_scores.png"} <= {p.name for p in out.iterdir()}
    bad = runner.invoke(app, ["compare", str(model_dir), "--out", str(tmp_path / "r2"), "--methods", "come,magic",
                              "--calib", str(text_file), "--tasks", "none", "--ppl-data", "none"])
    assert bad.exit_code == 2 and "unknown method 'magic'" in bad.output


def test_method_overrides_parse_and_validate():
    from come.compare import method_list
    from come.config import CompressConfig
    from come.errors import ComeError

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
