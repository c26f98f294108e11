"""The activations in `come distill`'s memory plan (recovery/distill_memory.py): a layer's term is
the bytes autograd saves through it, the terms follow the settings that size them, a run too big
for its activations is refused in one line naming what to lower before any weight loads, and a
child process's measured peak is what the plan says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from come.cli.app import app
from come.models.checkpoint import save_checkpoint
from come.recovery.distill_memory import _layer_saved, activations, memory_plan
from come.settings.distill_config import DistillConfig
from come.settings.plan import Plan

from conftest import corpus, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = [[0], [1, 2], [3], [4, 5]]  # merged layers 1 and 3 train (--train merged); layer 2 is frozen between them
SHAPE = dict(vocab_size=2000, hidden_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, max_position_embeddings=512)


def _configs(**shape):
    return tiny_config("llama", **{**SHAPE, **shape}), tiny_config("llama", layers=len(GROUPS), **{**SHAPE, **shape})


@pytest.fixture(scope="module")
def dirs(tokenizer, tmp_path_factory) -> Path:
    """A random 6-layer teacher and a random 4-layer student with a Plan that maps them (GROUPS),
    as HF folders, and a training text: what `come distill` reads, built in-process."""
    root = tmp_path_factory.mktemp("distill-memory")
    torch.manual_seed(0)
    teacher, student = (transformers.AutoModelForCausalLM.from_config(c) for c in _configs())
    plan = Plan(model="teacher", method="come", settings={}, num_layers_before=6, num_layers_after=len(GROUPS),
                groups=GROUPS)
    save_checkpoint(teacher, tokenizer, None, root / "teacher")
    save_checkpoint(student, tokenizer, plan, root / "student")
    (root / "train.txt").write_text(corpus())
    return root


def _saved_per_layer(model, trainable: list[int], ids: torch.Tensor, bf16: bool) -> dict[int, int]:
    """Bytes of the distinct tensors autograd saves in each decoder layer of a forward (parameters
    left out: the plan counts them as weights)."""
    layers = model.model.layers
    model.requires_grad_(False).train()
    for k in trainable:
        layers[k].requires_grad_(True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where, seen = [None], {}
    hooks = [layer.register_forward_pre_hook(lambda _m, _a, k=k: where.__setitem__(0, k)) for k, layer in
             enumerate(layers)]  # and the final norm's (distill drops its output) to none
    hooks.append(model.model.norm.register_forward_pre_hook(lambda *_: where.__setitem__(0, None)))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen and where[0] is not None:
            seen[storage.data_ptr()] = (where[0], storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model.model(input_ids=ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    per_layer = dict.fromkeys(range(len(layers)), 0)
    for k, nbytes in seen.values():
        per_layer[k] += nbytes
    return per_layer


@pytest.mark.parametrize("bf16, stored", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)])
def test_a_layers_term_is_what_autograd_saves_through_it(bf16, stored):
    """Counted tensor by tensor (saved-tensor hooks) on a random LLaMA: every layer after the
    first trainable one saves what `_layer_saved` says, trained (layer 3) or frozen (layer 2):
    in fp32, and under bf16 autocast with the weights stored in fp32 or in bf16 (the trained
    layers in fp32, as distill trains them)."""
    torch.manual_seed(0)
    config = _configs()[1]
    model = transformers.AutoModelForCausalLM.from_config(config).to(stored)
    tokens, trainable = 2 * 64, [1, 3]
    for k in trainable:
        model.model.layers[k].float()
    saved = _saved_per_layer(model, trainable, torch.randint(0, 300, (2, 64)), bf16)
    size, stream = (2 if bf16 else 4), stored.itemsize
    # under bf16 autocast each projection saves the bf16 copy of its fp32 weight (the plan counts the
    # layer's parameters, its norms' too: 2 x hidden more)
    copies = [sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear)) * 2
              * (bf16 and next(layer.parameters()).dtype == torch.float32) for layer in model.model.layers]
    assert saved[0] == 0  # before the first trainable layer nothing needs a gradient
    assert saved[2] == tokens * _layer_saved(config, False, size, stream) + copies[2]
    assert saved[3] == tokens * _layer_saved(config, True, size, stream) + copies[3]


def _acts(mode: str = "sp", **settings):
    teacher, student = _configs()
    cfg = DistillConfig(**{"mode": mode, "device": "cpu", "seqlen": 128, "batch_size": 4, **settings})
    return activations(teacher, student, GROUPS, [1, 3], cfg, bf16=False)


def test_the_terms_follow_the_settings_that_size_them():
    base = _acts()
    double = _acts(batch_size=8)
    for term in ("states", "saved", "chunk", "backward"):  # all linear in the tokens (the chunk until --kl-chunk)
        assert getattr(double, term) == 2 * getattr(base, term), term
    assert _acts(batch_size=8, kl_chunk=512).chunk == base.chunk  # 512 = the tokens of one batch of 4 x 128
    assert base.step == base.states + base.saved + base.chunk > base.evaluation  # the KL chunk outweighs the backward
    # sp keeps what layers 1-3 save (layer 0 needs no gradient); checkpointed, their inputs and one layer recomputed
    tokens, hidden = 4 * 128, SHAPE["hidden_size"]
    student = _configs()[1]
    assert base.saved == tokens * (2 * _layer_saved(student, True, 4, 4) + _layer_saved(student, False, 4, 4))
    checkpointed = _acts(gradient_checkpointing=True)
    assert checkpointed.saved == 3 * tokens * hidden * 4
    assert checkpointed.backward == base.backward + tokens * _layer_saved(student, True, 4, 4)
    # mp: one layer at a time, on the teacher's states at 1, 3, 4 and 6; the mse loss needs no KL chunk in the step
    mp = _acts("mp")
    assert mp.saved < base.saved / 2 and not mp.step_kl and mp.step == mp.states + mp.saved + mp.backward
    assert mp.states == (4 + 1) * tokens * hidden * 4  # four targets and the loss's difference
    assert _acts("mp", layer_loss="kl").step_kl
    # the held-out pass: min(--batch-size, --eval-windows) windows
    assert _acts(eval_windows=2).evaluation < base.evaluation == _acts(eval_windows=64).evaluation
    plan = memory_plan(*_configs(), [1, 3], 1, False, False, acts=base)
    assert plan["activations"] == base.peak and plan["total"] == sum(v for k, v in plan.items() if k != "total")


def test_a_run_its_activations_do_not_fit_is_refused_in_one_line_before_the_weights_load(dirs, monkeypatch):
    """A cap above the weights and training state but below the activations: refused, with
    nothing loaded or written, in one line that names each lever and what it would lower."""
    def no_loading(*_args, **_kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr("come.models.checkpoint.load_model", no_loading)
    out = dirs / "refused"
    result = CliRunner().invoke(app, [
        "distill", "--teacher", str(dirs / "teacher"), "--student", str(dirs / "student"), "--data",
        str(dirs / "train.txt"), "--out", str(out), "--device", "cpu", "--batch-size", "8", "--seqlen", "256",
        "--max-memory-gb", "0.05"])  # weights and state 0.02 GB, activations 0.18
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.output.strip().endswith(errors[0])
    for lever in ("activations 0.176 GB", "--batch-size or --seqlen", "--kl-chunk (one chunk 0.0983 GB)",
                  "--gradient-checkpointing (saved for backward 0.0704 GB)", "--shard (weights and training state",
                  "more than --max-memory-gb 0.05"):
        assert lever in errors[0], lever
    assert not out.exists()


# The measured check: one child process runs `come distill` at each setting in turn, and for each
# reads its peak resident memory (VmHWM) from the moment the plan is made (the peak is reset there,
# before the weights load) against its resident memory then. The first run, at 1 x 8 tokens, has
# next to no activations: what it holds beyond its plan is the framework's own first-use memory
# (about 0.03 GB here), which the later runs find already there. Large blocks go back to the system
# when freed (MALLOC_MMAP_THRESHOLD_, as tests/test_compress_memory.py), so what is measured is the
# plan's live bytes, not the allocator's cache.
_CHILD = """
import json, sys
import come.recovery.distill_memory as memory
from come.cli.app import app


