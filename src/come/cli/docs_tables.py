"""README's families and methods tables, generated from the adapters and the method registry,
so a new family or method shows up in the docs by itself (tests/test_cli_reference.py
compares README's blocks with these; `python -m come.cli.reference` rewrites them).

What is exact and what is approximate per family is prose, not data: docs/families.md.
"""

from __future__ import annotations

import dataclasses

from ..settings.options import flag_of

# the checkpoints a model_type stands for (the adapter knows only the model_type)
KNOWN_AS = {"llama": "LLaMA-2/3, Vicuna", "mistral": "Mistral", "qwen2": "Qwen2 / Qwen2.5", "qwen3": "Qwen3",
            "gemma2": "Gemma 2", "gemma3_text": "Gemma 3 (text)", "phi3": "Phi-3 / Phi-4", "olmo2": "OLMo-2",
            "granite": "Granite", "mixtral": "Mixtral", "qwen2_moe": "Qwen1.5-MoE / Qwen2-MoE",
            "qwen3_moe": "Qwen3-MoE", "olmoe": "OLMoE"}


def _norms(fields: set[str], offset: float) -> str:
    """Where the layer's norms sit, read from the parameters the adapter maps."""
    pre, post = bool({"attn_norm", "ffn_norm"} & fields), "attn_post_norm" in fields
    where = "before and after each block" if pre and post else "after each block" if post else "before each block"
    return where + (" (scale 1 + w)" if offset else "")


def families_table() -> str:
    """One row per model_type the adapters take: its layout as the adapter declares it."""
    from ..models.adapters import ADAPTERS

    rows = ["| checkpoints (`model_type`) | norms | q/k norms | FFN units | fused projections |",
            "|---|---|---|---|---|"]
    for adapter in ADAPTERS:
        fields = {f for names in adapter.tensors.values() for f in names}
        fused = sorted(p.rsplit(".", 2)[-2] for p, names in adapter.tensors.items()
                       if len(names) > 1 and "experts" not in p)
        ffn = "experts (Mixture-of-Experts)" if "router" in fields else "channels"
        for model_type in adapter.model_types:
            rows.append(f"| {KNOWN_AS.get(model_type, adapter.family)} (`{model_type}`) | "
                        f"{_norms(fields, adapter.weights.norm_offset)} | {'yes' if adapter.qk_norm else 'no'} | "
                        f"{ffn} | {', '.join(f'`{p}`' for p in fused) or 'none'} |")
    return "\n".join(rows)


def _own_flags(method) -> str:
    """The options only this method (or its loop) reads: its own group's flags (docs/cli.md: each
    group's help panel)."""
    from ..methods import MergeOptions

    group = method.own_options
    if group is None:
        return "none"
    loop = {f.name for f in dataclasses.fields(MergeOptions)} if issubclass(group, MergeOptions) else set()
    own = [f"`{flag_of(f)}`" for f in dataclasses.fields(group) if f.name not in loop]
    return ", ".join(own + (["the merge loop's"] if loop else []))


def methods_table() -> str:
    """One row per registered method, in listing order: its kind, default refit and summary."""
    from ..methods import REGISTRY, DropMethod, MergeMethod, method_names

    rows = ["| `--method` | kind | default `--refit` | own options | what it does |", "|---|---|---|---|---|"]
    for name in method_names():
        m = REGISTRY[name]
        kind = "merge" if isinstance(m, MergeMethod) else "drop" if isinstance(m, DropMethod) else "chooser"
        refit = m.default_refit or "the chosen recipe's"
        rows.append(f"| `{name}` | {kind} | {refit} | {_own_flags(m)} | {m.summary.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)
