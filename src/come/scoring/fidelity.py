"""Fidelity to a reference model, measured like llama.cpp measures quantization: per-token
KL(reference || model), top-1 agreement and the NLL difference on the perplexity windows.

The reference's next-token distributions are computed once (`ReferenceLogprobs.build`) and
reused for every model scored against them, so N models cost N + 1 passes. A full-vocabulary
distribution per token is too large to keep (20K tokens x a 49K vocabulary is 4 GB in fp32;
a language model's tail is long: 1e-4 of the mass is spread over ~15K of SmolLM2's 49K tokens),
so each position keeps the reference's `top_k` most probable tokens and the rest as one bucket.
KL is then the KL of the two distributions coarsened to those tokens and the bucket: exact with
`top_k=0` (all), and never above the full KL (coarsening cannot raise KL). At the default 1024
it read 1.4% below the full KL on SmolLM2-135M at 25% (docs/decisions.md), 8 KB a token.

Per-window values are kept so two models scored on the same windows compare PAIRED
(`paired_fidelity`: mean difference and its standard error over windows).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import ComeError

DEFAULT_TOP_K = 1024  # reference tokens kept per position; the rest is one bucket
MARKER = "come_reference.json"
STATS = ("kl", "top1", "nll_delta")  # the per-window means two models pair on


def _log_probs(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def compact(ref_logp: Tensor, top_k: int = DEFAULT_TOP_K) -> dict[str, Tensor]:
    """One window's reference log-probs [T, V] as each position's `top_k` most probable tokens
    (`idx` [T, K] int32, most probable first, and their `logp` [T, K]); `top_k` 0 or >= V keeps
    every token (exact)."""
    k = ref_logp.shape[-1] if top_k <= 0 else min(top_k, ref_logp.shape[-1])
    logp, idx = ref_logp.topk(k, dim=-1)
    return {"idx": idx.to(torch.int32), "logp": logp.contiguous()}


def token_stats(ref: dict[str, Tensor], logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Per-token KL(reference || model) over the reference's kept tokens plus one bucket for
    the rest, top-1 agreement (the model's argmax is the reference's) and the model's NLL minus
    the reference's, from the model's logits [T, V] and the next tokens [T]. Pure tensors;
    float64 sums."""
    logq = _log_probs(logits)
    idx, logp = ref["idx"].long(), ref["logp"].double()
    p, q_kept = logp.exp(), logq.gather(-1, idx).double()
    kl = (p * (logp - q_kept)).sum(-1)
    if idx.shape[-1] < logq.shape[-1]:  # the bucket: what the reference did not keep, on both sides
        p_tail = (1.0 - p.sum(-1)).clamp(min=0.0)
        log_q_tail = torch.logsumexp(logq.scatter(-1, idx, -math.inf), dim=-1).double()
        kl = kl + torch.where(p_tail > 0, p_tail * (p_tail.clamp(min=1e-300).log() - log_q_tail), 0.0)
    top1 = (logq.argmax(-1) == idx[:, 0]).double()
    nll = -logq.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
    return {"kl": kl.clamp(min=0.0), "top1": top1, "nll_delta": nll - ref["nll"].double()}


def summarize(per_token: dict[str, Tensor], windows: list[dict[str, float]], reference: str, top_k: int) -> dict:
    """The JSON `fidelity` section: KL mean / median / p90 / p99 / max over all tokens, top-1
    agreement, mean NLL difference, and each window's means (for paired comparisons)."""
    kl = per_token["kl"]
    q = torch.quantile(kl, torch.tensor([0.5, 0.9, 0.99], dtype=kl.dtype)).tolist() if kl.numel() <= 2**24 else \
        [float(kl.kthvalue(max(1, math.ceil(f * kl.numel()))).values) for f in (0.5, 0.9, 0.99)]
    return {"reference": reference, "top_k": top_k, "tokens": kl.numel(),
            "kl": {"mean": float(kl.mean()), "median": q[0], "p90": q[1], "p99": q[2], "max": float(kl.max())},
            "top1": float(per_token["top1"].mean()), "nll_delta": float(per_token["nll_delta"].mean()),
            "per_window": {k: [w[k] for w in windows] for k in STATS}}


def paired_difference(xa: list[float], xb: list[float]) -> tuple[float, float]:
    """(mean of xa - xb, its standard error): values paired item by item (windows, seeds)."""
    d = torch.tensor(xa, dtype=torch.float64) - torch.tensor(xb, dtype=torch.float64)
    return float(d.mean()), float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0


def paired_fidelity(a: dict, b: dict, stat: str = "kl") -> tuple[float, float] | None:
    """(mean of `a`'s per-window `stat` minus `b`'s, standard error over windows): two models
    scored against the same reference on the same windows. None when they are not comparable."""
    if not a or not b or any(a.get(k) != b.get(k) for k in ("reference", "top_k", "tokens")):
        return None
    xa, xb = a["per_window"][stat], b["per_window"][stat]
    if not xa or len(xa) != len(xb):
        return None
    return paired_difference(xa, xb)


