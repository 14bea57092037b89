"""DICOM in and DICOM-SEG out (issue 30, parts 1 and 2).

Series are written from phantoms by pydicom with realistic tags (tests/dicom_series.py), by highdicom (an enhanced
multi-frame file) and by SimpleITK/GDCM. Each must load to the array and affine of the NIfTI of the same data, segment
to the same masks, and the DICOM-SEG written for it must read back (highdicom and plain pydicom) equal to the NIfTI
masks. Bad DICOM input is one line naming the folder or file, a non-zero exit and no output.
"""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
from dicom_series import LPS, header, rotation, write_enhanced, write_series, write_sitk_series
from test_bad_inputs import _assert_one_line_error, _files_under, _run

from spineps_like.geometry import reorient
from spineps_like.io import Scan, ScanError, load_scan, save_scan
from spineps_like.phantom.generate import make_phantom

GEOMETRIC = ["--instance-method", "geometric", "--no-snapshot", "-q"]


@pytest.fixture(scope="module")
def sagittal():
    """A small lumbar T2w phantom in DICOM's sagittal layout: columns P, rows I, slices R (PIR), 111 x 165 x 20."""
    return make_phantom(3, fov="lumbar", mode="t2w", spacing=(2.0, 2.0, 4.0), orientation="PIR")


@pytest.fixture(scope="module")
def axial_ct():
    """A small lumbar CT phantom (HU) in DICOM's axial layout: columns L, rows P, slices S (LPS), 39 x 111 x 83."""
    return make_phantom(4, fov="lumbar", mode="ct", spacing=(2.0, 4.0, 2.0), orientation="LPS")


def _nifti(tmp_path, name, array, affine):
    return save_scan(Scan(array, affine), tmp_path / name)


def _same(a: Scan, b: Scan) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)


# ------------------------------------------------------------------ DICOM in: geometry and values
CASES = {  # name -> (phantom fixture, affine change, modality, rescale)
    "sagittal MR": ("sagittal", None, "MR", dict(slope=0.5)),
    "sagittal MR, slope per slice": ("sagittal", None, "MR", dict(slope_per_slice=np.linspace(0.2, 0.45, 20))),
    "oblique sagittal MR": ("sagittal", rotation("z", 12) @ rotation("x", -7), "MR", dict(slope=0.25)),
    "axial CT (HU)": ("axial_ct", None, "CT", dict(intercept=-1024.0)),
    "axial CT, flipped in-plane (RAS)": ("axial_ct", np.diag([-1.0, -1.0, 1.0, 1.0]), "CT",
                                         dict(intercept=-1024.0, slope=0.5)),
}


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
@pytest.mark.parametrize("case", list(CASES))
def test_series_loads_to_the_array_and_affine_of_the_nifti(tmp_path, request, case, order):
    fixture, change, modality, rescale = CASES[case]
    ph = request.getfixturevalue(fixture)
    affine = ph.image.affine if change is None else change @ ph.image.affine
    files, values, _ = write_series(tmp_path / "dcm", ph.image.array, affine, modality=modality, order=order,
                                    **rescale)
    if order != "ascending":  # neither the file names nor InstanceNumber follow the slices
        z = [float(header(f).SliceLocation) for f in files]
        assert z != sorted(z)
    nifti = load_scan(_nifti(tmp_path, "ref.nii.gz", values, affine))
    scan = load_scan(tmp_path / "dcm")
    _same(scan, nifti)
    assert scan.source.series.modality == modality and scan.source.series.images == len(files)
    if modality == "CT":  # RescaleIntercept applied: HU
        assert scan.array.min() == -1024 and scan.array.max() > 300


