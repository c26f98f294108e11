"""Hierarchical distillation (sp / mp) on a tiny compressed model: it recovers, trains only
what it should, resumes exactly, refuses mismatched inputs, and runs from the CLI."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from typer.testing import CliRunner

from come import CompressConfig, ComeError, compress
from come.checkpoint import save_checkpoint
from come.cli import app
from come.data import token_windows
from come.distill import DistillConfig, distill, head_terms

distill_mod = importlib.import_module("come.distill")  # the module; `come.distill` is the API function

from conftest import corpus, tiny_model

SMALL = dict(seqlen=32, batch_size=4, eval_windows=8, device="cpu", warmup=0.1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: on a shared, loaded CPU two spinning intra-op threads are ~50x slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pair(tokenizer, tmp_path_factory):
    """(teacher, compressed student, plan, training text file): 6 layers -> 4."""
    teacher = tiny_model("llama")
    calib = token_windows(corpus(), tokenizer, 8, 32, seed=0)
    student, plan = compress(copy.deepcopy(teacher), tokenizer, CompressConfig(sparsity=0.3, device="cpu"), calib=calib)
    text = tmp_path_factory.mktemp("distill") / "train.txt"
    text.write_text(corpus())
    return teacher, student, plan, str(text)


def _run(pair, tokenizer, **cfg):
    teacher, student, plan, text = pair
    return distill(teacher, copy.deepcopy(student), tokenizer, plan, DistillConfig(data=text, **{**SMALL, **cfg}))


@pytest.mark.parametrize("mode", ["sp", "mp"])
def test_recovers_and_trains_only_merged_layers(pair, tokenizer, mode):
    _, before, plan, _ = pair
    after, log = _run(pair, tokenizer, mode=mode, steps=24, lr=3e-3)
    losses = [e["loss"] for e in log["train"]]
    assert sum(losses[-6:]) < 0.85 * sum(losses[:6])
    first, last = log["eval"][0], log["eval"][-1]
    assert (first["step"], last["step"]) == (0, 24)
    assert last["kl"] < 0.75 * first["kl"]
    assert log["tokens_seen"] == 24 * 4 * 32 and log["tokens_per_s"] > 0 and log["teacher_ppl"] > 0

    merged = {k for k, g in enumerate(plan.groups) if len(g) > 1}
    assert log["trainable_layers"] == sorted(merged)
    new = after.state_dict()
    for name, tensor in before.state_dict().items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        assert new[name].dtype == tensor.dtype
        assert torch.equal(new[name], tensor) != (layer in merged), name


def test_bf16_student_keeps_its_dtype_and_untouched_weights(pair, tokenizer):
    """Stored bf16, trained in fp32 master weights under bf16 autocast, returned in bf16."""
    teacher, student, plan, text = pair
    teacher, student = copy.deepcopy(teacher).bfloat16(), copy.deepcopy(student).bfloat16()
    before = copy.deepcopy(student.state_dict())
    cfg = DistillConfig(data=text, mode="mp", steps=2, dtype="bf16", **SMALL)
    after, _ = distill(teacher, student, tokenizer, plan, cfg)
    changed = {name for name, tensor in after.state_dict().items() if not torch.equal(tensor, before[name])}
    assert {t.dtype for t in after.state_dict().values()} == {torch.bfloat16}
    assert {int(name.split(".")[2]) for name in changed} == {k for k, g in enumerate(plan.groups) if len(g) > 1}


def test_resume_continues_exactly(pair, tokenizer, tmp_path, monkeypatch):
    """Interrupted after the step-4 checkpoint and resumed = one uninterrupted run, bit for bit."""
    cfg = dict(mode="mp", steps=8, grad_accum=2, lr=3e-3, save_every=4)
    whole, whole_log = _run(pair, tokenizer, checkpoint_dir=str(tmp_path / "a"), **cfg)

    real = distill_mod._checkpoint

    def crash(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_mod, "_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(pair, tokenizer, checkpoint_dir=str(tmp_path / "b"), **cfg)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["step_4"]
    resumed, log = _run(pair, tokenizer, checkpoint_dir=str(tmp_path / "b"), resume=True, **cfg)

    assert log["resumed_from"] == 4
    assert [e["step"] for e in log["train"]] == list(range(1, 9))
    assert [e["loss"] for e in log["train"]] == [e["loss"] for e in whole_log["train"]]
    assert log["tokens_seen"] == whole_log["tokens_seen"]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_chunked_kl_equals_the_full_one():
    """Chunks + checkpointing change memory, not the loss or its gradient."""
    torch.manual_seed(0)
    head_t, head_s = nn.Linear(8, 50), nn.Linear(8, 50)
    h_t, h_s = torch.randn(2, 7, 8), torch.randn(2, 7, 8, requires_grad=True)
    targets = torch.randint(0, 50, (2, 7))
    kl, nll = head_terms(head_t, head_s, h_t, h_s, temperature=2.0, chunk=3, targets=targets)
    (kl + nll).backward()
    grad, h_s.grad = h_s.grad, None
    log_s = F.log_softmax(head_s(h_s) / 2.0, -1)
    full = (F.softmax(head_t(h_t) / 2.0, -1) * (F.log_softmax(head_t(h_t) / 2.0, -1) - log_s)).sum()
    full_nll = F.cross_entropy(head_s(h_s).flatten(0, 1), targets.flatten(), reduction="sum")
    (full + full_nll).backward()
    torch.testing.assert_close(torch.stack([kl, nll]), torch.stack([full, full_nll]).detach())
    torch.testing.assert_close(grad, h_s.grad)


def test_activation_checkpointing_and_train_all_give_the_same_step(pair, tokenizer):
    plain, _ = _run(pair, tokenizer, mode="sp", train="all", steps=2, kl_chunk=16, lr=1e-3)
    ckpt, log = _run(pair, tokenizer, mode="sp", train="all", steps=2, kl_chunk=16, lr=1e-3, gradient_checkpointing=True)
    assert log["trainable_layers"] == list(range(len(pair[2].groups)))
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_mismatched_teacher_is_one_line_error(pair, tokenizer):
    _, student, plan, text = pair
    with pytest.raises(ComeError, match="hidden_size 32 != student hidden_size 64") as exc:
        distill(tiny_model("llama", hidden_size=32), student, tokenizer, plan, DistillConfig(data=text, steps=1, **SMALL))
    assert "\n" not in str(exc.value)


@pytest.fixture(scope="module")
def dirs(pair, tokenizer, tmp_path_factory):
    teacher, student, plan, text = pair
    root = tmp_path_factory.mktemp("cli")
    save_checkpoint(teacher, tokenizer, None, root / "teacher")
    save_checkpoint(student, tokenizer, plan, root / "student")
    save_checkpoint(student, tokenizer, None, root / "no_plan")
    return root, text


def _cli(*args: str):
    return CliRunner().invoke(app, ["distill", *args, "--seqlen", "32", "--batch-size", "2", "--eval-windows", "2",
                                    "--device", "cpu", "--lr", "3e-3"])


def test_cli_distills_writes_a_stock_checkpoint_and_resumes(dirs):
    root, text = dirs
    out = root / "out"
    args = ["--teacher", str(root / "teacher"), "--student", str(root / "student"), "--out", str(out), "--data", text,
            "--mode", "sp", "--layer-loss", "mse", "--save-every", "2", "--gradient-checkpointing"]
    result = _cli(*args, "--steps", "3")
    assert result.exit_code == 0, result.output
    assert "held-out KL" in result.output
    log = json.loads((out / "distill_log.json").read_text())
    assert log["settings"]["layer_loss"] == "mse" and len(log["train"]) == 3
    assert json.loads((out / "come_plan.json").read_text())["groups"] == log["groups"]
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == len(log["groups"])

    result = _cli(*args, "--steps", "4", "--resume")  # continues from the kept step-2 checkpoint
    assert result.exit_code == 0, result.output
    log = json.loads((out / "distill_log.json").read_text())
    assert log["resumed_from"] == 2 and [e["step"] for e in log["train"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("case", ["no_plan", "tokenizer", "non_empty_out"])
def test_cli_bad_input_is_one_line(dirs, tokenizer, case):
    root, text = dirs
    teacher, student, out = root / "teacher", root / "student", root / f"bad_{case}"
    if case == "no_plan":
        student = root / "no_plan"
    elif case == "tokenizer":
        other = transformers.PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(tokenizer.backend_tokenizer),
                                                     eos_token="<eos>")
        other.add_tokens(["<extra>"])
        teacher = root / "teacher_other_tok"
        if not teacher.exists():
            save_checkpoint(transformers.AutoModelForCausalLM.from_pretrained(root / "teacher"), other, None, teacher)
    else:
        out.mkdir()
        (out / "x").write_text("x")
    result = _cli("--teacher", str(teacher), "--student", str(student), "--out", str(out), "--data", text, "--steps", "1")
    assert result.exit_code == 2
    message = result.output.strip()
    assert message.startswith("error:") and "\n" not in message
    assert {"no_plan": "no Plan", "tokenizer": "tokenizers differ", "non_empty_out": "not empty"}[case] in message
