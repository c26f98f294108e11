"""The Plan: the record of a compression, and the contract between compress, distill and eval.

It says, for every layer of the compressed model, which contiguous ORIGINAL layers it
stands for (its group), and for every merge which units each side kept, the split and
the scores that chose it. Saved as come_plan.json beside the checkpoint.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ComeError

PLAN_FILE = "come_plan.json"


@dataclass
class MergeRecord:
    """One merge: current layers (position, position+1), or position .. position+m-1 with
    `--merge-item m`, became one layer at `position`.

    A merge of m > 2 layers (`--merge-item m`) lists each layer in `sides`, in order:
    {"group": original layers, "kv": KV groups kept, "ffn": FFN units kept (ids within
    that layer), "share": its share of the units, "bi": its block influence}. Its pair
    fields then read side A = the first layer and side B = all the others: group_b is
    their original layers, kv_b / ffn_b their kept ids one side after another (the
    sides split them), bi_b the sum of their BIs.
    """

    step: int
    position: int
    group_a: list[int]
    group_b: list[int]
    operator: str
    kv_a: list[int]  # KV groups kept from side A (ids within A as it was then)
    kv_b: list[int]
    ffn_a: list[int]  # FFN units kept from side A: channels, or experts in an MoE layer
    ffn_b: list[int]
    r_a: float  # share of units given to side A
    bi_a: float
    bi_b: float
    pair_score: float
    pair_scores: list[float]  # score of every candidate pair at this step
    params_before: int
    params_after: int
    refit: dict | None = None
    # --split search: {"score": "nll" | "error" | "refit", "candidates": [[r_a, score], ...]} (refit: also
    # "joint": [r_a, score] and "took": "drop A" | "drop B" | "merge" | "joint"); left out of
    # the JSON when None, so Plans without a search read as they always did
    split_search: dict | None = None
    # --merge-item > 2: every merged layer (class docstring); left out of the JSON when None
    sides: list[dict] | None = None


@dataclass
class Plan:
    model: str
    method: str
    settings: dict
    num_layers_before: int
    num_layers_after: int = 0
    params_before: int = 0
    params_after: int = 0
    target_sparsity: float = 0.0
    achieved_sparsity: float = 0.0
    groups: list[list[int]] = field(default_factory=list)  # per new layer: original layers it stands for
    merges: list[MergeRecord] = field(default_factory=list)
    calibration_tokens: int = 0
    layer_forwards: int = 0
    wall_time_s: float = 0.0
    versions: dict = field(default_factory=dict)

    def to_json(self) -> str:
        """Always valid JSON: a non-finite number (an ineligible pair's inf score) becomes null."""
        data = asdict(self)
        for merge in data["merges"]:
            for optional in ("split_search", "sides"):
                if merge[optional] is None:
                    del merge[optional]
        return json.dumps(_finite(data), indent=1, allow_nan=False)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PLAN_FILE
        path.write_text(self.to_json())
        return path


def library_versions() -> dict:
    import torch
    import transformers

    from .._version import __version__

    return {"come": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def load_plan(path: str | Path) -> Plan:
    """Read a Plan from come_plan.json or from the checkpoint directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_FILE
    if not path.is_file():
        raise ComeError(f"no Plan at {path}: pass a `come compress` output directory or --plan FILE")
    try:
        data = json.loads(path.read_text())
        data["merges"] = [MergeRecord(**m) for m in data.get("merges", [])]
        return Plan(**data)
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
        raise ComeError(f"{path} is not a valid come Plan ({str(exc).splitlines()[0][:120]}); use the "
                        "come_plan.json `come compress` wrote") from None


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