def test_geometry_agrees_with_simpleitk_gdcm_reader(tmp_path, sagittal):
    """An independent reader of the same files (ITK's GDCM ImageSeriesReader) gives the same grid."""
    import SimpleITK as sitk

    from spineps_like.io import _lps_to_ras_affine

    affine = rotation("y", 20) @ sagittal.image.affine
    write_series(tmp_path / "dcm", sagittal.image.array, affine, order="shuffled")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "dcm")))
    img = reader.Execute()
    itk_affine = _lps_to_ras_affine(np.array(img.GetDirection()), np.array(img.GetSpacing()),
                                    np.array(img.GetOrigin()))
    scan = load_scan(tmp_path / "dcm")
    np.testing.assert_allclose(scan.affine, itk_affine, atol=1e-4)
    np.testing.assert_allclose(scan.array, sitk.GetArrayFromImage(img).transpose(2, 1, 0), rtol=1e-6)


def test_left_handed_stack_is_ordered_along_the_slice_normal(tmp_path, sagittal):
    """Slices written right to left (a PIL array): the series is read along its normal (PIR), the same image."""
    pil = reorient(sagittal.image, "PIL")
    _, values, _ = write_series(tmp_path / "dcm", pil.array, pil.affine, order="shuffled")
    scan = load_scan(tmp_path / "dcm")
    assert scan.orientation == "PIR"
    _same(scan, reorient(load_scan(_nifti(tmp_path, "pil.nii.gz", values, pil.affine)), "PIR"))


def test_series_written_by_simpleitk_gdcm(tmp_path, axial_ct):
    _, values = write_sitk_series(tmp_path / "dcm", axial_ct.image.array, axial_ct.image.affine)
    _same(load_scan(tmp_path / "dcm"), load_scan(_nifti(tmp_path, "ref.nii.gz", values, axial_ct.image.affine)))


@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_enhanced_multiframe_file_loads_like_the_nifti(tmp_path, sagittal, axial_ct, modality):
    ph = sagittal if modality == "MR" else axial_ct
    affine = rotation("x", 9) @ ph.image.affine
    _, values, datasets = write_series(tmp_path / "classic", ph.image.array, affine, modality=modality,
                                       order="shuffled", slope=0.5, intercept=-1024.0 if modality == "CT" else 0.0)
    mf = write_enhanced(tmp_path / "enhanced" / "multiframe.dcm", datasets)
    assert "PerFrameFunctionalGroupsSequence" in header(mf) and int(header(mf).NumberOfFrames) == len(datasets)
    nifti = load_scan(_nifti(tmp_path, "ref.nii.gz", values, affine))
    for path in (tmp_path / "enhanced", mf):  # the folder, or the file itself
        scan = load_scan(path)
        _same(scan, nifti)
        assert scan.source.enhanced and sorted(scan.source.frame_order) == list(range(len(datasets)))


