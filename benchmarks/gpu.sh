#!/usr/bin/env bash
# One-call GPU benchmark of come (benchmarks/gpu.py: compress / dense pass, peak GPU memory vs its
# prediction, decode compressed / dense, distill sp and mp vs fine-tuning with MFU; JSON + table).
# Needs only torch, transformers and accelerate: this checkout's src goes on PYTHONPATH, nothing is
# installed or downloaded. Arguments pass through: --quick runs the same code on the CPU in seconds,
# --json PATH says where the rows go (default ./gpu_bench.json). PYTHON picks the interpreter.
#
#     bash benchmarks/gpu.sh
#     bash benchmarks/gpu.sh --quick --json /tmp/gpu_quick.json
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$root/benchmarks/gpu.py" "$@"
