"""What a compression method declares, and the registry that knows them all.

A method is one module in this package that defines a `MergeMethod` (progressive: one
layer built from two, repeated to the target) or a `DropMethod` (one-shot: choose layers
to remove) subclass and decorates it with `@register`. Everything else (the CLI's
choices and help, the defaults a config resolves to, `come compare`'s list) reads the
registry (come.registry), so adding a method is one new file.

A method module imports only the settings floor (errors, options, config, registry) at its
top: the engine it runs (the progressive loop, the drop pass, the merge math, torch) is
imported in the functions that run it. So the registry (names, summaries, defaults, options,
checks) loads without torch: `CompressConfig.resolved()` and the CLI's help read it in a
fraction of a second (tests/test_import_graph.py checks that no torch loads).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import TYPE_CHECKING, ClassVar

from ..config import BUILT_SCORES, ERROR_SCORES, CompressConfig
from ..errors import ComeError
from ..options import flag_of
from ..registry import REGISTRY, method_options, register

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ..activation_cache import ActivationCache
    from ..adapters import LayerWeights
    from ..pipeline import PairToMerge, WindowToMerge
    from ..plan import Plan
    from ..preparation import Levels

__all__ = ["REGISTRY", "DropMethod", "MergeMethod", "Method", "method_options", "register", "unprotected_runs"]


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
    progressive: ClassVar[bool] = False  # True: removes layers by merging adjacent ones (MergeMethod)
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
        """Compress in place to `cfg.sparsity`; `levels` (progressive methods): the smaller
        targets to hand over on the way (compression.compress makes it)."""
        raise NotImplementedError


class MergeMethod(Method):
    """Progressive: merge the least important adjacent pair into one stock-shaped layer,
    re-profile, repeat (pipeline.py)."""

    operator: ClassVar[str]  # recorded in the Plan per merge
    progressive = True
    keeps_units: ClassVar[bool] = False  # True: units chosen by sensitivity (concatenation)
    needs_originals: ClassVar[bool] = False  # True: merge() reads the original layers
    merges_windows: ClassVar[bool] = False  # True: merge_window() builds one layer from m > 2 (--merge-item)
    # what the progressive pipeline reads (pipeline.py, pair_scoring.py, activation_cache.py)
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

    def merge(self, pair: "PairToMerge") -> "LayerWeights":
        """The merged layer's weights (float64; written into A's slot)."""
        raise NotImplementedError

    def merge_window(self, window: "WindowToMerge") -> "LayerWeights":
        """The one layer built from m > 2 adjacent layers (float64; written into the first's slot)."""
        raise NotImplementedError

    def compress(self, model, tokenizer, cfg, calib, model_name, levels=None):
        from ..pipeline import merge_progressively

        return merge_progressively(self, model, tokenizer, cfg, calib, model_name, levels)


class DropMethod(Method):
    """One-shot: choose the layers to remove from one profiling pass, drop them, and
    optionally refit the layer kept before each removed run (dropping.py)."""

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

    def compress(self, model, tokenizer, cfg, calib, model_name, levels=None):
        from ..budget import merge_budget
        from ..dropping import compress_by_dropping

        select = self.select
        if levels is not None and self.greedy:
            n_largest, order = merge_budget(model, cfg.sparsity)[2], []

            def select(cache, n, level_cfg):  # every level profiles the same dense model: one order serves all
                if not order:
                    order.extend(self.removal_order(cache, n_largest, cfg))
                return sorted(order[:n])

        # which layers go, and the refit of the ones kept, depend on the level: each smaller level
        # drops (and refits) on its own copy of the dense model
        for sparsity in levels.sparsities if levels is not None else ():
            levels.receive(*compress_by_dropping(self, copy.deepcopy(model), tokenizer, cfg.at(sparsity), calib,
                                                 model_name, select))
            levels.handed.append(sparsity)
        return compress_by_dropping(self, model, tokenizer, cfg, calib, model_name, select)
