"""spineps-like: semantic and instance segmentation of the spine in MRI and CT, in the style of SPINEPS.

Public API (imported lazily, so ``import spineps_like`` stays cheap)::

    segment(scan, ...) -> SegmentResult          # one scan, both phases
    Cohort(inputs, out_dir, ...), segment_cohort  # many scans, resumable
    evaluate(pred, gt, spacing, protocol=...)     # PQ/SQ/RQ, SPIDER, Endplate3D-QCT
    make_phantom(seed, ...)                       # synthetic spine with exact ground truth
    tune_allocator()                              # once per process: glibc malloc reuses the networks' memory
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("spineps-like")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

_LAZY = {
    "segment": "spineps_like.pipeline",
    "SegmentResult": "spineps_like.pipeline",
    "Cohort": "spineps_like.cohort",
    "segment_cohort": "spineps_like.cohort",
    "evaluate": "spineps_like.evaluation",
    "evaluate_folders": "spineps_like.evaluation",
    "make_phantom": "spineps_like.phantom",
    "load_semantic_model": "spineps_like.models",
    "load_instance_model": "spineps_like.instance.network",
    "tune_allocator": "spineps_like.runtime",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spineps_like' has no attribute {name!r}")
