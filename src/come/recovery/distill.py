"""Hierarchical distillation (method.md section 5): the compressed model recovers by
imitating the original one, layer group by layer group.

The Plan says which contiguous original layers G_k each student layer k stands for, so
the teacher's hidden state at the end of G_k is the target of the student's layer k.
- sp (CoMe-sp): one student forward, all trainable layers at once, loss =
  KL(teacher || student) on the final logits + lambda * sum of the layer losses at the
  correspondence points after the first trainable layer (the last point IS the final
  logits, so it is not counted twice).
- mp (CoMe-mp): per batch the teacher runs once and its activations are streamed: each
  trainable layer alone maps the teacher's input of G_k to the teacher's output of G_k,
  with its own backward, so activation memory is one layer's.
The layer loss is a KL through the final norm + LM head (frozen, but for the head under
--train last:K,head) or a normalized MSE on hidden states. KL is computed in fp32, chunk
by chunk over tokens, each chunk differentiated as soon as it is computed
(distill_losses.head_kl), so full-vocabulary logits never exist for more than one chunk
and are never recomputed. To seed those gradients, each loss term is told the gradient
its backward will give it.

This module is the loop; the settings live in distill_config, the losses in
distill_losses, checkpoints and the written result in train_state, LoRA in trainable,
the token windows in data.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import ComeError
from ..models.adapters import Adapter, get_adapter
from ..models.api_inputs import expect, expect_model, expect_token_ids
from ..models.data import shuffled_batch, training_windows
from ..settings.device import resolve_device
from ..settings.distill_config import DistillConfig, train_set
from ..settings.options import check_context
from ..settings.plan import Plan
from .distill_losses import head_kl, head_terms, normalized_mse
from .sharding import ShardedCheckpoint, all_finite, check_processes, gathered, shard_models
from .train_state import TrainState, last_complete, restore, write_checkpoint
from .trainable import activation_checkpointing, make_trainable, seeded_rng, train_head

_log = logging.getLogger("come")


def check_pair(teacher_config, student_config, plan: Plan) -> None:
    """Teacher, student and Plan must describe one compression: checked on configs, so the
    CLI can refuse before any weight is loaded."""
    get_adapter(student_config)
    for key in ("model_type", "hidden_size", "vocab_size"):
        t, s = getattr(teacher_config, key, None), getattr(student_config, key, None)
        if t != s:
            raise ComeError(f"teacher {key} {t} != student {key} {s}: "
                            "--teacher must be the model the student was compressed from")
    groups, n_t, n_s = plan.groups, teacher_config.num_hidden_layers, student_config.num_hidden_layers
    if len(groups) != n_s or [i for g in groups for i in g] != list(range(n_t)):
        raise ComeError(f"the Plan's groups {groups} do not map the student's {n_s} layers onto the teacher's {n_t} "
                        "contiguous layers: wrong --plan or --teacher")


def check_tokenizers(teacher_tokenizer, student_tokenizer) -> None:
    """Distilling logits needs one vocabulary: same token ids for the same strings."""
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ComeError("teacher and student tokenizers differ: --teacher must be the model the student was compressed from")


def launcher_processes(env: Mapping[str, str]) -> tuple[int, str]:
    """(how many processes the launcher asked for, the variable that says so), from its
    environment: a world size (torchrun, mpirun), else at least 2 when `accelerate launch`
    set a rendezvous port (it does only for --num_processes > 1) and started the script
    itself, as one process (with --cpu and no --mpirun_hostfile), else 1."""
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if env.get(var, "").isdigit():
            return int(env[var]), f"{var}={env[var]}"
    if "ACCELERATE_USE_CPU" in env and "MASTER_PORT" in env:
        return 2, "accelerate launch set MASTER_PORT, for --num_processes > 1"
    return 1, ""


def process_count(device: str) -> int:
    """How many processes train on `device` (a --device name), asked of accelerate as distill()
    asks it: on CPU, accelerate sees torchrun's processes only when told cpu=True."""
    from accelerate import PartialState

    return PartialState(cpu=resolve_device(device).type == "cpu").num_processes


