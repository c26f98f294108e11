"""`--cache-dir`: the activation cache's calibration states in memory-mapped files instead of
host memory, so a model whose states do not fit `--max-cache-gb` keeps every batch's dense
states (all the refit's tokens) and every layer input (no re-runs from a distant cache) all the
same, and its weights and Plan are those of an in-memory run with room for everything.

Each cached tensor is copied into its own file under the folder and mapped shared
(`torch.from_file`); the file is unlinked as soon as it is mapped, so the folder never holds
anything come leaves behind (not even after a kill) and a state's disk space is freed when the
cache drops it. Its pages are file pages: the kernel writes them out and evicts them under
pressure instead of counting them against the process's anonymous memory.
"""

from __future__ import annotations

import os
import tempfile

import torch
from torch import Tensor


class DiskStates:
    """Maps the tensors the activation cache keeps into files under `folder` (unlinked at once)."""

    def __init__(self, folder: str):
        self.folder = folder

    def keep(self, batches: list[Tensor]) -> list[Tensor]:
        """File-backed copies of `batches` (one already in a file is kept as it is)."""
        return [self._mapped(t) for t in batches]

    def _mapped(self, t: Tensor) -> Tensor:
        if t.numel() == 0 or t.device.type != "cpu" or t.untyped_storage().filename is not None:
            return t
        fd, path = tempfile.mkstemp(prefix=".come-states-", dir=self.folder)
        try:
            os.ftruncate(fd, t.numel() * t.element_size())
            out = torch.from_file(path, shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
        finally:
            os.unlink(path)
            os.close(fd)
        return out.copy_(t)

