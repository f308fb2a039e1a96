#!/usr/bin/env bash
# GPU check of the fused HIFI kernel (scsnn.kernels), in under 5 minutes:
#   1. versions of python, torch, triton, spikingjelly and the GPU
#   2. python -m pytest -q -m gpu tests/        (every gpu-marked test of the suite)
#   3. python -m pytest -q tests/test_kernels.py (parity: torch-fused, Triton interpreter, CUDA)
#   4. python benchmarks/gpu_bench.py           (torch loop vs torch-fused vs Triton)
# then one summary line per step. Assumes only that scsnn is importable (run it from anywhere;
# the repository is put on PYTHONPATH). Builds nothing and downloads nothing; Triton compiles
# its two kernels on first use, as it always does.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to choose the interpreter
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
LOG_DIR="$(mktemp -d "${TMPDIR:-/tmp}/scsnn-gpu-check.XXXXXX")"
START=$SECONDS
BUDGET=290  # seconds for all steps together
SUMMARY=()
FAILED=0

# run NAME LIMIT CMD...: run a step with a time limit (capped by what is left of the budget),
# echo its output, keep one summary line
run() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    ((limit > left)) && limit=$left
    if ((limit < 5)); then
        SUMMARY+=("$(printf '%-12s SKIP  (time budget used up)' "$name")")
        FAILED=1
        return 0
    fi
    local log="$LOG_DIR/$name.log" t0=$SECONDS rc=0
    echo "=== $name (limit ${limit}s): $*"
    if command -v timeout >/dev/null 2>&1; then
        timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
    else
        "$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
    fi
    local dt=$((SECONDS - t0)) status="PASS" detail
    detail="$(grep -E '(passed|failed|skipped|error|no tests ran)' "$log" | tail -n 1 || true)"
    if [[ "$name" == bench ]]; then
        detail="$(grep -E '^summary' "$log" | tail -n 1 || true)"
    fi
    if [[ "$name" == versions ]]; then
        detail="$(grep -E '^(torch|triton|gpu)' "$log" | paste -sd ';' - || true)"
    fi
    if ((rc == 124 || rc == 137)); then
        status="FAIL"
        detail="timed out after ${limit}s"
    elif ((rc == 5)) && [[ "$name" == gpu-tests ]]; then
        status="PASS"  # pytest: no gpu-marked test collected
    elif ((rc != 0)); then
        status="FAIL"
        detail="exit $rc; $(tail -n 1 "$log")"
    fi
    [[ "$status" == FAIL ]] && FAILED=1
    SUMMARY+=("$(printf '%-12s %s  %4ds  %s' "$name" "$status" "$dt" "${detail:-}")")
    return 0
}

run versions 60 "$PY" - <<'EOF'
import platform
import sys

import torch

print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as e:  # noqa: BLE001
    print(f"triton: not importable ({type(e).__name__}: {e})")
import spikingjelly
import scsnn
print(f"spikingjelly {getattr(spikingjelly, '__version__', '?')}, scsnn {scsnn.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"{torch.cuda.device_count()} device(s)")
else:
    print("gpu: none (torch.cuda.is_available() is False)")
EOF

run gpu-tests 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/
run kernel-tests 90 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py
run bench 120 "$PY" benchmarks/gpu_bench.py

echo
echo "=== gpu_check summary ($((SECONDS - START))s; logs in $LOG_DIR)"
for line in "${SUMMARY[@]}"; do
    echo "$line"
done
if ((FAILED)); then
    echo "gpu_check: FAIL"
    exit 1
fi
echo "gpu_check: PASS"
