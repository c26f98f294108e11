"""Rewritten layers of a file-mapped checkpoint kept file-mapped (issue 40: bigger than the machine).

A checkpoint loaded in its own dtype is mapped copy on write (transformers + safetensors): its
pages are the file's, clean, and the kernel drops them under memory pressure and reads them
again when needed. A write into them turns every written page into anonymous memory held for
the rest of the run: about 0.4 GB for each merged layer of a 7B model in bf16. So
`Adapter.write_layer` gives a mapped parameter fresh memory instead of writing into it
(`file_mapped`), and once a merge step is done with its layer, `LayerSpill.remap` writes the
layer to a safetensors file in its own temporary directory, maps that file in place of the fresh
memory and unlinks it: the layer's pages are clean file pages again (the file lives on while
mapped, and goes with its last mapping), and nothing stays on disk. The bytes never change.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

MAPS = Path("/proc/self/maps")


def file_mapped(tensors: list[Tensor]) -> list[bool]:
    """Whether each tensor's memory lies in a mapping of a regular file (Linux's
    /proc/self/maps; False elsewhere, for device tensors, and for shared memory under /dev)."""
    try:
        lines = MAPS.read_text().splitlines()
    except OSError:
        return [False] * len(tensors)
    spans = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/") and not parts[5].startswith(("/dev/", "/memfd:")):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            spans.append((lo, hi))
    return [t.device.type == "cpu" and t.numel() > 0 and any(lo <= t.data_ptr() < hi for lo, hi in spans)
            for t in tensors]


class LayerSpill:
    """A temporary directory of this run's own, for `remap` (in `folder`, --cache-dir, when given:
    the system's temporary folder may be memory, tmpfs); `close` removes it."""

    def __init__(self, folder: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="come-layers-", dir=folder))
        self.count = 0

    def remap(self, layer: nn.Module) -> None:
        """Write `layer`'s parameters to a file, map them back in place of their memory, and
        unlink the file (module docstring)."""
        params = dict(layer.named_parameters())
        path = self.dir / f"layer-{self.count}.safetensors"
        self.count += 1
        try:
            save_file({n: p.detach().contiguous() for n, p in params.items()}, str(path))
            mapped = load_file(str(path))
        finally:
            path.unlink(missing_ok=True)
        with torch.no_grad():
            for name, p in params.items():
                p.data = mapped[name]

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
