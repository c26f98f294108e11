"""What a run starts from: `resolve(cfg)`, the settings resolved by the method (its defaults
and checks) with --device checked on this machine; and the method specs, the rows of `come
compare --methods` and of auto's `--candidates` (`method[:key=value...]`), each resolved
before any work. Torch loads only when a device is checked (device.py)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ComeError
from .config import CompressConfig
from .device import resolve_device
from .options import field_of, flag_of, override
from .registry import REGISTRY, default_methods, get_method, method_names

# the same in every row (and a candidate of auto); a memory cap is the run's, not a row's
SHARED = ("method", "sparsity", "calib", "nsamples", "seqlen", "seed", "protect", "max_memory_gb")


def resolve(cfg: CompressConfig) -> CompressConfig:
    """What a run starts from: `cfg.resolved()` (the method's defaults and checks, on the
    settings floor) with its --device checked on this machine (device.py: asks torch)."""
    resolved = cfg.resolved()
    resolve_device(resolved.device)
    return resolved


@dataclass(frozen=True)
class MethodSpec:
    """One row of a comparison: a method plus option overrides, written `method[:key=value...]`
    (e.g. `come:refit=none:split=bi:pair_score=angular` for the paper's pure merge, `shortgpt:refit=ls`), so what the
    refit buys and what the operator buys can sit in one table."""

    label: str
    method: str
    overrides: tuple[tuple[str, object], ...] = ()

    def config(self, base: CompressConfig) -> CompressConfig:
        """`base` with this row's method and overrides (unset refit / pair score: the method's own).
        A shared option this row's method does not read stays at its default here: it is for the
        rows whose method reads it (an override that does not apply is refused by `resolved`)."""
        return replace(get_method(self.method).own(replace(base, method=self.method)), **dict(self.overrides))


def method_list(text: str, base: CompressConfig | None = None, flag: str = "--methods") -> list[MethodSpec]:
    """Parse `--methods` (or `flag`, e.g. --candidates); every row's full config is resolved here,
    before any work. Overrides are parsed like the command line parses the same option."""
    base = base or CompressConfig()
    specs = []
    for item in (m.strip() for m in text.split(",")):
        if not item:
            continue
        method, *pairs = item.split(":")
        if method not in REGISTRY:
            raise ComeError(f"{flag}: unknown method {method!r}; choose from {', '.join(method_names())}")
        overrides = []
        for pair in pairs:
            key, _, value = pair.partition("=")
            if not value:
                raise ComeError(f"{flag}: bad override {pair!r} in {item!r}; write method:option=value with a "
                                "`come compress` option such as refit=none or pair-score=error")
            overrides.append(override(CompressConfig, key, value.strip(), flag, SHARED))
        keys = [name for name, _ in overrides]
        if len(set(keys)) != len(keys):
            twice = next(k for k in keys if keys.count(k) > 1).replace("_", "-")
            raise ComeError(f"{flag}: {item!r} sets {twice} twice; give each option once per row")
        spec = MethodSpec(item, method, tuple(overrides))
        try:
            resolve(spec.config(base))
        except ComeError as exc:
            raise ComeError(f"{flag} {item}: {exc}") from None
        specs.append(spec)
    if not specs:
        raise ComeError(f"{flag}: none given; choose from {', '.join(method_names())} (leave --methods out for "
                        f"the default set, {default_methods()})")
    if len({s.label for s in specs}) != len(specs):
        raise ComeError(f"{flag}: a row is listed twice")
    _applies_somewhere(base, specs)
    return specs


def _applies_somewhere(base: CompressConfig, specs: list[MethodSpec]) -> None:
    """A method-specific option given for every row is read by at least one row's method."""
    ignored = [set(get_method(s.method).ignored(replace(base, method=s.method))) for s in specs]
    for name in sorted(set.intersection(*ignored)):
        flag = flag_of(field_of(type(base), name))
        raise ComeError(f"{flag} is read by none of the methods compared ({', '.join(s.method for s in specs)}): "
                        f"drop {flag}, or add a method that reads it")
