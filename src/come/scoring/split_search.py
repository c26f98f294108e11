"""`--split search`: CoMe-P, the paper's Alg. 2 (the "posterior" split). For the chosen pair,
side A's share r is tried on the grid {0, 1/g, ..., 1} (g = `--granularity`, the authors'
default 20), each candidate merge is built (units by sensitivity, counts from r: r = 1 keeps
A whole, which drops B; r = 0 drops A), and the r whose model scores lowest is kept.

The authors' code (WangFei-2019/CoMe, methods/concat_merge_P.py): r over
`np.arange(0, 1 + 1/g, 1/g)`, i.e. i * (1/g) in float64 (the same floats here, so the unit
counts floor alike); a deep copy of the model merged per r; `get_loss`, the summed next-token
cross-entropy of the whole model on the calibration windows; `min()`, so the first (lowest) r
wins a tie. For some g (6, 9, 21, ...) their arange yields one extra r = 1 + 1/g (a share
above 1); the grid here stops at 1. Their candidates are scored as merged (they have no
refit); so are ours, and `--refit ls` then refits the chosen merge.

`--split-score nll` (default, theirs): the mean next-token NLL over every predicted token of
the calibration windows (their sum over windows of equal length ranks the same). Nothing of
the model changes while scoring: the candidate is written into a scratch copy of layer k,
run on the cached input of layer k, then the model's layers k+2.. run (each at its current
position, so its attention type's mask), then the final norm and LM head: L - k - 1 layer
passes per candidate instead of the authors' whole model. `--split-score error` (cheap):
the held-out output error of the candidate layer against the dense group's output on the
dense group's input (`refit_layer(..., solve=False)`, as `--pair-score merge-error`): one
layer pass per candidate. Every layer pass counts into `cache.forwards`.

`--split-score refit` (issue 41, "merge where it pays"): each candidate is scored by the
held-out error of its refit, AFTER the solve, exactly the refit the loop then applies to the
merged layer (`refit_layer(..., cfg.refit_input, solve=True)`: the same inputs, targets,
held-out windows and ridge grid; its `err_after`, the held-out error of the train-only solve
at the ridge the held-out windows pick). So r = 0 (drop A + refit) and r = 1 (drop B + refit)
compete with every merge + refit on one objective, and the joint split's own merge (what
`--split joint`, the default, would have built) is one more candidate: the search can only
match or beat, on that objective, both drops and the default merge. The record says which it
took ("took": "drop A", "drop B", "merge" or "joint") and the joint candidate's [r_a, score].
One layer pass and one ridge grid per candidate.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from ..errors import ComeError
from ..merging.layer_refit import refit_layer
from .lm_loss import nll_with_merge

if TYPE_CHECKING:
    from ..engine.cache import ActivationCache
    from ..models.adapters import LayerWeights
    from .pair_scoring import Choice

log = logging.getLogger("come")


def split_grid(granularity: int) -> list[float]:
    """{0, 1/g, ..., 1}, each as i * (1/g): the floats of the authors' np.arange."""
    step = 1.0 / granularity
    return [i * step for i in range(granularity + 1)]


def search_split(cache: ActivationCache, k: int, group: list[int], choose: Callable[[float | None], Choice],
                 build: Callable[[Choice], LayerWeights], cfg) -> tuple[Choice, dict]:
    """(the best candidate's Choice, the record {"score", "candidates": [[r_a, score], ...]},
    plus "joint" and "took" with the refit score) for merging current layers k, k + 1
    (standing for original `group`). `choose(r)` picks the units for share r (None: the joint
    split's); `build(choice)` makes the merged layer's weights."""
    scratch = copy.deepcopy(cache.adapter.decoder_layers(cache.model)[k])
    inputs = cache.inputs_at(k) if cfg.split_score == "nll" else None

    def score(choice: Choice) -> float:
        cache.adapter.write_layer(scratch, build(choice))
        if inputs is not None:
            return nll_with_merge(cache, k, scratch, inputs)
        if cfg.split_score == "refit":
            return refit_layer(cache, k, group, cfg.refit_input, layer=scratch).err_after
        return refit_layer(cache, k, group, "dense", layer=scratch, solve=False).err_before

    candidates, best = [], None

    def consider(value: float, choice: Choice, took: str) -> None:
        nonlocal best
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, choice, took)

    # with the nll score each candidate runs the rest of the model: minutes a merge on a CPU
    for r in tqdm(split_grid(cfg.granularity), desc=f"split search ({cfg.split_score})", leave=False, unit="split"):
        choice = choose(r)
        candidates.append([r, score(choice)])
        consider(candidates[-1][1], choice, _took(r))
    record = {"score": cfg.split_score, "candidates": candidates}
    if cfg.split_score == "refit":
        joint = choose(None)
        record["joint"] = [joint.r_a, score(joint)]
        consider(record["joint"][1], joint, "joint")
    if best is None:
        raise ComeError(f"--split search: every candidate merge of current layers {k}, {k + 1} scored non-finite; "
                        "try --dtype fp32")
    if cfg.split_score == "refit":
        record["took"] = best[2]
    log.info("split search (%s) at layers %d+%d: r_A=%.3f (%s), %s %.5f (r=0: %.5f, r=1: %.5f)", cfg.split_score, k,
             k + 1, best[1].r_a, best[2], cfg.split_score, best[0], candidates[0][1], candidates[-1][1])
    return best[1], record


def _took(r: float) -> str:
    """What a grid candidate is: r = 0 keeps none of A (drops it), r = 1 keeps A whole (drops B)."""
    return "drop A" if r == 0 else "drop B" if r == 1 else "merge"
