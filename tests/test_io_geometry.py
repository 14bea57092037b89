import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from spineps_like.geometry import (bbox, oriented_view, rescale, reorient, resample_to, to_input_grid,
                                    to_model_grid)
from spineps_like.io import (Scan, ScanError, atomic_path, derivative_name, derivatives_dir, load_scan, save_mask,
                             save_scan)


def _oblique_scan(shape=(20, 30, 12), seed=0) -> Scan:
    rng = np.random.default_rng(seed)
    aff = np.array([[0.0, 0.0, -3.3, 40.0], [-0.8, 0.0, 0.0, 10.0], [0.0, -0.9, 0.0, 55.0], [0, 0, 0, 1]])
    return Scan(rng.random(shape).astype(np.float32), aff)


@pytest.mark.parametrize("codes", ["PIR", "RAS", "LPS", "SAL", "IRP"])
def test_reorient_round_trip_is_bit_exact(codes):
    scan = _oblique_scan()
    there = reorient(scan, codes)
    assert there.orientation == codes
    back = reorient(there, scan.orientation)
    assert back.shape == scan.shape
    np.testing.assert_array_equal(back.array, scan.array)
    np.testing.assert_allclose(back.affine, scan.affine, atol=1e-9)
    # world position of every voxel is kept: compare the world coordinate of one voxel both ways
    ijk = np.array([3, 7, 5, 1.0])
    world = scan.affine @ ijk
    idx = np.linalg.solve(there.affine, world)
    assert np.allclose(idx, np.round(idx))
    assert there.array[tuple(np.round(idx[:3]).astype(int))] == scan.array[3, 7, 5]


def test_model_grid_round_trip_returns_original_grid_and_mask():
    scan = _oblique_scan()
    mask = Scan((scan.array > 0.5).astype(np.int16) * 49, scan.affine)
    # resolution range that contains the spacing: only a reorientation, so the round trip is exact
    on_model = to_model_grid(mask, "PIR", [[0.5, 0.5, 0.5], [4.0, 4.0, 4.0]], order=0)
    assert on_model.orientation == "PIR"
    back = to_input_grid(on_model, mask)
    np.testing.assert_array_equal(back.array, mask.array)
    np.testing.assert_array_equal(back.affine, mask.affine)
    # a real resampling (to 0.4 mm, an exact subdivision for nearest neighbour) still lands on the input grid
    fine = to_model_grid(mask, "PIR", [[0.4, 0.4, 0.4], [0.4, 0.4, 0.4]], order=0)
    assert fine.spacing == pytest.approx((0.4, 0.4, 0.4))
    back = to_input_grid(fine, mask)
    assert back.shape == mask.shape
    assert np.mean(back.array == mask.array) > 0.97


def test_resample_to_same_grid_returns_input_untouched():
    scan = _oblique_scan()
    assert resample_to(scan, scan.shape, scan.affine) is scan
    assert rescale(scan, scan.spacing) is scan


def test_rescale_keeps_field_of_view_and_mask_labels():
    m = np.zeros((40, 40, 10), np.int16)
    m[10:30, 5:20, 2:8] = 49
    m[10:30, 22:30, 2:8] = 100
    scan = Scan(m, np.diag([1.0, 1.0, 3.0, 1.0]))
    half = rescale(scan, (2.0, 2.0, 3.0), order=0)
    assert half.shape == (20, 20, 10)
    assert set(np.unique(half.array)) == {0, 49, 100}
    c_full = nib.affines.apply_affine(scan.affine, (np.array(scan.shape) - 1) / 2)
    c_half = nib.affines.apply_affine(half.affine, (np.array(half.shape) - 1) / 2)
    np.testing.assert_allclose(c_full, c_half, atol=1e-6)


def test_mha_and_nifti_load_to_same_array_and_geometry(tmp_path):
    scan = _oblique_scan()
    save_scan(scan, tmp_path / "a.nii.gz")
    save_scan(scan, tmp_path / "a.mha")
    a = load_scan(tmp_path / "a.nii.gz")
    b = load_scan(tmp_path / "a.mha")
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    assert a.spacing == pytest.approx(b.spacing)
    assert a.orientation == b.orientation


