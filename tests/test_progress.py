"""Progress of single-scan work: the phases segment() reports, and one stderr line per phase on a terminal only."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from spineps_like.cli import PhaseLog
from spineps_like.pipeline import PROGRESS_PHASES, segment


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> dict:
    from spineps_like.phantom import write_phantoms

    root = tmp_path_factory.mktemp("progress")
    img = write_phantoms(root / "ds", 1, seed=5, fov="lumbar", spacing=(2.0, 2.0, 4.0), orientation="RAS",
                         snapshot=False)[0]
    mask = next((root / "ds" / "derivatives_gt" / img.parent.parent.name).glob("*_seg-spine_msk.nii.gz"))
    return {"root": root, "image": img, "mask": mask}


@pytest.fixture(scope="module")
def tiny_semantic_model(tmp_path_factory) -> Path:
    """An nnU-Net semantic model with random weights on the phantom's grid (a few sliding windows)."""
    from spineps_like.training.semantic import write_random_model

    return write_random_model(tmp_path_factory.mktemp("model") / "tiny", labels=(41, 49, 60, 61, 100),
                              spacing_pir=(2.0, 2.0, 4.0), patch_pir=(64, 96, 32),
                              resolution_range=((2.0, 2.0, 4.0), (2.0, 2.0, 4.0)))


def test_segment_reports_each_phase_that_runs_in_order(phantom, tiny_semantic_model):
    seen: list[str] = []
    res = segment(phantom["image"], semantic_mask=phantom["mask"], instance_method="geometric", progress=seen.append)
    assert seen == ["loading", "instance", "post-processing", "labelling", "measuring"]
    assert res.vertebra_ids  # the work was done
    seen.clear()
    segment(phantom["image"], semantic_model=tiny_semantic_model, semantic_only=True, progress=seen.append)
    assert seen == ["loading", "semantic"]
    assert all(p in PROGRESS_PHASES for p in seen)
    # without a callback nothing changes
    again = segment(phantom["image"], semantic_mask=phantom["mask"], instance_method="geometric")
    assert (again.instance.array == res.instance.array).all()


def test_phase_log_writes_only_to_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream, quiet in ((tty, False), (pipe, False)):
        log = PhaseLog("scan.nii.gz", quiet=quiet, stream=stream)
        log("semantic")
        log("writing")
    lines = tty.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("spineps-like: scan.nii.gz: semantic (")
    assert lines[1].startswith("spineps-like: scan.nii.gz: writing (") and lines[1].endswith(" s)")
    assert pipe.getvalue() == ""
    quiet = Tty()
    PhaseLog("scan.nii.gz", quiet=True, stream=quiet)("semantic")
    assert quiet.getvalue() == ""


def _segment_cli(args: list[str], *, tty: bool) -> tuple[int, str, str]:
    """Run `spineps-like segment ...` in a child with stderr on a pseudo-terminal (tty) or a pipe."""
    cmd = [sys.executable, "-m", "spineps_like.cli", "segment", *args]
    if not tty:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout, proc.stderr
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, text=True)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        out = proc.stdout.read()
        rc = proc.wait(timeout=300)
    finally:
        os.close(master)
    return rc, out, b"".join(chunks).decode().replace("\r\n", "\n")


def test_segment_cli_prints_phases_on_a_terminal_only(phantom):
    base = [str(phantom["image"]), "--semantic-mask", str(phantom["mask"]), "--instance-method", "geometric",
            "--no-snapshot", "--allow-implausible"]
    rc, out, err = _segment_cli([*base, "--out", str(phantom["root"] / "o1")], tty=True)
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("spineps-like: ") and "warning" not in ln]
    phases = [ln.split(": ")[2].split(" (")[0] for ln in lines]
    assert phases == ["loading", "instance", "post-processing", "labelling", "measuring", "writing"]
    assert "instance:" in out and "vertebrae (" in out  # the output list still goes to stdout
    rc, out, err = _segment_cli([*base, "--out", str(phantom["root"] / "o2")], tty=False)
    assert rc == 0 and "instance:" in out
    assert not [ln for ln in err.splitlines() if ln.startswith("spineps-like: ") and "warning" not in ln]
    rc, out, err = _segment_cli([*base, "--out", str(phantom["root"] / "o3"), "--quiet"], tty=True)
    assert rc == 0 and out == ""
    assert not [ln for ln in err.splitlines() if ln.startswith("spineps-like: ") and "warning" not in ln]