def _say_processes(accelerator, cfg: DistillConfig) -> None:
    """One line on how many processes train; one warning when the launcher asked for more."""
    n, (asked, why) = accelerator.num_processes, launcher_processes(os.environ)
    if not accelerator.is_main_process:
        return
    _log.info("distill %s: %d process%s on %s, %d windows of %d tokens per optimizer step", cfg.mode, n,
              "" if n == 1 else "es", accelerator.device.type, cfg.batch_size * cfg.grad_accum * n, cfg.seqlen)
    if asked > n:
        _log.warning("only %d distill process%s started, the launcher asked for more (%s): `accelerate launch --cpu` "
                     "starts one unless MPI runs it (--mpirun_hostfile); on CPU use `torchrun --nproc_per_node N -m "
                     "come.cli.app distill ... --device cpu`", n, "" if n == 1 else "es", why)


# ---- running the models ------------------------------------------------------------------------

def _hidden(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


class _Stop(Exception):
    """Raised by _record's hook once every state it wants is captured: the layers after it need not run."""


def _record(model: nn.Module, adapter: Adapter, ids: Tensor, bounds: set[int],
            with_kwargs: bool = False) -> tuple[dict[int, Tensor], dict[int, dict]]:
    """Run the decoder stack (no LM head) as far as needed and return the hidden states at
    layer boundaries `bounds` (b = the state entering layer b; b = n_layers = the last
    layer's output, before the final norm) and, if asked, the keyword arguments each of
    those layers received (rotary embeddings, mask), so a single layer can later be run on
    its own."""
    layers = adapter.decoder_layers(model)
    states: dict[int, Tensor] = {}
    kwargs: dict[int, dict] = {}
    last = max(bounds)

    def before(b, _module, args, kw):
        states[b] = args[0] if args else kw["hidden_states"]
        if with_kwargs:
            kwargs[b] = {k: v for k, v in kw.items() if k != "hidden_states"}
        if b == last:
            raise _Stop

    hooks = [layers[b].register_forward_pre_hook(partial(before, b), with_kwargs=True, prepend=True)  # before FSDP's
             for b in bounds if b < len(layers)]
    if len(layers) in bounds:
        hooks.append(layers[-1].register_forward_hook(lambda _m, _a, out: states.__setitem__(len(layers), _hidden(out))))
    try:
        adapter.backbone(model)(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return states, kwargs


def trainable_layers(groups: list[list[int]], train: str) -> list[int]:
    """The student layers that train: every one (--train all), the last K (last:K), or those
    standing for more than one (merged; a Plan without one is refused: nothing would train).
    last:K is checked below the layer count first (DistillConfig.check_student)."""
    spec = train_set(train)
    if spec.layers == "last":
        return list(range(len(groups) - spec.last, len(groups)))
    layers = [k for k, g in enumerate(groups) if spec.layers == "all" or len(g) > 1]
    if not layers:
        raise ComeError("the Plan has no merged layer to train; use --train all")
    return layers


class _Distiller:
    """The two modes' losses for one teacher / student pair, and the held-out evaluation."""

    def __init__(self, teacher: nn.Module, student: nn.Module, adapter: Adapter, groups: list[list[int]],
                 cfg: DistillConfig, autocast):
        self.teacher, self.student, self.adapter, self.cfg, self.autocast = teacher, student, adapter, cfg, autocast
        self.n_t, self.n_s = sum(len(g) for g in groups), len(groups)
        self.starts = [g[0] for g in groups]
        self.ends = self.starts[1:] + [self.n_t]
        self.trainable = trainable_layers(groups, cfg.train)
        alone = [k for k in self.trainable if len(groups[k]) == 1]
        if cfg.mode == "mp" and train_set(cfg.train).layers == "last" and alone:
            _log.warning("mp: layers %s of --train %s stand for one original layer each, so they see the teacher's "
                         "own input and target and do not change; use --mode sp to train them", alone, cfg.train)
        self.points = range(self.trainable[0], self.n_s - 1)  # layer-loss points upstream of the final logits
        self.head_t = nn.Sequential(adapter.final_norm(teacher), adapter.lm_head(teacher))
        self.head_s = nn.Sequential(adapter.final_norm(student), adapter.lm_head(student))

    def kl(self, h_t: Tensor, h_s: Tensor, upstream: Tensor) -> Tensor:
        """Mean per-token KL(teacher || student) through the heads, times T^2 (so gradients
        keep their scale across temperatures). `upstream`: the gradient the backward will
        give the result (head_kl seeds the chunks' gradients with it)."""
        t, n = self.cfg.temperature, h_s[..., 0].numel()
        seed = upstream / n * t * t  # autograd's order for the gradient of `kl * t * t / n` below
        return head_kl(self.head_t, self.head_s, h_t, h_s, t, self.cfg.kl_chunk, seed) * t * t / n

    def layer_loss(self, h_t: Tensor, h_s: Tensor, upstream: Tensor) -> Tensor:
        return self.kl(h_t, h_s, upstream) if self.cfg.layer_loss == "kl" else normalized_mse(h_t, h_s)

    def backward(self, ids: Tensor, scale: float) -> float:
        """Forward + backward of one micro-batch (gradients scaled by `scale`); the loss value."""
        return self._sp(ids, scale) if self.cfg.mode == "sp" else self._mp(ids, scale)

    def _sp(self, ids: Tensor, scale: float) -> float:
        lw = self.cfg.layer_weight
        points = self.points if lw else ()  # a zero weight adds exact zeros: skip the work
        upstream = torch.ones((), device=ids.device) * scale  # what (loss * scale).backward() gives `loss`
        with self.autocast():
            with torch.no_grad():
                t, _ = _record(self.teacher, self.adapter, ids, {self.ends[k] for k in points} | {self.n_t})
            s, _ = _record(self.student, self.adapter, ids, {k + 1 for k in points} | {self.n_s})
            loss = self.kl(t[self.n_t], s[self.n_s], upstream)
            if points:
                loss = loss + lw * sum(self.layer_loss(t[self.ends[k]], s[k + 1], upstream * lw) for k in points)
        (loss * scale).backward()
        return float(loss.detach())

    def _mp(self, ids: Tensor, scale: float) -> float:
        bounds = {self.starts[k] for k in self.trainable} | {self.ends[k] for k in self.trainable}
        with self.autocast(), torch.no_grad():
            t, kw = _record(self.teacher, self.adapter, ids, bounds, with_kwargs=True)
        layers, losses = self.adapter.decoder_layers(self.student), []
        upstream = torch.ones((), device=ids.device) * scale
        for k in self.trainable:
            with self.autocast():
                loss = self.layer_loss(t[self.ends[k]], _hidden(layers[k](t[self.starts[k]], **kw[self.starts[k]])),
                                       upstream)
            (loss * scale).backward()
            losses.append(loss.detach())
        total = 0.0
        for value in torch.stack(losses).tolist():  # one device sync; summed in order (sum() compensates from 3.12)
            total += value
        return total

    @torch.no_grad()
    def held_out(self, windows: Tensor, student: bool = True) -> Tensor:
        """[KL sum, NLL sum] over `windows` (NLL of the student, or of the teacher itself)."""
        head = self.head_s if student else self.head_t
        total = torch.zeros(2, dtype=torch.float64)
        self.student.eval()
        for ids in windows.split(self.cfg.batch_size):
            ids = ids.to(self.device)
            targets = F.pad(ids[:, 1:], (0, 1), value=-100)
            with self.autocast():
                h_t = _record(self.teacher, self.adapter, ids, {self.n_t})[0][self.n_t]
                h_s = _record(self.student, self.adapter, ids, {self.n_s})[0][self.n_s] if student else h_t
                total += head_terms(self.head_t, head, h_t, h_s, 1.0, self.cfg.kl_chunk, targets).double().cpu()
        self.student.train()
        return total

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device


# ---- the loop ----------------------------------------------------------------------------------

def _stopped(state: TrainState, cfg: DistillConfig, problem: str) -> ComeError:
    """The one line of a run whose loss, held-out score or weights left the finite numbers; nothing
    more is written (the checkpoints before it were checked the same way, so they are good)."""
    kept = last_complete(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    return ComeError(f"distillation stopped at step {state.step}: {problem}; nothing written"
                     f"{f', the last good checkpoint is {kept}' if kept else ''}; lower --lr (or --max-grad-norm) "
                     "and start over")


def _finite(value: float, what: str, state: TrainState, cfg: DistillConfig) -> None:
    if not math.isfinite(value):
        raise _stopped(state, cfg, f"{what} is {value}, not a finite number")


def _check_weights(layers: Mapping[int | str, nn.Module], state: TrainState, cfg: DistillConfig) -> None:
    """Every trained weight finite (one device sync): checked before each checkpoint and the result."""
    if not all_finite(p for layer in layers.values() for p in layer.parameters()):
        raise _stopped(state, cfg, "a trained weight is NaN or infinite")


def _ppl(mean_nll: float) -> float:
    """exp(mean NLL); infinity where that overflows a float (math.exp would raise)."""
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


class _Run:
    """One training run: optimizer steps over data-parallel micro-batches, held-out evaluation."""

    def __init__(self, accelerator, job: _Distiller, state: TrainState, windows: tuple[Tensor, Tensor],
                 clip_groups: list[list[Tensor]], bar):
        self.acc, self.job, self.state, self.bar, self.clip_groups = accelerator, job, state, bar, clip_groups
        self.train_w, self.eval_w = windows
        self.cfg = job.cfg
        self.per_step = self.cfg.batch_size * self.cfg.grad_accum * accelerator.num_processes

    def step(self) -> None:
        """One optimizer step; gradients averaged over processes once, after accumulation."""
        cfg, acc, state = self.cfg, self.acc, self.state
        t0, loss = time.perf_counter(), 0.0
        for micro in range(cfg.grad_accum):
            first = state.step * self.per_step + (micro * acc.num_processes + acc.process_index) * cfg.batch_size
            ids = shuffled_batch(self.train_w, first, cfg.batch_size, cfg.seed).to(acc.device)
            loss += self.job.backward(ids, 1.0 / cfg.grad_accum) / cfg.grad_accum
        for group in self.clip_groups:
            if acc.num_processes > 1 and not cfg.shard:  # sharded gradients arrive averaged
                for p in group:
                    p.grad = acc.reduce(p.grad, "mean")
            torch.nn.utils.clip_grad_norm_(group, cfg.max_grad_norm)
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        loss = acc.reduce(torch.tensor(loss, device=acc.device), "mean").item()
        state.step += 1
        _finite(loss, "the training loss", state, cfg)
        log_ = state.log
        log_["tokens_seen"] += self.per_step * cfg.seqlen
        log_["train_time_s"] += time.perf_counter() - t0
        log_["tokens_per_s"] = log_["tokens_seen"] / log_["train_time_s"]
        log_["train"].append({"step": state.step, "loss": loss, "lr": state.scheduler.get_last_lr()[0]})
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{log_['tokens_per_s']:.0f}")

    def evaluate(self) -> None:
        """Held-out KL to the teacher and perplexity (the teacher's own, once), sharded over processes."""
        acc, log_, w = self.acc, self.state.log, self.eval_w
        mine, n_pred = w[acc.process_index::acc.num_processes], w.shape[0] * (w.shape[1] - 1)
        kl, nll = acc.reduce(self.job.held_out(mine).to(acc.device), "sum").tolist()
        if log_["teacher_ppl"] is None:
            t_nll = acc.reduce(self.job.held_out(mine, student=False).to(acc.device), "sum")[1].item()
            log_["teacher_ppl"] = _ppl(t_nll / n_pred)
            _finite(log_["teacher_ppl"], "the teacher's held-out ppl", self.state, self.cfg)
        entry = {"step": self.state.step, "tokens": log_["tokens_seen"], "kl": kl / w.numel(), "ppl": _ppl(nll / n_pred)}
        for key in ("kl", "ppl"):
            _finite(entry[key], f"the held-out {key}", self.state, self.cfg)
        log_["eval"].append(entry)
        if acc.is_main_process:
            self.bar.write(f"step {entry['step']}: held-out KL {entry['kl']:.4f}, ppl {entry['ppl']:.3f} "
                           f"(teacher {log_['teacher_ppl']:.3f})")


def distill(teacher: nn.Module, student: nn.Module, tokenizer, plan: Plan, cfg: DistillConfig,
            windows: tuple[Tensor, Tensor] | None = None) -> tuple[nn.Module, dict]:
    """Train `student` (a `come compress` output with `plan`) to imitate `teacher` on
    `windows` (training, held-out; default: training_windows(cfg, tokenizer)).

    Both models move to the device (and to fp32 when computing in fp32); the trainable
    layers train in fp32 (master weights under bf16 autocast), and the student returns
    to its stored dtype at the end, so untouched weights come back bit-identical. With
    cfg.lora_r > 0 only LoRA adapters on those layers' projections train, and they are
    merged into the weights before the return: same architecture, same parameter names.
    Returns the student and the log written as distill_log.json.

    Under `accelerate launch` / `torchrun` every process takes its own share of each batch
    and gradients are averaged once per optimizer step. The student is deliberately not
    wrapped in DDP: mp runs single layers outside the model's forward, which DDP cannot
    follow. With cfg.shard every decoder layer of both models is split over the processes
    (sharding.py; the teacher is left sharded), and every process gets the whole student back.
    """
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    expect(cfg, DistillConfig, "cfg")
    expect(plan, Plan, "plan")
    cfg.validate()
    check_pair(expect_model(teacher, "teacher").config, expect_model(student, "student").config, plan)
    cfg.check_student(student.config)
    device = resolve_device(cfg.device)
    bf16 = cfg.bf16(device.type)
    accelerator = Accelerator(cpu=device.type == "cpu")  # its mixed_precision is process-wide: autocast is ours
    _say_processes(accelerator, cfg)
    check_processes(cfg, accelerator.num_processes)
    autocast = partial(torch.autocast, accelerator.device.type, dtype=torch.bfloat16, enabled=bf16)
    adapter = get_adapter(student.config)
    windows = windows if windows is not None else training_windows(cfg, tokenizer)
    for part, name in zip(windows, ("the training windows", "the held-out windows")):
        check_context(student.config, expect_token_ids(part, student, name).shape[1])

    stored = next(student.parameters()).dtype
    for model in (teacher, student):
        model.to(None if cfg.shard else accelerator.device, None if bf16 else torch.float32).requires_grad_(False)
    teacher.eval()
    student.train()
    job = _Distiller(teacher, student, adapter, plan.groups, cfg, autocast)
    layers: dict[int | str, nn.Module] = {k: adapter.decoder_layers(student)[k].float() for k in job.trainable}
    lora = make_trainable(student, list(layers.values()), cfg)
    if train_set(cfg.train).head:
        layers["head"] = train_head(student)
    if cfg.gradient_checkpointing:
        activation_checkpointing(student, True)
    if cfg.shard:
        shard_models((teacher, student), adapter.decoder_layers, accelerator.device, bf16)
    per_layer = [[p for p in layer.parameters() if p.requires_grad] for layer in layers.values()]
    params = [p for group in per_layer for p in group]

    steps = cfg.total_steps(accelerator.num_processes)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup * steps), steps)
    state = TrainState(layers, optimizer, scheduler, {
        "settings": cfg.to_dict(), "groups": plan.groups, "trainable_layers": job.trainable, "steps": steps,
        "processes": accelerator.num_processes, "train": [], "eval": [], "tokens_seen": 0, "train_time_s": 0.0,
        "tokens_per_s": None, "teacher_ppl": None, "eval_tokens": int(windows[1].numel()), "resumed_from": None},
        {"settings": cfg.run_settings(), "precision": "bf16" if bf16 else "fp32", "processes": accelerator.num_processes},
        ShardedCheckpoint(layers, optimizer) if cfg.shard else None)
    accelerator.register_for_checkpointing(state)
    with seeded_rng(cfg.seed + accelerator.process_index, accelerator.device):  # LoRA dropout's masks
        restore(accelerator, state, cfg)
        bar = tqdm(total=steps, initial=state.step, desc=f"distill {cfg.mode}", unit="step",
                   disable=not accelerator.is_main_process)
        run = _Run(accelerator, job, state, windows, per_layer if cfg.mode == "mp" else [params], bar)
        if not state.log["eval"]:
            run.evaluate()
        while state.step < steps:
            run.step()
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < steps:
                run.evaluate()
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < steps:
                _check_weights(layers, state, cfg)
                write_checkpoint(accelerator, state, cfg.checkpoint_dir)
        if state.log["eval"][-1]["step"] != state.step:
            run.evaluate()
        bar.close()

    if cfg.gradient_checkpointing:
        activation_checkpointing(student, False)
    if lora is not None:
        lora.merge_and_unload()  # in place: W += alpha / r * B A (in fp32), the peft wrappers give way to plain Linears
    if cfg.shard:  # one whole student again, in every process
        student = gathered(student)
        layers = {k: adapter.decoder_layers(student)[k] for k in layers}
    student.requires_grad_(False).to(stored)
    _check_weights(layers, state, cfg)  # in the stored dtype: fp16 overflows where fp32 did not
    return student.eval(), state.log

