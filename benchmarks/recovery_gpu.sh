#!/usr/bin/env bash
# Recovery at a real budget in one call of a GPU machine (benchmarks/recovery_gpu.py: the rows of
# recovery_budget.py on the real SmolLM2-135M, 1M and 5M distillation tokens each, JSON per row and
# a table). The machine has torch, transformers and accelerate; this checkout's src goes on
# PYTHONPATH, the model and texts come in the payload `pack` writes. PYTHON picks the interpreter.
#
#     bash benchmarks/recovery_gpu.sh pack .gpu                            # here
#     bash benchmarks/recovery_gpu.sh run .gpu --results "$OUT/recovery_gpu"  # there, every folder carried
#     bash benchmarks/recovery_gpu.sh pack /tmp/p && bash benchmarks/recovery_gpu.sh run /tmp/p --quick  # CPU
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/src:$root/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$root/benchmarks/recovery_gpu.py" "$@"
