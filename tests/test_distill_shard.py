"""`come distill --shard` (FSDP2) on 2 CPU processes: the same training as 1 unsharded
process on the same global batch, with about half the state per process, resumable after
kill -9, gathered into a stock checkpoint; and its refusals, one line each."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

from come import CompressConfig, compress
from come.models.checkpoint import save_checkpoint
from come.cli.app import app
from come.models.data import token_windows
from come.recovery.distill_memory import memory_plan

from conftest import corpus, tiny_model
from shard_worker import measured

WORKER = Path(__file__).parent / "shard_worker.py"
ARGS = ["--steps", "4", "--seqlen", "32", "--eval-windows", "2", "--device", "cpu", "--lr", "3e-3", "--train", "all",
        "--save-every", "2", "--eval-every", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dirs(tokenizer, tmp_path_factory) -> Path:
    """A tiny teacher and its compressed student (6 -> 3 layers) as HF folders, and a text."""
    root = tmp_path_factory.mktemp("shard")
    teacher = tiny_model("llama")
    calib = token_windows(corpus(), tokenizer, 8, 32, seed=0)
    student, plan = compress(copy.deepcopy(teacher), tokenizer, CompressConfig(sparsity=0.3, device="cpu", split="bi"),
                             calib=calib)
    save_checkpoint(teacher, tokenizer, None, root / "teacher")
    save_checkpoint(student, tokenizer, plan, root / "student")
    (root / "train.txt").write_text(corpus())
    return root


def _distill_args(root: Path, out: Path, mode: str, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(root / "teacher"), "--student", str(root / "student"), "--data",
            str(root / "train.txt"), "--out", str(out), "--mode", mode, *ARGS, *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(how: str, path: str, args: list[str]) -> subprocess.CompletedProcess:
    """tests/shard_worker.py under `torchrun --nproc_per_node 2` on CPU."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(_free_port()),
           str(WORKER), how, path, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def runs(dirs):
    """Per mode: the sharded run (2 processes x --batch-size 2) and the unsharded one (1 process
    x --batch-size 4), each with the bytes it held after its first step."""
    done = {}

    def run(mode: str) -> dict:
        if mode not in done:
            sharded, one = dirs / f"{mode}-sharded", dirs / f"{mode}-one"
            result = _two_processes("measure", str(dirs / f"{mode}-sharded.json"),
                                    _distill_args(dirs, sharded, mode, "--batch-size", "2", "--shard"))
            assert result.returncode == 0, result.stderr[-3000:]
            with measured(str(dirs / f"{mode}-one.json")):
                result = CliRunner().invoke(app, _distill_args(dirs, one, mode, "--batch-size", "4"))
            assert result.exit_code == 0, result.output
            done[mode] = {"sharded": sharded, "one": one,
                          "bytes": [json.loads((dirs / f"{mode}-{name}.json.{rank}").read_text())
                                    for name, rank in (("one", 0), ("sharded", 0), ("sharded", 1))]}
        return done[mode]

    return run


def _log(out: Path) -> dict:
    return json.loads((out / "distill_log.json").read_text())


@pytest.mark.parametrize("mode", ["sp", "mp"])
def test_two_sharded_processes_train_as_one_unsharded_and_write_a_stock_checkpoint(runs, mode):
    """Same losses, held-out scores and weights as 1 process on the whole batch, to float
    rounding: fp32 throughout, only the order of the sums differs (each process sums its half
    of the batch, the reduce-scatter adds the halves), so ~1e-7 relative per operation; over 4
    AdamW steps at lr 3e-3 the weights moved by at most ~1.5e-6 in trials, held to 1e-5."""
    run = runs(mode)
    sharded, one = _log(run["sharded"]), _log(run["one"])
    assert (sharded["processes"], one["processes"]) == (2, 1)
    assert sharded["settings"]["shard"] and sharded["tokens_seen"] == one["tokens_seen"] == 4 * 4 * 32
    assert [e["loss"] for e in sharded["train"]] == pytest.approx([e["loss"] for e in one["train"]], rel=1e-5)
    assert [e["kl"] for e in sharded["eval"]] == pytest.approx([e["kl"] for e in one["eval"]], rel=1e-4)
    assert sharded["train"][-1]["loss"] < sharded["train"][0]["loss"]  # it trained

    got, want = (load_file(run[k] / "model.safetensors") for k in ("sharded", "one"))
    before = load_file(run["sharded"].parent / "student" / "model.safetensors")
    assert {n: (t.shape, t.dtype) for n, t in got.items()} == {n: (t.shape, t.dtype) for n, t in want.items()}
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert any(not torch.equal(got[n], before[n]) for n in got)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(run["sharded"])  # a stock checkpoint
    assert all(torch.equal(t, got[n]) for n, t in reloaded.state_dict().items())


