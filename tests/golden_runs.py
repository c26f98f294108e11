"""Golden runs: the decisions (come_plan.json without timings) and a hash of the output
weights of every method on tiny LLaMA / Qwen2 / Qwen3 models, and of come and shortgpt on
the real SmolLM2 at 25%. Recorded BEFORE the architecture redesign (main at 33f6bca) so
the redesigned code can be held to them byte for byte (tests/test_golden.py).

    python tests/golden_runs.py   # rewrite tests/golden/*.json from this checkout (SmolLM2 when installed)

Byte-identity of float math holds on one CPU instruction set and one torch build; the
record says which, and on another one the test compares every number to 1e-4 instead.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import corpus, make_tokenizer, smollm2_path, tiny_model  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"

# every method, and the option branches the redesign moves (pair scores, refit, select)
RUNS: dict[str, dict] = {
    "come": {},
    "come-official": {"norm": "average", "refit": "none", "split": "bi", "pair_score": "angular"},
    "come-error": {"pair_score": "error"},
    "come-merge-error": {"pair_score": "merge-error", "head_score": "exact"},
    "shortgpt": {"method": "shortgpt"},
    "shortgpt-refit": {"method": "shortgpt", "refit": "ls"},
    "replaceme": {"method": "replaceme"},
    "replaceme-bi": {"method": "replaceme", "select": "bi"},
    "laco": {"method": "laco"},
    "average": {"method": "average"},
}
TINY_FAMILIES = ("llama", "qwen2", "qwen3")
REAL_RUNS = {"come": {}, "shortgpt": {"method": "shortgpt"}}
TIMING_KEYS = {"wall_time_s", "seconds", "solve_seconds", "versions"}


def _strip(obj):
    """The Plan without what differs run to run (timings, library versions)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def weights_record(model) -> dict:
    """sha256 over every tensor's name, shape and bytes, plus per-tensor sums (the check used
    on another CPU instruction set, where float results may differ in the last bits)."""
    sha = hashlib.sha256()
    sums = {}
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        sha.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        sha.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        sums[name] = [float(t.double().sum()), float(t.double().abs().sum())]
    return {"sha256": sha.hexdigest(), "sums": sums}


def run_record(model, tokenizer, calib, overrides: dict, model_name: str = "") -> dict:
    from come import CompressConfig, compress
    from come.methods import get_method

    # recorded with full re-profiling, the default until 2026-12-03 (the window has its own tests),
    # where the method re-profiles (a drop method profiles once and refuses --reprofile)
    cfg = CompressConfig(**{"sparsity": 0.3, "device": "cpu", "batch_size": 4, "reprofile": "full", **overrides})
    cfg = get_method(cfg.method).own(cfg)
    out, plan = compress(model, tokenizer, cfg, calib=calib, model_name=model_name)
    return {"plan": _strip(json.loads(plan.to_json())), "weights": weights_record(out)}


def machine() -> dict:
    import platform

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine()}


def tiny_calib(tokenizer):
    from come.models.data import token_windows

    return token_windows(corpus(), tokenizer, 8, 32, seed=0)


def tiny_records(tokenizer) -> dict:
    calib = tiny_calib(tokenizer)
    out = {}
    for family in TINY_FAMILIES:
        dense = tiny_model(family)
        for name, overrides in RUNS.items():
            out[f"{family}/{name}"] = run_record(copy.deepcopy(dense), tokenizer, calib, overrides)
    return out


def real_calib(tokenizer):
    from come.models.data import token_windows

    return token_windows(corpus(8000), tokenizer, 8, 128, seed=0)


def real_records(model_dir: Path) -> dict:
    from come.models.checkpoint import load_model

    out = {}
    for name, overrides in REAL_RUNS.items():
        model, tok = load_model(str(model_dir))
        out[f"smollm2/{name}"] = run_record(model, tok, real_calib(tok), {"sparsity": 0.25, **overrides}, "smollm2")
    return out


def main() -> None:
    GOLDEN.mkdir(exist_ok=True)
    tok = make_tokenizer()
    (GOLDEN / "tiny.json").write_text(json.dumps({"machine": machine(), "runs": tiny_records(tok)}, indent=0) + "\n")
    smol = smollm2_path()
    if smol is not None:
        (GOLDEN / "smollm2.json").write_text(json.dumps({"machine": machine(), "runs": real_records(smol)},
                                                        indent=0) + "\n")


if __name__ == "__main__":
    main()