class ReferenceLogprobs:
    """The reference model's compacted next-token distributions on a fixed list of windows,
    one safetensors file per window in `directory` (with its token ids, so a model is only ever
    scored on the same tokens). Written by `ReferenceWriter` (or `build`)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        try:
            meta = json.loads((self.directory / MARKER).read_text())
        except (OSError, ValueError):
            raise ComeError(f"{self.directory} is not a reference written by come (no readable {MARKER}); "
                            "pass the reference model instead") from None
        self.name, self.windows, self.top_k = meta["reference"], meta["windows"], meta["top_k"]

    @classmethod
    def build(cls, model, windows: Tensor, directory: str | Path, name: str, top_k: int = DEFAULT_TOP_K,
              device: str | torch.device | None = None) -> "ReferenceLogprobs":
        """Run `model` over `windows` [N, T] once and keep its distributions in `directory`."""
        writer = ReferenceWriter(directory, name, top_k)
        score_windows(model, windows, device=device, writer=writer)
        return writer.close()

    def window(self, i: int) -> dict[str, Tensor]:
        return load_file(str(self.directory / f"window-{i:06d}.safetensors"))

    def refuse(self) -> None:
        """The one-line refusal of windows other than the reference's (other text, tokenizer, seqlen)."""
        raise ComeError(f"the reference {self.name!r} was computed on other tokens than this model's perplexity "
                        "windows; use the same --ppl-data, --seqlen, --ppl-windows and a model with the "
                        "reference's tokenizer")


class ReferenceWriter:
    """Fills a reference directory window by window, during the reference model's own
    perplexity pass (so the reference costs no pass of its own); the marker file is written
    last by `close`, so a half-written reference is never read."""

    def __init__(self, directory: str | Path, name: str, top_k: int = DEFAULT_TOP_K):
        if top_k < 0:
            raise ComeError(f"the reference keeps top_k >= 0 tokens a position (0: all), got {top_k}")
        self.directory, self.name, self.top_k, self.count = Path(directory), name, top_k, 0
        self.directory.mkdir(parents=True, exist_ok=True)

    def add(self, logits: Tensor, window: Tensor) -> None:
        """One window's logits [T - 1, V] (any device) and its token ids [T]."""
        logp = _log_probs(logits)
        nll = -logp.gather(-1, window[1:].to(logp.device).unsqueeze(-1)).squeeze(-1)
        kept = {k: v.cpu().contiguous() for k, v in {**compact(logp, self.top_k), "nll": nll}.items()}
        save_file({**kept, "ids": window.cpu().contiguous()}, str(self.directory / f"window-{self.count:06d}.safetensors"))
        self.count += 1

    def close(self) -> ReferenceLogprobs:
        meta = {"reference": self.name, "windows": self.count, "top_k": self.top_k}
        (self.directory / MARKER).write_text(json.dumps(meta) + "\n")
        return ReferenceLogprobs(self.directory)


@torch.no_grad()
def score_windows(model, windows: Tensor, reference: ReferenceLogprobs | None = None,
                  device: str | torch.device | None = None, writer: ReferenceWriter | None = None,
                  ) -> tuple[float, dict | None]:
    """(perplexity of `model` on `windows`, its `fidelity` section against `reference` or None)
    from ONE pass, one window per forward (full-vocabulary fp32 logits are the memory peak);
    with `writer`, the pass also records this model as a reference."""
    from tqdm.auto import tqdm

    model.eval()
    device = device or next(model.parameters()).device
    if reference is not None and len(windows) != reference.windows:
        reference.refuse()
    nll, count, per_token, per_window = 0.0, 0, [], []
    for i, window in enumerate(tqdm(windows, desc="perplexity", leave=False, unit="window")):
        ref = reference.window(i) if reference is not None else None  # read once: checked, then scored
        if ref is not None and not torch.equal(ref["ids"], window):
            reference.refuse()
        ids = window.unsqueeze(0).to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        target = ids[0, 1:]
        nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        count += target.numel()
        if writer is not None:
            writer.add(logits, window)
        if ref is not None:
            ref = {k: v.to(device) for k, v in ref.items()}
            stats = {k: v.cpu() for k, v in token_stats(ref, logits, target).items()}
            per_token.append(stats)
            per_window.append({k: float(v.mean()) for k, v in stats.items()})
    ppl = math.exp(nll / count)
    if reference is None:
        return ppl, None
    joined = {k: torch.cat([t[k] for t in per_token]) for k in STATS}
    return ppl, summarize(joined, per_window, reference.name, reference.top_k)
