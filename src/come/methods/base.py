"""What a compression method declares, and the registry that knows them all.

A method is one module in this package that defines a `MergeMethod` (progressive: one
layer built from two, repeated to the target) or a `DropMethod` (one-shot: choose layers
to remove) subclass and decorates it with `@register`. Everything else (the CLI's
choices and help, the defaults a config resolves to, `come compare`'s list) reads the
registry (come.registry), so adding a method is one new file.

Who runs a method: the engine (come.compression.run_method, by the method's `loop`) puts a
`MergeMethod` through the progressive loop (pipeline.py) and a `DropMethod` through the
one-shot loop (dropping.py); the loop calls the method back (`MergeMethod.steps`,
`DropMethod.select`). So a method never starts a loop, this module imports none, and one
method stays one file: what only it measures (CoMe's split search, MKA's similarities) sits
in its own module, behind the hooks below. A method of neither kind runs itself (`compress`,
e.g. auto, which runs other methods).

A method module imports only the settings floor (errors, options, config, registry) at its
top: the engine it uses (the merge math, the scores, torch) is imported in the functions
that use it. So the registry (names, summaries, defaults, options,
checks) loads without torch: `CompressConfig.resolved()` and the CLI's help read it in a
fraction of a second (tests/test_import_graph.py checks that no torch loads).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..errors import ComeError
from ..settings.config import BUILT_SCORES, ERROR_SCORES, CompressConfig
from ..settings.options import all_fields, default_of, field_of, flag_of, option
from ..settings.registry import REGISTRY, method_options, register

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ..engine.dense_profile import DenseProfile
    from ..engine.preparation import Levels, Run
    from ..models.adapters import LayerWeights
    from ..scoring.pair_scoring import Choice, PairToMerge, WindowChoice, WindowToMerge
    from ..settings.plan import Plan

__all__ = ["REGISTRY", "DropMethod", "MergeMethod", "MergeOptions", "MergeSteps", "Method", "method_options",
           "register", "unprotected_runs"]

PairScore = Literal["angular", "bi-all-tokens", "angular-all-tokens", "error", "merge-error", "nll"]
Reprofile = Literal["full", "window"]


@dataclasses.dataclass
class MergeOptions:
    """The progressive loop's options, read by every `MergeMethod` (engine/pipeline.py,
    scoring/pair_scoring.py, engine/cache.py): a method that merges extends this group."""

    cli_panel: ClassVar[str] = "Progressive merging"

    pair_score: PairScore | None = option(
        None, "Which adjacent pair merges next. bi-all-tokens (DECISION, come's default, BENCHMARKS.md): block "
              "influence 1 - cos between the state entering layer l and the one leaving l+1, over ALL calibration tokens; "
              "angular (OFFICIAL; laco's and average's default): arccos(cos)/pi of those states on the last token of each sample; "
              "angular-all-tokens (OFFICIAL with --split search, the authors' CoMe-P): arccos(cos)/pi over ALL tokens; error: "
              "held-out error of the actual merged + refit layer against the dense group; merge-error: the same "
              "before the refit; nll: calibration next-token NLL of the whole model with the pair's merge in place "
              "(the posterior; about L^2/2 layer passes per merge). Default: the method's own.", choices=PairScore.__args__)
    no_repeat: bool = option(False, "Never merge an already merged layer again.")
    merge_item: int = option(
        2, "Adjacent layers merged into one per step (the authors' merge_item): each merge removes m - 1 layers, the "
           "last only as many as the target still needs, so the layer count is the same for every m. m > 2: the "
           "window is scored like a pair (the state entering its first layer against the one leaving its last); "
           "come keeps the top units of all m layers ranked together (--split joint) or side i's share "
           "normalize(normalize(BI)^p)_i (--split bi); laco combines the window's original layers, average takes "
           "their mean. Not with --split search, --pair-score error/merge-error, --reprofile window or a --sparsity "
           "list.", bounds=">= 2")
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


def unprotected_runs(n_layers: int, protect) -> list[int]:
    """The lengths of the maximal runs of adjacent layers outside `protect`."""
    protect = set(protect)
    return [len(list(g)) for free, g in itertools.groupby(range(n_layers), lambda i: i not in protect) if free]


class Method:
    """A compression method on come's plumbing (same calibration, budget, Plan, output)."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for the CLI help and the docs
    order: ClassVar[int] = 100  # place in listings
    default_refit: ClassVar[str] = "none"  # what --refit resolves to when not given
    default_pair_score: ClassVar[str] = "angular"  # what --pair-score resolves to when not given
    default_reprofile: ClassVar[str] = "full"  # what --reprofile resolves to when not given (and it fits)
    compared_by_default: ClassVar[bool] = True  # a row of `come compare` when --methods is not given
    # which loop runs it (come.compression.run_method): "progressive", merging adjacent layers
    # (MergeMethod); "one-shot", dropping layers (DropMethod); None: it runs itself (`compress`)
    loop: ClassVar[str | None] = None
    # Its own options: a dataclass of `option()` fields (MergeOptions, CoMe's ComeOptions), which
    # `come compress` shows as a help panel, `come compare` specs and the README reference take,
    # and CompressConfig carries (`cfg.split`); this method's `check` validates their combinations.
    own_options: ClassVar[type | None] = None
    # The shared options some methods ignore that this one reads (ReplaceMe fits its own map: no --refit)
    shared_options: ClassVar[frozenset[str]] = frozenset({"refit"})
    ignored_hint: ClassVar[str] = ""  # appended to the refusal of an option this method ignores

    @property
    def options(self) -> frozenset[str]:
        """The method-specific options this method reads. One that another method reads and this one
        does not is ignored by this one: a run refuses it when set (`ignored`), a preset or `come
        compare`'s shared option leaves it at its default here."""
        own = self.own_options
        return self.shared_options | {f.name for f in dataclasses.fields(own)} if own else self.shared_options

    def defaults(self, cfg: CompressConfig) -> dict[str, Any]:
        """The options this method fills in when not given (`CompressConfig.resolved`)."""
        return {}

    def check(self, cfg: CompressConfig) -> None:
        """Refuse settings this method cannot honour (one line, before any work)."""

    def check_model(self, config, cfg: CompressConfig) -> None:
        """Refuse settings this method cannot honour on this model (its HF config, before weights load)."""

    def ignored(self, cfg: CompressConfig) -> list[str]:
        """The method-specific options `cfg` sets (away from their defaults) that this method never reads."""
        return [f.name for f in all_fields(cfg) if f.name in method_options() and f.name not in self.options
                and cfg.is_set(f.name)]

    def refuse_ignored(self, cfg: CompressConfig) -> None:
        """One line naming the first option `cfg` sets that this method would silently ignore."""
        for name in self.ignored(cfg):
            flag = flag_of(field_of(type(cfg), name))
            readers = sorted(n for n, m in REGISTRY.items() if name in m.options)
            if len(readers) <= 4:  # else the list is longer than the point
                raise ComeError(f"{flag} is read by --method {' / '.join(readers)} only; --method {self.name} "
                                f"ignores it: drop {flag}{self.ignored_hint}")
            raise ComeError(f"--method {self.name} ignores {flag}: drop {flag}{self.ignored_hint}")

    def own(self, cfg: CompressConfig) -> CompressConfig:
        """`cfg` with the options this method ignores put back at their defaults (a preset's or a
        shared setting that concerns other methods)."""
        return dataclasses.replace(cfg, **{name: default_of(field_of(type(cfg), name)) for name in self.ignored(cfg)})

    def needs_dense(self, cfg: CompressConfig) -> bool:
        """Whether the run caches the DENSE model's states at every boundary (refit targets)."""
        return cfg.refit == "ls"

    def removable(self, n_layers: int, cfg: CompressConfig) -> int:
        """How many of `n_layers` layers this method can remove under `cfg` (`--protect`): checked
        against the target before weights load. A drop method: any unprotected layer."""
        return n_layers - len(set(cfg.protect))

    def compress(self, model: "nn.Module", tokenizer, cfg: CompressConfig, calib: "Tensor | None", model_name: str,
                 levels: "Levels | None" = None) -> tuple["nn.Module", "Plan"]:
        """Compress in place to `cfg.sparsity`: only a method that is neither a `MergeMethod`
        nor a `DropMethod` (those run in their loop, come.compression.run_method) implements it;
        `levels`: the smaller targets to hand over on the way (compression.compress makes it)."""
        raise NotImplementedError


