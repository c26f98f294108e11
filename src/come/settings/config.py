"""The options objects of `compress` and of evaluation: one per command, shared by the CLI
(generated from these fields, cli/commands.py) and the Python API, saved in the Plan.

The settings floor: this module imports neither torch nor the engine, so the engine can
name its settings' type and `come --help` builds without torch. What a setting means for a
method (its defaults, the options it reads, its own checks) is asked of the method object
the registry holds (come.registry: filled by come.methods, which the package imports);
whether this machine has the device is asked where a run starts (compression.resolve,
device.py)."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

from ..errors import ComeError
from .eval_inputs import check_inputs
from .options import (SEEDS, Options, all_fields, check_cache_dir, check_choices, check_context, check_device_name,
                      check_ranges, default_of, int_list, option)
from .registry import REGISTRY, get_method, method_names, method_options, option_groups
from .tasks import DEFAULT_TASKS, TASK_DATA_ENV, parse_tasks

Refit = Literal["ls", "none"]
RefitInput = Literal["dense", "compressed"]

# --pair-score values (declared with the progressive methods' options, methods/base.py) the engine branches on
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


@dataclass(init=False)
class CompressConfig(Options):
    """Settings of `come compress` (method.md: OFFICIAL defaults unless marked DECISION): the
    options every method shares, declared here, and each method's own (its `own_options`
    group, declared in its module: CoMe's split, ReplaceMe's select, ...), which the object
    takes as keywords and attributes like its own fields (`CompressConfig(split="bi").split`)
    and keeps in `method_settings`, only those set away from their defaults."""

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
    protect: list[int] = option(help="Comma-separated original layers never merged.", parse=int_list,
                                show=lambda v: ",".join(map(str, v)), default_factory=list)
    max_cache_gb: float = option(32.0, "Host memory for cached calibration activations (docs/memory.md).",
                                 bounds="> 0")
    cache_dir: str | None = option(None, "Keep the cached calibration activations in memory-mapped files in this "
                                         "folder instead of host memory: all of them, whatever --max-cache-gb says "
                                         "(the same result as ample memory; files removed as they are mapped).")
    refit: Refit | None = option(None, "ls: closed-form refit of each merged / kept layer (DECISION); none: the paper. "
                                       "Default: the method's own (ls for come, none for the peers).", choices=Refit.__args__)
    refit_holdout: float = option(0.1, "Calibration share that picks the ridge and vetoes a refit.",
                                  bounds="(0, 1)")
    refit_input: RefitInput = option("compressed", "The refit's inputs: the compressed model's states (corrects upstream "
                                                  "error) or the dense model's.",
                                     choices=RefitInput.__args__)
    refit_attn: bool = option(False, "With --refit ls: also re-solve each refit layer's attention output projection "
                                     "in closed form (the FFN output held), then its down projection; kept where the "
                                     "pair beats the down projection alone on held-out error (docs/methods.md). Not "
                                     "for families whose attention output is normalized before it adds (a log line).")
    max_memory_gb: float | None = option(None, "Refuse, before loading, a run whose predicted peak host memory "
                                               "(logged at start, docs/memory.md) exceeds this.", bounds="> 0")
    method_settings: dict = option(help="The methods' own options set away from their defaults.", cli=False,
                                   default_factory=dict)

    def __init__(self, **values: Any) -> None:
        own = dict(values.pop("method_settings", None) or {})
        shared = {f.name for f in dataclasses.fields(self)}
        methods = {f.name for f in all_fields(type(self))} - shared
        unknown = set(values) - methods - shared
        if unknown:
            raise TypeError(f"CompressConfig got an unexpected keyword argument {sorted(unknown)[0]!r}")
        self.method_settings = {**own, **{k: v for k, v in values.items() if k in methods}}
        for f in dataclasses.fields(self):
            if f.name != "method_settings":
                setattr(self, f.name, values[f.name] if f.name in values else default_of(f))
        self.__post_init__()

    @classmethod
    def groups(cls) -> list[type]:
        """Its own fields, then the registered methods' option groups (registry.option_groups)."""
        return [cls, *option_groups()]

    def __getattr__(self, name: str) -> Any:
        """A method's option: its value if set, else its default (only called for names that
        are not the object's own attributes)."""
        if name.startswith("__") or name == "method_settings":
            raise AttributeError(name)
        for f in all_fields(type(self)):
            if f.name == name:
                return self.__dict__.get("method_settings", {}).get(name, default_of(f))
        raise AttributeError(f"CompressConfig has no option {name!r}")

    def _set(self, f: dataclasses.Field, value: Any) -> None:
        """A method's option is kept only when it differs from its default: equal settings compare equal."""
        if f.name in {g.name for g in dataclasses.fields(self)}:
            setattr(self, f.name, value)
        elif value == default_of(f):
            self.method_settings.pop(f.name, None)
        else:
            self.method_settings[f.name] = value

    def is_set(self, name: str) -> bool:
        """Whether the option `name` is away from its default."""
        return name in self.method_settings or (name in self.__dataclass_fields__ and
                                                getattr(self, name) != default_of(self.__dataclass_fields__[name]))

    def resolved(self) -> "CompressConfig":
        """A checked copy with the method's defaults filled in (refit, pair score); `self`
        is left as it is. One line naming the problem and the fix on bad settings. The method
        is the registry's (its defaults and `check`); --device is checked as a name here and
        on this machine by compression.resolve, which every run starts from."""
        method = get_method(self.method)
        method.refuse_ignored(self)
        levels = self.levels()
        cfg = replace(self, refit=self.refit or method.default_refit,
                      sparsity=levels[0] if len(levels) == 1 else levels, **method.defaults(self))
        check_ranges(cfg)
        if levels != sorted(set(levels)):
            raise ComeError(f"--sparsity {','.join(map(str, levels))}: list the levels ascending, each once "
                            "(e.g. 0.1,0.2,0.3)")
        check_choices(cfg)
        check_device_name(cfg.device)
        if cfg.cache_dir is not None:
            check_cache_dir(cfg.cache_dir)
        method.check(cfg)
        if not method.needs_dense(cfg) and any(cfg.is_set(f) for f in ("refit_input", "refit_holdout", "refit_attn")):
            raise ComeError("--refit-input, --refit-holdout and --refit-attn shape the refit; add --refit ls, or drop "
                            "them")
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
        method = get_method(self.method)
        method.check_model(config, self)
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
        """Every option by name, the methods' own at their values or defaults (the Plan's settings)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in all_fields(self) if f.name != "method_settings"}


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


