"""The compress service: a model path in, checkpoints or a comparison report out. `come compress`,
`come compare` and the Python API (`compress_to`, `compare_to`) all start with `prepare`: the
same pre-flight in the same order (the outputs, naming the inputs they must not overwrite; the
settings against the model's config: context, protected layers, whether the target is
reachable), then the tokenizer, the calibration (tokenized once, for every row and level) and
the weights. A bad input fails before any weight loads, with nothing written. `compare` is the
comparison on a model in memory: each method compresses a copy (the engine) and each copy is
evaluated into a report row (rows.py). Imported, it loads no torch (the engine loads inside the
functions): the CLI imports it at start-up."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ComeError
from .settings.config import CompressConfig, EvalConfig
from .settings.options import cli_fields, flag_of
from .settings.registry import default_methods
from .settings.specs import MethodSpec, method_list, resolve

if TYPE_CHECKING:
    from torch import Tensor, nn

    from .settings.plan import Plan

EVAL_PREFIX = "eval-"  # compare spells the evaluation's flags that compress also has --eval-seqlen, ...


@dataclass
class Prepared:
    """A run's inputs, checked and loaded: the tokenizer, the calibration ids
    [nsamples, seqlen] and the model (on CPU)."""

    tokenizer: object
    calib: Tensor
    model: nn.Module


def prepare(name: str, cfgs: list[CompressConfig], outs: list[str | Path], overwrite: bool,
            inputs: Mapping[str, str | None], dtype: str = "auto", evaluation: EvalConfig | None = None,
            before_load: Callable[[nn.Module], None] | None = None) -> Prepared:
    """Every check before the weights, then the tokenizer, the calibration and the weights.
    `cfgs`: the runs' settings (compare: one per row; they share the calibration and the target);
    `outs`: the directories to write, checked against `inputs` ({flag: path}, never overwritten);
    `evaluation`: compare's, checked against the model too (its flags as compare spells them);
    `before_load(meta model)`: the last check, with the tokenizer and calibration in memory
    (compress's memory plan counts what the process holds then)."""
    from .models.budget import merge_budget
    from .models.checkpoint import load_config, load_model, load_tokenizer, meta_model
    from .models.data import load_calibration
    from .models.preflight import check_output_dir

    for path in outs:
        check_output_dir(path, overwrite, inputs=inputs)
    with _prefixed_flags(EvalConfig, CompressConfig, EVAL_PREFIX):  # the model's errors name no flag
        if evaluation is not None:
            evaluation.check()
        config = load_config(name)
        if evaluation is not None:
            evaluation.check_model(config)
    for cfg in cfgs:
        cfg.check_model(config)
    first, meta = cfgs[0], meta_model(config)
    n_remove = merge_budget(meta, first.levels()[-1])[2]
    for cfg in cfgs:
        cfg.check_reachable(config.num_hidden_layers, n_remove)
    tokenizer = load_tokenizer(name)
    calib = load_calibration(first.calib, tokenizer, first.nsamples, first.seqlen, first.seed)
    if before_load is not None:
        before_load(meta)
    model, _ = load_model(name, dtype, tokenizer)
    return Prepared(tokenizer, calib, model)


def level_dirs(out: str | Path, levels: list[float]) -> dict[float, Path]:
    """Where each level goes: OUT itself for one, OUT/sparsity-0.10 ... for several (two
    decimals unless the level has more)."""
    if len(levels) == 1:
        return {levels[0]: Path(out)}
    return {s: Path(out) / f"sparsity-{f'{s:.2f}' if float(f'{s:.2f}') == s else repr(s)}" for s in levels}


def compress_to(model: str, out: str | Path, cfg: CompressConfig, overwrite: bool = False, dtype: str = "auto",
                written: Callable[[Plan, Path], None] | None = None) -> list[Plan]:
    """Compress the model at `model` (Hub id, local directory, .gguf) and write a stock checkpoint
    to `out` (several --sparsity levels: one per level, out/sparsity-0.10, ...); return the Plans,
    smallest level first. `written(plan, path)` is told of each checkpoint as it lands."""
    from .engine.compression import compress
    from .engine.memory_plan import check_run
    from .models.api_inputs import expect
    from .models.checkpoint import save_checkpoint

    cfg = resolve(expect(cfg, CompressConfig, "cfg"))
    outs = level_dirs(out, cfg.levels())
    run = prepare(model, [cfg], [out, *outs.values()], overwrite,  # OUT as given: '' is refused, not '.'
                  {"MODEL": model, "--calib": cfg.calib}, dtype, before_load=lambda meta: check_run(meta, cfg, dtype))
    plans: list[Plan] = []

    def write(compressed: nn.Module, plan: Plan) -> None:
        path = save_checkpoint(compressed, run.tokenizer, plan, outs[plan.target_sparsity], overwrite)
        plans.append(plan)
        if written is not None:
            written(plan, path)

    write(*compress(run.model, run.tokenizer, cfg, calib=run.calib, model_name=model, on_level=write))
    return plans


def compare(model, tokenizer, base: CompressConfig, methods: list[MethodSpec] | str, calib: Tensor, out: Path,
            evaluation: EvalConfig, model_name: str = "", overwrite: bool = False) -> list[dict]:
    """Compress a copy of `model` with each method (same calibration ids), evaluate each
    and the dense model, and write the report into `out`. Returns the report rows. With
    several sparsities (`base.sparsity` a list) each method runs once through every level
    (compress's `on_level`) and gives one row per level, labelled `method@level`. `methods` may
    be given as `--methods` text ("come,shortgpt:refit=ls"). `out` is checked before any work
    (empty, or with `overwrite` a come output: atomic_dir)."""
    import copy
    import tempfile

    from .engine.compression import compress
    from .evaluation.report import write_report
    from .evaluation.rows import evaluated, row, set_against_first
    from .models.api_inputs import expect, expect_model, expect_token_ids
    from .models.checkpoint import atomic_dir
    from .models.preflight import check_output_dir
    from .scoring.fidelity import ReferenceWriter

    expect(base, CompressConfig, "base")
    expect(evaluation, EvalConfig, "evaluation")
    expect_token_ids(calib, expect_model(model), "calib")
    methods = method_list(methods, base) if isinstance(methods, str) else methods
    evaluation.check()
    check_output_dir(out, overwrite, inputs={"model": model_name, "calib": base.calib})
    eval_kwargs = evaluation.evaluate_kwargs()
    levels = base.levels()
    plans: dict[str, Plan] = {}
    with tempfile.TemporaryDirectory(prefix="come-reference-") as ref_dir:
        # the dense row's perplexity pass records its distributions: every row's KL reuses them
        writer = ReferenceWriter(ref_dir, "dense") if eval_kwargs["ppl_data"] else None
        rows = [row("dense", model, None, None, tokenizer, eval_kwargs, plans, writer=writer)]
        reference = writer.close() if writer else None
        for spec in methods:
            def on_level(lm, plan: Plan, spec=spec) -> None:  # each level's model is evaluated as the run passes it
                label = spec.label if len(levels) == 1 else f"{spec.label}@{plan.target_sparsity:g}"
                rows.append(row(label, lm, plan, plan.wall_time_s, tokenizer, eval_kwargs, plans, reference))

            on_level(*compress(copy.deepcopy(model), tokenizer, spec.config(base), calib=calib, model_name=model_name,
                               on_level=on_level if len(levels) > 1 else None))
    set_against_first(rows, len(methods) > 1)
    tasks = list(rows[0]["tasks"])
    header = (f"Model {model_name or 'model'}; sparsity {', '.join(f'{s:g}' for s in levels)} of all params; "
              f"calibration {calib.shape[0]} x {calib.shape[1]} tokens of {base.calib} (seed {base.seed}); "
              f"{evaluated(evaluation, eval_kwargs)}.")
    with atomic_dir(out, overwrite) as tmp:
        write_report(tmp, rows, tasks, plans, header)
    return rows



def compare_to(model: str, out: str | Path, cfg: CompressConfig, methods: str | None = None,
               evaluation: EvalConfig | None = None, overwrite: bool = False, dtype: str = "auto") -> list[dict]:
    """Compress the model at `model` with each of `methods` (`--methods` text; None: the default
    set) on the same calibration, evaluate them and the dense model, and write report.md,
    report.json and the plots to `out`; return the report rows."""
    from .models.api_inputs import expect

    expect(cfg, CompressConfig, "cfg")
    if cfg.max_memory_gb is not None:
        raise ComeError("max_memory_gb is come compress's (its memory plan); compare keeps a copy of the model per "
                        "method and evaluates it, which that plan does not count: leave it None")
    evaluation = EvalConfig() if evaluation is None else expect(evaluation, EvalConfig, "evaluation")
    chosen = method_list(default_methods() if methods is None else methods, cfg)
    run = prepare(model, [spec.config(cfg) for spec in chosen], [out], overwrite,
                  {"MODEL": model, "--calib": cfg.calib, "--ppl-data": evaluation.ppl_data,
                   "--task-data": evaluation.task_data}, dtype, evaluation)
    return compare(run.model, run.tokenizer, cfg, chosen, run.calib, Path(out), evaluation, model_name=model,
                   overwrite=overwrite)


@contextmanager
def _prefixed_flags(group: type, other: type, prefix: str) -> Iterator[None]:
    """A ComeError raised in the block names `group`'s flags as the command spells them: the
    fields `other` also has take `prefix` there (compare's --eval-seqlen beside --seqlen)."""
    taken = {f.name for f in cli_fields(other)}
    renamed = {flag_of(f): flag_of(f, prefix) for f in cli_fields(group) if f.name in taken}
    try:
        yield
    except ComeError as exc:
        if not renamed:
            raise
        pattern = "|".join(re.escape(flag) for flag in renamed)
        raise ComeError(re.sub(f"({pattern})(?![\\w-])", lambda m: renamed[m.group(1)], str(exc))) from None
