"""Bigger than the machine (issue 40, benchmarks/streamed.py): a checkpoint loaded in its own
dtype is MAPPED, not read, copy on write, so a layer's pages come in when it runs and the kernel
may drop them again; what a run allocates itself is what must fit. Measured on the 7B shape in
BENCHMARKS.md; here, the properties it rests on and one capped run."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def random_model(smollm2_dir, tmp_path_factory) -> Path:
    """The `tiny` shape written by `streamed.py make` (bf16, a shard per layer), SmolLM2's tokenizer."""
    out = tmp_path_factory.mktemp("streamed") / "tiny"
    done = subprocess.run([sys.executable, str(BENCH / "streamed.py"), "make", "--out", str(out), "--shape", "tiny",
                           "--tokenizer", str(smollm2_dir)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _mappings(directory: Path) -> list[tuple[int, int]]:
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if str(directory) in line:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            spans.append((start, end))
    return spans


def _anon_mb() -> float:
    return int(re.search(r"RssAnon:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_weights_load_mapped_and_writes_never_reach_the_file(random_model):
    from come.models.checkpoint import load_model, load_tokenizer

    index = json.loads((random_model / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 14  # the embedding, 12 layers, the head: one shard each
    tok = load_tokenizer(str(random_model))
    before = _anon_mb()
    model, _ = load_model(str(random_model), tokenizer=tok)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    spans = _mappings(random_model)
    unmapped = [n for n, p in model.named_parameters()
                if not any(a <= p.untyped_storage().data_ptr() < b for a, b in spans)]
    assert model.dtype == torch.bfloat16 and not unmapped
    assert _anon_mb() - before < 0.25 * weights_mb  # not read into memory
    shard = random_model / index["weight_map"]["model.layers.3.mlp.down_proj.weight"]
    digest = hashlib.sha256(shard.read_bytes()).hexdigest()
    with torch.no_grad():  # what a merge or a refit does to a layer: copy on write, the input untouched
        model.model.layers[3].mlp.down_proj.weight.mul_(2)
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == digest


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/sys/fs/cgroup/memory", os.W_OK),
                    reason="needs a writable cgroup-v1 memory controller (root)")
def test_compress_runs_under_a_memory_cap(random_model, tmp_path):
    """`streamed.py run`: compress, one dense pass and the reload, each inside a 1.5 GB cgroup cap."""
    out = tmp_path / "come"
    done = subprocess.run([sys.executable, str(BENCH / "streamed.py"), "run", "--model", str(random_model), "--out",
                           str(out), "--cap-gb", "1.5", "--sparsity", "0.25", "--nsamples", "4", "--seqlen", "64",
                           "--max-cache-gb", "0.05", "--json", str(tmp_path / "row.json")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads((tmp_path / "row.json").read_text())
    assert row["compress"]["rc"] == 0 and row["compress"]["oom_kills"] == 0, row
    assert row["compress"]["cgroup_peak_gb"] <= 1.5 and row["dense_pass_s"] > 0
    assert 0 < row["layers_after"] < 12