def test_files_that_are_not_dicom_and_non_image_objects_are_skipped(tmp_path, sagittal):
    """Documented choice: README/thumbnail files and a DICOMDIR-like object beside the series do not matter."""
    _, values, _ = write_series(tmp_path / "dcm", sagittal.image.array, sagittal.image.affine)
    (tmp_path / "dcm" / "README.txt").write_text("exported by PACS\n")
    (tmp_path / "dcm" / "thumb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    (tmp_path / "dcm" / ".DS_Store").write_bytes(b"\x00" * 10)
    _same(load_scan(tmp_path / "dcm"), load_scan(_nifti(tmp_path, "ref.nii.gz", values, sagittal.image.affine)))


# ------------------------------------------------------------------ segmentation: DICOM gives the NIfTI's masks
def _segment_both(tmp_path, capsys, ph, extra=()):
    _, values, _ = write_series(tmp_path / "sub-01_T2w", ph.image.array, ph.image.affine, order="shuffled")
    nifti = _nifti(tmp_path, "sub-01_T2w.nii.gz", values, ph.image.affine)
    mask = save_scan(ph.semantic, tmp_path / "semantic.nii.gz", dtype=np.uint8)
    outs = {}
    for name, src in (("dicom", tmp_path / "sub-01_T2w"), ("nifti", nifti)):
        outs[name] = tmp_path / f"out-{name}"
        rc, out, err, _ = _run(["segment", src, "--out", outs[name], "--semantic-mask", mask, *GEOMETRIC, *extra],
                               capsys)
        assert rc == 0, err
    return outs


def test_segment_from_dicom_folder_gives_the_masks_of_the_nifti(tmp_path, capsys, sagittal):
    outs = _segment_both(tmp_path, capsys, sagittal)
    for kind in ("spine", "vert"):
        a = nib.load(outs["dicom"] / f"sub-01_mod-T2w_seg-{kind}_msk.nii.gz")
        b = nib.load(outs["nifti"] / f"sub-01_mod-T2w_seg-{kind}_msk.nii.gz")
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
        assert np.asarray(a.dataobj).max() > 0
    summary = json.loads((outs["dicom"] / "sub-01_mod-T2w_seg-spine_summary.json").read_text())
    assert any(n.startswith("input: DICOM series 3") for n in summary["notes"])


@pytest.mark.slow
def test_segment_from_dicom_with_the_bundled_models_gives_the_masks_of_the_nifti(tmp_path, capsys, sagittal):
    outs = {}
    _, values, _ = write_series(tmp_path / "sub-01_T2w", sagittal.image.array, sagittal.image.affine)
    nifti = _nifti(tmp_path, "sub-01_T2w.nii.gz", values, sagittal.image.affine)
    for name, src in (("dicom", tmp_path / "sub-01_T2w"), ("nifti", nifti)):
        outs[name] = tmp_path / f"out-{name}"
        rc, _, err, _ = _run(["segment", src, "--out", outs[name], "--no-snapshot", "-q", "--allow-implausible"],
                             capsys)
        assert rc == 0, err
    for kind in ("spine", "vert"):
        a = nib.load(outs["dicom"] / f"sub-01_mod-T2w_seg-{kind}_msk.nii.gz")
        b = nib.load(outs["nifti"] / f"sub-01_mod-T2w_seg-{kind}_msk.nii.gz")
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


# ------------------------------------------------------------------ several series in one folder
@pytest.fixture()
def two_series(tmp_path, sagittal):
    folder = tmp_path / "study"
    _, t2, d2 = write_series(folder / "s3", sagittal.image.array, sagittal.image.affine, series_number=3,
                             description="T2 TSE SAG")
    _, t1, _ = write_series(folder / "s4", sagittal.image.array[::-1].copy(), sagittal.image.affine, series_number=4,
                            description="T1 TSE SAG", study_uid=str(d2[0].StudyInstanceUID),
                            frame_uid=str(d2[0].FrameOfReferenceUID))
    return folder, {"3": t2, "4": t1}, {"3": str(d2[0].SeriesInstanceUID)}


def test_two_series_without_a_choice_is_one_line_listing_them(tmp_path, capsys, two_series):
    folder, _, uids = two_series
    before = _files_under(tmp_path)
    rc, out, err, _ = _run(["segment", folder, "--out", tmp_path / "out", *GEOMETRIC], capsys)
    line = _assert_one_line_error(rc, out, err, str(folder), "holds 2 DICOM series", "--series",
                                  'series 3 "T2 TSE SAG"', 'series 4 "T1 TSE SAG"', uids["3"], "20 images")
    assert line.index("series 3") < line.index("series 4")
    assert _files_under(tmp_path) == before
    rc, out, err, _ = _run(["segment", folder, "--series", "7", "--out", tmp_path / "out", *GEOMETRIC], capsys)
    _assert_one_line_error(rc, out, err, str(folder), "no DICOM series matches --series '7'", "T1 TSE SAG")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["number", "description", "uid"])
def test_series_picks_one(two_series, how):
    folder, values, uids = two_series
    choice = {"number": "4", "description": "t2 tse sag", "uid": uids["3"]}[how]
    scan = load_scan(folder, series=choice)
    expect = "4" if how == "number" else "3"
    np.testing.assert_array_equal(scan.array, values[expect])
    assert str(scan.source.series.number) == expect


