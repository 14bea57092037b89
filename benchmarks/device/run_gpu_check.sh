#!/usr/bin/env bash
# The GPU check's one command on a lent device machine (benchmarks/device/README.md): install the carried wheels (.whl/,
# from fetch_wheels.sh) with the device README's pip line, then run gpu_check.py, log and results under $OUT.
# Arguments go to gpu_check.py. PYTHON, SITE and WHEELS change the interpreter, the install folder and the wheels'
# folder (for a local stand-in).
cd "$(dirname "$0")/../.." && mkdir -p "${OUT:=/tmp/gpu_check_out}" && ${PYTHON:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${SITE:=/tmp/site}" "${WHEELS:-.whl}"/*.whl && export PYTHONPATH="$SITE" && set -o pipefail && PYTHONUNBUFFERED=1 ${PYTHON:-python3} benchmarks/device/gpu_check.py --out-dir "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
