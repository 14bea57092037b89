"""The DICOM Modality tag decides the measurements' modality (issue 29): a CT series gets CT measurements (trabecular
HU) without being told, even where the image alone would pass for MRI; an MR series is measured as MRI whatever its
folder is called; a modality the caller asks for still wins, and one that contradicts the tag warns in one line."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
from dicom_series import write_series
from test_bad_inputs import _run

from spineps_like.io import Scan, load_scan, save_scan
from spineps_like.measure.density import is_ct
from spineps_like.phantom.generate import make_phantom
from spineps_like.pipeline import _modality

GEOMETRIC = ["--instance-method", "geometric", "--no-snapshot", "-q", "--allow-implausible"]


@pytest.fixture(scope="module")
def ct_without_air(tmp_path_factory):
    """A lumbar CT phantom (HU) in DICOM's axial layout with no air in the field of view (everything below -100 HU
    set to -100, as in a field of view inside the body): the image's own test (1st percentile <= -500 HU) takes it
    for MRI. Written as a DICOM CT series in a folder whose name says nothing, and as a NIfTI of the same values."""
    root = tmp_path_factory.mktemp("dicom-modality")
    ph = make_phantom(4, fov="lumbar", mode="ct", spacing=(2.0, 4.0, 2.0), orientation="LPS")
    array = np.maximum(ph.image.array, -100.0)
    _, values, _ = write_series(root / "scan", array, ph.image.affine, modality="CT", intercept=-1024.0,
                                description="CT LWS")
    return {"root": root, "dicom": root / "scan", "values": values, "phantom": ph,
            "nifti": save_scan(Scan(values, ph.image.affine), root / "scan.nii.gz"),
            "mask": save_scan(ph.semantic, root / "semantic.nii.gz", dtype=np.uint8)}


def _measure(src, mask, out, capsys) -> dict:
    rc, _, err, _ = _run(["segment", src, "--out", out, "--semantic-mask", mask, *GEOMETRIC], capsys)
    assert rc == 0, err
    return json.loads(next(out.glob("*_seg-spine_measurements.json")).read_text())


def _complete_hu(m: dict) -> list:
    return [v["trabecular_hu_mean"] for v in m["vertebrae"] if v["complete"]]


def test_dicom_ct_series_gets_ct_measurements_without_being_told(ct_without_air, tmp_path, capsys):
    c = ct_without_air
    assert not is_ct(c["values"])  # the image alone passes for MRI
    nifti = _measure(c["nifti"], c["mask"], tmp_path / "nifti", capsys)
    assert all(h is None for h in _complete_hu(nifti))  # so the NIfTI of the same values is measured as MRI
    dicom = _measure(c["dicom"], c["mask"], tmp_path / "dicom", capsys)
    hu = _complete_hu(dicom)
    assert len(hu) >= 4 and all(h is not None and 50 < h < 400 for h in hu)  # the series' tag says CT
    assert dicom["spine"][0]["osteoporosis_screen"] in ("unlikely", "possible", "likely")
    assert all(d["disc_csf_signal_ratio"] is None for d in dicom["discs"])
    # the masks are the same either way: only the modality-specific fields differ
    assert [v["body_height_middle_mm"] for v in dicom["vertebrae"]] == \
        [v["body_height_middle_mm"] for v in nifti["vertebrae"]]


def test_dicom_mr_series_is_measured_as_mri_whatever_its_folder_is_called(tmp_path, capsys):
    ph = make_phantom(3, fov="lumbar", mode="t2w", spacing=(2.0, 2.0, 4.0), orientation="PIR")
    folder = tmp_path / "sub-01_ct"  # a BIDS suffix that says CT
    write_series(folder, ph.image.array, ph.image.affine, modality="MR")
    assert _modality(None, Scan(ph.image.array, ph.image.affine, folder)) == "ct"  # the name alone would say CT
    mask = save_scan(ph.semantic, tmp_path / "semantic.nii.gz", dtype=np.uint8)
    m = _measure(folder, mask, tmp_path / "out", capsys)
    assert all(h is None for h in _complete_hu(m))
    assert any(d["disc_csf_signal_ratio"] is not None for d in m["discs"])


def test_requested_modality_wins_and_a_conflict_with_the_tag_warns(ct_without_air):
    scan = load_scan(ct_without_air["dicom"])
    assert scan.source.series.modality == "CT" and _modality(None, scan) == "ct"
    with pytest.warns(UserWarning) as caught:
        assert _modality(None, scan, requested="mr") == "mr"
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "\n" not in text and "DICOM series says CT" in text and "measuring as mr" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # agreement, or no tag at all: silent
        assert _modality(None, scan, requested="ct") == "ct"
        assert _modality(None, Scan(scan.array, scan.affine, ct_without_air["nifti"]), requested="mr") == "mr"
    # a tag other than CT or MR (e.g. OT, secondary capture) decides nothing: the name's BIDS suffix does
    other = dataclasses.replace(scan.source, series=dataclasses.replace(scan.source.series, modality="OT"))
    assert _modality(None, Scan(scan.array, scan.affine, ct_without_air["root"] / "sub-01_T2w", other)) == "mr"
    assert _modality(None, Scan(scan.array, scan.affine, ct_without_air["root"] / "scan", other)) is None


def test_modality_flag_decides_for_a_nifti(ct_without_air, tmp_path, capsys):
    """`segment --modality ct` measures HU on a NIfTI that the image's own test takes for MRI; a bad value is refused
    before any work."""
    c = ct_without_air
    rc, _, err, _ = _run(["segment", c["nifti"], "--out", tmp_path / "ct", "--semantic-mask", c["mask"], *GEOMETRIC,
                          "--modality", "ct"], capsys)
    assert rc == 0, err
    m = json.loads(next((tmp_path / "ct").glob("*_seg-spine_measurements.json")).read_text())
    hu = _complete_hu(m)
    assert len(hu) >= 4 and all(h is not None and 50 < h < 400 for h in hu)
    from spineps_like.pipeline import segment

    with pytest.raises(ValueError, match="unknown modality"):
        segment(c["nifti"], semantic_mask=c["mask"], instance_method="geometric", modality="pet")
