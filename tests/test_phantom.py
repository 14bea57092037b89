"""Synthetic spine phantoms: ground-truth invariants, variants, determinism, geometry, files, calibration."""

from __future__ import annotations

import json

import cc3d
import numpy as np
import pytest
from scipy import ndimage as ndi

from spineps_like.geometry import reorient
from spineps_like.io import load_scan
from spineps_like.phantom import (
    Phantom,
    calibration_table,
    label_intensity_stats,
    make_phantom,
    tptbox_reference_stats,
    write_phantoms,
)

FAST = (1.3, 1.3, 3.9)  # coarse but anisotropic like a sagittal scan: keeps the tests quick
POSTERIOR = (41, 42, 43, 44, 45, 46, 47, 48)


def _world(scan, mask: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask)
    return idx @ scan.affine[:3, :3].T + scan.affine[:3, 3]


def _complete(ph: Phantom) -> list[dict]:
    """Vertebrae (not the sacrum) that the field of view does not cut."""
    return [v for v in ph.meta["vertebrae"] if v["id"] != 26 and not v["cut"]]


def _check_invariants(ph: Phantom) -> None:
    sem, inst = ph.semantic.array, ph.instance.array
    assert sem.shape == inst.shape == ph.image.shape
    assert sem.dtype == np.int16 and inst.dtype == np.int16 and ph.image.array.dtype == np.float32
    assert np.allclose(ph.semantic.affine, ph.image.affine) and np.allclose(ph.instance.affine, ph.image.affine)
    allowed = {0, 26, 41, 42, 43, 44, 45, 46, 47, 48, 49, 52, 53, 60, 61, 100}
    assert set(np.unique(sem).tolist()) <= allowed
    # instance ids consistent with semantic labels, voxel for voxel
    assert np.array_equal(inst == 0, np.isin(sem, (0, 60, 61)))
    bone_ids = inst[np.isin(sem, range(41, 50))]
    assert bone_ids.min() >= 1 and bone_ids.max() <= 28 and not np.any(bone_ids == 26)
    assert np.all(inst[sem == 26] == 26)
    ivd = inst[sem == 100]
    assert np.all((ivd > 100) & (ivd <= 128))
    ep = inst[np.isin(sem, (52, 53))]
    assert np.all((ep > 200) & (ep <= 228))
    assert set((np.unique(ep) - 200).tolist()) <= set(np.unique(bone_ids).tolist())
    ids = [v["id"] for v in ph.meta["vertebrae"]]
    assert ids == ph.meta["vertebra_ids"] and len(ids) == len(set(ids))
    assert set(ids) == set(np.unique(inst[(inst > 0) & (inst < 100)]).tolist())
    # every complete vertebra has a corpus, endplates touching it and all posterior elements
    for v in _complete(ph):
        vid = v["id"]
        corpus = (inst == vid) & (sem == 49)
        assert corpus.any(), f"{vid} has no corpus"
        assert v["centroid_vox"] is not None
        assert np.allclose(v["centroid_vox"], np.argwhere(corpus).mean(0), atol=0.01)
        labels = set(np.unique(sem[inst == vid]).tolist())
        need = {41, 42, 45, 46, 47, 48} | (set() if v["cut_lateral"] else {43, 44})
        assert need <= labels, f"{vid} lacks {need - labels}"
        grown = ndi.binary_dilation(corpus)
        z_c = _world(ph.semantic, corpus)[:, 2].mean()
        for lab in (52, 53):
            e = (sem == lab) & (inst == 200 + vid)
            if vid == 2 and lab == 52:
                continue  # C2 has no superior endplate (no disc above)
            if v.get("fused_below") and lab == 53 or v.get("fused_above") and lab == 52:
                assert not e.any()
                continue
            assert e.any(), f"{vid} lacks endplate {lab}"
            assert (grown & e).any(), f"endplate {lab} of {vid} does not touch its corpus"
            z_e = _world(ph.semantic, e)[:, 2].mean()
            assert (z_e > z_c) if lab == 52 else (z_e < z_c)  # superior is up in RAS world
    # an IVD between every two consecutive vertebrae whose corpora are both in the image
    with_corpus = [v for v in ph.meta["vertebrae"] if v["centroid_vox"] is not None]
    for a, b in zip(with_corpus[:-1], with_corpus[1:]):
        if a.get("fused_below"):
            assert not np.any(inst == 100 + a["id"])
        else:
            assert np.any(inst == 100 + a["id"]), f"no IVD between {a['id']} and {b['id']}"
    # the cord lies inside the canal
    cord = sem == 60
    if cord.any():
        rim = ndi.binary_dilation(cord) & ~cord
        assert np.all(np.isin(sem[rim], (60, 61)))
    # patient's left is world -x (RAS): left processes left of the right ones
    for left, right in ((43, 44), (45, 46), (47, 48)):
        assert _world(ph.semantic, sem == left)[:, 0].mean() < _world(ph.semantic, sem == right)[:, 0].mean()


