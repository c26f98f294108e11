#!/usr/bin/env bash
# GPU benchmark of come (benchmarks/gpu.py: compress / dense pass, peak GPU memory vs its prediction,
# decode compressed / dense, distill sp and mp vs fine-tuning with MFU, a profile of compress, a
# streamed 13B; JSON + table). Needs only torch, transformers and accelerate: this checkout's src
# goes on PYTHONPATH, nothing is installed or downloaded. Arguments pass through: --rows picks what
# runs (gpu.py's docstring: each row and its time), --quick runs the same code on the CPU in
# seconds, --json PATH says where the rows go (default ./gpu_bench.json). PYTHON picks the interpreter.
# Each call below fits a 10-minute device call on one H100 (estimates; BENCHMARKS.md "GPU benchmark"):
#
#     bash benchmarks/gpu.sh                                           # 7B, 1.1B, distill: ~4 min
#     bash benchmarks/gpu.sh --rows llama-2-7b,profile                 # the 7B row + its profile: ~5.5 min
#     bash benchmarks/gpu.sh --rows streamed --nsamples 8              # 13B from disk: ~5 min, 45 GB of disk
#     bash benchmarks/gpu.sh --quick --rows all --json /tmp/gpu_quick.json --scratch /tmp
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$root/benchmarks/gpu.py" "$@"
