"""One options object per command, shared by the CLI and the Python API and saved in the Plan."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from .errors import ComeError

PairScore = Literal["angular", "bi-all-tokens", "error", "merge-error"]
Split = Literal["bi", "joint"]
Method = Literal["come", "shortgpt", "replaceme", "laco", "average"]
Refit = Literal["ls", "none"]
RefitInput = Literal["dense", "compressed"]
Select = Literal["angle", "bi"]


# The authors' code's choices where our defaults differ (`come compress --official`).
OFFICIAL = {"norm": "average", "refit": "none", "split": "bi", "pair_score": "angular"}


@dataclass
class CompressConfig:
    """Settings of `come compress` (method.md: OFFICIAL defaults unless marked DECISION)."""

    sparsity: float = 0.3  # removed params / ALL params (embeddings and head included)
    method: Method = "come"  # come = concatenation merge; shortgpt / replaceme = peers on the same plumbing
    calib: str = "wikitext2"  # named dataset or local .txt/.jsonl
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 4
    device: str = "auto"  # cuda | cpu | auto; layers visit it one at a time
    pair_score: PairScore | None = None  # None: "bi-all-tokens" for come (DECISION, BENCHMARKS.md), "angular" else
    split: Split = "joint"  # DECISION: top units of both layers (BENCHMARKS.md); "bi" = OFFICIAL share from BI
    skew: float = 1.0  # exponent p of the bi split rule
    min_max: float = 0.0  # the bi split's floor on the larger share
    norm: Literal["fold", "average"] = "fold"  # DECISION: exact folding; "average" = OFFICIAL
    head_score: Literal["channel", "exact"] = "channel"
    no_repeat: bool = False
    protect: list[int] = field(default_factory=list)  # original layers never merged
    max_cache_gb: float = 32.0  # host memory for cached calibration hidden states
    refit: Refit | None = None  # None: "ls" for come (DECISION, ours), "none" for shortgpt (the peer as published)
    refit_holdout: float = 0.1  # calibration share that picks the ridge and vetoes bad refits
    refit_input: RefitInput = "compressed"  # refit on the compressed model's inputs or the dense ones
    select: Select = "angle"  # replaceme: published last-token angle block, or ShortGPT's BI layers

    def validate(self) -> None:
        if self.refit is None:
            self.refit = "ls" if self.method == "come" else "none"
        if self.pair_score is None:  # angular = last-token angular distance (OFFICIAL)
            self.pair_score = "bi-all-tokens" if self.method == "come" else "angular"
        if not 0.0 < self.sparsity <= 0.9:
            raise ComeError(f"--sparsity must be in (0, 0.9], got {self.sparsity}")
        choices = {"pair_score": PairScore, "split": Split, "method": Method, "refit": Refit,
                   "refit_input": RefitInput, "select": Select}
        for name, lit in choices.items():
            if getattr(self, name) not in lit.__args__:
                raise ComeError(f"--{name.replace('_', '-')} must be one of {', '.join(lit.__args__)}")
        if self.norm not in ("fold", "average"):
            raise ComeError("--norm must be fold or average")
        if self.head_score not in ("channel", "exact"):
            raise ComeError("--head-score must be channel or exact")
        if self.batch_size < 1:
            raise ComeError("--batch-size must be >= 1")
        if self.pair_score in ("error", "merge-error") and self.method in ("laco", "average"):
            raise ComeError(f"--pair-score {self.pair_score} scores concatenation merges; use angular or "
                            f"bi-all-tokens with --method {self.method}")
        if not 0.0 < self.refit_holdout < 1.0:
            raise ComeError(f"--refit-holdout must be in (0, 1), got {self.refit_holdout}")
        if not 0.0 <= self.min_max < 1.0:
            raise ComeError(f"--min-max must be in [0, 1), got {self.min_max}")
        if self.split == "joint" and (self.skew != 1.0 or self.min_max != 0.0):
            raise ComeError("--skew and --min-max shape the bi split rule; add --split bi (the default, joint, "
                            "ranks both layers' units together)")

    def to_dict(self) -> dict:
        return asdict(self)