@pytest.mark.parametrize("fov,seed", [("lumbar", 0), ("lumbar", 1), ("cervical", 2), ("thoracic", 3),
                                      ("whole", 4)])
def test_ground_truth_invariants(fov, seed):
    ph = make_phantom(seed, fov=fov, mode="random" if seed % 2 else "t2w", spacing=FAST)
    _check_invariants(ph)
    assert len(_complete(ph)) >= 4
    if fov in ("lumbar", "whole"):
        assert 26 in ph.meta["vertebra_ids"] and ph.meta["vertebra_ids"][-1] == 26


def test_default_spacing_is_sagittal_and_keeps_thin_endplates():
    ph = make_phantom(7, fov="cervical", mode="ct", orientation=None)
    sp = ph.image.spacing
    assert ph.image.orientation == "PIR"
    assert 0.6 <= sp[0] <= 1.0 and sp[0] == pytest.approx(sp[1]) and 3.0 <= sp[2] <= 4.0
    _check_invariants(ph)  # includes: every complete vertebra keeps both 1-2 mm endplates at 3-4 mm LR


@pytest.mark.parametrize("variant,fov", [("block", "lumbar"), ("collapsed", "lumbar"), ("l6", "lumbar"),
                                         ("t13", "thoracic"), ("sacralised_l5", "lumbar"),
                                         ("narrow_discs", "cervical")])
def test_variants(variant, fov):
    ph = make_phantom(11, fov=fov, variant=variant, spacing=FAST, orientation="PIR")
    _check_invariants(ph)
    sem, inst = ph.semantic.array, ph.instance.array
    ids = ph.meta["vertebra_ids"]
    if variant == "block":
        u, w = ph.meta["anatomy"]["block"]
        labels = cc3d.connected_components((sem == 49).astype(np.uint8), connectivity=26)
        shared = [c for c in np.unique(labels[(inst == u) & (sem == 49)]) if c and np.any((labels == c) & (inst == w))]
        assert shared, "the fused corpora are not one connected component"
        assert not np.any(inst == 100 + u)
        assert not np.any((inst == 200 + u) & (sem == 53)) and not np.any((inst == 200 + w) & (sem == 52))
    elif variant == "collapsed":
        vid = ph.meta["anatomy"]["collapsed"]["id"]
        k = ids.index(vid)

        def height(v: int) -> float:  # corpus + endplates along I through the corpus centroid column (PIR)
            c = np.round(np.argwhere((sem == 49) & (inst == v)).mean(0)).astype(int)
            col = ((inst[c[0], :, c[2]] == v) & (sem[c[0], :, c[2]] == 49)) | (inst[c[0], :, c[2]] == 200 + v)
            return float(col.sum())

        whole = {v["id"] for v in ph.meta["vertebrae"] if not v["corpus_cut"] and v["id"] != 26}
        neighbours = [height(ids[j]) for j in (k - 1, k + 1) if 0 <= j < len(ids) and ids[j] in whole]
        assert neighbours and height(vid) < 0.75 * min(neighbours)
    elif variant == "l6":
        assert 25 in ids and ids.index(25) == ids.index(24) + 1 and np.any(inst == 125)
    elif variant == "t13":
        assert 28 in ids and ids.index(28) == ids.index(19) + 1 and np.any(inst == 119) and np.any(inst == 128)
    elif variant == "sacralised_l5":
        costal = np.isin(sem, (43, 44)) & (inst == 24)
        assert (ndi.binary_dilation(costal, iterations=2) & (sem == 26)).any(), "L5 costal process misses the sacrum"
        discs = {d["id"]: d["height_mm"] for d in ph.meta["ivds"]}
        assert discs[124] < 0.6 * discs[123]
    elif variant == "narrow_discs":
        narrow = [d for d in ph.meta["ivds"] if d["narrow"]]
        normal = [d for d in ph.meta["ivds"] if not d["narrow"]]
        assert len(narrow) >= 2 and normal
        vol = {d["id"]: int(np.sum(inst == d["id"])) for d in ph.meta["ivds"]}
        assert max(vol[d["id"]] for d in narrow) < np.median([vol[d["id"]] for d in normal])


def test_deterministic_and_seed_dependent():
    a = make_phantom(21, fov="cervical", spacing=FAST)
    b = make_phantom(21, fov="cervical", spacing=FAST)
    c = make_phantom(22, fov="cervical", spacing=FAST)
    for x, y in ((a.image, b.image), (a.semantic, b.semantic), (a.instance, b.instance)):
        assert x.array.tobytes() == y.array.tobytes() and np.array_equal(x.affine, y.affine)
    drop = lambda m: {k: v for k, v in m.items() if k != "timing_s"}  # noqa: E731
    assert drop(a.meta) == drop(b.meta)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image.array, c.image.array)
    assert a.meta["anatomy"] != c.meta["anatomy"]


