"""`come distill` in one process of a `torchrun` launch, watched or cut short the way the
sharding tests need (tests/test_distill_shard.py):

    python -m torch.distributed.run --nproc_per_node 2 tests/shard_worker.py measure OUT.json distill ...
    python -m torch.distributed.run --nproc_per_node 2 tests/shard_worker.py crash - distill ...

measure: after the first optimizer step, each process writes OUT.json.<rank> with the bytes
it holds (its shards only) of the teacher, the student and the trainable state (weights,
gradients, AdamW's moments), and the rise of its resident memory (now and at its peak)
over what it was before the models loaded (run as its own process, as in docs/recovery.md's
"Memory plan": in pytest's process the peak is pytest's). crash: each process kills itself
with SIGKILL as soon as the first checkpoint is written (what `kill -9` leaves, at a known
step).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import resource
import signal
import sys
from collections.abc import Iterable, Iterator

import torch

distill_mod = importlib.import_module("come.recovery.distill")  # the module; `come.distill` is the API function


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this process stores for `tensors`: a sharded tensor's local shard, else all of it."""
    from come.recovery.sharding import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def _rss() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _layer_bytes(model) -> int:
    return local_bytes(p for name, p in model.named_parameters() if ".layers." in name)


@contextlib.contextmanager
def measured(path: str) -> Iterator[None]:
    """Record the bytes held after the first optimizer step into `path`.<rank>, and how far
    the process's resident memory (now, and its peak: ru_maxrss) rose above what it was
    just before the first model loaded."""
    import come.models.checkpoint

    real_step, real_load = distill_mod._Run.step, come.models.checkpoint.load_model
    before_load = []

    def load_model(*args, **kwargs):
        before_load.append(_rss())
        return real_load(*args, **kwargs)

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
                      student_layers=_layer_bytes(run.job.student),
                      peak_rise=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before_load[0],
                      rise=_rss() - before_load[0])
        with open(f"{path}.{os.environ.get('RANK', '0')}", "w") as f:
            json.dump(record, f)

    distill_mod._Run.step, come.models.checkpoint.load_model = step, load_model
    try:
        yield
    finally:
        distill_mod._Run.step, come.models.checkpoint.load_model = real_step, real_load


@contextlib.contextmanager
def crash_after_first_checkpoint() -> Iterator[None]:
    real = distill_mod.write_checkpoint

    def write_then_die(*args) -> None:
        real(*args)
        os.kill(os.getpid(), signal.SIGKILL)

    distill_mod.write_checkpoint = write_then_die
    yield


def main(argv: list[str]) -> None:
    from come.cli.app import app

    how, path, *command = argv
    with measured(path) if how == "measure" else crash_after_first_checkpoint():
        app(command)


if __name__ == "__main__":
    main(sys.argv[1:])
