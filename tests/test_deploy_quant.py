"""benchmarks/deploy_quant.py (issue 40 item 4): it reads llama.cpp's own summaries (the
samples below are cut from real runs), refuses in one line when llama.cpp's tools are absent,
and its run writes each row as it is measured and skips those already written (here with
stand-in tools that print the real samples; tests/test_deploy.py runs the real ones)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import deploy_quant  # noqa: E402

# From `llama-perplexity -m come-Q4_K_M.gguf --kl-divergence-base base-512-all.kld --kl-divergence -c 512 -t 1`
# (SmolLM2-135M compressed by come at 25%, llama.cpp 0c1e570, 2026-12-07): its first and summary lines.
KL_SAMPLE = """\
0.00.154.547 I kl_divergence: computing over 40 chunks, n_ctx=512, batch_size=2048, n_seq=4
====== Perplexity statistics ======
Mean PPL(Q)                   :  77.702980 ±   2.219202
Mean PPL(base)                :  14.188106 ±   0.386851
Cor(ln(PPL(Q)), ln(PPL(base))):  70.33%
Mean ln(PPL(Q)/PPL(base))     :   1.700490 ±   0.021534
Mean PPL(Q)/PPL(base)         :   5.476628 ±   0.117932
Mean PPL(Q)-PPL(base)         :  63.514873 ±   1.966438

====== KL divergence statistics ======
Mean    KLD:   1.761650 ±   0.014368
Maximum KLD:  13.143058
99.9%   KLD:  11.084275
99.0%   KLD:   7.014497
95.0%   KLD:   4.616116
90.0%   KLD:   3.589426
Median  KLD:   1.341856
10.0%   KLD:   0.489237
 5.0%   KLD:   0.326246
 1.0%   KLD:   0.087681
 0.1%   KLD:   0.018436
Minimum KLD:   0.003994

