"""Row blocks for per-token reductions on a CPU.

A reduction over a whole calibration batch ([batch, seq, width], tens of MB) streams it
from memory, and its temporaries (|x|, a cast) are as large again: on a CPU the same
reduction over blocks of rows that stay in cache measured 3-14x faster (SmolLM2 at 4 x 2048
tokens: channel |a| sums 111 -> 7 ms, token cosines 22 -> 4 ms). A GPU gains nothing from it.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

BLOCK_BYTES = 512 * 1024  # one operand's block; the fastest of 128 KiB..2 MiB for both uses above


def row_blocks(*xs: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """The tensors' rows (every leading dim flattened) in matching blocks: one block of the
    whole tensors off the CPU, cache-sized blocks on it."""
    rows = [x.reshape(-1, x.shape[-1]) for x in xs]
    first = rows[0]
    n = first.shape[0] if first.device.type != "cpu" else max(1, BLOCK_BYTES // (first.shape[1] * first.element_size()))
    yield from zip(*(r.split(n) for r in rows))
