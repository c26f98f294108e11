"""The compute device: which one a `--device` name stands for on this machine.

Its own module, since the settings floor (config.py, distill_config.py) checks names
without torch, while this needs torch to ask for CUDA: the layer that runs the work
(compression.resolve, the runner, distillation, `come eval`) resolves the name here."""

from __future__ import annotations

import torch

from .errors import ComeError
from .options import check_device_name


def resolve_device(name: str) -> torch.device:
    """The compute device layers visit: `auto` takes CUDA when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ComeError("--device cuda requested but CUDA is not available; use --device cpu")
    check_device_name(name)
    return torch.device(name)
