"""Where a module's weights sit while it works: `on_device` brings a layer (or any module) to
the compute device for a block of work and puts it back home after, so a model loaded in host
memory visits the device one layer at a time (the runner, the calibration loss, backprop)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def on_device(module: nn.Module, device: torch.device):
    """Temporarily move `module` to `device` (no-op when it is already there), for work that
    reads its weights (every caller: passes, refit statistics, gradients of the inputs).

    Its parameters get their home tensors back as they were rather than copies of the device's:
    nothing is copied back, and a layer mapped from its checkpoint file stays mapped (a copy
    back would give every layer a GPU visits fresh host memory: the whole model, after one
    pass). Buffers (rotary frequencies) get theirs back too."""
    params = [(m, name, p, p.data) for m in module.modules() for name, p in m._parameters.items() if p is not None]
    buffers = [(m, name, b) for m in module.modules() for name, b in m._buffers.items() if b is not None]
    module.to(device)
    try:
        yield module
    finally:  # `to` swaps a parameter's data in place (cpu <-> cuda) or makes a new parameter: undo either
        for m, name, p, data in params:
            p.data = data
            m._parameters[name] = p
        for m, name, b in buffers:
            m._buffers[name] = b