def resident(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


real = memory.check_memory


def check(plan, *args, **kwargs):
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak (VmHWM) starts again from what is resident now
    print("PLAN", json.dumps(plan), resident("VmRSS:"), file=sys.stderr)
    return real(plan, *args, **kwargs)


memory.check_memory = check
for args in json.loads(sys.argv[1]):
    try:
        app(args)
    except SystemExit as stop:
        if stop.code:
            raise
    print("PEAK", resident("VmHWM:"), file=sys.stderr)
"""

SETTINGS = {"1 x 8 tokens": ["--mode", "sp", "--batch-size", "1", "--seqlen", "8"],
            "sp": ["--mode", "sp", "--batch-size", "8", "--seqlen", "256"],
            "mp": ["--mode", "mp", "--batch-size", "16", "--seqlen", "256"],
            "sp, checkpointed": ["--mode", "sp", "--batch-size", "8", "--seqlen", "256", "--gradient-checkpointing"]}


def _measure(dirs: Path) -> dict[str, tuple[dict, int]]:
    """Per setting: (the plan, the peak's rise over what was resident when the plan was made)."""
    runs = [["distill", "--teacher", str(dirs / "teacher"), "--student", str(dirs / "student"), "--data",
             str(dirs / "train.txt"), "--out", str(dirs / "out"), "--overwrite", "--steps", "2", "--eval-windows", "2",
             "--device", "cpu", *extra] for extra in SETTINGS.values()]
    env = {**os.environ, "COLUMNS": "1000", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(runs)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    plans = re.findall(r"PLAN (\{.*?\}) (\d+)", done.stderr)
    peaks = re.findall(r"PEAK (\d+)", done.stderr)
    assert len(plans) == len(peaks) == len(SETTINGS), done.stderr[-3000:]
    return {name: (json.loads(plan), int(peak) - int(now)) for name, (plan, now), peak in zip(SETTINGS, plans, peaks)}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads and resets the peak in Linux's /proc")
def test_measured_peak_is_the_plan(dirs):
    """At sp, mp and checkpointed sp, where activations are most of the plan, the peak's rise is
    the plan's total within 25% (the issue's tolerance, as for `come compress`). Measured alone
    it is 0.87-0.98 of it (3 runs): the plan is a bound (in sp the gradients arrive as the backward frees
    the activations; the backward's working set is planned at 3 FFN-wide tensors a token against
    the 2.3-3.3 measured). A miss is measured once more before it fails: a second run tells a
    transient from a plan that is wrong (tests/test_compress_memory.py saw one inside a full suite)."""
    misses = []
    for _ in range(2):
        measured = _measure(dirs)
        small, small_rise = measured.pop("1 x 8 tokens")
        assert small["activations"] < 0.05 * small["total"]
        for name, (plan, _) in measured.items():
            assert plan["activations"] > 0.5 * plan["total"], name  # the check is of the activations' term
        ratios = {name: round(rise / plan["total"], 3) for name, (plan, rise) in measured.items()}
        print(f"1 x 8 tokens: plan {small['total'] / 1e9:.4f} GB, measured {small_rise / 1e9:.4f}")  # pytest -s:
        for name, (plan, rise) in measured.items():  # docs/memory.md's table
            print(f"{name}: plan {plan['total'] / 1e9:.3f} GB (activations {plan['activations'] / 1e9:.3f}), "
                  f"measured {rise / 1e9:.3f}, measured / plan {ratios[name]}")
        if all(0.75 <= ratio <= 1.25 for ratio in ratios.values()):
            return
        misses.append(ratios)
    raise AssertionError(f"two runs' peaks off the plan by more than 25% (measured / plan): {misses}")
