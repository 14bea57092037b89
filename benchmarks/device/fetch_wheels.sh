#!/usr/bin/env bash
# Fetch the wheels of benchmarks/device/wheels.txt into .whl/ at the repository root, for the one `device` run of
# benchmarks/device/README.md: cp312 manylinux x86-64 wheels from the registry (the device README's pip line), and a
# pure-Python wheel built here for a name that has only an sdist there. The folder is emptied first (two versions of a
# package stop the install there) and must stay git-ignored (.gitignore lists .whl/).
#
#   bash benchmarks/device/fetch_wheels.sh            # -> .whl/ for the device machine (Python 3.12)
#   PYVER=3.11 bash benchmarks/device/fetch_wheels.sh /tmp/whl311   # the same set for a local stand-in test
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dest=${1:-$root/.whl}
pyver=${PYVER:-3.12}
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x "$root/.venv/bin/python" ]; then py=$root/.venv/bin/python; else py=python3; fi
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p "$dest"
rm -f "$dest"/*.whl
log=$(mktemp)
grep -vE '^[[:space:]]*(#|$)' "$root/benchmarks/device/wheels.txt" | while read -r spec; do
  if "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
      "${plat[@]}" -d "$dest" "$spec" >"$log" 2>&1; then
    echo "downloaded $spec"
  else  # no wheel for that Python on the registry: build one here, which must be pure Python to travel
    before=$(ls "$dest")
    "$py" -m pip wheel -q --no-deps -w "$dest" "$spec" >"$log" 2>&1 || { grep -v 'is ignored' "$log"; exit 1; }
    built=$(comm -13 <(echo "$before") <(ls "$dest"))
    case "$built" in
      *-py3-none-any.whl) echo "built $spec (no wheel on the registry): $built" ;;
      *) echo "ERROR: $spec built as '$built', not a pure-Python wheel: it would not run on the device" >&2; exit 1 ;;
    esac
  fi
done
rm -f "$log"
if [ "$dest" = "$root/.whl" ] && ! git -C "$root" check-ignore -q .whl/x.whl; then
  echo /.whl/ >> "$(git -C "$root" rev-parse --git-path info/exclude)"
fi
n=$(ls "$dest"/*.whl | wc -l)
echo "$n wheels in $dest: $(du -ch "$dest"/*.whl | tail -1 | cut -f1)"
