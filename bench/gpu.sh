#!/usr/bin/env bash
# Fine-tuning throughput + achieved TFLOP/s on one GPU (bf16 autocast + channels_last), ResNet-50 and
# EfficientNet-Lite0, synthetic data and the ants/bees shards. Under 5 minutes on one GPU (about 1 min
# on an H100-class GPU; BENCH_TIMEOUT, default 290 s, stops it otherwise).
#   bench/gpu.sh                                                          # GPU: the full table
#   BENCH_TIMEOUT=1800 bench/gpu.sh --device cpu --steps 3 --warmup 1 --batch 4 --workers 1   # CPU smoke
# Extra arguments go to bench/gpu.py (see its --help), e.g. --compile, --batch 256, --models lite0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
timeout "${BENCH_TIMEOUT:-290}" "$PY" bench/gpu.py "$@" || {
  rc=$?; [ "$rc" = 124 ] && echo "bench/gpu.sh: stopped after ${BENCH_TIMEOUT:-290} s" >&2; exit "$rc"; }
