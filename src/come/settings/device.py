"""The compute device: which one a `--device` name stands for on this machine.

The settings check a name without torch (options.check_device_name); whether this machine
has the device is asked here, of torch, which loads only when a name is resolved: where a
run starts (specs.resolve), in the runner's set-up, distillation and `come eval`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ComeError
from .options import check_device_name

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    """The compute device layers visit: `auto` takes CUDA when there is one."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ComeError("--device cuda requested but CUDA is not available; use --device cpu")
    check_device_name(name)
    return torch.device(name)
