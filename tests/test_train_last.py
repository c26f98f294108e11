"""`come distill --train last:K[,head]` (reverse-order pruning's recovery, "Reassessing Layer
Pruning"): exactly the last K decoder layers (and the LM head) train, a tied head trains as
the embedding's matrix, LoRA goes on the layers, checkpoints resume it and refuse a change,
the memory plan counts it, and every bad value is one line before any weight loads."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import transformers
from torch import nn
from typer.testing import CliRunner

from come import CompressConfig, ComeError, compress
from come.cli.app import app
from come.models.checkpoint import save_checkpoint
from come.models.data import token_windows
from come.models.model_card import model_card
from come.recovery.distill import distill, trainable_layers
from come.recovery.distill_losses import head_kl
from come.recovery.distill_memory import memory_plan
from come.settings.distill_config import DistillConfig, TrainSet, train_set

from conftest import corpus, tiny_model
from shard_worker import measured

SMALL = dict(seqlen=32, batch_size=4, eval_windows=8, device="cpu", warmup=0.1, lr=3e-3)

pytestmark = pytest.mark.usefixtures("one_thread")


def _compressed(tokenizer, tied: bool):
    """A tiny teacher (6 layers; its head tied to the embedding or not) and its student pruned
    in reverse order, the paper's setting."""
    teacher = tiny_model("llama", tie_word_embeddings=tied)
    calib = token_windows(corpus(), tokenizer, 8, 32, seed=0)
    cfg = CompressConfig(method="reverse-order", sparsity=0.3, device="cpu")
    student, plan = compress(copy.deepcopy(teacher), tokenizer, cfg, calib=calib)
    return teacher, student, plan


@pytest.fixture(scope="module")
def pairs(tokenizer, tmp_path_factory):
    """{tied: (teacher, student, plan)} and a training text."""
    text = tmp_path_factory.mktemp("train_last") / "train.txt"
    text.write_text(corpus())
    return {tied: _compressed(tokenizer, tied) for tied in (False, True)}, str(text)


def _run(pairs, tokenizer, tied=False, **cfg):
    (teacher, student, plan), text = pairs[0][tied], pairs[1]
    return distill(teacher, copy.deepcopy(student), tokenizer, plan, DistillConfig(data=text, **{**SMALL, **cfg}))


def _changed(before: nn.Module, after: nn.Module) -> set[str]:
    new = after.state_dict()
    return {name for name, tensor in before.state_dict().items() if not torch.equal(new[name], tensor)}


def _layer_names(model: nn.Module, layers) -> set[str]:
    return {n for n in model.state_dict() if n.startswith("model.layers.") and int(n.split(".")[2]) in layers}


# ---- what trains -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, train, changed", [("sp", "last:2", {1, 2}), ("sp", "last:1", {2}),
                                                  ("sp", "last:2,head", {1, 2}), ("mp", "last:2", {1})])
def test_exactly_the_last_k_layers_and_the_head_change(pairs, tokenizer, caplog, mode, train, changed):
    """In mp the final layer, which stands for itself alone, sees the teacher's own input and
    target: it has nothing to learn there and stays bit for bit (said in one warning)."""
    _, student, plan = pairs[0][False]
    assert plan.groups == [[0], [1, 2, 3, 4], [5]]
    with caplog.at_level("WARNING", logger="come"):
        after, log = _run(pairs, tokenizer, mode=mode, train=train, steps=3)
    assert log["trainable_layers"] == list(range(3 - train_set(train).last, 3)) and log["settings"]["train"] == train
    want = _layer_names(student, changed) | ({"lm_head.weight"} if train.endswith(",head") else set())
    assert _changed(student, after) == want
    assert log["eval"][-1]["kl"] < log["eval"][0]["kl"]
    assert ("and the LM head (in full) were trained" in model_card(plan, None, log)) == train.endswith(",head")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == (["mp: layers [2] of --train last:2 stand for one original layer each, so they see the "
                         "teacher's own input and target and do not change; use --mode sp to train them"]
                        if mode == "mp" else [])


def test_a_tied_head_trains_as_the_embedding_matrix_and_stays_tied(pairs, tokenizer, caplog):
    _, student, plan = pairs[0][True]
    n = len(plan.groups)
    with caplog.at_level("INFO", logger="come"):
        after, _ = _run(pairs, tokenizer, tied=True, train="last:1,head", steps=3)
    assert after.lm_head.weight is after.model.embed_tokens.weight
    assert _changed(student, after) == _layer_names(student, {n - 1}) | {"lm_head.weight", "model.embed_tokens.weight"}
    assert any("tied to the input embedding" in r.getMessage() for r in caplog.records)