def test_series_flag_segments_one_and_names_outputs_after_it(tmp_path, capsys, two_series, sagittal):
    folder, _, _ = two_series
    mask = save_scan(sagittal.semantic, tmp_path / "semantic.nii.gz", dtype=np.uint8)
    for number in ("3", "4"):
        rc, _, err, _ = _run(["segment", folder, "--series", number, "--semantic-mask", mask, "--out",
                              tmp_path / "out", *GEOMETRIC], capsys)
        assert rc == 0, err
    names = _files_under(tmp_path / "out")
    assert "sub-studyseries3_mod-img_seg-vert_msk.nii.gz" in names
    assert "sub-studyseries4_mod-img_seg-vert_msk.nii.gz" in names
    rc, out, _, _ = _run(["info", folder, "--series", "T1 TSE SAG"], capsys)
    assert rc == 0 and 'DICOM series 4 "T1 TSE SAG"' in out and "orientation PIR" in out


# ------------------------------------------------------------------ bad DICOM input: one line, no output
def _shear(ph):
    """Gantry tilt: each slice shifted along the image's rows (head-feet) as the stack advances, the stack leaning 12
    degrees off the slice normal (the image planes keep their orientation)."""
    aff = ph.image.affine.copy()
    step = np.linalg.norm(aff[:3, 2])
    aff[:3, 2] += aff[:3, 1] / np.linalg.norm(aff[:3, 1]) * step * np.tan(np.radians(12))
    return aff


def _positions(ph, steps):
    lps = LPS @ ph.image.affine
    z = np.concatenate([[0.0], np.cumsum(steps)])
    normal = lps[:3, 2] / np.linalg.norm(lps[:3, 2])
    return [lps[:3, 3] + normal * d for d in z]


