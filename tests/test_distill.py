"""Hierarchical distillation (sp / mp) on a tiny compressed model: it recovers, trains only
what it should, resumes exactly, refuses mismatched inputs, and runs from the CLI."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from come import CompressConfig, ComeError, compress
from come.cli.app import app
from come.models.checkpoint import save_checkpoint
from come.models.data import token_windows
from come.recovery.distill import distill
from come.recovery.distill_losses import head_kl, head_terms
from come.settings.distill_config import DistillConfig

distill_mod = importlib.import_module("come.recovery.distill")  # the module; `come.distill` is the API function
distill_losses = importlib.import_module("come.recovery.distill_losses")

from conftest import corpus, tiny_model

SMALL = dict(seqlen=32, batch_size=4, eval_windows=8, device="cpu", warmup=0.1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tokenizer, tmp_path_factory):
    """(teacher, compressed student, plan, training text file): 6 layers -> 4. The student's
    settings are pinned (the authors' BI split), so the recovery thresholds below do not move
    with compress's defaults."""
    teacher = tiny_model("llama")
    calib = token_windows(corpus(), tokenizer, 8, 32, seed=0)
    cfg = CompressConfig(sparsity=0.3, device="cpu", split="bi")
    student, plan = compress(copy.deepcopy(teacher), tokenizer, cfg, calib=calib)
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


@pytest.mark.parametrize("lora_r", [0, 4])
def test_bf16_student_keeps_its_dtype_and_untouched_weights(pair, tokenizer, lora_r):
    """Stored bf16, trained in fp32 master weights (and adapters) under bf16 autocast, returned in bf16."""
    teacher, student, plan, text = pair
    teacher, student = copy.deepcopy(teacher).bfloat16(), copy.deepcopy(student).bfloat16()
    before = copy.deepcopy(student.state_dict())
    cfg = DistillConfig(data=text, mode="mp", steps=2, dtype="bf16", lora_r=lora_r, **SMALL)
    after, _ = distill(teacher, student, tokenizer, plan, cfg)
    changed = {name for name, tensor in after.state_dict().items() if not torch.equal(tensor, before[name])}
    assert {t.dtype for t in after.state_dict().values()} == {torch.bfloat16}
    assert {int(name.split(".")[2]) for name in changed} == {k for k, g in enumerate(plan.groups) if len(g) > 1}


@pytest.mark.parametrize("lora_r", [0, 4])
def test_resume_continues_exactly(pair, tokenizer, tmp_path, monkeypatch, lora_r):
    """Interrupted after the step-4 checkpoint and resumed = one uninterrupted run, bit for bit
    (with LoRA too: the checkpoint carries the adapters, and their dropout's RNG state)."""
    cfg = dict(mode="mp", steps=8, grad_accum=2, lr=3e-3, save_every=4, lora_r=lora_r,
               lora_dropout=0.1 if lora_r else 0.0)
    whole, whole_log = _run(pair, tokenizer, checkpoint_dir=str(tmp_path / "a"), **cfg)

    real = distill_mod.write_checkpoint

    def crash(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_mod, "write_checkpoint", crash)
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
    """Chunks change memory, not the loss or its gradient; head_kl's gradient, computed in its
    forward for the upstream gradient it is told, is the full KL's (told wrong: rescaled)."""
    torch.manual_seed(0)
    head_t, head_s = nn.Linear(8, 50), nn.Linear(8, 50)
    h_t, h_s = torch.randn(2, 7, 8), torch.randn(2, 7, 8, requires_grad=True)
    targets = torch.randint(0, 50, (2, 7))
    kl, nll = head_terms(head_t, head_s, h_t, h_s, temperature=2.0, chunk=3, targets=targets)
    log_s = F.log_softmax(head_s(h_s) / 2.0, -1)
    full = (F.softmax(head_t(h_t) / 2.0, -1) * (F.log_softmax(head_t(h_t) / 2.0, -1) - log_s)).sum()
    full_nll = F.cross_entropy(head_s(h_s).flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(torch.stack([kl, nll]), torch.stack([full, full_nll]).detach())
    (3.0 * full).backward()
    want, h_s.grad = h_s.grad, None
    for told in (3.0, 0.5):
        (3.0 * head_kl(head_t, head_s, h_t, h_s, 2.0, 3, torch.tensor(told))).backward()
        torch.testing.assert_close(h_s.grad, want)
        h_s.grad = None


def test_head_kl_gradient_is_the_backward_of_its_chunk_bit_for_bit():
    """Seeded with the upstream gradient it will receive, the gradient computed in the forward
    is the one a backward through the chunk gives (what kept the golden runs byte-identical)."""
    torch.manual_seed(0)
    head_t, head_s = nn.Linear(8, 50), nn.Linear(8, 50)
    h_t, h_s = torch.randn(6, 8), torch.randn(6, 8, requires_grad=True)
    (distill_losses._chunk_terms(head_t, head_s, 1.0, h_t, h_s, None)[0] * 0.3).backward()
    want, h_s.grad = h_s.grad, None
    (head_kl(head_t, head_s, h_t, h_s, 1.0, 6, torch.ones(()) * 0.3) * 0.3).backward()
    assert torch.equal(h_s.grad, want)


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


@pytest.mark.parametrize("lora, message", [
    (dict(lora_r=-1), "--lora-r must be >= 0"),
    (dict(lora_r=4, lora_alpha=0.0), "--lora-alpha must be a finite number > 0"),
    (dict(lora_r=4, lora_alpha=float("nan")), "--lora-alpha must be a finite number > 0"),
    (dict(lora_r=4, lora_dropout=1.0), r"--lora-dropout must be in \[0, 1\), got 1.0"),
    (dict(lora_alpha=8.0), "need --lora-r > 0"),
])
def test_bad_lora_settings_are_one_line_errors(lora, message):
    with pytest.raises(ComeError, match=message) as exc:
        DistillConfig(**lora).validate()
    assert "\n" not in str(exc.value)


def test_settings_refuse_a_bad_choice_read_only_and_show_token_counts_as_typed():
    cfg = DistillConfig(layer_loss="l1")
    before = dataclasses.asdict(cfg)
    with pytest.raises(ComeError, match=r"^--layer-loss must be one of kl, mse, got 'l1'$"):
        cfg.validate()
    assert dataclasses.asdict(cfg) == before
    tokens = {f.name: f for f in dataclasses.fields(DistillConfig)}["tokens"].metadata
    assert tokens["show"](20_000_000) == "20M" and tokens["parse"]("20M") == 20_000_000
    assert tokens["show"](1500) == "1500"


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
            "--mode", "sp", "--official", "--layer-loss", "mse", "--save-every", "2", "--gradient-checkpointing"]
    result = _cli(*args, "--steps", "3")
    assert result.exit_code == 0, result.output
    assert "held-out KL" in result.output
    assert re.search(r"training processes\W+1\b", result.output), result.output  # the summary says how many trained
    log = json.loads((out / "distill_log.json").read_text())
    assert log["settings"]["layer_loss"] == "mse" and len(log["train"]) == 3  # a typed option beats --official
    assert json.loads((out / "come_plan.json").read_text())["groups"] == log["groups"]
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == len(log["groups"])

    first = load_file(out / "model.safetensors")
    result = _cli(*args, "--steps", "3", "--resume")  # continues from the kept step-2 checkpoint
    assert result.exit_code == 0, result.output
    log = json.loads((out / "distill_log.json").read_text())
    assert log["resumed_from"] == 2 and [e["step"] for e in log["train"]] == [1, 2, 3]
    assert all(torch.equal(t, first[n]) for n, t in load_file(out / "model.safetensors").items())


def test_cli_lora_writes_a_stock_checkpoint(dirs):
    """No adapter key reaches the file (from_pretrained would only warn about them); --official
    gives the paper's KL layer loss in place of the default mse."""
    root, text = dirs
    out = root / "out_lora"
    result = _cli("--teacher", str(root / "teacher"), "--student", str(root / "student"), "--out", str(out),
                  "--data", text, "--mode", "mp", "--steps", "2", "--lora-r", "4", "--lora-alpha", "16", "--official")
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "distill_log.json").read_text())["settings"]
    assert (settings["lora_r"], settings["lora_alpha"], settings["layer_loss"]) == (4, 16, "kl")
    assert DistillConfig().layer_loss == "mse"
    saved, original = (load_file(d / "model.safetensors") for d in (out, root / "student"))
    assert {n: t.shape for n, t in saved.items()} == {n: t.shape for n, t in original.items()}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(t, saved[n]) for n, t in reloaded.state_dict().items())


