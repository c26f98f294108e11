"""The options objects of `compress` and of evaluation: one per command, shared by the CLI
(generated from these fields, cli/commands.py) and the Python API, saved in the Plan.

The settings floor: this module imports neither torch nor the engine, so the engine can
name its settings' type and `come --help` builds without torch. What a setting means for a
method (its defaults, the options it reads, its own checks) is asked of the method object
the registry holds (come.registry: filled by come.methods, which the package imports);
whether this machine has the device is asked where a run starts (compression.resolve,
device.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import ClassVar, Literal

from ..errors import ComeError
from .eval_inputs import check_inputs
from .options import SEEDS, Options, check_choices, check_context, check_device_name, check_ranges, int_list, option
from .registry import REGISTRY, get_method, method_names, method_options
from .tasks import DEFAULT_TASKS, TASK_DATA_ENV, parse_tasks

PairScore = Literal["angular", "bi-all-tokens", "angular-all-tokens", "error", "merge-error", "nll"]
Split = Literal["bi", "joint", "search", "refit"]
SplitScore = Literal["nll", "error", "refit"]
Refit = Literal["ls", "none"]
RefitInput = Literal["dense", "compressed"]
Select = Literal["angle", "bi"]
Reprofile = Literal["full", "window"]
Norm = Literal["fold", "average"]
HeadScore = Literal["channel", "exact"]
Sensitivity = Literal["l1", "taylor", "magnitude"]

ERROR_SCORES = ("error", "merge-error")  # pair scores measured against the dense group (need its states)
BUILT_SCORES = (*ERROR_SCORES, "nll")  # pair scores that build each candidate (concatenation) merge

# The authors' code's choices where our defaults differ (`come compress --official`).
OFFICIAL = {"norm": "average", "refit": "none", "split": "bi", "pair_score": "angular", "reprofile": "full"}


def official_settings(split: str, method: str = "come") -> dict:
    """The authors' choices for a run with this split: their CoMe-P (`--split search`, their
    concat_merge_P) scores pairs by the angle over ALL tokens, their CoMe by the last token's.
    Only those `method` reads: a drop method has no pair score, split or norm to set."""
    preset = {**OFFICIAL, "pair_score": "angular-all-tokens"} if split == "search" else OFFICIAL
    return {k: v for k, v in preset.items() if k not in method_options() or k in get_method(method).options}


def sparsity_levels(text: str) -> float | list[float]:
    """'0.3' -> 0.3; '0.1,0.2,0.3' -> [0.1, 0.2, 0.3] (checked by `CompressConfig.resolved()`)."""
    try:
        levels = [float(x) for x in text.split(",")]
    except ValueError:
        raise ComeError(f"--sparsity takes a number or an ascending comma-separated list such as 0.1,0.2,0.3, "
                        f"got {text!r}") from None
    return levels[0] if len(levels) == 1 else levels


def _method_help() -> str:
    return "; ".join(f"{n}: {REGISTRY[n].summary}" for n in method_names())


def _check_merge_item(cfg: "CompressConfig", levels: list[float]) -> None:
    """What `--merge-item` above 2 cannot be combined with (one line naming it)."""
    if cfg.split == "search":
        raise ComeError(f"--merge-item {cfg.merge_item} with --split search: the search tries shares of two layers; "
                        "use --split joint or bi")
    if cfg.pair_score in BUILT_SCORES:
        raise ComeError(f"--merge-item {cfg.merge_item} with --pair-score {cfg.pair_score}: that score builds "
                        "pair merges; use bi-all-tokens, angular or angular-all-tokens")
    if getattr(cfg, "reprofile", "full") == "window":
        raise ComeError(f"--merge-item {cfg.merge_item} with --reprofile window: the window re-profiling keeps pair "
                        "scores; use --reprofile full")
    if len(levels) > 1:
        raise ComeError(f"--merge-item {cfg.merge_item} takes one --sparsity: each level's merges would differ from "
                        "a run at that level alone; run the levels one by one")


@dataclass
class CompressConfig(Options):
    """Settings of `come compress` (method.md: OFFICIAL defaults unless marked DECISION)."""

    cli_panel: ClassVar[str] = "Compression"

    sparsity: float | list[float] = option(
        0.3, "Fraction of ALL params (embeddings and head included) to remove, in (0, 0.9]; every merge removes one "
             "layer, so the achieved figure is the first one >= this, reported exactly. An ascending list "
             "(0.1,0.2,0.3): one run passes every level; `come compress` writes OUT/sparsity-0.10, ..., `come compare` "
             "reports a row per method and level",
        parse=sparsity_levels, bounds="(0, 0.9]")
    method: str = option("come", lambda: "The method (peers on the same plumbing): " + _method_help() + ".",
                         choices=method_names)
    calib: str = option("wikitext2", "Calibration text: wikitext2, c4 (via `datasets`), or a local .txt / .jsonl "
                                     "({\"text\": ...} per line) file.")
    nsamples: int = option(128, "Calibration windows: nsamples non-overlapping random windows of seqlen tokens.",
                           bounds=">= 1")
    seqlen: int = option(2048, "Tokens per calibration window.", bounds=">= 2")
    seed: int = option(0, "Seed of the calibration windows.", bounds=SEEDS)
    batch_size: int = option(4, "Calibration windows per forward.", bounds=">= 1")
    device: str = option("auto", "cuda | cpu | auto (layers visit it one at a time).")
    pair_score: PairScore | None = option(
        None, "Which adjacent pair merges next. bi-all-tokens (DECISION, come's default, BENCHMARKS.md): block "
              "influence 1 - cos between the state entering layer l and the one leaving l+1, over ALL calibration tokens; "
              "angular (OFFICIAL; laco's and average's default): arccos(cos)/pi of those states on the last token of each sample; "
              "angular-all-tokens (OFFICIAL with --split search, the authors' CoMe-P): arccos(cos)/pi over ALL tokens; error: "
              "held-out error of the actual merged + refit layer against the dense group; merge-error: the same "
              "before the refit; nll: calibration next-token NLL of the whole model with the pair's merge in place "
              "(the posterior; about L^2/2 layer passes per merge). Default: the method's own.", choices=PairScore.__args__)
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
    no_repeat: bool = option(False, "Never merge an already merged layer again.")
    merge_item: int = option(
        2, "Adjacent layers merged into one per step (the authors' merge_item): each merge removes m - 1 layers, the "
           "last only as many as the target still needs, so the layer count is the same for every m. m > 2: the "
           "window is scored like a pair (the state entering its first layer against the one leaving its last); "
           "come keeps the top units of all m layers ranked together (--split joint) or side i's share "
           "normalize(normalize(BI)^p)_i (--split bi); laco combines the window's original layers, average takes "
           "their mean. Not with --split search, --pair-score error/merge-error, --reprofile window or a --sparsity "
           "list.", bounds=">= 2")
    protect: list[int] = option(help="Comma-separated original layers never merged.", parse=int_list,
                                show=lambda v: ",".join(map(str, v)), default_factory=list)
    max_cache_gb: float = option(32.0, "Host memory for cached calibration activations (docs/memory.md).",
                                 bounds="> 0")
    refit: Refit | None = option(None, "ls: closed-form refit of each merged / kept layer (DECISION); none: the paper. "
                                       "Default: the method's own (ls for come, none for the peers).", choices=Refit.__args__)
    refit_holdout: float = option(0.1, "Calibration share that picks the ridge and vetoes a refit.",
                                  bounds="(0, 1)")
    refit_input: RefitInput = option("compressed", "The refit's inputs: the compressed model's states (corrects upstream "
                                                  "error) or the dense model's.",
                                     choices=RefitInput.__args__)
    candidates: str = option(
        "come,shortgpt:refit=ls,magnitude:refit=ls",
        "--method auto: the recipes tried (`come compare --methods` specs); the one with the lowest KL to the dense "
        "model on held-out calibration windows is kept.")
    select: Select = option("angle", "replaceme: angle (published block) | bi (ShortGPT's layers).",
                            choices=Select.__args__)
    reprofile: Reprofile | None = option(
        None, "What re-runs after a merge at layer l. full: layers l..end (fresh statistics and pair scores "
                "everywhere); window: layers l..l+W (--reprofile-window) only, the later layers keep the statistics "
                "and pair scores they had (stale) unless the hidden state leaving the window moved, relative to the "
                "one they were computed from, by --reprofile-drift or more: then they re-run too. The refit always "
                "reads the current model's true states. Default: window for come (DECISION: within 2% of full's "
                "perplexity on three splits and within noise on the tasks, 1.5-2x less re-profiling; BENCHMARKS.md: "
                "Windowed re-profiling), full for the other methods, --split search, --merge-item > 2, the pair scores "
                "that build merges, and --official (the authors re-run the whole model).",
        choices=Reprofile.__args__)
    reprofile_window: int = option(4, "--reprofile window: layers after the merged one that re-run.", bounds=">= 1")
    reprofile_drift: float = option(0.2, "--reprofile window: relative change of the state leaving the window "
                                         "(Frobenius norm, all calibration tokens) that re-runs every later layer; "
                                         "0 re-runs them always (= full).", bounds=">= 0")
    max_memory_gb: float | None = option(None, "Refuse, before loading, a run whose predicted peak host memory "
                                               "(logged at start, docs/memory.md) exceeds this.", bounds="> 0")

    def resolved(self) -> "CompressConfig":
        """A checked copy with the method's defaults filled in (refit, pair score); `self`
        is left as it is. One line naming the problem and the fix on bad settings. The method
        is the registry's (its defaults and `check`); --device is checked as a name here and
        on this machine by compression.resolve, which every run starts from."""
        method = get_method(self.method)
        method.refuse_ignored(self)
        levels = self.levels()
        reads = method.options  # a pair score or re-profiling the method never reads is not recorded
        pair_score = (self.pair_score or method.default_pair_score) if "pair_score" in reads else None
        # the window is the default only where it was measured against full (BENCHMARKS.md)
        window_fits = self.merge_item == 2 and self.split != "search" and pair_score not in BUILT_SCORES
        reprofile = self.reprofile or (method.default_reprofile if window_fits else "full")
        cfg = replace(self, refit=self.refit or method.default_refit, pair_score=pair_score,
                      reprofile=reprofile if "reprofile" in reads else None,
                      sparsity=levels[0] if len(levels) == 1 else levels)
        check_ranges(cfg)
        if levels != sorted(set(levels)):
            raise ComeError(f"--sparsity {','.join(map(str, levels))}: list the levels ascending, each once "
                            "(e.g. 0.1,0.2,0.3)")
        check_choices(cfg)
        check_device_name(cfg.device)
        if cfg.merge_item > 2:
            _check_merge_item(cfg, levels)
        method.check(cfg)
        if cfg.sensitivity != "l1" and cfg.head_score == "exact":
            raise ComeError(f"--head-score exact measures the l1 head score; drop it with --sensitivity "
                            f"{cfg.sensitivity} (heads are scored as units by that metric)")
        if cfg.split == "joint" and (cfg.skew != 1.0 or cfg.min_max != 0.0):
            raise ComeError("--skew and --min-max shape the bi split rule; add --split bi (the default, joint, "
                            "ranks both layers' units together)")
        search_only = ("granularity", "split_score")
        if cfg.split != "search" and any(getattr(cfg, f) != self.__dataclass_fields__[f].default for f in search_only):
            raise ComeError("--granularity and --split-score shape the split search; add --split search")
        if cfg.split == "search" and (cfg.skew != 1.0 or cfg.min_max != 0.0):
            raise ComeError("--skew and --min-max shape the bi split rule; --split search tries every r on its grid")
        refit_only = ("refit_input", "refit_holdout")
        if not method.needs_dense(cfg) and any(getattr(cfg, f) != self.__dataclass_fields__[f].default
                                               for f in refit_only):
            raise ComeError("--refit-input and --refit-holdout shape the refit; add --refit ls, or drop them")
        window_only = ("reprofile_window", "reprofile_drift")
        if cfg.reprofile != "window" and any(getattr(cfg, f) != self.__dataclass_fields__[f].default
                                             for f in window_only):
            raise ComeError("--reprofile-window and --reprofile-drift shape the windowed re-profiling; add "
                            "--reprofile window")
        return cfg

    def levels(self) -> list[float]:
        """The target sparsities: one, or the ascending levels of a multi-level run."""
        return list(self.sparsity) if isinstance(self.sparsity, (list, tuple)) else [self.sparsity]

    def at(self, sparsity: float) -> "CompressConfig":
        """These settings with one target: what a run at that level alone would be given."""
        return replace(self, sparsity=sparsity)

    def check_model(self, config) -> None:
        """Settings that depend on the model, checked on its config before weights load."""
        n = config.num_hidden_layers
        if n < 2:
            raise ComeError(f"the model has {n} decoder layer{'s' if n != 1 else ''}: too few to merge or drop (each "
                            "step leaves at least one); give a model with 2 or more layers")
        outside = [i for i in self.protect if not 0 <= i < n]
        if outside:
            raise ComeError(f"--protect {','.join(map(str, outside))}: the model has layers 0..{n - 1}")
        check_context(config, self.seqlen)
        if self.split == "refit" and (getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0)):
            raise ComeError("--split refit picks FFN channels; an MoE model's units are experts: use --split joint")
        method = get_method(self.method)
        if method.loop == "progressive" and method.removable(n, self) == 0:
            raise ComeError("every adjacent pair of layers touches a --protect layer, so nothing can merge; "
                            "protect fewer layers")

    def check_reachable(self, n_layers: int, n_remove: int) -> None:
        """The largest target's `n_remove` layers (budget.merge_budget) can go with the layers
        `--protect` keeps: one line before weights load, not an error after merging started."""
        method = get_method(self.method)
        can = method.removable(n_layers, self)
        if n_remove > can:
            limits, eases = [], ["lower --sparsity"]
            if self.protect:
                limits.append(f"--protect {','.join(map(str, self.protect))}")
                eases.append("protect fewer layers")
            if self.no_repeat and "no_repeat" in method.options:
                limits.append("--no-repeat")
                eases.append("drop --no-repeat")
            raise ComeError(f"--sparsity {self.levels()[-1]} removes {n_remove} of the model's {n_layers} layers, but "
                            f"--method {self.method}{' with ' + ' '.join(limits) if limits else ''} can remove at "
                            f"most {can}; {' or '.join(eases)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalConfig(Options):
    """Settings of an evaluation (`come eval`, each row of `come compare`, the report)."""

    cli_panel: ClassVar[str] = "Evaluation"

    tasks: str = option(",".join(DEFAULT_TASKS), "Comma-separated lm-eval tasks, or none.")
    task_data: str | None = option(None, "Offline task data: DIR/<dataset>/<config|none>/<split>/ "
                                         "(datasets.save_to_disk); nothing then reaches the network.",
                                   envvar=TASK_DATA_ENV)
    limit: int | None = option(None, "Score only the first N documents of each task.", bounds=">= 1")
    skip: int = option(0, "Start at document N of each task (choose settings on other documents than you report).",
                       bounds=">= 0")
    batch_size: int = option(8, "lm-eval requests per forward.", bounds=">= 1")
    ppl_data: str = option("auto", "Perplexity text: wikitext2 | ptb | c4 (the papers' test texts) | boolq-passages | "
                                   "none | a local .txt/.jsonl; auto: wikitext2, or boolq-passages (offline) with "
                                   "--task-data.")
    seqlen: int = option(2048, "Tokens per perplexity window.", bounds=">= 2")
    ppl_windows: int | None = option(None, "Score only the first N perplexity windows (default all).", bounds=">= 1")

    def task_list(self) -> list[str]:
        return parse_tasks(self.tasks)

    def evaluate_kwargs(self) -> dict:
        """The keyword arguments of `evaluate()` these settings stand for."""
        ppl = self.ppl_data if self.ppl_data != "auto" else "boolq-passages" if self.task_data else "wikitext2"
        return {"tasks": self.task_list(), "task_data": self.task_data, "limit": self.limit,
                "ppl_data": None if ppl == "none" else ppl, "seqlen": self.seqlen,
                "batch_size": self.batch_size, "ppl_windows": self.ppl_windows, "skip": self.skip}

    def check_model(self, config) -> None:
        """The perplexity windows fit the model's context (on its config, before weights load)."""
        if self.evaluate_kwargs()["ppl_data"]:
            check_context(config, self.seqlen)

    def check(self) -> None:
        """Every evaluation input checked before any model loads (one line on a problem)."""
        check_ranges(self)
        kw = self.evaluate_kwargs()
        check_inputs(kw["tasks"], self.task_data, kw["ppl_data"], self.limit, self.seqlen, self.batch_size,
                     self.ppl_windows, self.skip)


@dataclass
class LoadOptions(Options):
    """How a model is loaded (not saved in the Plan: the output is stock either way)."""

    cli_panel: ClassVar[str] = "Loading"

    dtype: str = option("auto", "bf16 | fp16 | fp32 | auto (as stored).", choices=("bf16", "fp16", "fp32", "auto"))


