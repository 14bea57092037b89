"""benchmarks/real_scans.py: its data folders carry licences and provenance, its loaders read every real file and
map the references to non-empty structures, and its scoring gives Dice 1 for a reference against itself and less for
a perturbed mask. No model runs here (the benchmark itself does that)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "real_data"


@pytest.fixture(scope="module")
def rs():
    path = ROOT / "benchmarks" / "real_scans.py"
    spec = importlib.util.spec_from_file_location("real_scans_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cases(rs):
    return {name: load() for name, load in rs.LOADERS.items()}


def test_every_data_folder_has_readme_with_licence_and_origin():
    folders = [p for p in DATA.iterdir() if p.is_dir()]
    assert {p.name for p in folders} >= {"totalsegmentator", "sct_testing_data"}
    for folder in folders:
        readme = folder / "README.md"
        assert readme.is_file(), f"{folder} has no README.md"
        text = readme.read_text().lower()
        assert "licence" in text or "license" in text, readme
        assert "github.com" in text and "commit" in text, f"{readme}: origin (repository, commit) missing"
        assert "manual" in text, f"{readme}: how the labels were made is not stated"
        assert (folder / "LICENSE").is_file(), f"{folder}: the source's LICENSE is not kept beside the data"
        for f in folder.glob("*.nii.gz"):
            assert f.stat().st_size < 3_000_000, f"{f} is over 3 MB"
            assert f.name in readme.read_text(), f"{readme} does not describe {f.name}"


def test_loaders_read_every_file_and_map_non_empty_structures(rs, cases):
    assert set(cases) == {"tptbox_mri", "tptbox_ct", "totalseg_mr", "totalseg_ct", "sct_t2"}
    expected = {"tptbox_mri": {"vertebra", "corpus", "posterior", "endplate", "ivd", "canal", "cord"},
                "tptbox_ct": {"vertebra", "corpus", "posterior"},
                "totalseg_mr": {"vertebra", "ivd", "cord"},
                "totalseg_ct": {"vertebra", "cord"},
                "sct_t2": {"cord"}}
    for name, case in cases.items():
        assert case.image.array.ndim == 3 and np.isfinite(case.image.array).all(), name
        assert case.image.array.std() > 0, f"{name}: flat image"
        for s, m in case.gt.items():
            assert s in rs.PRED_STRUCTURES, f"{name}: unknown structure {s}"
            assert m.shape == case.image.shape and m.dtype == bool, (name, s)
        non_empty = {s for s, m in case.gt.items() if m.any()}
        assert expected[name] <= non_empty, f"{name}: empty structures {expected[name] - non_empty}"
    # reference vertebra counts where instance labels exist
    assert cases["tptbox_mri"].gt_names == ["C5", "C6", "C7"]
    assert cases["totalseg_ct"].gt_names == ["T11", "T12", "L1", "L2"]
    assert cases["sct_t2"].gt_names == ["C2", "C3", "C4", "C5"]
    assert cases["totalseg_mr"].gt_count is None
    # TotalSegmentator CT vertebra labels -> our instance ids, on the vertebra structure only
    ins = cases["totalseg_ct"].gt_instance.array
    assert set(np.unique(ins).tolist()) == {0, 18, 19, 20, 21}
    assert np.array_equal(ins > 0, cases["totalseg_ct"].gt["vertebra"])


def test_totalsegmentator_label_map_matches_their_class_names(rs):
    assert rs.TOTALSEG_CT_VERTEBRAE[26] == "S1" and rs.TOTALSEG_CT_VERTEBRAE[27] == "L5"
    assert rs.TOTALSEG_CT_VERTEBRAE[31] == "L1" and rs.TOTALSEG_CT_VERTEBRAE[32] == "T12"
    assert rs.TOTALSEG_CT_VERTEBRAE[43] == "T1" and rs.TOTALSEG_CT_VERTEBRAE[44] == "C7"
    assert rs.TOTALSEG_CT_VERTEBRAE[50] == "C1"
    assert rs.TOTALSEG_MR_CLASSES == {18: "sacrum", 19: "vertebrae", 20: "intervertebral_discs", 21: "spinal_cord"}


def _as_prediction(rs, gt: dict[str, np.ndarray], shape) -> np.ndarray:
    """A semantic mask in our labels whose structures equal ``gt``'s (one representative label each)."""
    pred = np.zeros(shape, np.uint8)
    rep = {"vertebra": 49, "corpus": 49, "posterior": 41, "endplate": 62, "ivd": 100, "canal": 61, "cord": 60,
           "sacrum": 26}
    for s in ("vertebra", "ivd", "canal", "cord"):  # disjoint structures first, bone refined below
        if s in gt:
            pred[gt[s]] = rep[s]
    for s in ("corpus", "posterior", "endplate", "sacrum"):
        if s in gt:
            pred[gt[s]] = rep[s]
    return pred


def test_score_is_one_against_itself_and_less_when_perturbed(rs, cases):
    from scipy import ndimage as ndi

    for name in ("totalseg_mr", "totalseg_ct", "sct_t2"):
        case = cases[name]
        pred = _as_prediction(rs, case.gt, case.image.shape)
        assert all(v == pytest.approx(1.0) for v in rs.score_structures(pred, case.gt).values()), name
        # perturbed: the cord grown by one voxel
        grown = pred.copy()
        grown[ndi.binary_dilation(pred == 60) & (pred == 0)] = 60
        d = rs.score_structures(grown, case.gt)
        assert 0 < d["cord"] < 1, name
    # TPTBox: its own semantic mask (our scheme) scores 1, and agrees with accuracy.py's label_dice
    case = cases["tptbox_mri"]
    sem = case.gt_semantic.array
    gt = {s: m for s, m in case.gt.items() if m.any()}  # the crop holds no sacrum
    d = rs.score_structures(sem, gt)
    assert all(v == pytest.approx(1.0) for v in d.values())
    shifted = np.roll(sem, 2, axis=1)
    d2 = rs.score_structures(shifted, gt)
    ref = rs.label_dice(shifted, sem)
    assert all(d2[s] < 1 for s in gt)
    for s, lab in (("corpus", "49"), ("ivd", "100"), ("canal", "61"), ("cord", "60"), ("posterior", "posterior"),
                   ("endplate", "endplate")):
        assert d2[s] == pytest.approx(ref[lab]), s
    assert np.isnan(rs.dice(np.zeros(3, bool), np.zeros(3, bool)))


def test_vertebra_ids_and_endplate_merge(rs):
    ins = np.array([0, 5, 6, 26, 27, 105, 205, 206, 28])
    assert rs.vertebra_ids(ins) == [5, 6, 28]
    assert rs.merge_endplates(ins).tolist() == [0, 5, 6, 26, 27, 105, 5, 6, 28]
