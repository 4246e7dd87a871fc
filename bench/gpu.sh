#!/usr/bin/env bash
# Fine-tuning throughput + achieved TFLOP/s on one GPU (bf16 autocast + channels_last), ResNet-50 and
# EfficientNet-Lite0, synthetic data and the ants/bees shards. Under 5 minutes on one GPU.
#   bench/gpu.sh                      # GPU: the full table
#   bench/gpu.sh --device cpu --steps 3 --warmup 1 --batch 4 --workers 1   # CPU smoke test
# Extra arguments go to bench/gpu.py (see its --help), e.g. --compile, --batch 256.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
exec timeout 290 "$PY" bench/gpu.py "$@"