def test_lora_goes_on_the_last_layers_and_the_head_trains_in_full(pairs, tokenizer):
    _, student, plan = pairs[0][False]
    n = len(plan.groups)
    after, _ = _run(pairs, tokenizer, train="last:2,head", steps=3, lr=1e-2, lora_r=2)
    projections = {name for name in _layer_names(student, range(n - 2, n)) if name.endswith("proj.weight")}
    assert _changed(student, after) == projections | {"lm_head.weight"}  # the layers' norms stay frozen under LoRA
    old, new = student.state_dict(), after.state_dict()
    for name in projections:
        assert torch.linalg.matrix_rank(new[name].double() - old[name].double(), rtol=1e-5) <= 2, name
    assert torch.linalg.matrix_rank(new["lm_head.weight"].double() - old["lm_head.weight"].double()) > 2


def test_head_kl_gives_the_student_heads_weights_the_full_kls_gradient():
    """With a trainable head the chunked KL's weight gradients are the unchunked KL's, seeded
    with the upstream gradient or rescaled when told another one, as for the hidden states."""
    torch.manual_seed(0)
    head_t, head_s = nn.Linear(8, 50), nn.Sequential(nn.LayerNorm(8).requires_grad_(False), nn.Linear(8, 50))
    h_t, h_s = torch.randn(2, 7, 8), torch.randn(2, 7, 8, requires_grad=True)
    full = torch.nn.functional.kl_div(torch.log_softmax(head_s(h_s), -1), torch.log_softmax(head_t(h_t), -1),
                                      log_target=True, reduction="sum")
    (3.0 * full).backward()
    want = [p.grad for p in head_s[1].parameters()]
    for told in (3.0, 0.5):
        head_s.zero_grad(set_to_none=True)
        (3.0 * head_kl(head_t, head_s, h_t, h_s, 1.0, 3, torch.tensor(told))).backward()
        for p, w in zip(head_s[1].parameters(), want):
            torch.testing.assert_close(p.grad, w)
    assert head_s[0].weight.grad is None


# ---- resume ------------------------------------------------------------------------------------

def test_resume_continues_the_head_and_refuses_another_train(pairs, tokenizer, tmp_path):
    """The checkpoint carries the head: resumed from the step-2 checkpoint a finished run kept,
    the run ends as it did; a resume with another --train is one line naming it, and changes
    nothing."""
    cfg = dict(train="last:2,head", steps=4, save_every=2, checkpoint_dir=str(tmp_path))
    whole, _ = _run(pairs, tokenizer, **cfg)
    assert [p.name for p in tmp_path.iterdir()] == ["step_2"]
    saved = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(ComeError, match=r"--train last:2,head \(now last:2\)") as exc:
        _run(pairs, tokenizer, resume=True, **{**cfg, "train": "last:2"})
    assert "\n" not in str(exc.value)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == saved
    resumed, log = _run(pairs, tokenizer, resume=True, **cfg)
    assert log["resumed_from"] == 2
    assert all(torch.equal(t, resumed.state_dict()[n]) for n, t in whole.state_dict().items())


# ---- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(train="last:0"), "--train last:0: K must be a whole number >= 1"),
    (dict(train="last:x"), "--train last:x: K must be a whole number >= 1"),
    (dict(train="last:-1"), "--train last:-1: K must be a whole number >= 1"),
    (dict(train="last:3,foo"), "only ',head' may follow last:K; write last:3 or last:3,head"),
    (dict(train="last:3,head,head"), "only ',head' may follow"),
    (dict(train="first:3"), "--train must be merged, all, last:K or last:K,head"),
    (dict(train="last"), "--train must be merged, all, last:K or last:K,head"),
    (dict(train="merged,head"), "--train must be merged, all, last:K or last:K,head"),
    (dict(train="last:3,head", mode="mp"), "needs --mode sp"),
    (dict(train="last:3,head", shard=True), "sharded runs train decoder layers only"),
])
def test_bad_train_values_are_one_line_and_read_only(settings, message):
    cfg = DistillConfig(**settings)
    before = dataclasses.asdict(cfg)
    with pytest.raises(ComeError, match=message) as exc:
        cfg.validate()
    assert "\n" not in str(exc.value) and dataclasses.asdict(cfg) == before


def test_train_forms_parse_and_pick_their_layers():
    groups = [[0, 1], [2], [3, 4], [5]]
    assert [train_set(t) for t in ("merged", "all", "last:3", "last:1,head")] == [
        TrainSet("merged"), TrainSet("all"), TrainSet("last", 3), TrainSet("last", 1, True)]
    assert [trainable_layers(groups, t) for t in ("merged", "all", "last:3", "last:1,head")] == [
        [0, 2], [0, 1, 2, 3], [1, 2, 3], [3]]


