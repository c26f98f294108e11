"""`--method auto`: compress with each candidate recipe and keep the one closest to the dense
model, by KL(dense || model) on held-out calibration windows.

No recipe wins everywhere (BENCHMARKS.md, the scoreboard): a peer with our refit ties or beats
the concatenation on some models. So auto tries a short list (`--candidates`, `come compare`
specs) on the same calibration and lets the model decide, as NVIDIA ModelOpt's Minitron search
scores candidate architectures. An eighth of the calibration windows (at least one) is held out:
every candidate calibrates on the rest, and is scored on those by the per-token KL to the dense
model, whose distributions are computed once (fidelity.py). The Plan records every candidate's
score under settings["auto"] (with the chosen recipe's own settings). The chosen recipe then runs
once more on ALL the calibration windows, so the model written is exactly what `--method <chosen>`
makes on the same calibration: the held-out split decides which recipe, never which weights (a
model calibrated on 7/8 of the windows moved KL by up to 0.10 either way on SmolLM2, BENCHMARKS.md).
Cost: each candidate once, plus the winner again.

Memory: the dense model and the candidate being built.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from dataclasses import dataclass, replace
from typing import ClassVar

from ..errors import ComeError
from ..settings.options import default_of, field_of, option
from .base import REGISTRY, Method, register

log = logging.getLogger("come")

HOLDOUT = 1 / 8  # share of the calibration windows that scores the candidates


@dataclass
class AutoOptions:
    """The recipes `--method auto` tries."""

    cli_panel: ClassVar[str] = "auto"

    candidates: str = option(
        "come,shortgpt:refit=ls,magnitude:refit=ls",
        "--method auto: the recipes tried (`come compare --methods` specs); the one with the lowest KL to the dense "
        "model on held-out calibration windows is kept.")


@register
class Auto(Method):
    name = "auto"
    summary = ("try each of --candidates on the same calibration, keep the one with the lowest KL to the dense model "
               "on held-out calibration windows")
    order = 1000  # listed last: it runs the others
    default_refit = None
    default_pair_score = None
    default_reprofile = None
    compared_by_default = False
    own_options = AutoOptions
    shared_options = frozenset()  # every other method-specific option belongs in a candidate's spec
    ignored_hint = " (each candidate has its own: give it in the candidate's spec, e.g. --candidates come,shortgpt:refit=ls)"

    def check(self, cfg) -> None:
        from ..settings.specs import method_list

        if len(cfg.levels()) > 1:
            raise ComeError("--method auto takes one --sparsity: the best recipe may differ by level; run each level")
        if cfg.nsamples < 2:
            raise ComeError(f"--method auto holds out calibration windows to score the candidates: needs --nsamples "
                            f">= 2, got {cfg.nsamples}")
        if self.name in (item.split(":")[0].strip() for item in cfg.candidates.split(",")):
            raise ComeError("--candidates: auto cannot be its own candidate")
        _candidates(cfg)  # every candidate resolves, or one line names the problem

    def needs_dense(self, cfg) -> bool:
        """The candidates may refit: the refit's shared options (--refit-holdout, --refit-input) reach them."""
        return True

    def removable(self, n_layers: int, cfg) -> int:
        """The fewest layers any candidate can remove: the target must suit them all."""
        return min(REGISTRY[s.method].removable(n_layers, s.config(_shared(cfg))) for s in _candidates(cfg))

    def compress(self, model, tokenizer, cfg, calib, model_name, levels=None):
        from ..engine.compression import run_method
        from ..scoring.fidelity import ReferenceWriter, score_windows

        n_held = max(1, round(len(calib) * HOLDOUT))
        fit, held = calib[:-n_held], calib[-n_held:]
        scores, best = [], None
        with tempfile.TemporaryDirectory(prefix="come-auto-") as ref_dir:
            writer = ReferenceWriter(ref_dir, "dense")
            dense_ppl = score_windows(model, held, writer=writer)[0]
            reference = writer.close()
            for spec in _candidates(cfg):
                t0 = time.perf_counter()
                own = spec.config(_shared(cfg)).resolved()
                built, _ = run_method(REGISTRY[own.method], copy.deepcopy(model), tokenizer, own, fit, model_name)
                seconds = time.perf_counter() - t0
                ppl, fid = score_windows(built, held, reference)
                del built
                scores.append({"spec": spec.label, "kl": fid["kl"]["mean"], "top1": fid["top1"], "ppl": ppl,
                               "seconds": round(seconds, 1)})
                log.info("auto: %s: KL %.4f to the dense model, top-1 %.3f, on %d held-out tokens (%.0f s)",
                         spec.label, fid["kl"]["mean"], fid["top1"], fid["tokens"], seconds)
                if best is None or fid["kl"]["mean"] < best[1]:
                    best = (own, fid["kl"]["mean"], spec.label)
        own, _, label = best
        log.info("auto: chose %s; running it on all %d calibration windows", label, len(calib))
        built, plan = run_method(REGISTRY[own.method], model, tokenizer, own, calib, model_name, levels)
        # the Plan is auto's (re-running these settings repeats the choice); the chosen recipe's own
        # settings, merges and groups are the ones that made the model
        plan.settings = {**cfg.to_dict(), "auto": {
            "candidates": scores, "chosen": label, "settings": plan.settings, "holdout_windows": n_held,
            "holdout_tokens": int(held[:, 1:].numel()), "dense_ppl": dense_ppl}}
        plan.method = self.name
        return built, plan


def _shared(cfg):
    """`cfg` without auto's own option: what every candidate starts from."""
    return replace(cfg, method="auto", candidates=default_of(field_of(AutoOptions, "candidates")))


def _candidates(cfg) -> list:
    """The candidates' specs (compare.MethodSpec), each resolved on the shared settings."""
    from ..settings.specs import method_list

    return method_list(cfg.candidates, _shared(cfg), "--candidates")