def test_mha_written_by_simpleitk_matches_nifti_written_by_simpleitk(tmp_path, sample_ct):
    """Cross-check the LPS->RAS conversion against ITK itself: ITK writes both formats of one image."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(sample_ct["image"]))
    sitk.WriteImage(img, str(tmp_path / "ct.mha"))
    a = load_scan(sample_ct["image"])
    b = load_scan(tmp_path / "ct.mha")
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)


def test_mask_dtype_and_round_trip(tmp_path, sample_mri):
    m = load_scan(sample_mri["instance"], kind="mask")
    assert np.issubdtype(m.array.dtype, np.integer)
    save_mask(m, tmp_path / "m.nii.gz")
    back = load_scan(tmp_path / "m.nii.gz", kind="mask")
    np.testing.assert_array_equal(back.array, m.array)
    assert set(np.unique(back.array)) >= {5, 6, 7, 105, 205}


def _write(tmp_path, name, arr, affine=None):
    p = tmp_path / name
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(p))
    return p


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file"),
        ("text", "not a readable image"),
        ("2d", "expected a 3D image"),
        ("4d", "expected a 3D image"),
        ("nan", "NaN/inf"),
        ("inf", "NaN/inf"),
        ("zero", "zero-sized axis"),
        ("suffix", "unsupported file type"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, case, message):
    if case == "missing":
        p = tmp_path / "nope.nii.gz"
    elif case == "text":
        p = tmp_path / "notes.nii.gz"
        p.write_text("this is not an image\n")
    elif case == "2d":
        p = _write(tmp_path, "flat.nii.gz", np.zeros((5, 5), np.float32))
    elif case == "4d":
        p = _write(tmp_path, "dwi.nii.gz", np.zeros((5, 5, 5, 3), np.float32))
    elif case in ("nan", "inf"):
        a = np.ones((5, 5, 5), np.float32)
        a[1, 2, 3] = np.nan if case == "nan" else np.inf
        p = _write(tmp_path, f"{case}.nii.gz", a)
    elif case == "zero":
        p = _write(tmp_path, "empty.nii.gz", np.zeros((5, 0, 5), np.float32))
    else:
        p = tmp_path / "scan.png"
        p.write_bytes(b"\x89PNG")
    with pytest.raises(ScanError, match=message) as err:
        load_scan(p)
    text = str(err.value)
    assert "\n" not in text and str(p) in text
    # the CLI prints it as one line with a non-zero exit
    proc = subprocess.run([sys.executable, "-m", "spineps_like.cli", "info", str(p)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(p) in lines[0]


def test_atomic_write_removes_temporary_on_error(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_killed_midway_leaves_no_file_under_the_final_name(tmp_path):
    target = tmp_path / "big.nii"
    code = (
        "import sys, time, numpy as np\n"
        "from spineps_like.io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    with open(tmp, 'wb') as f:\n"
        "        f.write(b'x' * 1000)\n"
        "        f.flush()\n"
        "        print('writing', flush=True)\n"
        "        time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert not target.exists()
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".big.nii.") and ".part" in p.name for p in leftovers)


def test_atomic_replace_keeps_old_file_until_done(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("new but unfinished")
            raise KeyboardInterrupt
    assert target.read_text() == "old"


def test_bids_derivative_names(tmp_path):
    assert (derivative_name("sub-0001_acq-sag_T2w.nii.gz", "spine", "msk", ".nii.gz")
            == "sub-0001_acq-sag_mod-T2w_seg-spine_msk.nii.gz")
    assert (derivative_name("sub-01_ses-2_acq-ax_ct.nii.gz", "vert", "msk", ".nii.gz")
            == "sub-01_ses-2_acq-ax_mod-ct_seg-vert_msk.nii.gz")
    assert derivative_name("patient 7.mha", "spine", "ctd", ".json") == "sub-patient7_mod-img_seg-spine_ctd.json"
    raw = tmp_path / "ds" / "rawdata" / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_T2w.nii.gz"
    assert derivatives_dir(raw) == (tmp_path / "ds" / "derivatives_seg" / "sub-01" / "ses-1").resolve()
    assert derivatives_dir(tmp_path / "x.nii.gz") == (tmp_path / "derivatives_seg").resolve()


def test_bbox():
    m = np.zeros((10, 10, 10), bool)
    assert bbox(m) is None
    m[2:4, 5, 7:9] = True
    assert bbox(m) == (slice(2, 4), slice(5, 6), slice(7, 9))
    assert bbox(m, margin=3) == (slice(0, 7), slice(2, 9), slice(4, 10))


@pytest.mark.parametrize("shape", [(7,), (5, 9), (6, 7, 8), (3, 4, 5, 6), (1, 1, 1), (4, 1, 3)])
def test_bbox_is_the_extent_of_the_non_zero_voxels_on_every_axis(shape):
    """bbox's one-projection shortcut against the definition: per axis, the first and last index whose slice holds a
    non-zero voxel (random sparse masks, integer masks, margins that clip)."""
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    for _ in range(200):
        m = (rng.random(shape) > rng.choice([0.5, 0.9, 0.99, 1.0])) * rng.integers(1, 300, shape)
        for margin in (0, 2):
            if not m.any():
                assert bbox(m, margin) is None
                continue
            expected = []
            for ax in range(m.ndim):
                nz = np.flatnonzero(np.moveaxis(m, ax, 0).reshape(m.shape[ax], -1).any(axis=1))
                expected.append(slice(max(0, nz[0] - margin), min(m.shape[ax], nz[-1] + 1 + margin)))
            assert bbox(m, margin) == tuple(expected)
            assert bbox(m.astype(bool), margin) == tuple(expected)


@pytest.mark.parametrize("seed", range(4))
def test_nearest_resampling_onto_a_box_is_the_crop_of_the_whole(seed):
    """resample_to(..., box=) maps each voxel as for the whole grid: a crop's own affine would move ties at half
    voxels (a coarse instance grid restored onto a fine scan's spine box)."""
    rng = np.random.default_rng(seed)
    for _ in range(10):
        shape = tuple(int(n) for n in rng.integers(20, 60, 3))
        aff = np.diag([*rng.choice([0.5, 0.6, 0.75, 0.9, 1.0, 1.2, 3.3], 3), 1.0])
        aff[:3, 3] = rng.normal(0, 50, 3)
        fine = Scan(np.zeros(shape, np.uint8), aff)
        coarse = rescale(fine, rng.choice([1.5, 2.0, 3.0], 3), order=0)
        coarse = Scan(rng.integers(0, 9, coarse.shape).astype(np.uint16), coarse.affine)
        lo = [int(rng.integers(0, n // 2)) for n in shape]
        box = tuple(slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(lo, shape))
        got = resample_to(coarse, shape, aff, order=0, box=box)
        assert np.array_equal(got.array, resample_to(coarse, shape, aff, order=0).array[box])
        assert got.array.flags.c_contiguous


def test_atomic_write_gives_usual_permissions(tmp_path):
    import stat

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644


def test_json_written_by_every_module_is_strict_json(tmp_path):
    import json
    from pathlib import Path

    from spineps_like.io import atomic_write_json

    obj = {1: np.int64(3), "f": np.float32(0.5), "nan": float("nan"), "inf": np.float64(-np.inf),
           "arr": np.arange(3), "path": Path("a/b"), "flag": np.bool_(True), "nested": [(np.int16(2), None)]}
    p = atomic_write_json(tmp_path / "x.json", obj)
    text = p.read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert back == {"1": 3, "f": 0.5, "nan": None, "inf": "-inf", "arr": [0, 1, 2], "path": "a/b", "flag": True,
                    "nested": [[2, None]]}


def test_surface_voxels_are_the_voxels_with_an_outside_face_neighbour():
    from scipy import ndimage as ndi

    from spineps_like.masks import surface_voxels

    rng = np.random.default_rng(5)
    mask = ndi.binary_closing(rng.random((20, 24, 9)) < 0.6, iterations=1)
    expected = np.argwhere(mask & ~ndi.binary_erosion(mask, border_value=0))
    assert np.array_equal(surface_voxels(mask), expected)
    assert len(surface_voxels(np.zeros((3, 3, 3), bool))) == 0


@pytest.mark.parametrize("seed", range(6))
def test_nearest_resampling_of_axis_aligned_grids_matches_scipy(seed):
    """The gather path for masks on rescaled grids picks the same voxels as scipy's order-0 affine_transform."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(5, 40, 3))
    arr = rng.integers(0, 30, shape).astype(np.uint16)
    affine = np.diag([*rng.uniform(0.4, 4.0, 3), 1.0])
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    scan = Scan(arr, affine)
    spacing = rng.uniform(0.3, 5.0, 3)
    if seed % 2:  # a grid whose field of view sticks out of the source's: clamped to the edge voxels
        new_affine = affine @ np.diag([*(spacing / np.diag(affine)[:3]), 1.0])
        new_affine[:3, 3] -= rng.uniform(1, 5, 3)
        new_shape = tuple(int(n) for n in rng.integers(5, 60, 3))
    else:
        res = rescale(Scan(arr.astype(np.float32), affine), spacing, order=1)
        new_shape, new_affine = res.shape, res.affine
    fast = resample_to(scan, new_shape, new_affine, order=0)
    m = np.linalg.inv(affine) @ new_affine
    ref = ndimage.affine_transform(arr.astype(np.float32), m[:3, :3], m[:3, 3], new_shape, order=0, mode="nearest")
    assert fast.array.dtype == arr.dtype and fast.shape == tuple(new_shape)
    np.testing.assert_array_equal(fast.array, ref.astype(np.uint16))
    np.testing.assert_allclose(fast.affine, new_affine)


@pytest.mark.parametrize("seed", range(6))
def test_spline_resampling_of_axis_aligned_grids_matches_scipy(seed):
    """Images on rescaled grids get scipy's zoom-shift result (affine_transform with the diagonal as a 1-D matrix),
    inside and beyond the source's field of view: linear exactly, for any number of threads (scipy's own code in
    slabs), cubic to float rounding (one axis at a time); and the general matrix path's to float rounding."""
    from scipy import ndimage

    rng = np.random.default_rng(100 + seed)
    shape = tuple(int(n) for n in rng.integers(6, 40, 3))
    arr = (rng.random(shape) * 1000).astype(np.float32)
    affine = np.diag([*rng.uniform(0.4, 4.0, 3), 1.0])
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    new_affine = affine @ np.diag([*(rng.uniform(0.3, 5.0, 3) / np.diag(affine)[:3]), 1.0])
    new_affine[:3, 3] -= rng.uniform(-5, 5, 3) if seed % 2 else 0.0
    new_shape = tuple(int(n) for n in rng.integers(5, 70, 3))
    m = np.linalg.inv(affine) @ new_affine
    for order in (1, 3):
        ref = ndimage.affine_transform(arr, np.diag(m[:3, :3]), m[:3, 3], new_shape, order=order, mode="nearest")
        general = ndimage.affine_transform(arr, m[:3, :3], m[:3, 3], new_shape, order=order, mode="nearest")
        np.testing.assert_allclose(ref, general, rtol=1e-5, atol=1e-3)
        for threads in (1, 2, 3):
            out = resample_to(Scan(arr, affine), new_shape, new_affine, order=order, threads=threads)
            assert out.array.dtype == np.float32 and out.shape == new_shape
            if order == 1:
                np.testing.assert_array_equal(out.array, ref.astype(np.float32), err_msg=f"{threads} threads")
            else:
                np.testing.assert_allclose(out.array, ref, rtol=1e-6, atol=1e-4)
            np.testing.assert_allclose(out.affine, new_affine)


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_cubic_resampling_one_axis_at_a_time(shift):
    """The 1-D cubic operator is scipy's 1-D interpolation (positions inside, between and far beyond the samples),
    and the separable resampling equals scipy's 3-D one to float rounding, also when an axis keeps its grid (a
    sagittal scan's slices: that axis is left as it is) or only shifts by half a voxel (it must not be)."""
    from scipy import ndimage

    from spineps_like.geometry import cubic_spline_operator, separable_cubic_resample

    rng = np.random.default_rng(7)
    line = rng.random(23) * 100
    for scale, offset, m in ((0.37, -9.2, 90), (2.4, 1.1, 11), (1.0, 0.5, 23)):
        ref = ndimage.affine_transform(line, [scale], [offset], output_shape=(m,), order=3, mode="nearest")
        np.testing.assert_allclose(cubic_spline_operator(23, scale, offset, m) @ line, ref, rtol=1e-12, atol=1e-10)
    arr = (rng.random((30, 41, 9)) * 1000).astype(np.float32)
    scale, offset, shape = np.array([2.4, 1.3, 1.0]), np.array([1.1, -0.2, shift]), (13, 31, 9)
    ref = ndimage.affine_transform(arr, scale, offset, output_shape=shape, order=3, mode="nearest")
    np.testing.assert_allclose(separable_cubic_resample(arr, scale, offset, shape), ref, rtol=1e-6, atol=1e-4)

def test_voxel_coords_is_argwhere():
    """The flat-index route gives np.argwhere's coordinates, order, shape and dtype (empty, full, 1-D to 4-D)."""
    from spineps_like.masks import voxel_coords

    rng = np.random.default_rng(3)
    for shape in [(5,), (4, 6), (7, 8, 9), (2, 3, 4, 5), (0, 3, 4), (3, 1, 2)]:
        for p in (0.0, 0.3, 1.0):
            m = (rng.random(shape) < p) * rng.integers(1, 5, shape)
            got, ref = voxel_coords(m), np.argwhere(m)
            assert got.shape == ref.shape and got.dtype == ref.dtype and np.array_equal(got, ref)


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.uint16, np.int32, np.float32])
def test_nonzero_index_and_coords_are_numpys(dtype):
    """nonzero_index / nonzero_coords answer np.flatnonzero / np.nonzero exactly (values, order, index dtype), on
    C-ordered arrays and on strided views, empty and full ones included."""
    from spineps_like.masks import nonzero_coords, nonzero_index

    rng = np.random.default_rng(4)
    for p in (0.0, 0.2, 1.0):
        m = ((rng.random((9, 11, 7)) < p) * rng.integers(1, 200, (9, 11, 7))).astype(dtype)
        for a in (m, m[1:8, ::2, 2:], m.transpose(2, 0, 1)):
            got, ref = nonzero_index(a), np.flatnonzero(a)
            assert got.dtype == ref.dtype and np.array_equal(got, ref)
            coords = nonzero_coords(a)
            assert len(coords) == 3 and all(g.dtype == r.dtype and np.array_equal(g, r)
                                            for g, r in zip(coords, np.nonzero(a)))


@pytest.mark.parametrize("codes", ["PIR", "RAS", "LPS", "SAL"])
def test_oriented_view_writes_a_box_where_reorient_puts_it(codes):
    """Writing a box through oriented_view (no copy) gives the array that reorienting a filled copy back gives."""
    scan = _oblique_scan()
    there = reorient(scan, codes)
    box = (slice(2, 9), slice(3, 11), slice(1, 5))
    filled = np.zeros(there.shape, np.float32)
    filled[box] = there.array[box]
    expected = reorient(Scan(filled, there.affine), scan.orientation).array
    out = np.zeros(scan.shape, np.float32)
    view = oriented_view(out, scan.affine, codes)
    assert view.shape == there.shape and np.shares_memory(view, out)
    view[box] = there.array[box]
    np.testing.assert_array_equal(out, expected)
    assert out.any()