def _bad(kind, t, ph):
    a, aff = ph.image.array, ph.image.affine
    folder = t / "dcm"
    if kind == "empty folder":
        folder.mkdir()
    elif kind == "folder of non-DICOM files":
        folder.mkdir()
        (folder / "notes.txt").write_text("not an image\n")
        (folder / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)
    elif kind == "missing slice":
        write_series(folder, a, aff, skip=(7,), order="shuffled")
    elif kind == "gantry tilt":
        write_series(folder, a, _shear(ph))
    elif kind == "mixed orientations":
        lps = LPS @ aff
        sag = np.concatenate([lps[:3, 0], lps[:3, 1]]) / np.repeat(np.linalg.norm(lps[:3, :2], axis=0), 3)
        cor = np.array([1.0, 0.0, 0.0, 0.0, 0.0, -1.0])
        write_series(folder, a, aff, orientations=[sag if k < 15 else cor for k in range(a.shape[2])])
    elif kind == "non-uniform spacing":
        write_series(folder, a, aff, positions=_positions(ph, [4.0] * 10 + [5.2] * 9))
    elif kind == "two images at one position":
        write_series(folder, a, aff, positions=_positions(ph, [4.0] * 10 + [0.0] + [4.0] * 8))
    elif kind == "a single image":
        write_series(folder, a[:, :, :1], aff)
    elif kind == "truncated file in the series":
        files, _, _ = write_series(folder, a, aff)
        files[5].write_bytes(files[5].read_bytes()[:-3000])
        return folder, files[5]
    elif kind == "damaged header":
        files, _, _ = write_series(folder, a, aff)
        b = bytearray(files[2].read_bytes())
        b[132:400] = b"\xff" * 268
        files[2].write_bytes(bytes(b))
        return folder, files[2]
    elif kind == "colour image":
        files, _, datasets = write_series(folder, a[:, :, :4], aff)
        ds = datasets[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = np.zeros((ds.Rows, ds.Columns, 3), np.uint8).tobytes()
        ds.save_as(files[0], enforce_file_format=True)
        return folder, files[0]
    return folder, folder


BAD = {
    "empty folder": "empty folder",
    "folder of non-DICOM files": "no DICOM files in this folder (2 other files: notes.txt, scan.png",
    "missing slice": "missing slice: a gap of 8.00 mm",
    "gantry tilt": "gantry tilt: the slices shift 16.15 mm within their plane across the stack (the stack leans 12.00 "
                   "degrees off the slice normal)",
    "mixed orientations": "mixed slice orientations (15 sagittal",
    "non-uniform spacing": "non-uniform slice spacing: steps from 4.00 to 5.20 mm",
    "two images at one position": "20 images at only 19 slice positions",
    "a single image": "a single image (one slice)",
    "truncated file in the series": "pixel data cannot be read",
    "damaged header": "damaged DICOM file",
    "colour image": "a colour image (RGB",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_dicom_input_is_one_line_and_writes_nothing(tmp_path, capsys, sagittal, kind):
    data = tmp_path / "data"
    data.mkdir()
    folder, named = _bad(kind, data, sagittal)
    before = _files_under(data)
    out = tmp_path / "out"
    rc, stdout, err, seconds = _run(["segment", folder, "--out", out, *GEOMETRIC], capsys)
    _assert_one_line_error(rc, stdout, err, str(named), BAD[kind])
    assert not out.exists() and _files_under(data) == before
    assert seconds < 10
    with pytest.raises(ScanError, match="^" + re.escape(str(named))):  # the API says the same
        load_scan(folder)


def test_series_flag_on_a_nifti_and_dicom_seg_without_dicom_fail_before_work(tmp_path, capsys, sagittal):
    nifti = _nifti(tmp_path, "sub-01_T2w.nii.gz", sagittal.image.array, sagittal.image.affine)
    rc, out, err, _ = _run(["segment", nifti, "--series", "3", "--out", tmp_path / "o", *GEOMETRIC], capsys)
    _assert_one_line_error(rc, out, err, str(nifti), "--series (series=) picks a series of a DICOM folder")
    rc, out, err, seconds = _run(["segment", nifti, "--dicom-seg", "--out", tmp_path / "o", *GEOMETRIC], capsys)
    _assert_one_line_error(rc, out, err, str(nifti), "--dicom-seg needs a DICOM input")
    assert seconds < 2.0 and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ DICOM-SEG out
def _seg_volume_with_pydicom(path, scan: Scan, kind: str) -> np.ndarray:
    """A DICOM-SEG read with plain pydicom: each frame placed by its ImagePositionPatient on the source grid, each
    segment given the label value its name stands for."""
    import pydicom

    from spineps_like.labels import SEMANTIC_NAMES, instance_id

    ds = pydicom.dcmread(str(path))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.SegmentationType == "BINARY"
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    by_name = {v: k for k, v in SEMANTIC_NAMES.items()}
    value = {n: (by_name[lab] if kind == "semantic" else instance_id(lab)) for n, lab in names.items()}
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    lps = LPS @ scan.affine
    inv = np.linalg.inv(lps)
    out = np.zeros(scan.shape, np.int32)
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ipp = np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient] + [1.0])
        ijk = inv @ ipp
        assert np.allclose(ijk[:2], 0, atol=1e-3) and abs(ijk[2] - round(ijk[2])) < 1e-3
        k = int(round(ijk[2]))
        plane = out[:, :, k]
        plane[frames[i].T.astype(bool)] = value[number]
    return out


