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



@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_a_rewritten_layer_is_mapped_from_a_file_again(random_model):
    """write_layer never writes into a mapped checkpoint's pages (they would stay anonymous
    memory); LayerSpill.remap maps the new values from a file of its own, which it unlinks, and
    close removes its directory."""
    from come.models.adapters import get_adapter
    from come.models.checkpoint import load_model, load_tokenizer
    from come.models.mapped import LayerSpill, file_mapped

    model, _ = load_model(str(random_model), tokenizer=load_tokenizer(str(random_model)))
    adapter = get_adapter(model.config)
    layer = adapter.decoder_layers(model)[3]
    shard = random_model / "model-00005-of-00014.safetensors"  # layer 3's
    digest = hashlib.sha256(shard.read_bytes()).hexdigest()
    assert all(file_mapped(list(layer.parameters())))
    new = adapter.read_layer(layer).map(lambda t: t.double() * 3 + 1)
    adapter.write_layer(layer, new)
    written = {n: p.detach().clone() for n, p in layer.named_parameters()}
    assert not any(file_mapped(list(layer.parameters())))  # fresh memory, the file's pages untouched
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == digest
    spill = LayerSpill()
    spill.remap(layer)
    assert all(file_mapped(list(layer.parameters()))) and not list(spill.dir.iterdir())
    assert all(torch.equal(p, written[n]) for n, p in layer.named_parameters())
    assert torch.equal(adapter.read_layer(layer).down, new.down.to(torch.bfloat16))
    spill.close()
    assert not spill.dir.exists()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
@pytest.mark.parametrize("spec", [{"refit": "none"}, {}, {"method": "shortgpt", "refit": "ls"}, {"method": "laco"}],
                         ids=["come-refit-none", "come", "shortgpt-refit", "laco"])
def test_a_mapped_model_compresses_to_the_same_bytes_with_its_merged_layers_mapped(random_model, monkeypatch, spec):
    """The loop remaps every merged layer of a mapped checkpoint; the weights and the Plan are
    those of the same run on the model read into memory (merges, refits, drops, and a method
    reading the original layers)."""
    from come import CompressConfig, compress
    from come.engine import pipeline
    from come.models.checkpoint import load_model, load_tokenizer
    from come.models.mapped import file_mapped
    from conftest import plan_record

    tok = load_tokenizer(str(random_model))
    calib = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(sparsity=0.25, device="cpu", batch_size=2, **spec)
    mapped, plan = compress(load_model(str(random_model), tokenizer=tok)[0], tok, cfg, calib=calib)
    merged = {m.position for m in plan.merges}  # a refit layer of a drop method gets fresh memory instead
    assert all(file_mapped(list(layer.parameters())) for k, layer in enumerate(mapped.model.layers)
               if k in merged or not plan.merges)
    in_memory = load_model(str(random_model), tokenizer=tok)[0]
    with torch.no_grad():
        for p in in_memory.parameters():
            p.data = p.detach().clone()
    assert not any(file_mapped(list(in_memory.parameters())))
    spills = []
    monkeypatch.setattr(pipeline, "LayerSpill", lambda *a: spills.append(1))
    read, plan_read = compress(in_memory, tok, cfg, calib=calib)
    assert not spills and plan_record(plan) == plan_record(plan_read)
    assert all(torch.equal(a, b) for a, b in zip(mapped.state_dict().values(), read.state_dict().values()))


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


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_a_layer_back_from_the_device_is_still_mapped(random_model):
    """on_device gives a layer its home tensors back instead of copies of the device's: on a GPU a
    copy back would turn every layer a pass visits into fresh host memory. "meta" stands in for
    the GPU here (nothing can be copied back from it: the old copy-back raised)."""
    from come.models.checkpoint import load_model, load_tokenizer
    from come.models.mapped import file_mapped
    from come.models.placement import on_device

    model, _ = load_model(str(random_model), tokenizer=load_tokenizer(str(random_model)))
    layer = model.model.layers[2]
    before = [p.data_ptr() for p in layer.parameters()]
    with on_device(layer, torch.device("meta")):
        assert all(p.device.type == "meta" for p in layer.parameters())
    assert [p.data_ptr() for p in layer.parameters()] == before and all(file_mapped(list(layer.parameters())))
    assert all(b.device.type == "cpu" for b in layer.buffers())
