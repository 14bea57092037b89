"""Process-wide settings for inference: the C allocator.

glibc's malloc serves every block above a dynamic threshold (at most 32 MB) with its own ``mmap`` and gives it back
with ``munmap`` when freed. The networks' activations are such blocks (4 tiles x 32 channels x 24 x 80 x 80 float32 is
78 MB): every forward call maps fresh memory and page-faults through it again, which costs more than a third of the
semantic network's time on a 512 x 512 x 20 scan (benchmarks/README.md). :func:`tune_allocator` raises the mmap
threshold so such blocks come from the heap and are reused, and lets the heap keep up to ``trim_threshold`` bytes of
free memory at its top instead of returning it after every scan. That is 1 GiB: the sliding window's class volume of
a whole spine alone is 274 MB (16 classes x 35 x 624 x 196 float32); with 256 MB the heap gave it back to the kernel
after each scan and page-faulted it in again in the next: up to 0.6-0.85 s of kernel time per pass over the five
side-by-side phantoms, against 0.06-0.35 s with 1 GiB (benchmarks/README.md). The peak memory stays about the same;
between scans a worker keeps up to that much free heap.

PyTorch's own CPU allocations (the sliding window's class volume, activations) page-fault through 4 KB pages when
they are fresh; :func:`tune_allocator` also asks PyTorch for transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``, read
once at torch's first allocation, so it only takes effect when torch has not been imported yet, as in the command
line; the cohort workers inherit it). On the side-by-side phantoms that made a whole run about 5% faster, network
included (benchmarks/README.md). A user's own ``THP_MEM_ALLOC_ENABLE`` is left as it is.

The command line and every cohort worker call it once; a library user calls it once per process. It changes nothing,
neither the malloc thresholds nor the huge pages, where the C library is not glibc, when
``SPINEPS_LIKE_MALLOC_TUNING=0``, when the user already set glibc's own ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` (or ``GLIBC_TUNABLES``) environment variables, or when ``mallopt`` refuses the thresholds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap (the largest activations of SPINEPS-wide networks fit)
TRIM_THRESHOLD = 1 << 30  # free memory the heap keeps at its top between phases and scans

_applied: dict[str, int] | None = None


def tuning_wanted() -> bool:
    """False when the user opted out with ``SPINEPS_LIKE_MALLOC_TUNING=0`` (or false/no/off)."""
    return os.environ.get("SPINEPS_LIKE_MALLOC_TUNING", "1").strip().lower() not in ("0", "false", "no", "off")


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> dict[str, int] | None:
    """Set glibc malloc's mmap and trim thresholds for this process (idempotent).

    Returns the settings applied (``{"mmap_threshold": ..., "trim_threshold": ...}``; torch's huge pages were then asked
    for too, :func:`enable_torch_huge_pages`), or None where nothing was changed, huge pages included (not glibc,
    opted out with ``SPINEPS_LIKE_MALLOC_TUNING=0``, the user's own glibc malloc variables set, or mallopt refused).
    """
    global _applied
    if _applied is not None:
        return _applied
    if not tuning_wanted():
        return None
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    limit = 2**31 - 1  # mallopt takes a C int
    settings = {"mmap_threshold": min(int(mmap_threshold), limit), "trim_threshold": min(int(trim_threshold), limit)}
    if not (mallopt(_M_MMAP_THRESHOLD, settings["mmap_threshold"]) and mallopt(_M_TRIM_THRESHOLD,
                                                                               settings["trim_threshold"])):
        return None
    _applied = settings
    enable_torch_huge_pages()
    return _applied


def enable_torch_huge_pages() -> bool:
    """Ask PyTorch to back its large CPU tensors with transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``, Linux),
    unless the user set that variable. True when it is on and can still take effect (torch not imported yet)."""
    if platform.system() != "Linux":
        return False
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1" and "torch" not in sys.modules