@pytest.mark.parametrize("source", ["classic", "enhanced"])
def test_dicom_seg_reads_back_equal_to_the_nifti_masks(tmp_path, capsys, sagittal, source):
    import highdicom as hd

    from spineps_like.dicom_seg import read_dicom_seg

    affine = rotation("z", 10) @ sagittal.image.affine
    folder = tmp_path / "sub-01_T2w"
    _, values, datasets = write_series(folder if source == "classic" else tmp_path / "classic", sagittal.image.array,
                                       affine, order="shuffled")
    if source == "enhanced":
        write_enhanced(folder / "mf.dcm", datasets)
    mask = save_scan(Scan(sagittal.semantic.array, affine), tmp_path / "semantic.nii.gz", dtype=np.uint8)
    out = tmp_path / "out"
    rc, stdout, err, _ = _run(["segment", folder, "--dicom-seg", "--semantic-mask", mask, "--out", out,
                               "--instance-method", "geometric", "--no-snapshot"], capsys)
    assert rc == 0, err
    assert f"dicom_seg_instance: {out / 'sub-01_mod-T2w_seg-vert_msk.dcm'}" in stdout
    scan = load_scan(folder)
    src_series = str(header(next(folder.glob("*.dcm"))).SeriesInstanceUID)
    for kind, entity in (("semantic", "spine"), ("instance", "vert")):
        nifti = load_scan(out / f"sub-01_mod-T2w_seg-{entity}_msk.nii.gz", kind="mask")
        seg_path = out / f"sub-01_mod-T2w_seg-{entity}_msk.dcm"
        np.testing.assert_array_equal(read_dicom_seg(seg_path, scan), nifti.array)  # highdicom, by source frame
        np.testing.assert_array_equal(_seg_volume_with_pydicom(seg_path, scan, kind), nifti.array)  # pydicom
        seg = hd.seg.segread(str(seg_path))
        assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == src_series
        assert seg.StudyInstanceUID == datasets[0].StudyInstanceUID
        assert seg.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
        labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
        if kind == "semantic":
            assert "Vertebra_Corpus_border" in labels and "Vertebra_Disc" in labels and "Spinal_Canal" in labels
        else:
            assert {"L1", "L5", "IVD L1", "Endplate L1", "S1"} <= set(labels)
            l1 = seg.SegmentSequence[labels.index("L1")]
            assert l1.SegmentedPropertyTypeCodeSequence[0].CodeValue == "66794005"  # SNOMED CT: L1 vertebra
        # highdicom's own volume of the SEG (its geometry from the SEG's plane positions) lies on the source grid
        vol = seg.get_volume(combine_segments=True, relabel=False)
        to_grid = np.linalg.inv(LPS @ scan.affine) @ vol.affine  # SEG volume index -> source voxel index
        assert np.allclose(to_grid, np.round(to_grid), atol=1e-3)
        perm = np.round(to_grid).astype(int)
        idx = np.indices(vol.spatial_shape).reshape(3, -1)
        ijk = perm[:3, :3] @ idx + perm[:3, 3:4]
        number_to_value = np.zeros(len(labels) + 1, np.int32)
        number_to_value[1:] = [nifti.array[tuple(ijk[:, np.flatnonzero(vol.array.ravel() == n)[0]])]
                               for n in range(1, len(labels) + 1)]
        placed = np.zeros(scan.shape, np.int32)
        placed[tuple(ijk)] = number_to_value[vol.array.ravel()]
        np.testing.assert_array_equal(placed, nifti.array)


