"""`come distill` in one process of a `torchrun` launch, watched or cut short the way the
sharding tests need (tests/test_distill_shard.py):

    python -m torch.distributed.run --nproc_per_node 2 tests/shard_worker.py measure OUT.json distill ...
    python -m torch.distributed.run --nproc_per_node 2 tests/shard_worker.py crash - distill ...

measure: after the first optimizer step, each process writes OUT.json.<rank> with the bytes
it holds (its shards only) of the teacher, the student and the trainable state (weights,
gradients, AdamW's moments). crash: each process kills itself with SIGKILL as soon as the first
checkpoint is written (what `kill -9` leaves, at a known step).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import sys
from collections.abc import Iterable, Iterator

import torch

distill_mod = importlib.import_module("come.distill")  # the module; `come.distill` is the API function


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this process stores for `tensors`: a sharded tensor's local shard, else all of it."""
    from come.sharding import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def _layer_bytes(model) -> int:
    return local_bytes(p for name, p in model.named_parameters() if ".layers." in name)


@contextlib.contextmanager
def measured(path: str) -> Iterator[None]:
    """Record the bytes held after the first optimizer step into `path`.<rank>."""
    real_step = distill_mod._Run.step

    def step(run) -> None:
        if run.state.step:
            return real_step(run)
        opt = run.state.optimizer
        params = [p for group in opt.param_groups for p in group["params"]]
        record = {}

        def before(*_) -> None:
            record["gradients"] = local_bytes(p.grad for p in params)

        def after(*_) -> None:
            moments = (t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
            record["optimizer"] = local_bytes(moments)  # AdamW's two moments; its step counts are scalars

        hooks = [opt.register_step_pre_hook(before), opt.register_step_post_hook(after)]
        try:
            real_step(run)
        finally:
            for hook in hooks:
                hook.remove()
        record.update(trainable_weights=local_bytes(params), teacher=local_bytes(run.job.teacher.parameters()),
                      student=local_bytes(run.job.student.parameters()), teacher_layers=_layer_bytes(run.job.teacher),
                      student_layers=_layer_bytes(run.job.student))
        with open(f"{path}.{os.environ.get('RANK', '0')}", "w") as f:
            json.dump(record, f)

    distill_mod._Run.step = step
    try:
        yield
    finally:
        distill_mod._Run.step = real_step


@contextlib.contextmanager
def crash_after_first_checkpoint() -> Iterator[None]:
    real = distill_mod.write_checkpoint

    def write_then_die(*args) -> None:
        real(*args)
        os.kill(os.getpid(), signal.SIGKILL)

    distill_mod.write_checkpoint = write_then_die
    yield


def main(argv: list[str]) -> None:
    from come.cli import app

    how, path, *command = argv
    with measured(path) if how == "measure" else crash_after_first_checkpoint():
        app(command)


if __name__ == "__main__":
    main(sys.argv[1:])
