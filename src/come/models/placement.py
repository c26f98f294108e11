"""Where a module's weights sit while it works: `on_device` brings a layer (or any module) to
the compute device for a block of work and puts it back home after, so a model loaded in host
memory visits the device one layer at a time (the runner, the calibration loss, backprop)."""

from __future__ import annotations

from contextlib import contextmanager
from itertools import chain

import torch
from torch import nn


@contextmanager
def on_device(module: nn.Module, device: torch.device):
    """Temporarily move `module` to `device` (no-op when it is already there)."""
    tensor = next(chain(module.parameters(), module.buffers()), None)
    home = tensor.device if tensor is not None else device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)
