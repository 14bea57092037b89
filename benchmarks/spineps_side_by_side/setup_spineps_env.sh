#!/usr/bin/env bash
# Create an isolated virtual environment with SPINEPS 2.1.3 for the side-by-side benchmark.
# SPINEPS is never a dependency of spineps-like; this venv lives next to this script (git-ignored).
#
# Usage: bash benchmarks/spineps_side_by_side/setup_spineps_env.sh [PYTHON]   (or `make spineps-env`)
#   PYTHON (the interpreter the venv is made from) defaults to python3; $SPINEPS_VENV overrides the venv's folder.
# Re-running updates the venv in place. Its last step, once SPINEPS imports, writes $VENV/.spineps-ready: the stamp
# `make spineps-env` builds and tests/test_spineps_compat.py looks for (a venv without it is half-built).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${SPINEPS_VENV:-$HERE/.venv-spineps}"
PY="${1:-python3}"
READY="$VENV/.spineps-ready"
rm -f "$READY"
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
"$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" "spineps==2.1.3"  # errors still print
# PyPI torchvision (pulled in by monai/lightning extras on some resolvers) does not import beside the
# CPU torch 2.13 wheel; SPINEPS does not need it for inference.
"$VENV/bin/python" -m pip uninstall --yes torchvision >/dev/null 2>&1 || true
# Smoke check: the versions, and the modules spineps_worker.py imports, imported under its shim (torchvision and
# timm answered as absent); offline, nothing is fetched.
SPINEPS_NO_CITATION_REMINDER=1 PYTHONPATH="" "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import sys

for name in ("spineps", "TPTBox", "nnunetv2", "torch", "antspyx", "monai", "pytorch-lightning"):
    try:
        print(f"{name:18s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:18s} (not installed)")
assert md.version("spineps") == "2.1.3", md.version("spineps")
for name in ("torchvision", "timm"):
    sys.modules.setdefault(name, None)
import spineps.get_models, spineps.phase_instance, spineps.phase_post, spineps.phase_pre, spineps.phase_semantic  # noqa
PY
echo "spineps 2.1.3 $(date -u +%FT%TZ)" > "$READY"
echo "SPINEPS venv ready: $VENV  (export SPINEPS_PYTHON=$VENV/bin/python)"
