"""Per-scan functions for cohort tests, importable by worker processes (and pickled by value for Ray)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def segment_with_faults(scan, *, marker_dir: str, kill_name: str | None = None, **settings):
    """spineps_like.pipeline.segment, but: records (pid, model object id, model type) per call, and SIGKILLs its own
    worker process on the first attempt at a scan whose file name contains ``kill_name``."""
    from spineps_like.pipeline import segment

    marker_dir = Path(marker_dir)
    model = settings.get("semantic_model")
    with open(marker_dir / f"calls-{os.getpid()}.txt", "a") as f:
        f.write(f"{Path(scan.path).name} {id(model)} {type(model).__name__}\n")
    if kill_name and kill_name in Path(scan.path).name:
        marker = marker_dir / f"killed-{Path(scan.path).name}"
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
    return segment(scan, **settings)


def mark_many(manifest_path: str, keys: list[str], worker: str) -> int:
    """Mark scans running then done, one short transaction each (a second process does the same meanwhile)."""
    from spineps_like.cohort import Manifest

    with Manifest(manifest_path, timeout=30) as m:
        for k in keys:
            m.mark_running(k, worker)
            m.mark_done(k, outputs={}, worker=worker, seconds=0.0)
    return len(keys)