====== Token probability statistics ======
Mean    Δp: -22.431 ± 0.302 %
RMS Δp    : 37.869 ± 0.324 %
Same top p: 34.990 ± 0.472 %
"""
# From the same run's `llama-perplexity -m dense-f16.gguf -f text.txt -c 512 -t 1 --kl-divergence-base ...`
# (the ETA and the estimate share a line in its output).
BASE_SAMPLE = """\
0.00.495.131 I perplexity: calculating perplexity over 40 chunks, n_ctx=512, batch_size=2048, n_seq=4
0.08.111.465 I perplexity: 7.59 seconds per pass - ETA 1.20.868.216 I Final estimate: PPL = 14.1903 +/- 0.38703
"""
# From the same run's `llama-quantize come-f16.gguf come-Q4_K_M.gguf Q4_K_M 1`.
QUANTIZE_SAMPLE = """\
llama_model_quantize_impl: model size  =   189.09 MiB (16.00 BPW)
llama_model_quantize_impl: quant size  =    75.65 MiB (6.40 BPW)
llama_model_quantize_impl: WARNING: 120 of 182 tensor(s) required fallback quantization
"""


def test_it_reads_llama_perplexitys_kl_summary():
    row = deploy_quant.parse_kl(KL_SAMPLE)
    assert row == {"ppl": 77.70298, "ppl_se": 2.219202, "kl": 1.76165, "kl_se": 0.014368, "kl_median": 1.341856,
                   "kl_p99": 7.014497, "same_top": 34.99, "same_top_se": 0.472, "chunks": 40, "ctx": 512}
    with pytest.raises(ValueError, match="same_top"):
        deploy_quant.parse_kl(KL_SAMPLE.replace("Same top p", "Same top"))


def test_it_reads_the_base_run_and_the_quantizer():
    base = deploy_quant.parse_base(BASE_SAMPLE)
    assert (base["ppl"], base["ppl_se"], base["kl"], base["chunks"]) == (14.1903, 0.38703, 0.0, 40)
    assert deploy_quant.parse_quantize(QUANTIZE_SAMPLE) == {"bpw": 6.4, "fallback": [120, 182]}
    assert deploy_quant.parse_quantize(QUANTIZE_SAMPLE.splitlines()[1])["fallback"] is None
    with pytest.raises(ValueError, match="Final estimate"):
        deploy_quant.parse_base(KL_SAMPLE)


def _run(tmp_path: Path, *args: str, tree: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "COME_LLAMA_CPP"}
    if tree is not None:
        env["COME_LLAMA_CPP"] = str(tree)
    return subprocess.run([sys.executable, str(BENCH / "deploy_quant.py"), "run", "--name", "m", "--results",
                           str(tmp_path / "results"), "--work", str(tmp_path / "work"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_it_refuses_in_one_line_without_llama_cpps_tools(tmp_path, model_dir):
    for tree in (None, tmp_path):
        done = _run(tmp_path, "--model", str(model_dir), tree=tree)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert ("COME_LLAMA_CPP" if tree is None else "llama-quantize") in done.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "work").exists()


def _fake_tools(tree: Path, calls: Path) -> None:
    """Stand-ins for llama.cpp's converter, quantizer and perplexity tool: each logs its call,
    writes its output file and prints the real sample its summary is read from."""
    (tree / "gguf-py").mkdir(parents=True)
    (tree / "build" / "bin").mkdir(parents=True)
    head = f"#!{sys.executable}\nimport sys\nopen({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
    tools = {"convert_hf_to_gguf.py": "open(sys.argv[sys.argv.index('--outfile') + 1], 'wb').write(b'x' * 1000)",
             "build/bin/llama-quantize": f"open(sys.argv[2], 'wb').write(b'x' * 300)\nprint({QUANTIZE_SAMPLE!r})",
             "build/bin/llama-perplexity": (f"if '--kl-divergence' in sys.argv: print({KL_SAMPLE!r})\nelse:\n"
                                            "    open(sys.argv[sys.argv.index('--kl-divergence-base') + 1], 'w')\n"
                                            f"    print({BASE_SAMPLE!r})")}
    for name, body in tools.items():
        (tree / name).write_text(head + body + "\n")
        (tree / name).chmod(0o755)


def test_a_run_writes_every_row_and_a_rerun_skips_them(tmp_path, model_dir):
    pytest.importorskip("sentencepiece")  # the run checks for the converter's import first
    tree, calls, text = tmp_path / "llama.cpp", tmp_path / "calls.log", tmp_path / "text.txt"
    _fake_tools(tree, calls)
    text.write_text("some unseen text")
    args = ("--model", str(model_dir), "--compressed", str(model_dir), "--text", f"file[{text}]")
    done = _run(tmp_path, *args, tree=tree)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((tmp_path / "results" / "m.json").read_text())
    assert list(data["rows"]) == ["dense f16", "dense Q8_0", "dense Q4_K_M", "dense Q3_K_M", "dense Q2_K",
                                  "come-25% f16", "come-25% Q8_0", "come-25% Q4_K_M"]
    assert data["rows"]["dense f16"]["bytes"] == 1000 and data["rows"]["dense f16"]["kl"] == 0
    assert data["rows"]["come-25% Q4_K_M"]["bytes"] == 300 and data["rows"]["come-25% Q4_K_M"]["kl"] == 1.76165
    assert len(calls.read_text().splitlines()) == 2 + 1 + 6 + 7  # 2 conversions, the base, 6 quantizations, 7 KL
    calls.unlink()
    assert _run(tmp_path, *args, tree=tree).returncode == 0 and not calls.exists()
    table = deploy_quant.markdown(data).splitlines()
    assert len(table) == 2 + 8 + 2 and "0 (reference)" in table[2] and "120/182 fell back" in table[-3]
    assert "40 chunks of 512 tokens" in table[-1] and "10,200 tokens" in table[-1]
    other = _run(tmp_path, *args, "--ctx", "256", tree=tree)
    assert other.returncode == 2 and "ctx" in other.stderr and json.loads((tmp_path / "results" / "m.json")
                                                                          .read_text()) == data