class MergeSteps:
    """One run's merges, as the progressive loop (pipeline.py) asks for them: the pair scores
    of each step, then the merged layer of the pair it picks. `MergeMethod.steps` makes a fresh
    one per run, so what a run measures (MKA's similarities) or remembers (CoMe's scored
    pairs) stays with the run, never on the registry's method object. This default: the angle
    scores the cache computed while profiling, and the method's operator on the layers as
    given (no units chosen)."""

    def __init__(self, method: "MergeMethod", run: "Run", cfg: CompressConfig):
        self.method, self.run, self.cfg = method, run, cfg

    def pair_scores(self, groups: list[list[int]], eligible: list[bool]) -> list[float]:
        """One score per window of current layers the cache scored (lowest merges first), the
        re-profiled cache at hand: what else a step measures is measured here."""
        return self.run.cache.pair_scores()

    def merge_pair(self, k: int, pair: "PairToMerge") -> tuple["LayerWeights", "Choice", dict]:
        """The merged layer of current layers k, k + 1, the units it keeps with side A's share
        (`pair.choice` as the loop made it: none, 0.5), and any further fields of its Plan record."""
        return self.method.merge(pair), pair.choice, {}

    def merge_window(self, k: int, window: "WindowToMerge") -> tuple["LayerWeights", "WindowChoice"]:
        """`merge_pair` for current layers k .. k + m - 1 (`--merge-item m`)."""
        return self.method.merge_window(window), window.choice