def test_bf16_sharded_trains_as_bf16_unsharded_to_bf16_rounding(dirs):
    """MixedPrecisionPolicy (bf16 gathers, fp32 reduce) against bf16 autocast on whole fp32
    weights: the weights' gradients are rounded to bf16 before the reduce, so the losses
    differ at ~2e-3 relative (seen); held to 1e-2."""
    args = ["--dtype", "bf16", "--steps", "3", "--save-every", "0"]  # the last typed value of a flag wins
    result = _two_processes("measure", str(dirs / "bf16.json"),
                            _distill_args(dirs, dirs / "bf16-sharded", "sp", "--batch-size", "2", "--shard", *args))
    assert result.returncode == 0, result.stderr[-3000:]
    one = CliRunner().invoke(app, _distill_args(dirs, dirs / "bf16-one", "sp", "--batch-size", "4", *args))
    assert one.exit_code == 0, one.output
    sharded, whole = _log(dirs / "bf16-sharded"), _log(dirs / "bf16-one")
    assert len(sharded["train"]) == len(whole["train"]) == 3 and sharded["settings"]["dtype"] == "bf16"
    assert [e["loss"] for e in sharded["train"]] == pytest.approx([e["loss"] for e in whole["train"]], rel=1e-2)
    assert sharded["eval"][-1]["kl"] == pytest.approx(whole["eval"][-1]["kl"], rel=1e-2)
    weights = transformers.AutoModelForCausalLM.from_pretrained(dirs / "bf16-sharded").state_dict().values()
    assert all(t.isfinite().all() for t in weights)


@pytest.mark.parametrize("mode", ["sp", "mp"])
def test_each_sharded_process_holds_half_the_layers_and_training_state(runs, mode):
    """Counted as each process's local shard bytes after the first step: the student's trained
    weights + gradients + AdamW state, and the decoder layers of both models, halve (exactly
    here: every tensor's first dimension is even); the embeddings and heads stay whole."""
    one, *sharded = runs(mode)["bytes"]
    state = ("trainable_weights", "gradients", "optimizer")
    for rank in sharded:
        for key in (*state, "teacher_layers", "student_layers"):
            assert rank[key] == one[key] / 2, key
        for model in ("teacher", "student"):  # whole embeddings and head: more than half, less than all
            assert one[model] / 2 < rank[model] < one[model]
    assert sum(sharded[0][k] for k in state) == sum(one[k] for k in state) / 2


@pytest.mark.parametrize("mode", ["sp", "mp"])
def test_the_memory_plan_is_the_bytes_each_process_held(runs, dirs, mode):
    """The plan logged at start, from the configs alone, against the bytes counted after the
    first step, for 1 process and for each of 2 sharded ones."""
    configs = [transformers.AutoConfig.from_pretrained(dirs / name) for name in ("teacher", "student")]
    trainable = list(range(configs[1].num_hidden_layers))  # --train all
    for measured_bytes, processes in zip(runs(mode)["bytes"], (1, 2, 2)):
        plan = memory_plan(*configs, trainable, processes, shard=processes > 1, bf16=False)
        assert plan == {"teacher": measured_bytes["teacher"], "student": measured_bytes["student"],
                        "gradients + AdamW": measured_bytes["gradients"] + measured_bytes["optimizer"],
                        "total": measured_bytes["teacher"] + measured_bytes["student"] + measured_bytes["gradients"]
                        + measured_bytes["optimizer"]}


def test_kill_9_after_a_checkpoint_then_resume_ends_as_the_uninterrupted_run(runs, dirs):
    """Both processes SIGKILLed right after the step-2 checkpoint (DCP shards + record);
    --resume on 2 processes reads its shards back and ends bit-identical to the whole run (with
    activation checkpointing switched on, which recomputes the same numbers)."""
    whole = runs("sp")["sharded"]
    out = dirs / "killed"
    args = _distill_args(dirs, out, "sp", "--batch-size", "2", "--shard")
    killed = _two_processes("crash", "-", args)
    assert killed.returncode != 0
    assert [p.name for p in out.iterdir()] == ["checkpoints"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_2"]

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port", str(_free_port()),
           "-m", "come.cli.app", *args, "--resume", "--gradient-checkpointing"]  # may change on resume
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log, whole_log = _log(out), _log(whole)
    assert log["resumed_from"] == 2
    assert [e["loss"] for e in log["train"]] == [e["loss"] for e in whole_log["train"]]
    assert log["eval"] == whole_log["eval"]
    got, want = (load_file(d / "model.safetensors") for d in (out, whole))
    assert all(torch.equal(got[n], t) for n, t in want.items())

    other_count = CliRunner().invoke(app, [*args, "--resume"])  # 1 process now
    assert other_count.exit_code == 2
    message = other_count.output.strip()
    assert "\n" not in message and "processes 2 (now 1)" in message


@pytest.mark.parametrize("extra, message", [
    (["--shard"], "--shard needs 2 or more processes"),
    (["--shard", "--lora-r", "4"], "--shard does not train LoRA adapters"),
    # the plan above, 1 process, --train all, and the activations of 4 x 32 tokens in mp
    (["--max-memory-gb", "0.002"], "needs 0.0033 GB per process"),
    (["--max-memory-gb", "0.002"], "--shard (weights and training state 0.00253 GB)"),
])
def test_unsupported_or_too_big_runs_are_one_line_before_any_weight_loads(dirs, monkeypatch, extra, message):
    def no_loading(*_args, **_kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr("come.models.checkpoint.load_model", no_loading)
    out = dirs / f"refused-{'-'.join(extra)}"
    result = CliRunner().invoke(app, [*_distill_args(dirs, out, "mp"), *extra])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]  # after the plan's log
    assert len(errors) == 1 and message in errors[0] and result.output.strip().endswith(errors[0])
    assert not out.exists()
