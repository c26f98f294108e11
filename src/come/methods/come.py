"""CoMe (Wang et al., NeurIPS 2025, arXiv 2510.15304): one stock-shaped layer built from
two by CONCATENATING their most sensitive KV groups / FFN channels (norms folded first,
exact), followed by our closed-form refit of the merged layer's down projection.

What only CoMe measures lives here, in its steps (`ComeSteps`), which the progressive loop
calls: taylor unit gradients once per step (`--sensitivity taylor`), the pair scores that
build each candidate merge (`--pair-score error / merge-error / nll`, pair_scoring.py), and
the units each merge keeps: by the split rule (`--split bi / joint`, pair_scoring.choose_units),
the error pair score's pick, or the paper's posterior search (`--split search`, split_search.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

from ..errors import ComeError
from ..settings.options import option
from .base import MergeMethod, MergeOptions, MergeSteps, register

Split = Literal["bi", "joint", "search", "refit"]
SplitScore = Literal["nll", "error", "refit"]
Norm = Literal["fold", "average"]
HeadScore = Literal["channel", "exact"]
Sensitivity = Literal["l1", "taylor", "magnitude"]


@dataclass
class ComeOptions(MergeOptions):
    """How CoMe chooses and shares the units a merge keeps (pair_scoring.py, split_search.py)
    and folds the norms (merge.py)."""

    cli_panel: ClassVar[str] = "CoMe"

    split: Split = option("joint", "joint (DECISION, BENCHMARKS.md): top-N of both layers' units ranked together by "
                                   "sensitivity; bi (OFFICIAL): side A's share r = normalize(normalize(BI)^p); search "
                                   "(CoMe-P, the paper's Alg. 2): try r in {0, 1/g, ..., 1} and keep the merge that "
                                   "scores best (--granularity, --split-score); refit: joint's KV groups, and the d_ff "
                                   "channels of both layers that the refit's least squares needs most (backward "
                                   "elimination on their Gram; needs --refit ls).", choices=Split.__args__)
    granularity: int = option(20, "Grid steps g of --split search: r_A in {0, 1/g, ..., 1} (the authors' 20).",
                              bounds=">= 1")
    split_score: SplitScore = option("nll", "What --split search minimizes. nll (the authors'): next-token NLL of "
                                            "the whole merged model on the calibration windows; error: held-out "
                                            "output error of the merged layer against the dense group (one layer "
                                            "per candidate); refit: the same error AFTER the candidate's refit "
                                            "(needs --refit ls), the joint split's merge a candidate too, so a drop "
                                            "+ refit and each merge + refit compete.", choices=SplitScore.__args__)
    skew: float = option(1.0, "Exponent p of the bi split rule (needs --split bi); 0: equal shares, large: the "
                              "side of higher BI keeps all.", bounds=">= 0")
    min_max: float = option(0.0, "bi split: raise the larger share to at least m^(1/(k-1)), k = original layers in "
                                 "the pair (needs --split bi).", bounds="[0, 1)")
    norm: Norm = option("fold", "fold: norm weights folded into q/k/v and gate/up (exact, DECISION); average: "
                                   "the mean of the two norms (OFFICIAL).", choices=Norm.__args__)
    head_score: HeadScore = option("channel", "channel: a head's score is the sum of its channels' scores; exact: "
                                                      "E_t of the head's own output L1 norm.", choices=HeadScore.__args__)
    sensitivity: Sensitivity = option(
        "l1", "Unit score that picks the units a merge keeps (KV groups, FFN channels, MoE experts). l1 (OFFICIAL, the "
              "paper's): E_t|a_j| * ||W_out[:, j]||_1; magnitude: weight-only L1 path norm of the unit (no "
              "activations); taylor: |first-order Taylor estimate of the calibration loss change| when the unit "
              "goes, from one extra backward pass over the whole model per merge (about 3 forward passes). "
              "magnitude and taylor: not with --head-score exact.",
        choices=Sensitivity.__args__)


class ComeSteps(MergeSteps):
    """A CoMe run's steps: its pair scorer (None for the cache's angle scores) and what it
    picked for each pair at the last step (the units its candidate merge kept)."""

    def __init__(self, method, run, cfg):
        from ..scoring.pair_scoring import built_scores

        super().__init__(method, run, cfg)
        self.shape = run.adapter.attn_shape(run.model.config)
        self.scorer = built_scores(run.cache, self.shape, cfg)
        self.picks = None

    def pair_scores(self, groups, eligible):
        cache = self.run.cache
        if self.cfg.sensitivity == "taylor":  # every layer's, after every merge: one backward per step
            cache.unit_gradients()
        if self.scorer is None:
            return cache.pair_scores()
        scores, self.picks = self.scorer.scores(groups, eligible)
        return scores

    def merge_pair(self, k, pair):
        from ..scoring.pair_scoring import choose_units
        from ..scoring.split_search import search_split

        cfg, cache = self.cfg, self.run.cache
        stats_a, stats_b = cache.stats[k], cache.stats[k + 1]
        group = pair.group_a + pair.group_b

        def units(r_a: float | None = None):
            return choose_units(pair.a, pair.b, stats_a, stats_b, pair.shape, cfg, len(group), r_a)

        if cfg.split == "refit":
            from ..scoring.channel_selection import refit_channels

            choice = refit_channels(cache, k, group, units(), pair.a, pair.b,
                                    lambda c: self.method.merge(replace(pair, choice=c)), cfg)
            return self.method.merge(replace(pair, choice=choice)), choice, {}
        if cfg.split == "search":
            choice, searched = search_split(cache, k, group, units,
                                            lambda c: self.method.merge(replace(pair, choice=c)), cfg)
            return self.method.merge(replace(pair, choice=choice)), choice, {"split_search": searched}
        choice = self.picks[k] if self.picks else units()
        return self.method.merge(replace(pair, choice=choice)), choice, {}

    def merge_window(self, k, window):
        from ..scoring.pair_scoring import choose_window_units

        stats = self.run.cache.stats[k:k + len(window.layers)]
        choice = choose_window_units(window.layers, stats, window.shape, self.cfg, sum(len(g) for g in window.groups))
        return self.method.merge_window(replace(window, choice=choice)), choice


@register
class Come(MergeMethod):
    name = "come"
    summary = "concatenation merge of the most sensitive units (the paper), + closed-form refit"
    order = 0
    default_refit = "ls"  # DECISION, ours (BENCHMARKS.md); --refit none = the paper
    default_pair_score = "bi-all-tokens"  # DECISION, chosen on held-out documents (BENCHMARKS.md)
    default_reprofile = "window"  # DECISION, measured against full on three splits (BENCHMARKS.md)
    operator = "concat"
    keeps_units = True
    merges_windows = True
    own_options = ComeOptions

    def defaults(self, cfg):
        """`--split search` re-profiles the whole model (the window was not measured with it)."""
        found = super().defaults(cfg)
        if cfg.split == "search" and cfg.reprofile is None:
            found["reprofile"] = "full"
        return found

    def check(self, cfg):
        """The split rule's own options with their rule only; --split-score refit and --split refit
        read the refit: there must be one."""
        if cfg.split == "search" and cfg.merge_item > 2:
            raise ComeError(f"--merge-item {cfg.merge_item} with --split search: the search tries shares of two "
                            "layers; use --split joint or bi")
        super().check(cfg)
        if cfg.sensitivity != "l1" and cfg.head_score == "exact":
            raise ComeError(f"--head-score exact measures the l1 head score; drop it with --sensitivity "
                            f"{cfg.sensitivity} (heads are scored as units by that metric)")
        if cfg.split == "joint" and (cfg.is_set("skew") or cfg.is_set("min_max")):
            raise ComeError("--skew and --min-max shape the bi split rule; add --split bi (the default, joint, "
                            "ranks both layers' units together)")
        if cfg.split != "search" and (cfg.is_set("granularity") or cfg.is_set("split_score")):
            raise ComeError("--granularity and --split-score shape the split search; add --split search")
        if cfg.split == "search" and (cfg.is_set("skew") or cfg.is_set("min_max")):
            raise ComeError("--skew and --min-max shape the bi split rule; --split search tries every r on its grid")
        if cfg.split_score == "refit" and cfg.refit != "ls":
            raise ComeError("--split-score refit scores each candidate after its refit; drop --refit none, or use "
                            "--split-score nll / error")
        if cfg.split == "refit" and cfg.refit != "ls":
            raise ComeError("--split refit keeps the FFN channels the refit needs most; drop --refit none, or use "
                            "--split joint")
        if cfg.split == "refit" and cfg.merge_item > 2:
            raise ComeError(f"--split refit chooses the channels of a pair; drop --merge-item {cfg.merge_item}, "
                            "or use --split joint")

    def check_model(self, config, cfg):
        if cfg.split == "refit" and (getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0)):
            raise ComeError("--split refit picks FFN channels; an MoE model's units are experts: use --split joint")

    def needs_dense(self, cfg):
        """Also for `--split search --split-score error`: it scores each candidate against the dense group."""
        return super().needs_dense(cfg) or (cfg.split == "search" and cfg.split_score == "error")

    def steps(self, run, cfg):
        return ComeSteps(self, run, cfg)

    def merge(self, pair):
        from ..merging.merge import concat_merge

        c = pair.choice
        return concat_merge(pair.a, pair.b, pair.shape, c.kv_a, c.kv_b, c.ffn_a, c.ffn_b, c.r_a, pair.cfg.norm)

    def merge_window(self, window):
        from ..merging.merge import concat_merge_many

        c = window.choice
        return concat_merge_many(window.layers, window.shape, c.kv, c.ffn, c.shares, window.cfg.norm)
