#!/usr/bin/env bash
# Create an isolated virtual environment with SPINEPS 2.1.3 for the side-by-side benchmark.
# SPINEPS is never a dependency of spineps-like; this venv lives next to this script (git-ignored).
#
# Usage: bash benchmarks/spineps_side_by_side/setup_spineps_env.sh [PYTHON]
#   PYTHON defaults to the interpreter behind /work/main/.venv (3.11), else python3.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${SPINEPS_VENV:-$HERE/.venv-spineps}"
PY="${1:-python3}"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
# torch pinned to the CPU build the project uses; SPINEPS 2.1.3 pins antspyx==0.6.3 itself.
cat > "$CONSTRAINTS" <<'PINS'
torch==2.13.0
PINS

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install -c "$CONSTRAINTS" "spineps==2.1.3"
# PyPI torchvision (pulled in by monai/lightning extras on some resolvers) does not import beside the
# CPU torch 2.13 wheel; SPINEPS does not need it for inference.
"$VENV/bin/python" -m pip uninstall --yes torchvision >/dev/null 2>&1 || true
# Smoke check: the import the benchmark relies on (offline; runner applies its own shims, see spineps_worker.py).
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("spineps", "TPTBox", "nnunetv2", "torch", "antspyx", "monai", "pytorch-lightning"):
    try:
        print(f"{name:18s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:18s} (not installed)")
PY
echo "SPINEPS venv ready: $VENV  (export SPINEPS_PYTHON=$VENV/bin/python)"
