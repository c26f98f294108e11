"""The model card (README.md) every `come` output carries: Hub front matter that parses (and
that huggingface_hub reads), a body naming every group with the Plan's own numbers, the
evaluation section `add_eval_to_card` fills in place, idempotently, and a distilled model's
card that says so. The card never gets in the way of `from_pretrained`."""

from __future__ import annotations

import copy
import json
import re

import pytest
import transformers
import yaml

from come.models.checkpoint import save_checkpoint, source_metadata
from come.models.model_card import CARD_FILE, EVAL_END, EVAL_START, add_eval_to_card, front_matter, model_card
from come.settings.plan import PLAN_FILE, MergeRecord, Plan, load_plan

HUB_ID = "HuggingFaceTB/SmolLM2-135M"
RESULTS = {
    "tasks": {"arc_easy": {"acc": 0.4123, "acc_norm": 0.3987, "n": 50, "split": "test", "usual_split": "test"},
              "boolq": {"acc": 0.6021, "acc_norm": None, "n": 50, "split": "validation", "usual_split": "validation"}},
    "average": 0.50040, "perplexity": 123.4567,
    "settings": {"limit": 50, "skip": 0, "ppl_data": "wikitext2", "seqlen": 32, "ppl_windows": 4, "ppl_tokens": 128,
                 "task_data": None, "wall_time_s": 1.5},
}


@pytest.fixture(scope="module")
def compressed(tokenizer, one_thread):
    """(teacher, student, plan) of a tiny LLaMA compressed 6 -> 4 layers, the Plan naming a Hub model."""
    from golden_distill import student_pair

    teacher, student, plan = student_pair(tokenizer)
    plan.model = HUB_ID
    return teacher, student, plan


@pytest.fixture
def saved(compressed, tokenizer, tmp_path):
    out = save_checkpoint(compressed[1], tokenizer, compressed[2], tmp_path / "tiny-come")
    return out, (out / CARD_FILE).read_text()


def _yaml_block(card: str) -> dict:
    assert card.startswith("---\n")
    block = card.split("---\n", 2)[1]
    return yaml.safe_load(block)


