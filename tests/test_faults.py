"""Fault injection on the real `come distill` command line, each run a subprocess: killed
inside a checkpoint write (SIGKILL), mid-run (SIGTERM, SIGINT) and while the result is swapped
in (SIGTERM), a run leaves nothing half-written that a later run reads, and `--resume` ends
bit-identical (weights sha256) to one uninterrupted run; `--resume` with other settings is
refused; LoRA dropout follows --seed. And on `come compress`: SIGKILL / SIGINT / SIGTERM
mid-compression and inside the final save leave no OUT (SIGINT: exit 130, SIGTERM: ended by
it, neither with a traceback, neither leaving a temporary sibling; SIGKILL's sibling is
removed by the next run, which succeeds); an output folder that refuses writes is one line,
exit 2; the same seed twice gives the same Plan and byte-identical weights.

Each run is its own process, forked from a warm interpreter that has imported torch,
transformers, accelerate and peft once (this file run with --serve): seconds of imports paid
once, not per run. The faults land deterministically: the run wraps one function at the chosen
point to send itself the signal there, then runs the CLI unchanged. Every run also scrambles
torch's global RNG first, so only --seed can make two runs agree. In-process tests check
the checkpoint rules themselves: which settings a resume may change, which step_N it takes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from come import ComeError
from come.recovery.train_state import latest_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="runs are forked from a warm interpreter")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1", "COLUMNS": "1000"}
FLAGS = ["--mode", "sp", "--lora-r", "2", "--lora-dropout", "0.1", "--lr", "1e-2", "--steps", "8", "--save-every", "2",
         "--seqlen", "32", "--batch-size", "2", "--eval-windows", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def pair(tokenizer, tmp_path_factory):
    """(teacher, compressed student, plan, training text file)."""
    from conftest import corpus
    from golden_distill import student_pair

    text = tmp_path_factory.mktemp("faults") / "train.txt"
    text.write_text(corpus())
    return (*student_pair(tokenizer), text)


@pytest.fixture(scope="module")
def dirs(pair, tokenizer):
    """The same, saved as a user has them."""
    from come.models.checkpoint import save_checkpoint

    teacher, student, plan, text = pair
    save_checkpoint(teacher, tokenizer, None, text.parent / "teacher")
    save_checkpoint(student, tokenizer, plan, text.parent / "student")
    return text.parent


@pytest.fixture(scope="module")
def server():
    """The warm interpreter that forks the runs (one thread each: sums do not depend on the machine)."""
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=ENV)
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


def _send(server, logdir: Path, args: list[str], fault: str, **job) -> subprocess.CompletedProcess:
    """One forked run of the CLI with `args` and `fault` armed; its exit code and output."""
    logs = [str(logdir / f"run{len(list(logdir.iterdir()))}.{s}") for s in ("out", "err")]
    server.stdin.write(json.dumps({"fault": fault, "args": args, "logs": logs, **job}) + "\n")
    server.stdin.flush()
    code = server.stdout.readline()
    assert code, "the fork server died (see its stderr above)"
    return subprocess.CompletedProcess(args, int(code), *(Path(f).read_text() for f in logs))


@pytest.fixture
def come(server, dirs, tmp_path):
    """come(out, *flags, fault=...) -> the finished run (returncode < 0: killed by that signal)."""
    def run(out: str, *extra: str, fault: str = "-") -> subprocess.CompletedProcess:
        args = ["distill", "--teacher", str(dirs / "teacher"), "--student", str(dirs / "student"),
                "--data", str(dirs / "train.txt"), "--out", str(dirs / out), *FLAGS, *extra]
        return _send(server, tmp_path, args, fault)

    return run


def weights(out: Path) -> str:
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def clean_stop(run: subprocess.CompletedProcess, code: int, out: Path) -> None:
    """Ended by `code`, without a traceback, and nothing half-written beside OUT."""
    assert run.returncode == code, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.fixture
def whole(dirs, come):
    """The uninterrupted run every interrupted one must end equal to (made once)."""
    if not (dirs / "whole" / "model.safetensors").exists():
        run = come("whole")
        assert run.returncode == 0, run.stderr[-3000:]
    return weights(dirs / "whole"), json.loads((dirs / "whole" / "distill_log.json").read_text())


def test_same_seed_twice_with_lora_dropout_is_bit_identical(dirs, come, whole):
    run = come("twice")
    assert run.returncode == 0, run.stderr[-3000:]
    assert weights(dirs / "twice") == whole[0]


def test_killed_runs_resume_to_the_uninterrupted_result(dirs, come, whole):
    out, ckpt = dirs / "killed", dirs / "killed" / "checkpoints"
    result = ["come_plan.json", "distill_log.json", "model.safetensors"]

    # SIGKILL inside the step-4 save (accelerate has written the RNG states, not the training state)
    run = come("killed", fault="SIGKILL@save:4")
    clean_stop(run, -signal.SIGKILL, out)
    temp = [n for n in listing(ckpt) if n.startswith(".step_4.tmp-")]
    assert listing(ckpt) == sorted(["step_2", *temp]) and len(temp) == 1
    assert listing(ckpt / temp[0]) == ["random_states_0.pkl"]
    (ckpt / "step_6").mkdir()  # the stand-in for a checkpoint killed half-written
    (ckpt / "step_abc").mkdir()

    # resumed from step 2 (the rest skipped, said so), SIGTERM after step 5
    run = come("killed", "--resume", fault="SIGTERM@step:5")
    clean_stop(run, -signal.SIGTERM, out)
    for said in (f"removed {ckpt / temp[0]}", "step_6 (incomplete", "step_abc (not a step_<number>",
                 f"resumed from {ckpt / 'step_2'} (step 2 of 8)"):
        assert said in run.stderr, run.stderr[-3000:]
    assert listing(ckpt) == ["step_4", "step_abc"] and not set(result) & set(listing(out))

    # SIGINT after step 7: stops as Ctrl-C does
    run = come("killed", "--resume", fault="SIGINT@step:7")
    clean_stop(run, 128 + signal.SIGINT, out)
    assert listing(ckpt) == ["step_6", "step_abc"] and not set(result) & set(listing(out))

    # SIGTERM while the result is swapped into OUT: held until OUT is whole, then delivered
    run = come("killed", "--resume", fault="SIGTERM@output")
    clean_stop(run, -signal.SIGTERM, out)
    assert set(result) < set(listing(out)) and listing(ckpt) == ["step_6", "step_abc"]
    assert weights(out) == whole[0]
    log = json.loads((out / "distill_log.json").read_text())
    assert log["resumed_from"] == 6 and [e["step"] for e in log["train"]] == list(range(1, 9))
    assert [e["loss"] for e in log["train"]] == [e["loss"] for e in whole[1]["train"]]


def test_resume_with_other_settings_is_refused_and_writes_nothing(dirs, come, whole):
    before = tree(dirs / "whole")
    run = come("whole", "--resume", "--steps", "9", "--seed", "1")
    message = run.stderr.strip()
    assert message.startswith("error: --resume:") and "\n" not in message, run.stderr
    assert "--steps 8 (now 9); --seed 0 (now 1); resume with" in message and message.count("(now ") == 2
    assert tree(dirs / "whole") == before
    clean_stop(run, 2, dirs / "whole")


# ---- come compress ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense(tokenizer, tmp_path_factory):
    """A tiny dense LLaMA as a user has it, and calibration text: the folder compress runs write into."""
    from conftest import corpus, tiny_model

    root = tmp_path_factory.mktemp("compress")
    tiny_model("llama").save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    (root / "calib.txt").write_text(corpus())
    return root


@pytest.fixture
def compress(server, dense, tmp_path):
    """compress(out, fault=..., nodac=...) -> the finished `come compress` run into dense/out
    (2 merges: 6 -> 4 layers)."""
    def run(out: str, *extra: str, fault: str = "-", nodac: bool = False) -> subprocess.CompletedProcess:
        args = ["compress", str(dense / "dense"), "--out", str(dense / out), "--calib", str(dense / "calib.txt"),
                "--sparsity", "0.2", "--nsamples", "8", "--seqlen", "32", "--device", "cpu", *extra]
        return _send(server, tmp_path, args, fault, nodac=nodac)

    return run


def untimed(plan: dict) -> dict:
    """The Plan without its timings (wall_time_s, each refit's seconds)."""
    if isinstance(plan, dict):
        return {k: untimed(v) for k, v in plan.items() if not (k.endswith("_s") or k.endswith("seconds"))}
    return [untimed(v) for v in plan] if isinstance(plan, list) else plan


def test_compress_interrupted_leaves_nothing_and_the_next_run_cleans_up(dense, compress):
    for point in ("merge:1", "plan"):  # after the first of 2 merges; inside the save, weights written
        for name, code in (("SIGINT", 128 + signal.SIGINT), ("SIGTERM", -signal.SIGTERM)):
            out = dense / f"{name}-{point.partition(':')[0]}"
            clean_stop(compress(out.name, fault=f"{name}@{point}"), code, out)
            assert not out.exists()
    out = dense / "killed"
    clean_stop(compress(out.name, fault="SIGKILL@merge:1"), -signal.SIGKILL, out)
    assert not out.exists()
    run = compress(out.name, fault="SIGKILL@plan")
    assert run.returncode == -signal.SIGKILL and not out.exists()
    left = [p for p in dense.iterdir() if p.name.startswith(".killed.tmp-")]
    assert len(left) == 1 and "model.safetensors" in listing(left[0]) and "come_plan.json" not in listing(left[0])

    run = compress(out.name)  # the next run: removes what the killed one left, and succeeds
    clean_stop(run, 0, out)
    assert f"removing {left[0]}" in " ".join(run.stderr.split()), run.stderr[-3000:]
    assert {"model.safetensors", "come_plan.json", "README.md"} <= set(listing(out))

    again = compress("again")  # same seed (the default), same everything
    assert again.returncode == 0, again.stderr[-3000:]
    plans = [json.loads((dense / d / "come_plan.json").read_text()) for d in ("killed", "again")]
    assert untimed(plans[0]) == untimed(plans[1]) and len(plans[0]["merges"]) == 2
    assert weights(dense / "killed") == weights(dense / "again")

    # SIGTERM while --overwrite swaps the new result in: held until OUT is the new one, then delivered
    out, inode = dense / "again", (dense / "again").stat().st_ino
    clean_stop(compress(out.name, "--overwrite", fault="SIGTERM@output"), -signal.SIGTERM, out)
    assert out.stat().st_ino != inode and weights(out) == weights(dense / "killed")
    assert {"model.safetensors", "come_plan.json", "README.md"} <= set(listing(out))


def _root_obeys_permissions() -> None:
    """Root passes every permission check through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: drop
    them in this (forked) process, so a 0o500 folder refuses root as it refuses anyone."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # {effective, permitted, inheritable} x 2 words
    if libc.capget(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for word in (0, 1):  # effective, permitted (capabilities 0-31)
        data[word] &= ~((1 << 1) | (1 << 2))  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


@pytest.mark.skipif(os.geteuid() == 0 and not sys.platform.startswith("linux"),
                    reason="root ignores folder permissions; dropping CAP_DAC_OVERRIDE needs Linux")
def test_compress_into_a_folder_that_refuses_writes(dense, compress):
    """A 0o500 folder (root: run without CAP_DAC_OVERRIDE): refused before any work when it is
    so from the start, and at the save when it turns so during compression. One line, exit 2."""
    nodac = os.geteuid() == 0
    for folder, fault in (("locked", "-"), ("locked-later", "READONLY@merge:1")):
        (dense / folder).mkdir(0o500 if fault == "-" else 0o755)
        out = dense / folder / "out"
        try:
            run = compress(f"{folder}/out", fault=fault, nodac=nodac)
        finally:
            os.chmod(dense / folder, 0o755)
        errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and errors[0].startswith(f"error: --out {out}: cannot write in "), run.stderr[-3000:]
        assert errors[0].endswith("(Permission denied); choose another --out")
        clean_stop(run, 2, out)
        assert listing(dense / folder) == []
        assert ("done: 6 -> 4 layers" in run.stderr) == (fault != "-")  # refused before any work / at the save


# ---- the checkpoint rules, in process ----------------------------------------------------------

def _run(pair, tokenizer, **cfg):
    from come import DistillConfig, distill

    teacher, student, plan, text = pair
    small = dict(seqlen=32, batch_size=4, eval_windows=8, device="cpu", warmup=0.1, data=str(text))
    return distill(teacher, copy.deepcopy(student), tokenizer, plan, DistillConfig(**small, **cfg))


@pytest.mark.usefixtures("one_thread")
def test_resume_refuses_other_settings_and_takes_run_control_ones(pair, tokenizer, tmp_path):
    """What defines the run must match the checkpoint's record (one line naming each option
    with both values); how it is carried out (RUN_CONTROL) may change."""
    cfg = dict(mode="mp", steps=3, save_every=1, checkpoint_dir=str(tmp_path))
    whole, _ = _run(pair, tokenizer, **cfg)
    with pytest.raises(ComeError, match=r"step_2 was made with other settings: --train merged \(now all\); "
                                        r"--lora-r 0 \(now 4\); resume with") as exc:
        _run(pair, tokenizer, resume=True, lora_r=4, train="all", **cfg)
    assert "\n" not in str(exc.value)
    resumed, log = _run(pair, tokenizer, resume=True, **{**cfg, "save_every": 0, "eval_every": 1})
    assert log["resumed_from"] == 2 and [e["step"] for e in log["eval"]] == [0, 3]
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    chunked, _ = _run(pair, tokenizer, resume=True, **{**cfg, "kl_chunk": 7})  # other float sums: last bits only
    for a, b in zip(whole.state_dict().values(), chunked.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.usefixtures("one_thread")
def test_resume_takes_the_newest_complete_checkpoint(pair, tokenizer, tmp_path, caplog):
    """A killed run's temporary checkpoint is removed; an empty or partial step_N and a
    misnamed one are skipped with a warning naming them."""
    ckpt = tmp_path / "ckpt"
    cfg = dict(mode="mp", steps=3, save_every=2, checkpoint_dir=str(ckpt))
    _run(pair, tokenizer, **cfg)
    (ckpt / "step_3").mkdir()
    shutil.copytree(ckpt / "step_2", ckpt / "step_4")
    record = ckpt / "step_4" / "come_checkpoint.json"
    record.write_text(record.read_text().replace('"step": 2', '"step": 4'))
    (ckpt / "step_4" / "custom_checkpoint_0.pkl").unlink()
    shutil.copytree(ckpt / "step_2", ckpt / "step_5")  # renamed by hand: its record says step 2
    (ckpt / "step_abc").mkdir()
    (ckpt / ".step_5.tmp-x1").mkdir()
    with caplog.at_level("INFO", logger="come"):
        _, log = _run(pair, tokenizer, resume=True, **cfg)
    assert log["resumed_from"] == 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_2", "step_3", "step_4", "step_5", "step_abc"]
    messages = " | ".join(r.getMessage() for r in caplog.records)
    for part in ("step_3 (incomplete: no come_checkpoint.json)", "step_4 (incomplete: custom_checkpoint_0.pkl missing)",
                 "step_5 (its come_checkpoint.json is step 2's)", "step_abc (not a step_<number> checkpoint)",
                 ".step_5.tmp-x1: an unfinished checkpoint"):
        assert part in messages
    for name in ("step_2", "step_3", "step_4", "step_5"):
        shutil.rmtree(ckpt / name)
    with pytest.raises(ComeError, match=r"^--resume: no complete checkpoint in .*\(skipped step_abc \(not a step_<number> "
                                        r"checkpoint\)\); run without --resume$"):
        latest_checkpoint(ckpt)


# ---- the fork server -----------------------------------------------------------------------------

def _child(fault: str, args: list[str]) -> None:
    """Run the CLI with `fault` armed: SIGNAL@save:N | SIGNAL@step:N (distill), SIGNAL@merge:N |
    SIGNAL@plan (compress), SIGNAL@output (both: OUT renamed aside for the result); the SIGNAL
    READONLY makes OUT's folder 0o500 there."""
    from come.cli.app import app
    from come.engine import pipeline
    from come.recovery import train_state
    from come.recovery.distill import _Run
    from come.settings import plan

    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    if fault != "-":
        name, where = fault.split("@")
        point, _, n = where.partition(":")
        out = Path(args[args.index("--out") + 1])

        def fire():
            if name == "READONLY":
                os.chmod(out.parent, 0o500)
            else:
                os.kill(os.getpid(), getattr(signal, name))

        if point == "merge":  # after merge N of the progressive loop (its finiteness check)
            real_check, merges = pipeline.check_finite, []

            def check_finite(*a, **kw):
                real_check(*a, **kw)
                merges.append(1)
                if len(merges) == int(n):
                    fire()

            pipeline.check_finite = check_finite
        elif point == "plan":  # inside save_checkpoint: the weights are in the temporary sibling
            real_plan_save = plan.Plan.save

            def plan_save(self, directory):
                assert Path(directory).name.startswith(f".{out.name}.tmp-{os.getpid()}-")
                assert (Path(directory) / "model.safetensors").is_file()
                fire()
                return real_plan_save(self, directory)

            plan.Plan.save = plan_save
        elif point == "save":  # called by accelerate's save_state, into the temporary directory
            real_state = train_state.TrainState.state_dict

            def state_dict(self):
                if self.step == int(n):
                    assert list((out / "checkpoints").glob(f".step_{n}.tmp-*"))
                    fire()
                return real_state(self)

            train_state.TrainState.state_dict = state_dict
        elif point == "step":
            real_step = _Run.step

            def step(self):
                if self.state.step == int(n):
                    fire()
                real_step(self)

            _Run.step = step
        elif point == "output":
            real_replace = os.replace

            def replace(src, dst, *a, **kw):
                if Path(src) == out:  # the first rename of the swap
                    fire()
                real_replace(src, dst, *a, **kw)

            os.replace = replace
    app(args=args, prog_name="come")


def _serve() -> None:
    """Import what every run imports, then fork one run per request line {fault, args, logs}
    and answer with its exit code (negative: the signal that ended it)."""
    import accelerate  # noqa: F401  (torch and come came with this file)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from come.cli import app  # noqa: F401  (and what its commands import on the way)
    from come.engine import compression  # noqa: F401
    from come.recovery import distill  # noqa: F401

    # Ctrl-C as at a terminal, also when pytest was started in the background (where the
    # shell starts it with SIGINT ignored and Python then installs no handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.alarm(240)  # a hung run ends, and so does the test's wait
                for fd, path in zip((1, 2), job["logs"]):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                if job.get("nodac"):
                    _root_obeys_permissions()
                _child(job["fault"], job["args"])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)


if __name__ == "__main__":
    _serve()