class MergeMethod(Method):
    """Progressive: merge the least important adjacent pair into one stock-shaped layer,
    re-profile, repeat (pipeline.py)."""

    operator: ClassVar[str]  # recorded in the Plan per merge
    loop = "progressive"
    # True: its merges keep units chosen by sensitivity (concatenation), so the pair scores that
    # build each candidate merge (BUILT_SCORES) apply; its steps choose the units
    keeps_units: ClassVar[bool] = False
    needs_originals: ClassVar[bool] = False  # True: merge() reads the original layers
    merges_windows: ClassVar[bool] = False  # True: merge_window() builds one layer from m > 2 (--merge-item)
    own_options = MergeOptions

    def defaults(self, cfg: CompressConfig) -> dict[str, Any]:
        """The method's pair score; the windowed re-profiling where it was measured against full
        (BENCHMARKS.md: pair merges scored without building them), full elsewhere."""
        pair_score = cfg.pair_score or self.default_pair_score
        window_fits = cfg.merge_item == 2 and pair_score not in BUILT_SCORES
        return {"pair_score": pair_score,
                "reprofile": cfg.reprofile or (self.default_reprofile if window_fits else "full")}

    def check(self, cfg: CompressConfig) -> None:
        if cfg.pair_score in BUILT_SCORES and not self.keeps_units:
            raise ComeError(f"--pair-score {cfg.pair_score} scores concatenation merges; use angular, "
                            f"bi-all-tokens or angular-all-tokens with --method {self.name}")
        if cfg.merge_item > 2:
            self._check_merge_item(cfg)
        if cfg.reprofile != "window" and (cfg.is_set("reprofile_window") or cfg.is_set("reprofile_drift")):
            raise ComeError("--reprofile-window and --reprofile-drift shape the windowed re-profiling; add "
                            "--reprofile window")

    def _check_merge_item(self, cfg: CompressConfig) -> None:
        """What `--merge-item` above 2 cannot be combined with (one line naming it)."""
        m = cfg.merge_item
        if not self.merges_windows:
            others = sorted(n for n, meth in REGISTRY.items() if getattr(meth, "merges_windows", False))
            raise ComeError(f"--method {self.name} merges two layers at a time; drop --merge-item {m}, or use "
                            f"--method {' / '.join(others)}")
        if cfg.pair_score in BUILT_SCORES:
            raise ComeError(f"--merge-item {m} with --pair-score {cfg.pair_score}: that score builds pair merges; "
                            "use bi-all-tokens, angular or angular-all-tokens")
        if cfg.reprofile == "window":
            raise ComeError(f"--merge-item {m} with --reprofile window: the window re-profiling keeps pair scores; "
                            "use --reprofile full")
        if len(cfg.levels()) > 1:
            raise ComeError(f"--merge-item {m} takes one --sparsity: each level's merges would differ from a run at "
                            "that level alone; run the levels one by one")

    def needs_dense(self, cfg: CompressConfig) -> bool:
        return cfg.refit == "ls" or cfg.pair_score in ERROR_SCORES

    def removable(self, n_layers: int, cfg: CompressConfig) -> int:
        """A merge joins adjacent unprotected layers: a run of r of them can end as one layer,
        r - 1 removed (with --no-repeat each layer merges once: windows of m remove m - 1 each)."""
        m = cfg.merge_item
        return sum((r // m) * (m - 1) + max(r % m - 1, 0) if cfg.no_repeat else r - 1
                   for r in unprotected_runs(n_layers, cfg.protect))

    def steps(self, run: "Run", cfg: CompressConfig) -> MergeSteps:
        """What the loop asks at each step of `run` (made once, after the set-up, before the
        first profile): a method that measures more than the cache's profile returns its own."""
        return MergeSteps(self, run, cfg)

    def merge(self, pair: "PairToMerge") -> "LayerWeights":
        """The merged layer's weights (float64; written into A's slot)."""
        raise NotImplementedError

    def merge_window(self, window: "WindowToMerge") -> "LayerWeights":
        """The one layer built from m > 2 adjacent layers (float64; written into the first's slot)."""
        raise NotImplementedError


class DropMethod(Method):
    """One-shot: choose the layers to remove from one profiling pass, drop them, and
    optionally refit the layer kept before each removed run (dropping.py)."""

    loop = "one-shot"
    refit_features: ClassVar[str] = "channels"  # "channels": our refit; "mlp_out": a hidden x hidden map
    always_refits: ClassVar[bool] = False  # the method's own recovery, whatever --refit says
    # True: the method removes layers one at a time, each choice seeing the ones before
    # (`removal_order`), so its choice of n layers is the first n of its choice of more, and
    # a --sparsity list computes the order once, for the largest level
    greedy: ClassVar[bool] = False

    def needs_dense(self, cfg: CompressConfig) -> bool:
        return self.always_refits or cfg.refit == "ls"

    def select(self, profile: "DenseProfile", n: int, cfg: CompressConfig) -> list[int]:
        """The `n` original layers to remove, from the dense model's profile (read-only)."""
        if self.greedy:
            return sorted(self.removal_order(profile, n, cfg))
        raise NotImplementedError

    def removal_order(self, profile: "DenseProfile", n: int, cfg: CompressConfig) -> list[int]:
        """A greedy method's `n` layers in the order it removes them."""
        raise NotImplementedError

    def checked(self, removed: list[int], n: int, n_layers: int, cfg: CompressConfig) -> list[int]:
        """`removed`, if it is what `select` promises: `n` distinct layers of the model, none
        protected. The target itself was checked against `removable` before any work
        (CompressConfig.check_reachable), so a miss here is the method's bug, not the user's."""
        if len(set(removed)) != n or not set(removed) <= set(range(n_layers)) - set(cfg.protect):
            raise RuntimeError(f"--method {self.name} chose layers {removed} for {n} removals of {n_layers} "
                               f"(protected: {cfg.protect}): a bug in the method")
        return sorted(removed)
