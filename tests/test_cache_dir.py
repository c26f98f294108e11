"""`--cache-dir`: the calibration states in memory-mapped files instead of host memory. A run
whose --max-cache-gb holds almost nothing gives, with --cache-dir, the weights and the Plan of a
run with room for every state (the refit sees every batch, no layer re-runs from a distant
cache), leaves nothing in the folder, and a folder that cannot serve is refused in one line
before the weights load."""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

import come.engine.memory_plan as memory_plan
from come import CompressConfig, compress
from come.cli.app import app
from come.engine.disk_cache import DiskStates
from conftest import plan_record, tiny_model

TINY_BUDGET = 2e-5  # GiB: about 21 KB, far below one boundary's states


@pytest.fixture(scope="module")
def dense():
    return tiny_model("llama")


def _calib(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (8, 32), generator=torch.Generator().manual_seed(0))


def _run(model, tokenizer, spec: dict):
    cfg = CompressConfig(sparsity=0.3, nsamples=8, seqlen=32, batch_size=2, device="cpu", **spec)
    return compress(copy.deepcopy(model), tokenizer, cfg, calib=_calib(model.config.vocab_size))


def test_mapped_states_equal_the_tensors_and_leave_no_file(tmp_path):
    disk = DiskStates(str(tmp_path))
    batches = [torch.randn(2, 5, 8), torch.randn(2, 5, 8).to(torch.bfloat16)]
    kept = disk.keep(batches)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(kept, batches))
    assert all(t.untyped_storage().filename is not None for t in kept)  # file pages, not anonymous memory
    assert disk.keep(kept)[0].data_ptr() == kept[0].data_ptr()  # a mapped state is not copied again
    assert list(tmp_path.iterdir()) == []  # unlinked as soon as mapped


@pytest.mark.parametrize("spec", [
    {"method": "come"},  # the refit's dense states, windowed re-profiling
    {"method": "come", "reprofile": "full", "pair_score": "nll"},
    {"method": "shortgpt", "refit": "ls"},  # one-shot: one profiling pass, then the refits
], ids=["come", "come-full-nll", "shortgpt-refit"])
def test_on_disk_equals_ample_memory(dense, tokenizer, tmp_path, spec, monkeypatch):
    kept = []
    real = DiskStates.keep
    monkeypatch.setattr(DiskStates, "keep", lambda self, b: kept.append(len(b)) or real(self, b))
    ample, ample_plan = _run(dense, tokenizer, spec)
    assert not kept
    disk, disk_plan = _run(dense, tokenizer, {**spec, "max_cache_gb": TINY_BUDGET, "cache_dir": str(tmp_path)})
    assert kept  # the states went to the folder
    for (name, a), (_, b) in zip(ample.state_dict().items(), disk.state_dict().items()):
        assert torch.equal(a, b), name
    assert plan_record(ample_plan) == plan_record(disk_plan)  # the same merges, refits (their tokens too), forwards
    assert list(tmp_path.iterdir()) == []


def test_without_the_folder_the_tiny_budget_is_another_run(dense, tokenizer):
    """What --cache-dir buys: in memory, that budget cannot hold the refit's states at all."""
    with pytest.raises(Exception, match="--max-cache-gb"):
        _run(dense, tokenizer, {"method": "come", "max_cache_gb": TINY_BUDGET})


def _compress(model_dir, text_file, out, *extra) -> object:
    return CliRunner().invoke(app, [str(a) for a in (
        "compress", model_dir, "--out", out, "--calib", text_file, "--nsamples", 8, "--seqlen", 32, "--device", "cpu",
        "--sparsity", 0.15, *extra)])


@pytest.mark.parametrize("make, says", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "a-file").write_text("x") and p / "a-file", "is not a folder"),
])
def test_a_folder_that_cannot_serve_is_one_line_before_loading(model_dir, text_file, tmp_path, monkeypatch, make,
                                                               says):
    import come.models.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    folder, out = make(tmp_path), tmp_path / "out"
    result = _compress(model_dir, text_file, out, "--cache-dir", folder)
    assert result.exit_code == 2 and says in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_too_little_free_space_is_refused_before_loading(model_dir, text_file, tmp_path, monkeypatch):
    import come.models.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("the weights were loaded"))
    monkeypatch.setattr(memory_plan.shutil, "disk_usage", lambda p: type("u", (), {"free": 1000})())
    folder, out = tmp_path / "states", tmp_path / "out"
    folder.mkdir()
    result = _compress(model_dir, text_file, out, "--cache-dir", folder)
    assert result.exit_code == 2 and "has 1e-06 GB free" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists() and list(folder.iterdir()) == []
