"""The allocator tuning: large blocks come from the (reused) heap instead of fresh mmaps, and opting out works.

Each check runs in a fresh interpreter: malloc settings are process-wide and cannot be undone.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="malloc tuning applies to glibc only")

CHILD = r"""
import json, sys
import numpy as np
call = sys.argv[1]
if call == "tune":
    from spineps_like.runtime import tune_allocator
    applied = tune_allocator()
elif call == "cli":
    from spineps_like.cli import main
    main(["info", sys.argv[2], "--mask"])
    from spineps_like import runtime
    applied = runtime._applied
elif call == "worker":
    from spineps_like.cohort.executors import CohortWorker
    CohortWorker({}).close()
    from spineps_like import runtime
    applied = runtime._applied
else:
    applied = None
def heap_kb():  # the main heap's size (it may show as several mappings)
    kb = 0
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            kb += (hi - lo) // 1024
    return kb
before = heap_kb()
block = np.ones(96 << 20, dtype=np.uint8)  # 96 MB: above glibc's largest default mmap threshold (32 MB)
grown = heap_kb() - before
print(json.dumps({"applied": applied, "heap_growth_mb": grown / 1024}))
"""


def _run(*args: str, **env: str) -> dict:
    e = {k: v for k, v in os.environ.items()
         if k not in ("SPINEPS_LIKE_MALLOC_TUNING", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    p = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env={**e, **env},
                       check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_tuned_process_serves_large_blocks_from_the_heap():
    untouched = _run("none")
    tuned = _run("tune")
    assert untouched["applied"] is None and untouched["heap_growth_mb"] < 8  # the 96 MB block was mmapped
    assert tuned["applied"] == {"mmap_threshold": 1 << 30, "trim_threshold": 1 << 30}
    assert tuned["heap_growth_mb"] > 64


def test_opt_out_and_users_own_malloc_settings_are_respected():
    off = _run("tune", SPINEPS_LIKE_MALLOC_TUNING="0")
    assert off["applied"] is None and off["heap_growth_mb"] < 8
    own = _run("tune", MALLOC_TRIM_THRESHOLD_="1000000")  # the user's own glibc settings win
    assert own["applied"] is None and own["heap_growth_mb"] < 8


def test_command_line_and_cohort_workers_tune_the_allocator(tmp_path):
    import nibabel as nib
    import numpy as np

    mask = tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), mask)
    for args in (("cli", str(mask)), ("worker",)):
        r = _run(*args)
        assert r["applied"] is not None and r["heap_growth_mb"] > 64, args


def test_command_line_asks_torch_for_huge_pages_before_torch_loads(tmp_path):
    """The CLI's tuning sets THP_MEM_ALLOC_ENABLE before torch is imported (torch reads it once); a user's own value
    and the opt-out are respected, and where the tuning stands aside for the user's own glibc malloc variables it
    leaves the huge pages alone too (it changes nothing then)."""
    code = ("import os, sys\nfrom spineps_like.runtime import tune_allocator\ntune_allocator()\n"
            "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules)")

    def run(**env: str) -> str:
        e = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "SPINEPS_LIKE_MALLOC_TUNING",
                                                              "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                                              "GLIBC_TUNABLES")}
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**e, **env},
                              check=True).stdout.strip()

    assert run() == "1 False"
    assert run(THP_MEM_ALLOC_ENABLE="0") == "0 False"
    assert run(SPINEPS_LIKE_MALLOC_TUNING="0") == "None False"
    assert run(MALLOC_TRIM_THRESHOLD_="1000000") == "None False"
    assert run(MALLOC_MMAP_THRESHOLD_="1000000") == "None False"
    assert run(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000") == "None False"