def test_spacing_and_orientation_honoured():
    ph = make_phantom(5, fov="cervical", spacing=(0.9, 1.1, 3.0), orientation="LPS")
    assert ph.image.orientation == "LPS" == ph.semantic.orientation == ph.meta["orientation"]
    assert ph.image.spacing == pytest.approx((3.0, 0.9, 1.1))  # P,I,R spacing permuted to L,P,S axes
    canon = make_phantom(5, fov="cervical", spacing=(0.9, 1.1, 3.0), orientation=None)
    back = reorient(ph.image, "PIR")
    assert np.array_equal(back.array, canon.image.array) and np.allclose(back.affine, canon.image.affine)
    assert np.array_equal(reorient(ph.instance, "PIR").array, canon.instance.array)
    codes = {make_phantom(s, fov="cervical", spacing=FAST).image.orientation for s in range(3)}
    assert len(codes) > 1 and all(sorted(c.translate(str.maketrans("LAS", "RPI"))) == ["I", "P", "R"] for c in codes)


def test_body_around_the_spine():
    ph = make_phantom(3, fov="lumbar", mode="t2w", spacing=FAST, orientation="PIR")
    img, sem = ph.image.array, ph.semantic.array
    corpus = np.median(img[sem == 49])
    bg = img[sem == 0]
    assert np.mean(bg > 0.3 * corpus) > 0.3  # tissue, not an empty background
    assert np.mean(bg < 0.1 * corpus) > 0.05  # and air outside the body


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="fov"):
        make_phantom(0, fov="neck")
    with pytest.raises(ValueError, match="mode"):
        make_phantom(0, mode="t1w")
    with pytest.raises(ValueError, match="variant"):
        make_phantom(0, variant="l7")
    with pytest.raises(ValueError, match="not visible"):
        make_phantom(0, fov="cervical", variant="l6")
    with pytest.raises(ValueError, match="orientation"):
        make_phantom(0, orientation="PIX")
    with pytest.raises(ValueError, match="spacing"):
        make_phantom(0, spacing=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="seed"):
        make_phantom(-1)
    with pytest.raises(ValueError, match="n must"):
        write_phantoms("unused", n=0)


def test_write_phantoms_bids_layout(tmp_path):
    paths = write_phantoms(tmp_path, n=2, seed=3, fov="cervical", mode="ct", spacing=FAST, orientation="RAS",
                           snapshot=True)
    assert [p.name for p in paths] == ["sub-phantom0003_acq-sag_ct.nii.gz", "sub-phantom0004_acq-sag_ct.nii.gz"]
    assert (tmp_path / "derivatives_gt" / "sub-phantom0004" / "sub-phantom0004_acq-sag_mod-ct_phantom.json").exists()
    for p, s in zip(paths[:1], (3,)):
        assert p.parent == tmp_path / "rawdata" / f"sub-phantom{s:04d}" / "anat"
        gt = tmp_path / "derivatives_gt" / f"sub-phantom{s:04d}"
        stem = f"sub-phantom{s:04d}_acq-sag_mod-ct"
        img = load_scan(p)
        sem = load_scan(gt / f"{stem}_seg-spine_msk.nii.gz", kind="mask")
        ins = load_scan(gt / f"{stem}_seg-vert_msk.nii.gz", kind="mask")
        ref = make_phantom(s, fov="cervical", mode="ct", spacing=FAST, orientation="RAS")
        assert img.orientation == "RAS" and np.allclose(img.affine, ref.image.affine)
        assert np.array_equal(img.array, ref.image.array)
        assert np.array_equal(sem.array, ref.semantic.array) and np.array_equal(ins.array, ref.instance.array)
        meta = json.loads((gt / f"{stem}_phantom.json").read_text())
        assert meta["seed"] == s and meta["mode"] == "ct" and meta["vertebra_ids"] == ref.meta["vertebra_ids"]
        assert (gt / f"{stem}_snp.png").stat().st_size > 1000
    assert not list(tmp_path.rglob(".*.part*"))
    random_paths = write_phantoms(tmp_path / "r", n=1, seed=0, fov="cervical", mode="random", spacing=FAST,
                                  snapshot=False)
    assert random_paths[0].name.endswith("_T2w.nii.gz")


