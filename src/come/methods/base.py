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
from typing import TYPE_CHECKING, ClassVar

from ..errors import ComeError
from ..settings.config import BUILT_SCORES, ERROR_SCORES, CompressConfig
from ..settings.options import flag_of
from ..settings.registry import REGISTRY, method_options, register

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ..engine.cache import ActivationCache
    from ..engine.preparation import Levels, Run
    from ..models.adapters import LayerWeights
    from ..scoring.pair_scoring import Choice, PairToMerge, WindowChoice, WindowToMerge
    from ..settings.plan import Plan

__all__ = ["REGISTRY", "DropMethod", "MergeMethod", "MergeSteps", "Method", "method_options", "register",
           "unprotected_runs"]


def unprotected_runs(n_layers: int, protect) -> list[int]:
    """The lengths of the maximal runs of adjacent layers outside `protect`."""
    protect = set(protect)
    return [len(list(g)) for free, g in itertools.groupby(range(n_layers), lambda i: i not in protect) if free]


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


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
    # The method-specific options (CompressConfig fields) this method reads. An option that some
    # method declares and this one does not is ignored by this one: a run refuses it when set
    # (`ignored`), a preset or `come compare`'s shared option leaves it at its default here.
    options: ClassVar[frozenset[str]] = frozenset({"refit"})
    ignored_hint: ClassVar[str] = ""  # appended to the refusal of an option this method ignores

    def check(self, cfg: CompressConfig) -> None:
        """Refuse settings this method cannot honour (one line, before any work)."""

    def ignored(self, cfg: CompressConfig) -> list[str]:
        """The method-specific options `cfg` sets (away from their defaults) that this method never reads."""
        return [f.name for f in dataclasses.fields(cfg) if f.name in method_options() and f.name not in self.options
                and getattr(cfg, f.name) != _default(f)]

    def refuse_ignored(self, cfg: CompressConfig) -> None:
        """One line naming the first option `cfg` sets that this method would silently ignore."""
        for name in self.ignored(cfg):
            flag = flag_of(cfg.__dataclass_fields__[name])
            readers = sorted(n for n, m in REGISTRY.items() if name in m.options)
            if len(readers) <= 4:  # else the list is longer than the point
                raise ComeError(f"{flag} is read by --method {' / '.join(readers)} only; --method {self.name} "
                                f"ignores it: drop {flag}{self.ignored_hint}")
            raise ComeError(f"--method {self.name} ignores {flag}: drop {flag}{self.ignored_hint}")

    def own(self, cfg: CompressConfig) -> CompressConfig:
        """`cfg` with the options this method ignores put back at their defaults (a preset's or a
        shared setting that concerns other methods)."""
        defaults = {f.name: _default(f) for f in dataclasses.fields(cfg)}
        return dataclasses.replace(cfg, **{name: defaults[name] for name in self.ignored(cfg)})

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
    # what the progressive pipeline reads (engine/pipeline.py, scoring/pair_scoring.py, engine/cache.py)
    options = Method.options | {"pair_score", "no_repeat", "merge_item", "reprofile", "reprofile_window",
                                "reprofile_drift"}

    def check(self, cfg: CompressConfig) -> None:
        if cfg.pair_score in BUILT_SCORES and not self.keeps_units:
            raise ComeError(f"--pair-score {cfg.pair_score} scores concatenation merges; use angular, "
                            f"bi-all-tokens or angular-all-tokens with --method {self.name}")
        if cfg.merge_item > 2 and not self.merges_windows:
            others = sorted(n for n, m in REGISTRY.items() if getattr(m, "merges_windows", False))
            raise ComeError(f"--method {self.name} merges two layers at a time; drop --merge-item "
                            f"{cfg.merge_item}, or use --method {' / '.join(others)}")

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

    def select(self, cache: "ActivationCache", n: int, cfg: CompressConfig) -> list[int]:
        """The `n` original layers to remove (the cache has profiled the dense model)."""
        if self.greedy:
            return sorted(self.removal_order(cache, n, cfg))
        raise NotImplementedError

    def removal_order(self, cache: "ActivationCache", n: int, cfg: CompressConfig) -> list[int]:
        """A greedy method's `n` layers in the order it removes them."""
        raise NotImplementedError
