"""Which adjacent layers to merge, and how many units each side keeps.

Pure functions on profiled statistics (method.md section 2 and the split of section 3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .row_blocks import row_blocks


def angular_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-row arccos(clamp(cos(a, b), 0, 1)) / pi: 0 = same direction, 0.5 = orthogonal."""
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return torch.arccos(cos.clamp(0.0, 1.0)) / math.pi


def token_cosines(a: Tensor, b: Tensor) -> Tensor:
    """Per-token cos(a, b) over the last dim, in float32 at least: enough for a block
    influence (1 - mean cos, often ~0.01) when summed in float64, and no float64 copy of
    every calibration batch (bf16 states are upcast: its 3 digits would not do). Over row
    blocks (row_blocks.py): the same values, 5x faster on a CPU."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    cos = [torch.nn.functional.cosine_similarity(x, y, dim=-1) for x, y in row_blocks(a.to(dtype), b.to(dtype))]
    return torch.cat(cos).reshape(a.shape[:-1])


# all-token pair scores: name -> angular? (False: 1 - cos, the block influence)
ALL_TOKEN_SCORES = {"bi-all-tokens": False, "angular-all-tokens": True}


def mean_token_distance(h_in: list[Tensor], h_out: list[Tensor], angular: bool = False) -> float:
    """Mean over ALL tokens, over batches, of how far a run of layers turns each state:
    1 - cos(in, out) (the block influence; `--pair-score bi-all-tokens`), or
    arccos(clamp(cos, 0, 1)) / pi (`angular-all-tokens`: the authors' CoMe-P score)."""
    total, n = 0.0, 0
    for a, b in zip(h_in, h_out):
        cos = token_cosines(a, b)
        if angular:
            total += float(torch.arccos(cos.double().clamp(0.0, 1.0)).sum()) / math.pi
        else:
            total += float(cos.sum(dtype=torch.float64))
        n += a.shape[0] * a.shape[1]
    return total / n if angular else 1.0 - total / n


def skip_scores(last_token_states: list[Tensor], span: int = 2) -> list[float]:
    """OFFICIAL pair score. `last_token_states[k]` is the last-token hidden state entering
    layer k for every calibration sample ([n_samples, hidden]; the final entry is the
    output of the last layer). skip(k) = sum over samples of the angular distance between
    the state entering k and the one leaving k+1: how much the pair changes it. A window
    of `span` layers (`--merge-item`) is scored alike, entering k to leaving k+span-1."""
    return [
        float(angular_distance(last_token_states[k], last_token_states[k + span]).sum())
        for k in range(len(last_token_states) - span)
    ]


def choose_pair(scores: list[float], eligible: list[bool]) -> int:
    """Index k of the least important eligible pair (k, k+1); ties go to the earlier pair."""
    best = None
    for k, (s, ok) in enumerate(zip(scores, eligible)):
        if ok and (best is None or s < scores[best]):
            best = k
    if best is None:
        raise ValueError("no eligible pair")
    return best


def split_ratio(bi_a: float, bi_b: float, p: float = 1.0, min_max: float = 0.0, n_original: int = 2) -> float:
    """Share r_A of the merged layer's units that come from side A (OFFICIAL rule).

    r = normalize(normalize(BI)^p); if min_max > 0 the larger share is raised to at least
    min_max ** (1 / (n_original - 1)) (n_original: original layers covered by the pair),
    so deep groups are pushed towards keeping one side whole.
    """
    return split_shares([bi_a, bi_b], p, min_max, n_original)[0]


def split_counts(n: int, r_a: float) -> tuple[int, int]:
    """(N_A, N_B) with N_A + N_B == n: floor each side, the remainder to the larger share."""
    n_a, n_b = share_counts(n, [r_a, 1.0 - r_a])
    return n_a, n_b


def split_shares(bis: list[float], p: float = 1.0, min_max: float = 0.0, n_original: int = 2) -> list[float]:
    """`split_ratio` for a window of several layers (`--merge-item` > 2; the authors'
    block_ratio): shares normalize(normalize(BI)^p); with min_max > 0 the largest share is
    raised to at least min_max ** (1 / (n_original - 1)) and the others scaled to the rest."""
    scores = [max(b, 0.0) for b in bis]
    total = sum(scores)
    if total <= 0:
        return [1.0 / len(bis)] * len(bis)
    shares = [(s / total) ** p for s in scores]
    if not sum(shares) > 0:  # a large p underflowed every term: their limit, all to the highest BI
        shares = [float(s == max(scores)) for s in scores]
    shares = [s / sum(shares) for s in shares]
    m = min_max ** (1.0 / max(n_original - 1, 1)) if min_max > 0 else 0.0
    big = max(range(len(shares)), key=shares.__getitem__)
    if shares[big] < m:
        rest = sum(s for i, s in enumerate(shares) if i != big)  # two sides: the other's share, so 1 - m exactly
        shares = [m if i == big else ((1.0 - m) * (s / rest) if rest > 0 else (1.0 - m) / (len(shares) - 1))
                  for i, s in enumerate(shares)]
    return shares


def share_counts(n: int, shares: list[float]) -> list[int]:
    """`split_counts` for several sides: floor each side's share of n, the remainder to the
    largest share (the first on a tie)."""
    counts = [math.floor(n * s) for s in shares]
    counts[max(range(len(shares)), key=shares.__getitem__)] += n - sum(counts)
    return counts


def joint_counts(scores: list[Tensor], n: int) -> list[int]:
    """`joint_split` over several sides: how many of each side's units the top-n of all of
    them, ranked together by sensitivity, holds."""
    top = torch.topk(torch.cat([s.double() for s in scores]), n).indices
    bounds = torch.tensor([s.numel() for s in scores]).cumsum(0)
    side = torch.bucketize(top, bounds, right=True)
    return [int((side == i).sum()) for i in range(len(scores))]


def joint_split(scores_a: Tensor, scores_b: Tensor, n: int) -> tuple[int, int]:
    """`--split joint`: top-n over the union of both sides' units ranked by sensitivity."""
    n_a, n_b = joint_counts([scores_a, scores_b], n)
    return n_a, n_b