@pytest.mark.parametrize("case", ["no_plan", "tokenizer", "non_empty_out", "negative_lora_r"])
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
    extra = ["--lora-r", "-1"] if case == "negative_lora_r" else []
    result = _cli("--teacher", str(teacher), "--student", str(student), "--out", str(out), "--data", text,
                  "--steps", "1", *extra)
    assert result.exit_code == 2
    message = result.output.strip()
    assert message.startswith("error:") and "\n" not in message
    assert {"no_plan": "no Plan", "tokenizer": "tokenizers differ", "non_empty_out": "not empty",
            "negative_lora_r": "--lora-r must be >= 0"}[case] in message


# ---- processes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("env, asked", [
    ({}, 1),
    ({"WORLD_SIZE": "4", "MASTER_PORT": "29500"}, 4),  # torchrun
    ({"OMPI_COMM_WORLD_SIZE": "3"}, 3),  # mpirun
    ({"ACCELERATE_USE_CPU": "True", "MASTER_PORT": "29500"}, 2),  # accelerate launch --cpu --num_processes 2
    ({"ACCELERATE_USE_CPU": "True"}, 1),  # accelerate launch --cpu (one process asked)
])
def test_launcher_processes_reads_the_launchers_environment(env, asked):
    assert distill_mod.launcher_processes(env)[0] == asked


