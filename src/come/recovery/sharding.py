"""Sharded distillation (`come distill --shard`) on PyTorch FSDP2: every decoder layer of the
student and of the frozen teacher is split over the processes (each holds 1/N of its
weights, and of the student's gradients and AdamW state), all-gathered for its own forward
and backward only; checkpoints are written shard by shard with torch.distributed.checkpoint
(DCP), and the result is gathered back into one whole model (in every process; the main
one writes it).

Why `fully_shard` directly and not accelerate's FSDP2 plugin: accelerate (1.16) switches to
FSDP only for GPU-type process groups (AcceleratorState: MULTI_CPU is not among them), so on
CPU / gloo the plugin would do nothing and the tests could not run; and the plugin shards
what `accelerator.prepare` is given, one model run through its own forward. Distillation runs two
models and calls their parts on their own: mp runs a single decoder layer on the teacher's
activations, and both modes apply the final norm and the LM head to one chunk of tokens at
a time, outside the model's forward. So every decoder layer is its own FSDP unit (its own
root): it gathers its weights whenever it runs, whoever calls it. The embeddings, final norm
and LM head stay whole in every process: they are frozen (--shard refuses --train
last:K,head), and the heads run chunk by chunk outside any unit (documented in
docs/recovery.md with the measured cost).

Precision: fp32 on CPU; with bf16 (CUDA's default) MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32): the weights are gathered in bf16, gradients reduced in fp32 into the
fp32 shards that AdamW updates.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..errors import ComeError


def check_processes(cfg, processes: int) -> None:
    """--shard splits the layers over the processes: one process has nothing to split with
    (checked before any weight loads)."""
    if cfg.shard and processes < 2:
        raise ComeError("--shard needs 2 or more processes: launch with `torchrun --nproc_per_node N -m come.cli.app "
                        "distill ... --shard`, or drop --shard")


def shard_models(models: Iterable[nn.Module], layers_of, device: torch.device, bf16: bool) -> None:
    """Shard every decoder layer (`layers_of(model)`) of each model over all processes, in
    place; FSDP2 moves each layer to `device` as it shards it, so a whole model never sits
    there. The rest of each model (embeddings, final norm, head) moves to `device` whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for model in models:
        for layer in layers_of(model):
            # said explicitly: a root unit otherwise keeps its weights gathered after forward, and a
            # teacher layer, with no backward to free them, would keep them whole for good
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        model.to(device)


def local(t: Tensor) -> Tensor:
    """This process's part of `t`: its shard when `t` is sharded, else `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Every element finite (one device sync); over all processes when the tensors are shards
    (every process then gets the same answer, so all stop together)."""
    tensors = list(tensors)
    finite = torch.stack([local(t.detach()).isfinite().all() for t in tensors]).all()
    if any(isinstance(t, DTensor) for t in tensors):
        finite = finite.int()
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite)


def gathered(model: nn.Module) -> nn.Module:
    """The whole model out of a sharded one, in every process: each sharded tensor is
    all-gathered in turn and copied to the CPU (device memory holds one whole tensor at a
    time) into a plain model of the same class, built on the meta device and given the
    tensors: the CPU then holds one whole student per process, as it did before sharding."""
    state = {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
             for name, t in model.state_dict().items()}
    with torch.device("meta"):
        plain = type(model)(model.config)
    plain.load_state_dict(state, strict=True, assign=True)
    for name, buffer in model.named_buffers():  # the non-persistent ones (rotary frequencies) are in no state dict
        owner, _, attr = name.rpartition(".")
        setattr(plain.get_submodule(owner), attr, buffer.cpu())
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


class ShardedCheckpoint:
    """The sharded part of a training state (the trainable layers' weights and the optimizer's
    state), written with DCP: each process writes its own shards into the checkpoint folder
    and reads them back, so no process ever holds the whole state. DCP could reshard to
    another process count, but the data order and the record are per process count, and
    --resume refuses another one (train_state.resume_point)."""

    def __init__(self, layers: dict[int, nn.Module], optimizer: torch.optim.Optimizer):
        self.module = nn.ModuleDict({str(k): layer for k, layer in layers.items()})  # one tree for DCP's names
        self.optimizer = optimizer

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        weights, optimizer = get_state_dict(self.module, self.optimizer)
        return {"layers": weights, "optimizer": optimizer}

    def save(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(folder))

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._state()  # the shapes to read into (and the optimizer's state, created empty)
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["layers"],
                       optim_state_dict=state["optimizer"])
