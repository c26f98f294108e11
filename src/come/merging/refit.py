"""Closed-form least-squares refit of an output projection (method.md section 3b).

A merged (or kept) layer M stands for an original group G. With x1 the stream after M's
attention and F the features feeding the projection (FFN channels Z for our refit; the
MLP output for ReplaceMe's hidden x hidden map), we solve

    min_W ||F W^T - T||^2 + lam * mean(diag(F^T F)) * ||W - W0||^2,   T = y - x1,

y being the ORIGINAL hidden states at the end of G. Only F^T F, F^T T and ||T||^2 are
accumulated (float64, batch by batch), so memory is O(features^2), not O(tokens). They
live on the compute device, so on a GPU the float64 solves (d_ff^3: seconds on a 7B's
11008 channels there, minutes on a CPU) run there too.
A held-out slice of the calibration picks lam and vetoes a refit that does not help.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ComeError

LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
MIN_TOKENS = 32


@dataclass
class NormalEquations:
    """Sufficient statistics of a least-squares problem F W^T ~ T."""

    ff: Tensor  # [f, f]  F^T F
    ft: Tensor  # [f, d]  F^T T
    tt: float  # ||T||^2
    yy: float  # ||y||^2 (for errors relative to the target stream)
    n: int  # rows (tokens)

    @classmethod
    def empty(cls, n_features: int, n_out: int, device: torch.device | str = "cpu") -> "NormalEquations":
        return cls(torch.zeros(n_features, n_features, dtype=torch.float64, device=device),
                   torch.zeros(n_features, n_out, dtype=torch.float64, device=device), 0.0, 0.0, 0)

    def add(self, feats: Tensor, target: Tensor, y: Tensor) -> None:
        """Accumulate one batch: feats [.., f], target [.., d], y [.., d] (any leading dims)."""
        # per-batch products in float32 (fast; a batch is a few thousand rows), sums in float64
        f = feats.reshape(-1, feats.shape[-1]).float()
        t = target.reshape(-1, target.shape[-1]).float()
        ff, ft = gram(f), f.T @ t
        # a NaN / inf in f or t always reaches these products (diag(ff) sums f^2; NaN * 0 is NaN),
        # so checking them, f x f and f x d, is as safe as checking tokens x f and far cheaper
        if not (torch.isfinite(ff).all() and torch.isfinite(ft).all()):
            raise ComeError("non-finite activations while accumulating the refit; "
                            "use --dtype fp32 or --refit none")
        self.ff += ff.to(self.ff.device, torch.float64)
        self.ft += ft.to(self.ft.device, torch.float64)
        self.tt += float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
        self.yy += float(torch.linalg.vector_norm(y, dtype=torch.float64)) ** 2
        self.n += f.shape[0]


GRAM_BLOCKS = 4
GRAM_BLOCKED_MIN = 512  # features; below it one product is as fast


def gram(f: Tensor) -> Tensor:
    """F^T F. On a CPU, for a wide F, from its upper block triangle (the rest is its
    transpose): 5/8 of the multiply-adds in 4 column blocks, 0.65-0.73x the time of one F^T @ F
    at 512-8192 x 1536 rows (1 and 2 threads), and the same values (each entry is the same
    dot product over the rows)."""
    n = f.shape[1]
    if f.device.type != "cpu" or n < GRAM_BLOCKED_MIN:
        return f.T @ f
    g = f.new_empty(n, n)
    edges = [n * i // GRAM_BLOCKS for i in range(GRAM_BLOCKS + 1)]
    for s, e in zip(edges, edges[1:]):
        block = f[:, s:e].T @ f[:, s:]
        g[s:e, s:] = block
        g[e:, s:e] = block[:, e - s:].T
    return g


def ridge_solve(eq: NormalEquations | Sequence[NormalEquations], w0: Tensor, lam: float) -> Tensor:
    """argmin_W ||F W^T - T||^2 + lam' ||W - W0||^2 with lam' = lam * mean(diag(F^T F)).

    Scaling lam by the mean feature energy makes one grid serve every layer and model.
    Several statistics (train and held-out) are solved as their sum, summed straight into
    A = F^T F + lam' I: the refit's solve is compress's GPU memory peak (BENCHMARKS.md, "GPU
    benchmark"), and this holds one d_ff x d_ff float64 matrix fewer than forming the sum
    and then A (the same values: the same additions in the same order).
    """
    eqs = [eq] if isinstance(eq, NormalEquations) else list(eq)
    a, b = eqs[0].ff.clone(), eqs[0].ft.clone()
    for other in eqs[1:]:
        a += other.ff
        b += other.ft
    w0 = w0.to(a.device, torch.float64)
    scale = lam * float(a.diagonal().mean().clamp_min(1e-12))
    a.diagonal().add_(scale)
    b += scale * w0.T
    chol, info = torch.linalg.cholesky_ex(a)
    sol = torch.cholesky_solve(b, chol) if int(info) == 0 else torch.linalg.lstsq(a, b).solution
    return sol.T


def sq_error(eq: NormalEquations, w: Tensor) -> float:
    """||F W^T - T||^2 from the statistics alone: tr(W FF W^T) - 2 tr(W FT) + ||T||^2."""
    w = w.to(eq.ff.device, torch.float64)
    return float((w @ eq.ff * w).sum() - 2 * (w * eq.ft.T).sum() + eq.tt)


@dataclass
class RefitResult:
    weight: Tensor  # the weight to write (W0 when the refit was vetoed)
    kept: bool
    lam: float | None
    err_before: float  # held-out squared error / ||y||^2 with W0
    err_after: float  # the same with the chosen weight
    solve_seconds: float  # the lam grid and the final solve
    tokens: int
    seconds: float = 0.0  # the whole refit step (Profiler.refit: its layer pass and accumulation too)

    def record(self) -> dict:
        return {"kept": self.kept, "lam": self.lam, "heldout_err_before": self.err_before,
                "heldout_err_after": self.err_after, "seconds": round(self.seconds, 3),
                "solve_seconds": round(self.solve_seconds, 3), "tokens": self.tokens}


def fit(train: NormalEquations, hold: NormalEquations, w0: Tensor, lambdas=LAMBDAS) -> RefitResult:
    """Pick lam on held-out error, keep the refit only if it beats W0 there, then solve on
    all calibration tokens with that lam. The result never raises held-out error."""
    t0 = time.perf_counter()
    if train.n < MIN_TOKENS or hold.n < 1:
        raise ComeError(f"refit needs at least {MIN_TOKENS} training and 1 held-out calibration tokens "
                        f"(got {train.n} and {hold.n}); raise --nsamples or use --refit none")
    norm = max(hold.yy, 1e-30)
    before = sq_error(hold, w0) / norm
    best_lam, best_err = None, before
    for lam in lambdas:
        err = sq_error(hold, ridge_solve(train, w0, lam)) / norm
        if err < best_err:
            best_lam, best_err = lam, err
    if best_lam is None:
        weight, kept, best_err = w0, False, before
    else:
        weight, kept = ridge_solve((train, hold), w0, best_lam), True
    secs = time.perf_counter() - t0
    return RefitResult(weight, kept, best_lam, before, best_err, secs, train.n + hold.n, secs)


def fit_map(train: NormalEquations, hold: NormalEquations, w0: Tensor, lambdas=LAMBDAS) -> RefitResult:
    """ReplaceMe: statistics over the MLP output m = Z W0^T; fit a hidden x hidden map M
    (ridge towards identity) with m M^T ~ T, then fold it: Z (M W0)^T = m M^T."""
    res = fit(train, hold, torch.eye(w0.shape[0], dtype=torch.float64, device=train.ff.device), lambdas)
    res.weight = res.weight.double() @ w0.to(res.weight.device, torch.float64)
    return res
