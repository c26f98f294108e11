"""The model card (README.md) of every `come` output: Hugging Face Hub front matter (YAML
between `---` lines: base_model, tags, library_name, license) and a short account a person
can read: what was removed, which original layers each new layer stands for (the Plan's
groups), the method and its settings, how to load the model, the distillation when there
was one, and the evaluation numbers once there are any.

`model_card()` is pure: the Plan, optional evaluation results (`come eval --out`'s dict) and
distillation log, and what the caller read about the source model in, markdown out.
`save_checkpoint` writes it; `add_eval_to_card()` later rewrites only the evaluation section
of a card this module wrote (in place, atomically).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..errors import ComeError
from ..settings.plan import PLAN_FILE, Plan, load_plan
from .outputs import write_text_atomic

log = logging.getLogger("come")

CARD_FILE = "README.md"
EVAL_START, EVAL_END = "<!-- come:evaluation:start -->", "<!-- come:evaluation:end -->"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
_FRONT = re.compile(r"\A---[ \t]*\r?\n(.*?)^---[ \t]*$", re.S | re.M)


def looks_like_hub_id(name) -> bool:
    """`org/name` as the Hub spells repository ids (a local path may look the same: the caller
    checks the file system first)."""
    return isinstance(name, str) and bool(_HUB_ID.fullmatch(name)) and ".." not in name and not name.endswith(".")


def front_matter(text: str) -> dict:
    """The YAML metadata at the top of a README; {} when there is none or it is not a mapping."""
    import yaml

    match = _FRONT.match(text)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def model_card(plan: Plan, results: dict | None = None, distill_log: dict | None = None, *,
               base_model: str | None = None, license: str | None = None, name: str | None = None) -> str:
    """The README.md of a compressed (and maybe distilled) model. `name`: what
    `from_pretrained` is shown loading (default: a placeholder for this folder)."""
    import yaml

    meta = {"base_model": base_model, "library_name": "transformers", "license": license,
            "pipeline_tag": "text-generation", "tags": _tags(plan, distill_log)}
    head = "---\n" + yaml.safe_dump({k: v for k, v in meta.items() if v}, sort_keys=False) + "---\n"
    parts = [head, _summary(plan, base_model, distill_log, name), _layers(plan), _method(plan),
             _distillation(distill_log) if distill_log else "", _loading(name, distill_log), eval_section(results)]
    return "\n".join(p for p in parts if p)


def _tags(plan: Plan, distill_log: dict | None) -> list[str]:
    dropped = any(m.operator.startswith("drop") for m in plan.merges)
    tags = ["come", "pruning", "layer-dropping" if dropped else "layer-merging", plan.method]
    return list(dict.fromkeys(tags + (["distillation"] if distill_log else [])))


def _span(group: list[int]) -> str:
    """[3, 4, 5] -> '3-5'; [2] -> '2'; a gap -> '1, 3'."""
    if len(group) > 1 and group == list(range(group[0], group[-1] + 1)):
        return f"{group[0]}-{group[-1]}"
    return ", ".join(map(str, group))


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _summary(plan: Plan, base_model: str | None, distill_log: dict | None, name: str | None) -> str:
    source = f"`{base_model or plan.model}`" if base_model or plan.model else "a model"
    then = " and then recovered by distillation from the original" if distill_log else ""
    return "\n".join([
        f"# {name or 'come output'}", "",
        f"{source} compressed by `come` with the `{plan.method}` method{then}: "
        f"{plan.num_layers_before} -> {plan.num_layers_after} decoder layers. Each layer of this model stands for "
        "one or more consecutive layers of the original (below); the architecture is the original's with fewer "
        "layers, so plain transformers loads it.", "",
        "## What was removed", "",
        "| | before | after |", "|---|---|---|",
        f"| decoder layers | {plan.num_layers_before} | {plan.num_layers_after} |",
        f"| parameters | {plan.params_before:,} | {plan.params_after:,} |",
        f"| sparsity (share of parameters removed) | | {_pct(plan.achieved_sparsity)} "
        f"(target {_pct(plan.target_sparsity)}) |", ""])


def _layers(plan: Plan) -> str:
    rows = ["## Layers", "", "Which original layers each layer of this model stands for (`groups` in "
            f"{PLAN_FILE}).", "", "| layer | original layers | made by |", "|---|---|---|"]
    for k, group in enumerate(plan.groups):
        ops = sorted({m.operator for m in plan.merges if set(m.group_a + m.group_b) <= set(group)})
        how = "unchanged" if len(group) == 1 and not ops else ", ".join(f"`{op}`" for op in ops) or "-"
        rows.append(f"| {k} | {_span(group)} | {how} |")
    return "\n".join(rows) + "\n"


def _cell(value) -> str:
    return "-" if value is None else str(value).replace("|", "\\|")


def _method(plan: Plan) -> str:
    rows = ["## Method and settings", "",
            f"`come compress --method {plan.method}` with these settings (all of them, as {PLAN_FILE} records):", "",
            "| setting | value |", "|---|---|"]
    rows += [f"| `--{k.replace('_', '-')}` | {_cell(v)} |" for k, v in plan.settings.items()]
    versions = ", ".join(f"{k} {v}" for k, v in plan.versions.items())
    rows += ["", f"Calibration: {plan.calibration_tokens:,} tokens; {len(plan.merges)} recorded steps, "
             f"{plan.layer_forwards:,} layer-forwards, {plan.wall_time_s:.1f} s."
             + (f" Made with {versions}." if versions else ""),
             f"{PLAN_FILE} beside the weights records every step: the pair chosen, the units each side kept, "
             "the scores that chose them."]
    return "\n".join(rows) + "\n"


def _distillation(log: dict) -> str:
    s = log.get("settings", {})
    how = f"LoRA adapters of rank {s['lora_r']}, merged into the weights" if s.get("lora_r") else "full weights"
    head = " and the LM head (in full)" if str(s.get("train", "")).endswith(",head") else ""  # --train last:K,head
    rows = ["## Distillation", "",
            f"After compression, layers {_cell(log.get('trainable_layers'))}{head} were trained to imitate the "
            f"original model (`come distill --mode {_cell(s.get('mode'))}`, {how}, layer loss {_cell(s.get('layer_loss'))}, "
            f"learning rate {_cell(s.get('lr'))}): {_cell(log.get('steps'))} optimizer steps on "
            f"{log.get('tokens_seen', 0):,} tokens of {_cell(s.get('data'))}."]
    evals = log.get("eval") or []
    if evals:
        first, last = evals[0], evals[-1]
        teacher = log.get("teacher_ppl")
        rows += ["", f"| held-out ({log.get('eval_tokens', 0):,} tokens) | before | after |", "|---|---|---|",
                 f"| KL to the original | {first['kl']:.4f} | {last['kl']:.4f} |",
                 f"| perplexity (original: {'-' if teacher is None else f'{teacher:.3f}'}) | {first['ppl']:.3f} | "
                 f"{last['ppl']:.3f} |"]
    return "\n".join(rows + ["", "distill_log.json beside the weights has every step."]) + "\n"


def _loading(name: str | None, distill_log: dict | None) -> str:
    where = name or "path/to/this/folder"
    rows = ["## How to load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{where}")  # this folder, or its Hub repo id',
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```"]
    if not distill_log:
        rows += ["", "`come distill --teacher ORIGINAL --student THIS_FOLDER --out OUT` recovers accuracy by "
                 "distillation; `come eval --out results.json THIS_FOLDER` fills the section below."]
    return "\n".join(rows) + "\n"


def eval_section(results: dict | None) -> str:
    """The evaluation section, between the markers `add_eval_to_card` replaces."""
    rows = [EVAL_START, "## Evaluation", ""]
    if not results:
        rows.append("Not evaluated yet: `come eval --out results.json THIS_FOLDER` writes the numbers here.")
        return "\n".join(rows + [EVAL_END]) + "\n"

    def num(x, spec=".4f"):
        return "-" if x is None else format(x, spec)

    s, ret, tasks = results.get("settings", {}), results.get("retention"), results.get("tasks") or {}
    what = []
    if tasks:
        docs = f"{s['limit']} documents per task" if s.get("limit") else "every document of each task"
        what.append(docs + (f" (after the first {s['skip']})" if s.get("skip") else ""))
    if s.get("ppl_data"):
        what.append(f"perplexity on {s.get('ppl_tokens', 0):,} tokens of {s['ppl_data']} in windows of "
                    f"{s.get('seqlen')}")
    rows.append("`come eval`: " + "; ".join(what) + ".")
    extra = " | acc % dense | acc_norm % dense" if ret else ""
    if tasks:
        rows += ["", f"| task | split | documents | acc | acc_norm{extra} |", "|---" * (7 if ret else 5) + "|"]
    for task, r in tasks.items():
        pcts = [num((ret["tasks"].get(task) or {}).get(m), ".1f") for m in ("acc", "acc_norm")] if ret else []
        rows.append("| " + " | ".join([task, str(r.get("split", "-")), str(r.get("n", "-")), num(r.get("acc")),
                                       num(r.get("acc_norm")), *pcts]) + " |")
    rows += ["", "| | value" + (" | % of dense |" if ret else " |"), "|---|---" + ("|---|" if ret else "|")]
    for label, key in (("average (paper metrics)", "average"), ("perplexity", "perplexity")):
        rows.append(f"| {label} | {num(results.get(key))}" + (f" | {num(ret.get(key), '.1f')} |" if ret else " |"))
    return "\n".join(rows + [EVAL_END]) + "\n"


def add_eval_to_card(model_dir: str | Path, results: dict) -> Path | None:
    """Rewrite the evaluation section of `model_dir`'s come card with `results`, in place and
    atomically (a temporary file renamed over it); the same results twice leave the same card.
    None (nothing written) when `model_dir` has no card this module wrote, or when its
    come_plan.json is missing or corrupt (a come output no longer: a warning), or refuses the
    write (a warning: the results themselves are already saved by then)."""
    path = Path(model_dir) / CARD_FILE
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):  # no card (a Hub id, a .gguf file, a plain model) or not text
        return None
    start, end = text.find(EVAL_START), text.find(EVAL_END)
    if start < 0 or end < start:
        return None
    try:
        load_plan(model_dir)
    except ComeError as exc:
        log.warning("%s was left as it is: %s", path, exc)
        return None
    tail = text[end + len(EVAL_END):]
    new = text[:start] + eval_section(results) + (tail[1:] if tail.startswith("\n") else tail)
    if new == text:
        return path
    try:
        write_text_atomic(path, new)
    except OSError as exc:
        log.warning("could not update the evaluation section of %s (%s)", path, exc.strerror or exc)
        return None
    return path