def test_label_intensity_stats_on_known_image():
    sem = np.zeros((10, 10, 10), np.int16)
    sem[2:6, 2:6, 2:6] = 49
    sem[6:9, 2:6, 2:6] = 100
    img = np.where(sem == 49, 10.0, np.where(sem == 100, 4.0, 1.0)).astype(np.float32)
    st = label_intensity_stats(img, sem)
    assert st["corpus"]["median"] == 10.0 and st["ivd"]["median"] == 4.0 and st["corpus"]["iqr"] == 0.0
    assert st["corpus"]["n"] == 64 and "canal" not in st
    with pytest.raises(ValueError, match="shape"):
        label_intensity_stats(img, sem[:5])


def test_calibrated_intensities_match_the_real_crops():
    ref = tptbox_reference_stats()
    assert {"corpus", "ivd", "canal", "posterior"} <= set(ref["ct"]) and "cord" in ref["mri"]
    table = calibration_table(seeds=[0])
    mri, ct = table["mri"], table["ct"]
    for group in ("posterior", "endplate", "ivd", "canal"):  # the L2-L4 crop holds only the conus tip of the cord
        real, phantom = mri[group]["real"]["ratio"], mri[group]["phantom"][0]["ratio"]
        assert abs(phantom - real) <= 0.35 * real, f"T2w {group}: phantom {phantom:.2f} vs real {real:.2f}"
    for group in ("corpus", "posterior", "ivd", "canal"):
        real, phantom = ct[group]["real"]["median"], ct[group]["phantom"][0]["median"]
        assert abs(phantom - real) <= max(40.0, 0.3 * abs(real)), f"CT {group}: {phantom:.0f} vs {real:.0f} HU"
    # the contrasts a reader relies on
    assert mri["canal"]["phantom"][0]["ratio"] > 2.0 and mri["ivd"]["phantom"][0]["ratio"] < 1.0
    assert ct["posterior"]["phantom"][0]["median"] > ct["corpus"]["phantom"][0]["median"] > \
        ct["canal"]["phantom"][0]["median"]


def _posterior_wall_step(ph: Phantom, upper: int, lower: int) -> float:
    """mm by which the lower corpus' top posterior wall lies behind the upper corpus' bottom one (mid-sagittal)."""
    s, ins = ph.semantic.array, ph.instance.array
    z = s.shape[2] // 2
    walls = []
    for vid, end in ((upper, "bottom"), (lower, "top")):
        p, i = np.nonzero((ins[:, :, z] == vid) & (s[:, :, z] == 49))
        rows = i >= i.max() - 2 if end == "bottom" else i <= i.min() + 2
        walls.append(p[rows].max())
    return float(walls[1] - walls[0]) * ph.semantic.spacing[0]


@pytest.mark.parametrize("seed", [0, 2])
def test_listhesis_slips_the_column_above_forward(seed):
    """Anterolisthesis: a step in the posterior vertebral line at the slipped level (at least half the recorded slip),
    none at the level above; the grade follows the slip fraction (Meyerding 1 < 25% <= 2)."""
    ph = make_phantom(seed, fov="lumbar", variant="listhesis", spacing=(1.0, 1.0, 3.0), orientation="PIR")
    _check_invariants(ph)
    lis = ph.meta["anatomy"]["listhesis"]
    assert lis["meyerding_grade"] == (1 if lis["slip_fraction"] < 0.25 else 2) and lis["slip_mm"] > 2
    ids = [v["id"] for v in ph.meta["vertebrae"]]
    k = ids.index(lis["id"])
    assert _posterior_wall_step(ph, ids[k], ids[k + 1]) >= 0.5 * lis["slip_mm"]
    assert abs(_posterior_wall_step(ph, ids[k - 1], ids[k])) <= 4.0
    with pytest.raises(ValueError, match="not visible in a thoracic"):
        make_phantom(seed, fov="thoracic", variant="listhesis")


def test_kidneys_lie_lateral_of_the_spine_in_the_abdomen():
    """Kidneys: in lumbar fields of view, left and right of the column at the upper lumbar levels, never in the neck;
    adding them changed no mask."""
    from spineps_like.phantom import TISSUE_ID

    ph = make_phantom(1, fov="lumbar", spacing=(1.5, 1.5, 3.0), orientation="PIR")
    k = ph.tissue.array == TISSUE_ID["kidney"]
    assert k.sum() * np.prod(ph.tissue.spacing) > 5_000  # mm3 (a sagittal field of view shows their medial parts)
    corpus_r = np.nonzero(ph.semantic.array == 49)[2].mean()
    r = np.nonzero(k)[2]
    assert (r < corpus_r - 10).any() and (r > corpus_r + 10).any()  # both sides
    assert not k[np.broadcast_to(ph.semantic.array > 0, k.shape)].any()
    neck = make_phantom(1, fov="cervical", spacing=(1.5, 1.5, 3.0), orientation="PIR")
    assert not (neck.tissue.array == TISSUE_ID["kidney"]).any()
