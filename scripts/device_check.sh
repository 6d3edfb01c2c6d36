#!/usr/bin/env bash
# The one script to run on a GPU machine with this repo checked out: install the project into a
# venv, run benchmarks/gpu_train.py, leave its JSON and logs under $OUT.
#
#   OUT=/tmp/out scripts/device_check.sh [gpu_train.py flags, e.g. --steps 20 --batch-size 8]
#
# benchmarks/route.py is not run: it needs a deployed router (`make demo`), too long for a check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
VENV=${VENV:-.venv-gpu}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-420}
mkdir -p "$OUT"

# System site packages: a machine image that already has torch keeps it (no multi-GB download).
[ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
PY=$VENV/bin/python
install() { "$PY" -m pip install -q "$@" >>"$OUT/pip.log" 2>&1; }
# flash-attn only from a wheel (compiling it takes far longer than this check; without it the
# benchmark runs sdpa and says so); offline, the packages already there have to do.
install --only-binary flash-attn -e ".[gpu]" || install -e . || install --no-deps -e .

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
timeout "$BENCH_TIMEOUT" "$PY" benchmarks/gpu_train.py "$@" \
    >"$OUT/gpu_train.json" 2>"$OUT/gpu_train.log"
status=$?
if [ "$status" -eq 124 ]; then
    echo "{\"error\": \"gpu_train.py timed out after ${BENCH_TIMEOUT}s\"}" >"$OUT/gpu_train.json"
fi
cat "$OUT/gpu_train.json"
[ "$status" -eq 0 ] || tail -n 20 "$OUT/gpu_train.log" >&2
exit "$status"
