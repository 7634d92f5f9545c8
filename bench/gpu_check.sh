#!/usr/bin/env bash
# The GPU path, checked in one go on a fresh GPU machine (within 9 minutes):
#
#     bash bench/gpu_check.sh --out gpu-check          # tests on CUDA, then bench/gpu_bench.py's figures
#     bash bench/gpu_check.sh --cpu-smoke --out smoke  # the same steps, tiny, on the CPU (CI: is it broken?);
#                                                      # its two-replica test is test_serve's there
#
# 1. the project's .venv (made with `make venv` when missing); torch, CUDA and GPU names;
# 2. bench/gpu_bench.py, in one process and one Ray cluster: the `gpu` tests (tests/test_gpu.py: train steps
#    per loss with AMP bf16 and fp16, exact resume, the same /generate bytes on two replicas), then train
#    images/s at 32/64/128 px (fp32, bf16, fp16, channels_last, torch.compile), Ray Train 1 worker beside
#    the plain loop, standard FID of 10,000 samples, a Serve replica at n=16 and n=64.
# Prints one table at the end and writes <out>/gpu_check.json (and <out>/tests.txt).
# Without a GPU (and without --cpu-smoke) it says so in one line and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=gpu-check
SMOKE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    *) echo "usage: bash bench/gpu_check.sh [--out DIR] [--cpu-smoke]" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || make venv >/dev/null
PY=.venv/bin/python
if [ "$SMOKE" = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no GPU on this machine (torch.cuda.is_available() is False); nothing to check (--cpu-smoke runs the steps on the CPU)"
  exit 0
fi
mkdir -p "$OUT"
SMOKE_FLAG=()
if [ "$SMOKE" = 1 ]; then SMOKE_FLAG=(--smoke); fi
timeout -k 10 520 "$PY" bench/gpu_bench.py --out "$OUT" "${SMOKE_FLAG[@]}"