def _table(card: str, label: str) -> list[str]:
    line = next(row for row in card.splitlines() if row.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_card_of_a_compressed_model(saved, compressed):
    out, card = saved
    plan = load_plan(out)
    meta = _yaml_block(card)
    assert meta["base_model"] == HUB_ID and meta["library_name"] == "transformers"
    assert {"come", "pruning", "layer-merging", plan.method} <= set(meta["tags"]) and "license" not in meta
    assert front_matter(card) == meta
    hub = pytest.importorskip("huggingface_hub").ModelCard.load(out / CARD_FILE)  # the Hub's own reader
    assert hub.data.base_model == HUB_ID and hub.data.library_name == "transformers"

    assert _table(card, "decoder layers") == [str(plan.num_layers_before), str(plan.num_layers_after)]
    assert _table(card, "parameters") == [f"{plan.params_before:,}", f"{plan.params_after:,}"]
    assert f"{100 * plan.achieved_sparsity:.2f}% (target {100 * plan.target_sparsity:.2f}%)" in card
    rows = [line for line in card.splitlines() if re.match(r"\| \d+ \| [\d, -]+ \|", line)]
    assert len(rows) == len(plan.groups) == plan.num_layers_after
    for k, (row, group) in enumerate(zip(rows, plan.groups)):
        span = f"{group[0]}-{group[-1]}" if len(group) > 1 else str(group[0])
        assert row.startswith(f"| {k} | {span} | ")
        assert ("`concat`" in row) == (len(group) > 1)
    for key, value in plan.settings.items():
        assert f"| `--{key.replace('_', '-')}` | {'-' if value is None else value} |" in card
    assert "AutoModelForCausalLM.from_pretrained(\"tiny-come\")" in card
    assert "Not evaluated yet" in card

    model = transformers.AutoModelForCausalLM.from_pretrained(out)  # a README is no obstacle
    assert model.config.num_hidden_layers == plan.num_layers_after
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_no_plan_no_card(compressed, tokenizer, tmp_path):
    out = save_checkpoint(compressed[0], tokenizer, None, tmp_path / "dense")
    assert not (out / CARD_FILE).exists()


def test_add_eval_to_card_inserts_the_numbers_and_is_idempotent(saved):
    out, before = saved
    path = out / CARD_FILE
    assert add_eval_to_card(out, RESULTS) == path
    card = path.read_text()
    head, tail = before.split(EVAL_START)[0], before.split(EVAL_END)[1]
    assert card.startswith(head) and card.endswith(tail)  # only the evaluation section changed
    section = card[card.index(EVAL_START):card.index(EVAL_END)]
    for number in ("0.4123", "0.3987", "0.6021", "0.5004", "123.4567", "50 documents per task", "128 tokens of wikitext2"):
        assert number in section, number
    assert "| arc_easy | test | 50 | 0.4123 | 0.3987 |" in section and "Not evaluated" not in card
    add_eval_to_card(out, RESULTS)
    assert path.read_text() == card
    assert _yaml_block(card) == _yaml_block(before)

    with_ret = {**RESULTS, "retention": {"tasks": {"arc_easy": {"acc": 91.25, "acc_norm": 90.0}}, "average": 88.8,
                                         "perplexity": 140.0}}
    add_eval_to_card(out, with_ret)
    again = path.read_text()
    assert "| arc_easy | test | 50 | 0.4123 | 0.3987 | 91.2 | 90.0 |" in again and "| average (paper metrics) | 0.5004 | 88.8 |" in again
    assert again.count(EVAL_START) == 1 and again.count("## Evaluation") == 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_add_eval_to_card_leaves_other_readmes_alone(tmp_path):
    assert add_eval_to_card(tmp_path, RESULTS) is None and not (tmp_path / CARD_FILE).exists()
    (tmp_path / CARD_FILE).write_text("---\nlicense: mit\n---\n# someone's model\n")
    assert add_eval_to_card(tmp_path, RESULTS) is None
    assert (tmp_path / CARD_FILE).read_text() == "---\nlicense: mit\n---\n# someone's model\n"


def test_distilled_model_card_says_so(compressed, tokenizer, tmp_path):
    from come import DistillConfig, distill
    from conftest import corpus

    teacher, student, plan = compressed
    (tmp_path / "train.txt").write_text(corpus())
    cfg = DistillConfig(data=str(tmp_path / "train.txt"), seqlen=32, batch_size=2, eval_windows=2, steps=2,
                        device="cpu", lora_r=2)
    student, log = distill(copy.deepcopy(teacher), copy.deepcopy(student), tokenizer, plan, cfg)
    out = save_checkpoint(student, tokenizer, plan, tmp_path / "distilled", distill_log=log)
    card = (out / CARD_FILE).read_text()
    assert "distillation" in _yaml_block(card)["tags"] and "## Distillation" in card
    assert "`come distill --mode sp`" in card and "LoRA adapters of rank 2" in card
    first, last = log["eval"][0], log["eval"][-1]
    assert f"| KL to the original | {first['kl']:.4f} | {last['kl']:.4f} |" in card
    assert f"{log['tokens_seen']:,} tokens of {cfg.data}" in card
    assert "come distill --teacher ORIGINAL" not in card  # no advice to do what was done


def test_source_metadata(tmp_path):
    """A Hub id is its own base; a local directory gives its config's _name_or_path when that is
    a Hub id, and the license its README's front matter (or config) states."""
    assert source_metadata(HUB_ID)[0] == HUB_ID
    assert source_metadata("") == (None, None) and source_metadata(str(tmp_path / "missing" / "x.gguf")) == (None, None)
    local = tmp_path / "local"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": "org/base-7b", "model_type": "llama"}))
    (local / CARD_FILE).write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# a model\n")
    assert source_metadata(str(local)) == ("org/base-7b", "apache-2.0")
    (local / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/ckpt", "license": "mit"}))
    (local / CARD_FILE).write_text("no front matter")
    assert source_metadata(str(local)) == (None, "mit")


def test_card_of_a_dropping_method_with_a_license():
    plan = Plan(model="", method="shortgpt", settings={"sparsity": 0.3, "protect": []}, num_layers_before=4,
                num_layers_after=3, params_before=400, params_after=300, target_sparsity=0.25, achieved_sparsity=0.25,
                groups=[[0], [1, 2], [3]],
                merges=[MergeRecord(0, 1, [1], [2], "drop", [0], [], [0], [], 1.0, 0.1, 0.2, 0.2, [], 400, 300)])
    card = model_card(plan, RESULTS, license="apache-2.0", name="x")
    meta = _yaml_block(card)
    assert meta["license"] == "apache-2.0" and "layer-dropping" in meta["tags"] and "base_model" not in meta
    assert "| 1 | 1-2 | `drop` |" in card and "| 0 | 0 | unchanged |" in card
    assert "0.4123" in card and PLAN_FILE in card
