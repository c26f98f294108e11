"""Every benchmark script runs in --quick mode and prints its ratio table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_compress_speed_quick():
    out = _run(str(BENCH / "compress_speed.py"), "--quick")
    assert "x floor" in out and "naive re-profile" in out and "faster" in out


def test_inference_quick():
    out = _run(str(BENCH / "inference.py"), "--quick")
    assert "decode x dense" in out and "| compressed |" in out


@pytest.mark.real
def test_quality_quick(smollm2_dir, text_file):
    out = _run(str(BENCH / "quality.py"), "--model", str(smollm2_dir), "--calib", str(text_file), "--heldout",
               str(text_file), "--unseen", str(text_file), "--quick", "--rows", "dense,shortgpt,come + refit (angular pairs)")
    assert "| shortgpt |" in out and "x ShortGPT" in out