def test_k_of_every_layer_is_refused_by_the_api_before_training(pairs, tokenizer):
    _, student, plan = pairs[0][False]
    n = len(plan.groups)
    kept = copy.deepcopy(student)
    with pytest.raises(ComeError, match=f"--train last:{n} asks for the last {n} of the student's {n} decoder "
                                        f"layers: K must be below {n}") as exc:
        distill(pairs[0][False][0], kept, tokenizer, plan, DistillConfig(data=pairs[1], train=f"last:{n}", **SMALL))
    assert "\n" not in str(exc.value) and not _changed(student, kept)


@pytest.fixture(scope="module")
def saved(pairs, tokenizer, tmp_path_factory):
    """saved(tied, dtype) -> a folder with teacher/, student/ (stored in `dtype`) and train.txt."""
    folders = {}

    def folder(tied: bool = False, dtype: torch.dtype = torch.float32):
        if (tied, dtype) not in folders:
            root = folders[tied, dtype] = tmp_path_factory.mktemp("cli")
            teacher, student, plan = pairs[0][tied]
            save_checkpoint(copy.deepcopy(teacher).to(dtype), tokenizer, None, root / "teacher")
            save_checkpoint(copy.deepcopy(student).to(dtype), tokenizer, plan, root / "student")
            (root / "train.txt").write_text(corpus())
        return folders[tied, dtype]

    return folder


def _cli(root, out, *extra: str):
    return CliRunner().invoke(app, ["distill", "--teacher", str(root / "teacher"), "--student", str(root / "student"),
                                    "--out", str(out), "--data", str(root / "train.txt"), "--seqlen", "32",
                                    "--batch-size", "2", "--eval-windows", "2", "--device", "cpu", "--steps", "1",
                                    *extra])


@pytest.mark.parametrize("train, mode", [("last:{n}", "sp"), ("last:{n5}", "sp"), ("last:0", "sp"),
                                         ("last:2,foo", "sp"), ("last:2,head", "mp")])
def test_cli_refuses_before_any_weight_loads_and_writes_nothing(pairs, saved, monkeypatch, train, mode):
    root, n = saved(), len(pairs[0][False][2].groups)

    def no_loading(*_args, **_kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr("come.models.checkpoint.load_model", no_loading)
    out = root / "refused"
    result = _cli(root, out, "--train", train.format(n=n, n5=n + 5), "--mode", mode)
    assert result.exit_code == 2
    message = result.output.strip()
    assert message.startswith("error:") and "\n" not in message and "--train" in message
    assert not out.exists()


# ---- the memory plan ---------------------------------------------------------------------------

@pytest.mark.parametrize("train, tied, dtype", [("last:2", False, torch.float32), ("last:2,head", False, torch.float32),
                                                ("last:2,head", False, torch.bfloat16),
                                                ("last:2,head", True, torch.bfloat16)])
def test_the_memory_plan_is_the_bytes_the_run_held(pairs, saved, tmp_path, train, tied, dtype):
    """The plan from the configs against the bytes held after the first step: the student's
    weights with what trains in fp32 (under bf16: the head too, a tied one as the embedding's
    one matrix), and the gradients and AdamW moments of the last layers and the head."""
    root, n = saved(tied, dtype), len(pairs[0][tied][2].groups)
    bf16 = dtype == torch.bfloat16
    with measured(str(tmp_path / "bytes.json")):
        result = _cli(root, tmp_path / "out", "--train", train, "--dtype", "bf16" if bf16 else "fp32")
    assert result.exit_code == 0, result.output
    held = json.loads((tmp_path / "bytes.json.0").read_text())
    configs = [transformers.AutoConfig.from_pretrained(root / name) for name in ("teacher", "student")]
    head = train.endswith(",head")
    plan = memory_plan(*configs, [n - 2, n - 1], 1, shard=False, bf16=bf16, head=head)
    assert plan == {"teacher": held["teacher"], "student": held["student"],
                    "gradients + AdamW": held["gradients"] + held["optimizer"],
                    "total": held["teacher"] + held["student"] + held["gradients"] + held["optimizer"]}
    without = memory_plan(*configs, [n - 2, n - 1], 1, shard=False, bf16=bf16)
    head_state = configs[1].vocab_size * configs[1].hidden_size * 4 * 3
    assert plan["gradients + AdamW"] - without["gradients + AdamW"] == head_state * head
