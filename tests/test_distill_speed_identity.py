"""The distillation speed work (issue 21) changes how the losses are computed, not what they
are: the loss of one batch and its gradient, in every loss branch, equal the values recorded
BEFORE that work (VALUES below) to 1e-5 relative, on the tiny LLaMA and on the real SmolLM2
(49K vocabulary: the chunked KL's real shape). Where the values were recorded (torch 2.13
CPU, one thread) they came out equal bit for bit. The students keep the first layer of
each group, so `compress` changing cannot move these values.

    python tests/test_distill_speed_identity.py   # print today's values (how VALUES was made)
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

sys.path.insert(0, str(Path(__file__).parent))

from conftest import smollm2_path, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(seqlen=32, batch_size=4, eval_windows=2, device="cpu", steps=1, lr=1e-3, warmup=0.0, layer_loss="kl",
            max_grad_norm=1e9)  # no clip: the gradient as computed
TINY: dict[str, dict] = {
    "sp-kl": {"mode": "sp"},
    "sp-kl-t2-chunks": {"mode": "sp", "temperature": 2.0, "kl_chunk": 48, "layer_weight": 0.5},
    "sp-mse-all": {"mode": "sp", "layer_loss": "mse", "train": "all"},
    "sp-kl-accum-ckpt": {"mode": "sp", "grad_accum": 2, "gradient_checkpointing": True},
    "mp-kl": {"mode": "mp"},
    "mp-kl-t2-chunks": {"mode": "mp", "temperature": 2.0, "kl_chunk": 48},
    "mp-mse-all": {"mode": "mp", "layer_loss": "mse", "train": "all"},
}
REAL: dict[str, dict] = {"sp-kl": {"mode": "sp"}, "sp-mse": {"mode": "sp", "layer_loss": "mse"},
                         "mp-kl": {"mode": "mp", "kl_chunk": 48}, "mp-mse": {"mode": "mp", "layer_loss": "mse"},
                         "sp-kl-t2-w0": {"mode": "sp", "temperature": 2.0, "layer_weight": 0.0}}
REAL_BASE = dict(BASE, seqlen=64, batch_size=1, eval_windows=1)

# Recorded with `python tests/test_distill_speed_identity.py` on the code before issue 21's changes (main at f914b54);
# the tiny mse rows again when normalized_mse became a mean of per-window terms (4 windows a batch here; the
# SmolLM2 rows have 1, where both forms agree and their values stayed).
VALUES = {
    "tiny": {
        "sp-kl": {"loss": 0.040070608258247375, "grad_abs": 24.13385747392155,
                 "grad_sq": 0.08523155623231868, "eval_kl": 0.013073677197098732},
        "sp-kl-t2-chunks": {"loss": 0.02883763238787651, "grad_abs": 19.953155224616584,
                           "grad_sq": 0.053955522842645584, "eval_kl": 0.013042972423136234},
        "sp-mse-all": {"loss": 0.8512776494026184, "grad_abs": 803.6604139471559,
                      "grad_sq": 46.65835739209839, "eval_kl": 0.012638458982110023},
        "sp-kl-accum-ckpt": {"loss": 0.04263067990541458, "grad_abs": 19.568081499560485,
                            "grad_sq": 0.054028415476363306, "eval_kl": 0.01295766793191433},
        "mp-kl": {"loss": 0.016939282417297363, "grad_abs": 7.363031301898426,
                 "grad_sq": 0.006325130008390682, "eval_kl": 0.013823060318827629},
        "mp-kl-t2-chunks": {"loss": 0.016870977357029915, "grad_abs": 7.333908375643837,
                           "grad_sq": 0.0063133455420175035, "eval_kl": 0.013795726001262665},
        "mp-mse-all": {"loss": 0.6503692865371704, "grad_abs": 228.79810998152777,
                      "grad_sq": 5.739655571275238, "eval_kl": 0.013425325974822044},
    },
    "smollm2": {
        "sp-kl": {"loss": 20.62689781188965, "grad_abs": 62599.78590469021,
                 "grad_sq": 5937.082656450687, "eval_kl": 1.6796905994415283},
        "sp-mse": {"loss": 16.399436950683594, "grad_abs": 13891.80069808907,
                  "grad_sq": 293.1631941204735, "eval_kl": 1.4132695198059082},
        "mp-kl": {"loss": 1.8418625593185425, "grad_abs": 3852.5149365378265,
                 "grad_sq": 17.581117859076322, "eval_kl": 2.678602933883667},
        "mp-mse": {"loss": 0.6843571662902832, "grad_abs": 42.411513614834035,
                  "grad_sq": 0.050173940677835274, "eval_kl": 2.3629698753356934},
        "sp-kl-t2-w0": {"loss": 3.5029654502868652, "grad_abs": 15345.95206315007,
                       "grad_sq": 354.5637801234748, "eval_kl": 1.4439102411270142},
    },
}


def one_batch(teacher, groups: list[list[int]], windows, overrides: dict, base: dict) -> dict:
    """distill for one optimizer step of a student that keeps the first layer of each group:
    the loss of its batch (the log), its gradient (sums of |g| and g^2 over the trainable
    parameters, read just before the step) and the held-out KL after the step."""
    from come.models.adapters import get_adapter
    from come.recovery.distill import distill
    from come.settings.distill_config import DistillConfig
    from come.settings.plan import Plan

    student = copy.deepcopy(teacher)
    get_adapter(student.config).keep_layers(student, [g[0] for g in groups])
    plan = Plan(model="", method="drop", settings={}, num_layers_before=sum(map(len, groups)),
                num_layers_after=len(groups), groups=groups)
    grads: list[list[float]] = []

    def read(optimizer, *_):
        g = [p.grad.double() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads.append([float(sum(x.abs().sum() for x in g)), float(sum(x.pow(2).sum() for x in g))])

    handle = register_optimizer_step_pre_hook(read)
    try:
        _, log = distill(copy.deepcopy(teacher), student, None, plan, DistillConfig(**{**base, **overrides}),
                         windows=windows)
    finally:
        handle.remove()
    return {"loss": log["train"][0]["loss"], "grad_abs": grads[0][0], "grad_sq": grads[0][1],
            "eval_kl": log["eval"][-1]["kl"]}


def tiny_values() -> dict:
    """The tiny LLaMA (6 layers, vocabulary 300) as 4 layers."""
    teacher = tiny_model("llama")
    ids = torch.randint(0, 300, (10, 32), generator=torch.Generator().manual_seed(0))
    groups = [[0], [1, 2], [3], [4, 5]]
    return {name: one_batch(teacher, groups, (ids[:8], ids[8:]), o, BASE) for name, o in TINY.items()}


def real_values() -> dict:
    """SmolLM2-135M (30 layers, vocabulary 49152) as 21 layers."""
    from come.models.checkpoint import load_model

    teacher, _ = load_model(str(smollm2_path()))
    ids = torch.randint(0, teacher.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    merged = {3: 2, 7: 3, 12: 2, 16: 2, 21: 3, 26: 2}  # first layer: group length
    groups, layer = [], 0
    while layer < 30:
        groups.append(list(range(layer, layer + merged.get(layer, 1))))
        layer = groups[-1][-1] + 1
    return {name: one_batch(teacher, groups, (ids[:1], ids[1:]), o, REAL_BASE) for name, o in REAL.items()}


def _check(got: dict, want: dict) -> None:
    for name, values in want.items():
        for key, value in values.items():
            assert got[name][key] == pytest.approx(value, rel=1e-5, abs=1e-12), (name, key)


def test_one_batch_loss_and_gradient_unchanged_tiny():
    _check(tiny_values(), VALUES["tiny"])


@pytest.mark.real
def test_one_batch_loss_and_gradient_unchanged_smollm2(smollm2_dir):
    _check(real_values(), VALUES["smollm2"])


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = {"tiny": tiny_values()}
    if smollm2_path() is not None:
        out["smollm2"] = real_values()
    print(json.dumps(out, indent=1))