def test_dicom_seg_api_refuses_a_nifti_input(tmp_path, sagittal):
    from spineps_like.dicom_seg import DicomSegError, check_dicom_seg, write_dicom_seg
    from spineps_like.pipeline import segment

    nifti = load_scan(_nifti(tmp_path, "x.nii.gz", sagittal.image.array, sagittal.image.affine))
    with pytest.raises(DicomSegError, match="needs a DICOM input"):
        check_dicom_seg(nifti)
    result = segment(nifti, semantic_mask=sagittal.semantic, instance_method="geometric")
    with pytest.raises(DicomSegError, match="needs a DICOM input"):
        write_dicom_seg(result, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ cohort: a DICOM folder is one scan
def test_cohort_finds_dicom_folders_and_segments_them(tmp_path, sagittal):
    from spineps_like.cohort import Cohort, discover_scans

    data = tmp_path / "data"
    write_series(data / "sub-01_T2w", sagittal.image.array, sagittal.image.affine, order="shuffled")
    write_series(data / "sub-02_T2w" / "dicom", sagittal.image.array, sagittal.image.affine)
    (data / "sub-02_T2w" / "dicom" / "README.txt").write_text("x\n")
    save_scan(sagittal.image, data / "sub-03_T2w.nii.gz")
    entries = discover_scans(data, tmp_path / "out")
    assert sorted(e.path.name for e in entries) == ["dicom", "sub-01_T2w", "sub-03_T2w.nii.gz"]
    mask = save_scan(sagittal.semantic, tmp_path / "semantic.nii.gz", dtype=np.uint8)
    lst = tmp_path / "list.csv"
    lst.write_text("path,semantic_mask\n" + "".join(f"{e.path},{mask}\n" for e in entries))
    summary = Cohort(lst, tmp_path / "out", snapshot=False, instance_method="geometric").run(progress=False)
    assert summary["counts"]["done"] == 3, summary
    vert = sorted((tmp_path / "out").rglob("*_seg-vert_msk.nii.gz"))
    assert len(vert) == 3
    ref = np.asarray(nib.load(vert[0]).dataobj)
    assert all(np.array_equal(np.asarray(nib.load(v).dataobj), ref) for v in vert[1:])


def test_segment_api_takes_a_series(two_series, sagittal):
    """``segment(folder, series=...)`` reads the series asked for; without it a two-series folder is refused with
    their list; ``series=`` beside an image already loaded is a plain error."""
    from spineps_like.pipeline import segment

    folder, values, _ = two_series
    res = segment(folder, series="T1 TSE SAG", semantic_mask=sagittal.semantic, instance_method="geometric")
    assert str(res.image.source.series.number) == "4"
    np.testing.assert_array_equal(res.image.array, values["4"])
    assert (res.instance.array > 0).any()
    with pytest.raises(ScanError, match="holds 2 DICOM series"):
        segment(folder, semantic_mask=sagittal.semantic, instance_method="geometric")
    with pytest.raises(ValueError, match="already an image"):
        segment(sagittal.image, series="3", semantic_mask=sagittal.semantic, instance_method="geometric")


def test_cohort_series_picks_one_series_in_every_dicom_folder(tmp_path, two_series, sagittal):
    """``cohort run --series``: each DICOM folder with several series segments the one named; NIfTI scans beside
    them are unaffected; without it the folder fails with the list of its series and the NIfTI is done."""
    from spineps_like.cohort import Cohort
    from spineps_like.cli import main

    folder, values, _ = two_series
    nifti = save_scan(sagittal.image, tmp_path / "sub-09_T2w.nii.gz")
    mask = save_scan(sagittal.semantic, tmp_path / "semantic.nii.gz", dtype=np.uint8)
    lst = tmp_path / "list.csv"
    lst.write_text(f"path,semantic_mask\n{folder},{mask}\n{nifti},{mask}\n")
    summary = Cohort(lst, tmp_path / "without", snapshot=False, instance_method="geometric").run(progress=False)
    assert summary["counts"]["done"] == 1 and summary["counts"]["failed"] == 1, summary
    rc = main(["cohort", "run", str(lst), "--out", str(tmp_path / "with"), "--series", "T2 TSE SAG", "--no-snapshot",
               "--instance-method", "geometric", "-q"])
    assert rc == 0
    assert len(sorted((tmp_path / "with").rglob("*_seg-vert_msk.nii.gz"))) == 2
    summary = json.loads(next((tmp_path / "with").rglob("sub-study*_summary.json")).read_text())
    assert summary["dicom_series"]["number"] == 3 and summary["dicom_series"]["description"] == "T2 TSE SAG"
    assert summary["dicom_series"]["series_in_folder"] == 2
