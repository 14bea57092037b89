"""Bad and hostile inputs (issue 28): each kind is built in tmp_path and given to the command line in-process.

Every case must end with a non-zero exit, one line on stderr naming the file (or option) and the problem, no
traceback, nothing on stdout, and no output file or folder left behind. None of them may reach a model: each fails in
the checks before the first phase (the suite runs in seconds).
"""

from __future__ import annotations

import gzip
import os
import sqlite3
import time
import zlib

import nibabel as nib
import numpy as np
import pytest

from spineps_like.cli import main


def _image(shape=(24, 20, 16), seed=0) -> np.ndarray:
    """A small image with structure and many grey values (passes the signal checks)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(100, 20, shape).astype(np.float32)
    a[shape[0] // 4 : shape[0] // 2] += 300
    return a


def _put(path, data):
    """Write text or bytes to ``path``; return the path."""
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _nifti(path, arr=None, affine=None, **header):
    img = nib.Nifti1Image(_image() if arr is None else arr, np.diag([0.8, 0.8, 3.5, 1]) if affine is None else affine)
    for k, v in header.items():
        img.header[k] = v
    nib.save(img, str(path))
    return path


def _raw_nifti(path, patch: dict[int, bytes], arr=None):
    """A .nii whose header bytes at the given offsets are overwritten (what nibabel would not write)."""
    p = _nifti(path.with_suffix(".tmp.nii"), arr)
    b = bytearray(p.read_bytes())
    p.unlink()
    for off, data in patch.items():
        b[off : off + len(data)] = data
    path.write_bytes(bytes(b))
    return path


def _no_orientation(path):
    img = nib.Nifti1Image(_image(), np.diag([0.8, 0.8, 3.5, 1]))
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    hdr = img.header.copy()
    nib.save(nib.Nifti1Image(_image(), None, hdr), str(path))
    return path


def _mha(path, arr=None, spacing=(0.8, 0.8, 3.5), compress=True, vector=False):
    import SimpleITK as sitk

    a = _image() if arr is None else arr
    img = sitk.GetImageFromArray(a.transpose(2, 1, 0), isVector=vector)
    img.SetSpacing(spacing[: img.GetDimension()])
    sitk.WriteImage(img, str(path), useCompression=compress)
    return path


def _mha_header_edit(path, old: bytes, new: bytes, **kw):
    """A MetaImage whose header line starting with ``old`` is replaced by ``new``."""
    import re

    p = _mha(path, **kw)
    b = p.read_bytes()
    b, n = re.subn(re.escape(old) + rb"[^\n]*", new, b, count=1)
    assert n == 1
    p.write_bytes(b)
    return p


def _corrupt_mha(path):
    p = _mha(path)
    b = bytearray(p.read_bytes())
    start = b.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    for i in range(start + 20, min(start + 400, len(b))):  # scramble the deflate stream after its first bytes
        b[i] ^= 0x5A
    p.write_bytes(bytes(b))
    return p


def _truncate(path, keep):
    b = path.read_bytes()
    path.write_bytes(b[:keep] if keep > 0 else b[:keep])
    return path


# kind -> (builder(tmp_path) -> scan path, words the message must hold)
CASES = {
    "missing file": (lambda t: t / "nope.nii.gz", "no such file"),
    "folder": (lambda t: (t / "scan.nii.gz").mkdir() or t / "scan.nii.gz", "is a folder"),
    "empty file": (lambda t: _put(t / "e.nii.gz", b""), "empty file"),
    "text as .nii.gz": (lambda t: _put(t / "t.nii.gz", "hello\n"), "not a readable image"),
    "text as .nii": (lambda t: _put(t / "t.nii", "hello there, not an image at all\n"),
                     "no NIfTI header"),
    "text as .mha": (lambda t: _put(t / "t.mha", "just some text\n"), "no MetaImage header"),
    "png suffix": (lambda t: _put(t / "s.png", b"\x89PNG\r\n"), "unsupported file type"),
    "no suffix": (lambda t: _put(t / "scan", b"\x00" * 400), "unsupported file type"),
    "gzip named .nii": (lambda t: _put(t / "g.nii", gzip.compress(_nifti(t / "x.nii").read_bytes())), "gzip-compressed data under a .nii name"),
    "plain nifti named .nii.gz": (lambda t: _put(t / "p.nii.gz", _nifti(t / "x.nii").read_bytes()), "uncompressed NIfTI under a .nii.gz name"),
    "truncated .nii": (lambda t: _truncate(_nifti(t / "tr.nii"), 2000), "truncated"),
    "truncated .nii.gz": (lambda t: _truncate(_nifti(t / "tr.nii.gz"), 900), "truncated or corrupt"),
    "truncated header": (lambda t: _truncate(_nifti(t / "th.nii"), 200), "shorter than a NIfTI header"),
    "corrupt gzip stream": (lambda t: _put(t / "c.nii.gz", b"\x1f\x8b\x08\x00" + os.urandom(600)), "truncated or corrupt"),
    "2D image": (lambda t: _nifti(t / "flat.nii.gz", np.ones((8, 8), np.float32)), "expected a 3D image"),
    "4D image": (lambda t: _nifti(t / "dwi.nii.gz", np.ones((8, 8, 8, 3), np.float32)), "expected a 3D image"),
    "zero-sized axis": (lambda t: _nifti(t / "z.nii.gz", np.zeros((8, 0, 8), np.float32)), "zero-sized axis"),
    "single slice": (lambda t: _nifti(t / "one.nii.gz", _image((24, 20, 1))), "2D image cannot be segmented"),
    "two slices": (lambda t: _nifti(t / "two.nii.gz", _image((24, 2, 16))), "2D image cannot be segmented"),
    "NaN voxel": (lambda t: _nifti(t / "nan.nii.gz", np.where(np.arange(7680).reshape(24, 20, 16) == 5, np.nan,
                                                               _image())), "NaN/inf"),
    "inf voxel": (lambda t: _nifti(t / "inf.nii.gz", np.where(np.arange(7680).reshape(24, 20, 16) == 5, np.inf,
                                                               _image())), "NaN/inf"),
    "complex64": (lambda t: _nifti(t / "cx.nii.gz", _image().astype(np.complex64)), "complex-valued"),
    "complex128": (lambda t: _nifti(t / "cx.nii.gz", _image().astype(np.complex128)), "complex-valued"),
    "RGB": (lambda t: _nifti(t / "rgb.nii.gz", np.zeros((8, 8, 8), [("R", "u1"), ("G", "u1"), ("B", "u1")])),
            "RGB colour"),
    "RGBA": (lambda t: _nifti(t / "rgba.nii.gz", np.zeros((8, 8, 8), [("R", "u1"), ("G", "u1"), ("B", "u1"),
                                                                         ("A", "u1")])), "RGBA colour"),
    "binary datatype code": (lambda t: _raw_nifti(t / "b.nii", {70: np.int16(1).tobytes()}), "1-bit"),
    "unknown datatype code": (lambda t: _raw_nifti(t / "u.nii", {70: np.int16(999).tobytes()}),
                              "unsupported voxel data type"),
    "huge declared shape": (lambda t: _raw_nifti(t / "h.nii", {42: np.array([30000, 30000, 30000], "<i2").tobytes()}),
                            "more than the"),
    "negative dim": (lambda t: _raw_nifti(t / "nd.nii", {42: np.array([-5], "<i2").tobytes()}), "negative image size"),
    "corrupt number of axes": (lambda t: _raw_nifti(t / "na.nii", {40: np.array([9], "<i2").tobytes()}),
                               "declares 9 axes"),
    "zero pixdim": (lambda t: _raw_nifti(t / "zp.nii", {80: np.float32(0).tobytes()}), "voxel size (pixdim)"),
    "negative pixdim": (lambda t: _raw_nifti(t / "np.nii", {84: np.float32(-2).tobytes()}), "must be positive"),
    "NaN pixdim": (lambda t: _raw_nifti(t / "nn.nii", {88: np.float32(np.nan).tobytes()}), "does not say how large"),
    "no qform and no sform": (lambda t: _no_orientation(t / "noori.nii.gz"), "--assume-orientation"),
    "singular affine": (lambda t: _raw_nifti(t / "sing.nii", {312: np.zeros(4, "<f4").tobytes()}), "singular"),
    "all-zero image": (lambda t: _nifti(t / "zeros.nii.gz", np.zeros((24, 20, 16), np.float32)), "all zero"),
    "constant image": (lambda t: _nifti(t / "const.nii.gz", np.full((24, 20, 16), 7.0, np.float32)), "constant"),
    "binary mask as scan": (lambda t: _nifti(t / "mask.nii.gz", (_image() > 250).astype(np.float32)),
                            "distinct values"),
    "label map as scan": (lambda t: _nifti(t / "labels.nii.gz", (np.arange(7680).reshape(24, 20, 16) % 5)
                                          .astype(np.int16)), "distinct values"),
    "ten bright voxels": (lambda t: _nifti(t / "dot.nii.gz", _dot()), "differ from the background"),
    "mha corrupt compressed data": (lambda t: _corrupt_mha(t / "bad.mha"), "compressed image data"),
    "mha truncated compressed data": (lambda t: _truncate(_mha(t / "tr.mha"), -200), "compressed image data"),
    "mha truncated raw data": (lambda t: _truncate(_mha(t / "tr.mha", compress=False), -100), "truncated"),
    "mha 2D": (lambda t: _sitk_write(t / "flat.mha", np.arange(64, dtype=np.float32).reshape(8, 8)),
               "expected a 3D image"),
    "mha RGB vector": (lambda t: _sitk_write(t / "rgb.mha", np.zeros((8, 8, 8, 3), np.uint8), vector=True),
                       "values per voxel"),
    "mha zero spacing": (lambda t: _mha_header_edit(t / "zs.mha", b"ElementSpacing = ", b"ElementSpacing = 0 0.8 3.5"),
                         "voxel size (ElementSpacing)"),
    "mha NaN spacing": (lambda t: _mha_header_edit(t / "ns.mha", b"ElementSpacing = ", b"ElementSpacing = 0.8 nan 3.5"),
                        "does not say how large"),
    "mha huge DimSize": (lambda t: _mha_header_edit(t / "hd.mha", b"DimSize = ",
                                                    b"DimSize = 90000 90000 90000"), "more than the"),
    "mha DimSize / NDims mismatch": (lambda t: _mha_header_edit(t / "dm.mha", b"DimSize = ",
                                                                b"DimSize = 24 20"), "NDims = 3 but DimSize"),
    "mhd missing raw file": (lambda t: _mhd_missing(t), "does not exist"),
    "all-zero mha": (lambda t: _mha(t / "zeros.mha", np.zeros((24, 20, 16), np.float32)), "all zero"),
    "broken symlink": (lambda t: os.symlink(t / "gone.nii.gz", t / "link.nii.gz") or t / "link.nii.gz",
                       "broken symbolic link"),
    "symlink loop": (lambda t: (os.symlink(t / "b.nii.gz", t / "a.nii.gz"), os.symlink(t / "a.nii.gz", t / "b.nii.gz"))
                     and t / "a.nii.gz", "symbolic link loop"),
    "fifo": (lambda t: os.mkfifo(t / "pipe.nii.gz") or t / "pipe.nii.gz", "not a regular file"),
}


def _dot() -> np.ndarray:
    a = np.zeros((64, 64, 32), np.float32)
    a[30:32, 30:35, 16] = np.arange(1, 11).reshape(2, 5)  # 10 of 131072 voxels: under 0.1%
    return a


def _sitk_write(path, arr, vector=False):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=vector), str(path), useCompression=True)
    return path


def _mhd_missing(t):
    p = _mha(t / "x.mhd", compress=False)  # SimpleITK writes x.mhd + x.raw
    (t / "x.raw").unlink()
    return p


def _run(argv, capsys):
    t0 = time.perf_counter()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err, time.perf_counter() - t0  # seconds: reported by benchmarks, never asserted


def _assert_one_line_error(rc, out, err, *words):
    assert rc != 0
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_scan_is_refused_in_one_line(tmp_path, capsys, monkeypatch, kind):
    build, words = CASES[kind]
    _forbid_phases(monkeypatch)  # refused on reading, before any phase
    data = tmp_path / "data"
    data.mkdir()
    scan = build(data)
    before = _files_under(data)
    out = tmp_path / "out"
    rc, stdout, err, _ = _run(["segment", scan, "--out", out, "--instance-method", "geometric"], capsys)
    _assert_one_line_error(rc, stdout, err, str(scan), words)
    assert not out.exists(), _files_under(out)
    assert _files_under(data) == before  # no derivatives_seg, no partial file beside the scan


def test_permission_denied_is_said_so(tmp_path, capsys, monkeypatch):
    import spineps_like.io as io

    scan = _nifti(tmp_path / "locked.nii.gz")
    if os.geteuid() != 0:
        scan.chmod(0)
    else:  # root reads every file: make the open fail as it does for other users
        real = io._open_for_reading

        def denied(p):
            if os.fspath(p) == os.fspath(scan):
                raise PermissionError(13, "Permission denied", os.fspath(p))
            return real(p)

        monkeypatch.setattr(io, "_open_for_reading", denied)
    rc, out, err, _ = _run(["segment", scan, "--out", tmp_path / "out"], capsys)
    _assert_one_line_error(rc, out, err, str(scan), "permission denied")
    assert not (tmp_path / "out").exists()


def test_missing_orientation_is_accepted_with_a_warning_under_the_flag(tmp_path, capsys):
    scan = _no_orientation(tmp_path / "noori.nii.gz")
    rc, out, err, _ = _run(["info", scan, "--assume-orientation", "LAS"], capsys)
    assert rc == 0 and "orientation LAS" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "assumed LAS" in lines[0] and str(scan) in lines[0]


# ------------------------------------------------------------------ checks before work (a good image, bad settings)
def _broken_instance_model(t, what):
    import shutil

    from spineps_like.models import find_model

    src = find_model("instance-phantom").path
    dst = t / "inst"
    shutil.copytree(src, dst)
    if what == "config":
        (dst / "inference_config.json").write_text("{not json")
    elif what == "weights":
        w = next(iter(dst.glob("**/*.ckpt")))
        w.write_bytes(w.read_bytes()[:-1000])  # the manifest no longer matches
    elif what == "no weights":
        for w in dst.glob("**/*.ckpt"):
            w.unlink()
    return dst


def _broken_semantic_model(t, what):
    import shutil

    from spineps_like.models import find_model

    src = find_model("semantic-phantom").path
    dst = t / "sem"
    shutil.copytree(src, dst)
    plans = next(iter(dst.glob("**/plans.json")))
    plans.write_text(plans.read_text() + "x")  # manifest mismatch
    return dst


SETTINGS = {
    "--out is a file": (lambda t: ["--out", _put(t / "f.txt", "x")], "is a file, not a folder"),
    "--out below a file": (lambda t: ["--out", (_put(t / "f.txt", "x")) / "sub"],
                           "is a file, so the folder cannot be made"),
    "--out not writable": (lambda t: ["--out", "/proc/spineps-like-out"], "--out /proc/spineps-like-out"),
    "unknown semantic model": (lambda t: ["--semantic-model", "no-such-model"], "unknown model 'no-such-model'"),
    "semantic model folder missing": (lambda t: ["--semantic-model", t / "nowhere" / "model"], "no such model folder"),
    "semantic model with a changed file": (lambda t: ["--semantic-model", _broken_semantic_model(t, "plans")],
                                           "sha256 mismatch"),
    "instance model not a model": (lambda t: ["--instance-model", (t / "empty").mkdir() or t / "empty"],
                                   "no inference_config.json"),
    "instance model with broken config": (lambda t: ["--instance-model", _broken_instance_model(t, "config")],
                                          "invalid JSON"),
    "instance model with corrupt weights": (lambda t: ["--instance-model", _broken_instance_model(t, "weights")],
                                            "sha256 mismatch"),
    "instance model without weights": (lambda t: ["--instance-model", _broken_instance_model(t, "no weights")],
                                       "weights file"),
    "unknown device": (lambda t: ["--device", "tpu"], "unknown device"),
    "cuda without CUDA": (lambda t: ["--device", "cuda"], "CUDA is not available"),
}


def _forbid_phases(monkeypatch):
    """Make the semantic phase raise: a check that passes only if it runs before any phase (how fast that is, is
    measured by benchmarks/check_before_work.py, not asserted here)."""
    import spineps_like.semantic

    def no_phase(*a, **k):
        raise AssertionError("the semantic phase ran before the settings were checked")

    monkeypatch.setattr(spineps_like.semantic, "predict_semantic", no_phase)


@pytest.mark.parametrize("kind", list(SETTINGS))
def test_bad_settings_fail_before_work(tmp_path, capsys, monkeypatch, kind):
    if kind == "cuda without CUDA":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    if kind == "--out not writable" and os.access("/proc", os.W_OK) and os.path.exists("/proc/spineps-like-out"):
        pytest.skip("/proc is writable here")
    scan = _nifti(tmp_path / "sub-01_T2w.nii.gz")
    make, words = SETTINGS[kind]
    extra = make(tmp_path)
    before = _files_under(tmp_path)
    _forbid_phases(monkeypatch)
    rc, out, err, _ = _run(["segment", scan, *extra], capsys)
    _assert_one_line_error(rc, out, err, words)
    assert "phase ran" not in err
    assert _files_under(tmp_path) == before


def _unverified_corrupt_model(t, kind):
    """A model folder without MANIFEST.sha256 (as real SPINEPS weights come) whose weights file is truncated."""
    import shutil

    from spineps_like.models import find_model

    dst = t / kind
    shutil.copytree(find_model("semantic-phantom" if kind == "semantic" else "instance-phantom").path, dst)
    (dst / "MANIFEST.sha256").unlink()
    w = next(iter([*dst.glob("**/checkpoint_final.pth"), *dst.glob("**/*.ckpt")]))
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])
    return dst, w


@pytest.mark.parametrize("kind", ["semantic", "instance"])
def test_unverified_model_with_corrupt_weights_fails_before_work(tmp_path, capsys, monkeypatch, kind):
    """Weights a user brings carry no manifest: they load with a warning, and a corrupt weights file is one error line
    naming that file, before any phase runs (the semantic phase would raise here), with nothing written."""
    import spineps_like.semantic

    def no_phase(*a, **k):
        raise AssertionError("the semantic phase ran before the weights were checked")

    monkeypatch.setattr(spineps_like.semantic, "predict_semantic", no_phase)
    scan = _nifti(tmp_path / "sub-01_T2w.nii.gz")
    model, weights = _unverified_corrupt_model(tmp_path, kind)
    before = _files_under(tmp_path)
    rc, out, err, _ = _run(["segment", scan, f"--{kind}-model", model], capsys)
    lines = err.strip().splitlines()
    assert rc != 0 and out == "" and "Traceback" not in err and "semantic phase ran" not in err
    assert len(lines) == 2 and "no MANIFEST.sha256" in lines[0], err
    assert str(weights) in lines[1] and "error" in lines[1], lines[1]
    assert _files_under(tmp_path) == before


def _mask(path, shape=(40, 40, 12), affine=None, dtype=np.int16, values=(0, 49)):
    """A small label mask: a block of ``values[1]`` in the middle (float data when dtype is a float type)."""
    a = np.full(shape, values[0], dtype=dtype)
    a[10:30, 10:30, 3:9] = values[1]
    return _nifti(path, a, affine)


#: Masks given to `evaluate`, `measure` and `segment --semantic-mask`: name -> (argv builder, words of the error).
MASK_INPUTS = {
    "evaluate: prediction missing": (
        lambda t: ["evaluate", t / "nowhere.nii.gz", _mask(t / "g.nii.gz"), "--out", t / "o"], "does not exist"),
    "evaluate: reference folder without masks": (
        lambda t: ["evaluate", (t / "p").mkdir() or _mask(t / "p" / "a.nii.gz").parent, (t / "g").mkdir() or t / "g",
                   "--out", t / "o"], "no reference mask"),
    "evaluate: a file and a folder": (
        lambda t: ["evaluate", _mask(t / "p.nii.gz"), (t / "g").mkdir() or t / "g", "--out", t / "o"],
        "give all files or all folders"),
    "evaluate: grids differ": (
        lambda t: ["evaluate", _mask(t / "p.nii.gz", shape=(38, 40, 12)), _mask(t / "g.nii.gz"), "--out", t / "o"],
        "differs from the reference grid"),
    "evaluate: prediction is not a mask": (
        lambda t: ["evaluate", _mask(t / "p.nii.gz", dtype=np.float32, values=(0.25, 49.5)), _mask(t / "g.nii.gz"),
                   "--out", t / "o"], "non-integer values"),
    "evaluate: prediction is not an image": (
        lambda t: ["evaluate", _put(t / "p.nii.gz", "not an image"), _mask(t / "g.nii.gz"), "--out", t / "o"],
        "not a readable image"),
    "measure: masks on different grids": (
        lambda t: ["measure", _mask(t / "s.nii.gz"), _mask(t / "i.nii.gz", shape=(40, 40, 10)), "--out",
                   t / "m.json"], "i.nii.gz"),
    "measure: semantic mask missing": (
        lambda t: ["measure", t / "nowhere.nii.gz", _mask(t / "i.nii.gz"), "--out", t / "m.json"], "nowhere.nii.gz"),
    "segment: --semantic-mask on another grid": (
        lambda t: ["segment", _nifti(t / "sub-01_T2w.nii.gz"), "--semantic-mask", _mask(t / "s.nii.gz"), "--out",
                   t / "o"], "s.nii.gz"),
    "segment: --semantic-mask is not a mask": (
        lambda t: ["segment", _nifti(t / "sub-01_T2w.nii.gz"), "--semantic-mask",
                   _nifti(t / "s.nii.gz", _image().astype(np.float32) + 0.5), "--out", t / "o"], "non-integer"),
}


@pytest.mark.parametrize("kind", list(MASK_INPUTS))
def test_bad_masks_are_refused_in_one_line(tmp_path, capsys, kind):
    """Masks a user brings (to evaluate, measure, or instead of the semantic phase): one line, non-zero exit, and
    nothing written."""
    make, words = MASK_INPUTS[kind]
    argv = make(tmp_path)
    before = _files_under(tmp_path)
    rc, out, err, _ = _run(argv, capsys)
    _assert_one_line_error(rc, out, err, words)
    assert _files_under(tmp_path) == before


def test_cohort_status_on_a_file_that_is_not_a_database(tmp_path, capsys):
    (tmp_path / "cohort.sqlite").write_bytes(b"this is not sqlite\n" * 100)
    rc, out, err, _ = _run(["cohort", "status", tmp_path], capsys)
    _assert_one_line_error(rc, out, err, str(tmp_path / "cohort.sqlite"), "not an SQLite database")
    with pytest.raises(sqlite3.DatabaseError):  # the premise: sqlite itself refuses it
        sqlite3.connect(tmp_path / "cohort.sqlite").execute("select * from sqlite_master").fetchall()


def test_cohort_run_with_out_a_file_or_a_bad_model_fails_before_work(tmp_path, capsys, monkeypatch):
    _forbid_phases(monkeypatch)
    data = tmp_path / "data"
    data.mkdir()
    _nifti(data / "sub-01_T2w.nii.gz")
    (tmp_path / "out.txt").write_text("x")
    rc, out, err, _ = _run(["cohort", "run", data, "--out", tmp_path / "out.txt", "-q"], capsys)
    _assert_one_line_error(rc, out, err, "is a file, not a folder")
    rc, out, err, _ = _run(["cohort", "run", data, "--out", tmp_path / "o", "-q", "--instance-model",
                                  tmp_path / "nowhere"], capsys)
    _assert_one_line_error(rc, out, err, "no such model folder")
    assert "phase ran" not in err
    assert not (tmp_path / "o").exists()


def test_api_array_with_a_3x3_affine_is_one_clear_error():
    from spineps_like.pipeline import segment

    with pytest.raises(ValueError, match="4 x 4"):
        segment(_image(), affine=np.eye(3))