def test_one_process_where_the_launcher_asked_for_more_is_one_warning(pair, tokenizer, monkeypatch, caplog):
    """What `accelerate launch --cpu --num_processes 2` leaves (issue 22): one process, which says so."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with caplog.at_level("INFO", logger="come"):
        _, log = _run(pair, tokenizer, mode="mp", steps=1)
    assert log["processes"] == 1
    assert any("distill mp: 1 process on cpu" in r.getMessage() for r in caplog.records)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "torchrun --nproc_per_node" in warnings[0]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_equal_one_with_the_whole_batch(dirs, tmp_path):
    """`torchrun --nproc_per_node 2` on CPU: two processes, each on half of every batch with
    gradients averaged, train as one process on the whole batch (same losses, same result)."""
    root, text = dirs
    common = ["--teacher", str(root / "teacher"), "--student", str(root / "student"), "--data", text, "--steps", "2",
              "--seqlen", "32", "--eval-windows", "2", "--device", "cpu", "--lr", "3e-3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "come.cli.app", "distill",
           *common, "--batch-size", "2", "--out", str(tmp_path / "two")]
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    one = CliRunner().invoke(app, ["distill", *common, "--batch-size", "4", "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    two_log, one_log = (json.loads((tmp_path / d / "distill_log.json").read_text()) for d in ("two", "one"))
    assert (two_log["processes"], one_log["processes"]) == (2, 1)
    assert two_log["tokens_seen"] == one_log["tokens_seen"] == 2 * 4 * 32
    assert [e["loss"] for e in two_log["train"]] == pytest.approx([e["loss"] for e in one_log["train"]], rel=1e-4)
    assert two_log["eval"][-1]["kl"] == pytest.approx(one_log["eval"][-1]["kl"], rel=1e-3)


# ---- LoRA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sp", "mp"])
def test_lora_recovers_and_merges_a_low_rank_update_into_the_merged_layers(pair, tokenizer, mode):
    """Only rank-4 adapters train; the result is the student's own architecture again, the
    other layers untouched and each merged projection moved by a delta of rank <= 4."""
    _, before, plan, _ = pair
    after, log = _run(pair, tokenizer, mode=mode, steps=24, lr=1e-2, lora_r=4)
    first, last = log["eval"][0], log["eval"][-1]
    assert last["kl"] < 0.75 * first["kl"]

    assert not hasattr(after, "peft_config") and not any(type(m).__module__.startswith("peft") for m in after.modules())
    old, new = before.state_dict(), after.state_dict()
    assert {n: (t.shape, t.dtype) for n, t in new.items()} == {n: (t.shape, t.dtype) for n, t in old.items()}
    merged = {k for k, g in enumerate(plan.groups) if len(g) > 1}
    for name, tensor in old.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        projection = layer in merged and name.endswith("proj.weight")
        assert torch.equal(new[name], tensor) != projection, name  # norms of the merged layers stay frozen too
        if projection:
            delta = new[name].double() - tensor.double()
            assert 1 <= torch.linalg.matrix_rank(delta, rtol=1e-5) <= 4, name  # fp32 rounding of W + BA: ~3e-8


def test_lora_init_and_dropout_follow_the_seed_not_the_global_rng(pair, tokenizer):
    """Data-parallel processes get equal adapters without DDP's broadcast; dropout masks come
    from --seed too, and the caller's RNG is given back untouched."""
    cfg = dict(mode="mp", steps=3, lr=1e-2, lora_r=4, lora_dropout=0.5)
    results, after = [], []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        results.append(_run(pair, tokenizer, **cfg)[0].state_dict())
        after.append(torch.rand(4))
    torch.manual_seed(2)
    assert torch.equal(after[1], torch.rand(4))
    assert all(torch.equal(a, results[1][name]) for name, a in results[0].items())
    other = _run(pair, tokenizer, seed=1, **cfg)[0].state_dict()
    assert not all(torch.equal(a, other[name]) for name, a in results[0].items())
