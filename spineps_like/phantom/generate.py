"""make_phantom / write_phantoms: anatomy -> label volumes -> image, with exact ground truth."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from spineps_like.geometry import reorient
from spineps_like.io import Scan, atomic_write_json, json_safe, save_mask, save_scan
from spineps_like.labels import SACRUM_ID, instance_name, ivd_id
from spineps_like.phantom.anatomy import (
    A, _Canvas, _canal_controls, _Layout, _fov_names, _layout, _paint_canal, _paint_disc, _paint_ribs_and_ilium,
    _paint_sacrum, _paint_vertebra,
)
from spineps_like.phantom.body import _body_params, _region_weights, _spine_profiles
from spineps_like.phantom.render import _render

FOVS = ("cervical", "thoracic", "lumbar", "whole")
MODES = ("t2w", "ct", "random")
VARIANTS = (None, "block", "collapsed", "l6", "t13", "sacralised_l5", "narrow_discs", "listhesis")
GENERATOR_VERSION = "1.1"  # 1.1: kidneys in the body, the listhesis variant
#: Largest sub-voxel edge (mm) of the fine grid the anatomy is rasterised on.
FINE_MAX_MM = 1.4
_MAX_FINE_VOXELS = 150_000_000


@dataclass
class Phantom:
    """A synthetic scan with exact ground truth, all on one grid.

    Attributes
    ----------
    image : Scan
        float32 image (T2w-like arbitrary units, CT in HU, or domain-randomised).
    semantic : Scan
        int16 SPINEPS semantic labels (41-49, 52, 53, 60, 61, 100, 26).
    instance : Scan
        int16 TPTBox ids: vertebra bone -> v, endplate -> 200+v, IVD -> 100+v (v above), sacrum -> 26, canal/cord -> 0.
    meta : dict
        JSON-serialisable description (seed, fov, mode, variant, spacing, orientation, vertebrae top->bottom with
        flags and corpus centroids in voxel coordinates, discs, timings).
    """

    image: Scan
    semantic: Scan
    instance: Scan
    meta: dict = field(default_factory=dict)
    #: uint8 tissue label map (:data:`TISSUES`, ids from 1): the generation labels an appearance model paints from
    #: (:mod:`spineps_like.phantom.appearance`). Finer than the semantic mask: marrow, cortex, nucleus, annulus,
    #: CSF, ... of the spine, and the body around it (fat, muscle, bowel, vessels, lung, air).
    tissue: Scan | None = None



_AXES = (("P", "A"), ("I", "S"), ("R", "L"))


def _parse_orientation(orientation: str | None, rng: np.random.Generator) -> str:
    if orientation is None:
        return "PIR"
    if str(orientation).lower() == "random":
        perm, flips = rng.permutation(3), rng.integers(0, 2, size=3)
        return "".join(_AXES[int(p)][int(f)] for p, f in zip(perm, flips))
    codes = str(orientation).upper()
    pairs = sorted(next((k for k, ax in enumerate(_AXES) if c in ax), -1) for c in codes)
    if len(codes) != 3 or pairs != [0, 1, 2]:
        raise ValueError(f"orientation {orientation!r} is not three axis codes with one of L/R, A/P, S/I each "
                         f"(e.g. 'PIR', 'RAS', 'LPS') or 'random'")
    return codes


def _parse_spacing(spacing, rng: np.random.Generator) -> np.ndarray:
    inplane, lr = rng.uniform(0.6, 1.0), rng.uniform(3.0, 4.0)
    if spacing is None:
        return np.array([inplane, inplane, lr], dtype=float)
    try:
        sp = np.asarray([float(s) for s in spacing], dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be three voxel sizes in mm (P, I, R), got {spacing!r}") from None
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp < 0.2) or np.any(sp > 10.0):
        raise ValueError(f"spacing must be three voxel sizes between 0.2 and 10 mm (P, I, R), got {spacing!r}")
    return sp


def visible_variants(fov: str) -> tuple[str, ...]:
    """The variants a field of view ``fov`` can show (e.g. no L6 in a cervical phantom)."""
    out = []
    for v in VARIANTS:
        if not v:
            continue
        try:
            _check_args(fov, "t2w", v)
        except ValueError:
            continue
        out.append(v)
    return tuple(out)


def _check_args(fov: str, mode: str, variant: str | None) -> None:
    if fov not in FOVS:
        raise ValueError(f"fov {fov!r} is unknown; use one of {', '.join(FOVS)}")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown; use None or one of {', '.join(v for v in VARIANTS if v)}")
    if variant in ("l6", "sacralised_l5") and fov not in ("lumbar", "whole"):
        raise ValueError(f"variant {variant!r} is not visible in a {fov} field of view; use fov 'lumbar' or 'whole'")
    if variant == "listhesis" and fov == "thoracic":
        raise ValueError("variant 'listhesis' is not visible in a thoracic field of view (mid-cervical or lower lumbar)")
    if variant == "t13" and fov == "cervical":
        raise ValueError("variant 't13' is not visible in a cervical field of view")


def _fov_box(lay: _Layout, fov_names: tuple[str, str], hab: dict, rng: np.random.Generator):
    """Field of view in canonical mm (lo, hi) from the vertebrae its top and bottom borders cut through."""
    elems = {v.name: v for v in lay.verts + lay.sacrum}
    top, bot = fov_names
    if top == "dens":
        c2 = elems["C2"]
        i_top = float(c2.world((1.2, -1.45 * c2.H, 0.0))[1]) - 4.0 - rng.uniform(3.0, 15.0)
    else:
        v = elems[top]
        i_top = float(v.O[1] + rng.uniform(-0.3, 0.3) * v.H)
    if bot == "sacrum":
        s5 = lay.sacrum[-1]
        i_bot = float(s5.world((0.0, 0.5 * s5.H, 0.0))[1]) + rng.uniform(3.0, 25.0)
    else:
        v = elems[bot]
        i_bot = float(v.O[1] + rng.uniform(-0.3, 0.3) * v.H)
    i_s = np.linspace(i_top, i_bot, 64)
    pr = _spine_profiles(lay, i_s)
    rw = _region_weights(lay, i_s)
    fat = hab["fat"] * (0.6 * rw["neck"] + 0.8 * rw["thorax"] + rw["abdomen"] + 1.3 * rw["pelvis"])
    musc = (hab["musc_neck"] * rw["neck"] + hab["musc_thorax"] * rw["thorax"] + hab["musc_lumbar"] * rw["abdomen"]
            + hab["musc_pelvis"] * rw["pelvis"])
    p_lo = float((pr["p_front"]).min() - rng.uniform(35.0, 90.0))
    p_hi = float((pr["p_lam"] + musc + fat).max() + rng.uniform(4.0, 15.0))
    rm = float(np.median(pr["r_mid"])) + rng.uniform(-4.0, 4.0)
    half = rng.uniform(36.0, 55.0)
    return np.array([p_lo, i_top, rm - half]), np.array([p_hi, i_bot, rm + half])


def make_phantom(seed: int, *, fov: str = "lumbar", mode: str = "t2w", variant: str | None = None,
                 spacing: Sequence[float] | None = None, orientation: str | None = "random") -> Phantom:
    """Generate one synthetic spine scan with exact semantic and instance ground truth.

    Parameters
    ----------
    seed : int
        Everything is a deterministic function of the seed (bit-identical output).
    fov : {'cervical', 'thoracic', 'lumbar', 'whole'}
        Field of view: ~C2-T2, ~T1-L1, ~T11/T12-sacrum, C2-sacrum; vertebrae cut by its borders are flagged.
    mode : {'t2w', 'ct', 'random'}
        Calibrated T2w-like or CT (HU) intensities, or domain randomisation.
    variant : {None, 'block', 'collapsed', 'l6', 't13', 'sacralised_l5', 'narrow_discs', 'listhesis'}
        Anatomical variant or pathology ('listhesis': anterolisthesis of a mid-cervical or lower lumbar vertebra,
        Meyerding grade 1-2, recorded in ``meta['anatomy']['listhesis']``).
    spacing : (float, float, float), optional
        Output voxel size in mm along P, I, R (before reorientation). Default: sagittal, in-plane 0.6-1.0 mm,
        left-right 3.0-4.0 mm (random by seed).
    orientation : str or None
        Axis codes of the output array ('PIR', 'RAS', 'LPS', ...), 'random' (by seed) or None (= 'PIR').

    Returns
    -------
    Phantom
    """
    t0 = time.perf_counter()
    _check_args(fov, mode, variant)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    ss = np.random.SeedSequence(int(seed))
    keys = ["anatomy", "fov", "body", "intensity", "noise", "orientation", "spacing"]
    rngs = {k: np.random.default_rng(c) for k, c in zip(keys, ss.spawn(len(keys)))}
    sp = _parse_spacing(spacing, rngs["spacing"])
    codes = _parse_orientation(orientation, rngs["orientation"])
    fov_names = _fov_names(rngs["fov"], fov)
    lay = _layout(rngs["anatomy"], variant, fov_names, fov)
    hab = _body_params(rngs["body"])
    lo, hi = _fov_box(lay, fov_names, hab, rngs["fov"])
    n = np.maximum(np.ceil((hi - lo) / sp).astype(int), 8)
    hi = lo + n * sp  # the grid's true extent
    f = tuple(int(max(1, math.ceil(s / FINE_MAX_MM - 1e-9))) for s in sp)
    # the fine canvas has a margin of rows above and below the FOV: parts painted there are cut by the FOV
    nm = int(math.ceil(12.0 / sp[1]))
    fine_shape = (int(n[0] * f[0]), int((n[1] + 2 * nm) * f[1]), int(n[2] * f[2]))
    if int(np.prod(fine_shape, dtype=np.int64)) > _MAX_FINE_VOXELS:
        raise ValueError(f"spacing {tuple(float(x) for x in sp)} mm over a {fov} field of view needs "
                         f"{np.prod(fine_shape, dtype=np.int64):.3g} sub-voxels (limit {_MAX_FINE_VOXELS:.3g}); "
                         f"use a coarser spacing")
    fstep = sp / np.asarray(f)
    cv = _Canvas(lo - np.array([0.0, nm * sp[1], 0.0]) + fstep / 2, fstep, fine_shape)
    t1 = time.perf_counter()
    _paint_ribs_and_ilium(cv, lay.verts, lay.sacrum)
    _paint_canal(cv, lay, rngs["anatomy"])
    chain = lay.verts + lay.sacrum[:1]
    for u, w in zip(chain[:-1], chain[1:]):
        _paint_disc(cv, u, w, 100, ivd_id(u.vid), A["nucleus_deg"] if u.degenerated_disc_below else A["nucleus"],
                    A["annulus"], u.cleft and not u.degenerated_disc_below)
    for k, v in enumerate(lay.verts):
        above = lay.verts[k - 1] if k > 0 else None
        below = lay.verts[k + 1] if k + 1 < len(lay.verts) else lay.sacrum[0]
        _paint_vertebra(cv, v, above, below, lay.sacrum)
    _paint_sacrum(cv, lay.sacrum, lay.verts[-1])
    t2 = time.perf_counter()
    mf = nm * f[1]
    cut = _cut_ids(cv, mf)
    inner = (slice(None), slice(mf, fine_shape[1] - mf), slice(None))
    c = tuple(m // 2 for m in f)
    sem = np.ascontiguousarray(cv.sem[inner][c[0]::f[0], c[1]::f[1], c[2]::f[2]]).astype(np.int16)
    inst = np.ascontiguousarray(cv.inst[inner][c[0]::f[0], c[1]::f[1], c[2]::f[2]]).astype(np.int16)
    # tissue labels: the spine's appearance class of the same centre sub-voxel (its id is the class index), the
    # body's classes elsewhere (filled in by the renderer)
    tissue = np.ascontiguousarray(cv.app[inner][c[0]::f[0], c[1]::f[1], c[2]::f[2]])
    out_lo = lo + sp / 2
    img, render_info = _render(cv.app[inner], f, lay, sp, out_lo, mode, rngs, hab, tissue)
    t3 = time.perf_counter()
    # canonical PIR affine (RAS+ world: x = r, y = -p, z = -i), world origin at the FOV centre
    centre = 0.5 * (lo + hi)
    o = out_lo - centre
    aff = np.array([[0.0, 0.0, sp[2], o[2]], [-sp[0], 0.0, 0.0, -o[0]], [0.0, -sp[1], 0.0, -o[1]],
                    [0.0, 0.0, 0.0, 1.0]])
    image = reorient(Scan(img, aff.copy()), codes)
    semantic = reorient(Scan(sem, aff.copy()), codes)
    instance = reorient(Scan(inst, aff.copy()), codes)
    tissue_scan = reorient(Scan(tissue, aff.copy()), codes)
    meta = _meta(seed, fov, mode, variant, sp, codes, f, fov_names, lay, cv, lo, hi, cut, semantic, instance,
                 render_info)
    meta["timing_s"] = {"layout": round(t1 - t0, 3), "rasterise": round(t2 - t1, 3), "render": round(t3 - t2, 3),
                        "total": round(time.perf_counter() - t0, 3)}
    return Phantom(image=image, semantic=semantic, instance=instance, meta=meta, tissue=tissue_scan)


def _cut_ids(cv: _Canvas, rows: int) -> dict[str, set[int]]:
    """Vertebra ids with voxels in the margin rows above/below the FOV: any part ('cut') or the corpus/endplates
    ('corpus_cut')."""
    any_ids: set[int] = set()
    corpus_ids: set[int] = set()
    for sl in (slice(0, rows), slice(cv.shape[1] - rows, cv.shape[1])):
        inst, sem = cv.inst[:, sl, :], cv.sem[:, sl, :]
        ids = set(np.flatnonzero(np.bincount(inst.reshape(-1), minlength=256)).tolist()) - {0}
        any_ids |= {i for i in ids if i <= 28} | {i - 200 for i in ids if i > 200}
        cor = inst[(sem == 49) | (sem == 52) | (sem == 53) | (sem == 26)]
        cids = set(np.flatnonzero(np.bincount(cor.reshape(-1), minlength=256)).tolist()) - {0}
        corpus_ids |= {i for i in cids if i <= 28} | {i - 200 for i in cids if i > 200}
    return {"cut": any_ids, "corpus_cut": corpus_ids}


def _meta(seed, fov, mode, variant, sp, codes, f, fov_names, lay: _Layout, cv: _Canvas, lo, hi, cut: dict,
          semantic: Scan, instance: Scan, render_info: dict) -> dict:
    sem, inst = semantic.array, instance.array
    counts = np.bincount(inst.reshape(-1).astype(np.intp), minlength=256)
    present = {int(k): int(counts[k]) for k in np.flatnonzero(counts)}
    order = [v.vid for v in lay.verts] + [SACRUM_ID]
    vids = [v for v in order if present.get(v, 0) > 0]
    coords = np.nonzero((sem == 49) | (sem == 26))
    lab = inst[coords].astype(np.intp)
    n_c = np.bincount(lab, minlength=256)
    sums = [np.bincount(lab, weights=c, minlength=256) for c in coords]
    cents = [tuple(s_[v] / n_c[v] for s_ in sums) if n_c[v] > 0 else None for v in vids]
    by_id = {v.vid: v for v in lay.verts}
    verts = []
    for vid, cm in zip(vids, cents):
        ext = cv.extent.get(vid)
        cut_lr = bool(ext is not None and (ext[0][2] < lo[2] or ext[1][2] > hi[2]))
        v = by_id.get(vid)
        has_corpus = cm is not None
        entry = {"id": int(vid), "name": instance_name(vid), "cut": vid in cut["cut"],
                 "cut_lateral": cut_lr, "corpus_cut": vid in cut["corpus_cut"], "voxels": int(present[vid]),
                 "centroid_vox": [round(float(x), 2) for x in cm] if has_corpus else None}
        if v is not None:
            for flag in ("collapsed", "sacralised", "fused_below", "fused_above"):
                if getattr(v, flag):
                    entry[flag] = True
        verts.append(entry)
    ivds = []
    for u, w in zip(lay.verts, lay.verts[1:] + [lay.sacrum[0]]):
        iid = ivd_id(u.vid)
        if present.get(iid, 0) > 0:
            ivds.append({"id": iid, "upper": int(u.vid), "lower": int(w.vid), "height_mm": round(float(u.disc), 2),
                         "narrow": bool(u.narrow_disc_below), "degenerated": bool(u.degenerated_disc_below)})
    meta = {
        "generator": "spineps_like.phantom", "version": GENERATOR_VERSION, "seed": int(seed), "fov": fov,
        "mode": mode, "variant": variant, "image_suffix": "ct" if mode == "ct" else "T2w",
        "spacing": [round(float(s), 6) for s in semantic.spacing], "spacing_pir": [round(float(s), 6) for s in sp],
        "orientation": codes, "shape": list(semantic.shape), "fine_factor_pir": list(f),
        "fov_cut_through": list(fov_names), "vertebra_ids": [int(v) for v in vids], "vertebrae": verts,
        "ivd_ids": [d["id"] for d in ivds], "ivds": ivds, "anatomy": json_safe(lay.info), "render": render_info,
        "truth": _truth(lay, lo, hi),
    }
    if mode == "random":
        meta["note"] = "domain-randomised intensities; written with the _T2w suffix"
    return meta


def _truth(lay: _Layout, lo: np.ndarray, hi: np.ndarray) -> dict:
    """Exact geometry for measurements, in RAS world mm (the output affine's world; the same in every orientation).

    ``elements``: per vertebra and S1, top to bottom: body centre, caudal and anterior axes, and the unit normals
    (pointing cranially) of the flat planes of the superior and inferior corpus surfaces (the endplates without their
    concavity; a wedge tilts them); the corpus's depth and height, ``posterior_wall_mm`` (the mask's mid-sagittal
    posterior surface 20% of the height from an endplate, from the centre along the posterior axis; for S1 the front
    of the sacral canal's ring, labelled sacrum) and ``slip_below_mm`` (the listhesis variant's shift of everything
    below, posteriorly along this vertebra's axis). ``canal``: at each body's centre and each disc's mid-level, the
    canal's antero-posterior and left-right diameters and cross-sectional area orthogonal to the canal, and the cord's area
    (0 below the conus). Recording it draws no random numbers: images and masks are unchanged."""
    centre = 0.5 * (np.asarray(lo, float) + np.asarray(hi, float))

    def pos(p: np.ndarray) -> list[float]:  # canonical (p, i, r) -> RAS world (x = r, y = -p, z = -i)
        d = np.asarray(p, float) - centre
        return [round(float(d[2]), 4), round(float(-d[0]), 4), round(float(-d[1]), 4)]

    def vec(p: np.ndarray) -> list[float]:
        d = np.asarray(p, float) / np.linalg.norm(p)
        return [round(float(d[2]), 6), round(float(-d[0]), 6), round(float(-d[1]), 6)]

    elements = []
    for v in lay.verts + lay.sacrum[:1]:
        k = 0.5 * v.k_wedge  # surfaces y = -+0.5 (H + k_wedge x) in the local frame (x posterior, y inferior)
        # mid-sagittal posterior surface 20% of the height from an endplate (yn = 0.6): the waisted, concave corpus;
        # S1's body is fronted by the sacral canal's ring (label 26 too), which reaches 0.8 mm behind the corpus
        wall = v.a + 0.8 if v.region == "S" else v.a * (1.0 - v.waist * (1.0 - 0.36)) - v.post_conc * v.a
        elements.append({"id": int(v.vid), "name": v.name, "centre_mm": pos(v.O), "axis_caudal": vec(v.Rm[:, 1]),
                         "axis_anterior": vec(-v.Rm[:, 0]), "superior_normal": vec(v.Rm @ np.array([-k, -1.0, 0.0])),
                         "inferior_normal": vec(v.Rm @ np.array([k, -1.0, 0.0])), "depth_mm": round(float(v.D), 3),
                         "height_mm": round(float(v.H), 3), "posterior_wall_mm": round(float(wall), 3),
                         "slip_below_mm": round(float(v.slip_below), 3)})
    ctl = _canal_controls(lay)

    def canal_at(i_mm: float) -> dict:
        f = {key: float(np.interp(i_mm, ctl["i"], ctl[key])) for key in ("cap", "clr", "cord_ap", "cord_lr")}
        conus = float(np.clip((lay.conus_i - i_mm) / 30.0, 0.0, 1.0) ** 0.5)
        ca, cl = f["cord_ap"] * conus, f["cord_lr"] * conus
        cord = math.pi * ca * cl if ca > 0.3 and f["cap"] > 0.3 else 0.0
        return {"ap_diameter_mm": round(2 * f["cap"], 3), "lr_diameter_mm": round(2 * f["clr"], 3),
                "area_mm2": round(math.pi * f["cap"] * f["clr"], 2), "cord_area_mm2": round(cord, 2)}

    canal = []
    for k, v in enumerate(lay.verts):
        canal.append({"id": int(v.vid), "kind": "body", **canal_at(float(v.world((v.xc, 0.0, 0.0))[1]))})
        w = lay.verts[k + 1] if k + 1 < len(lay.verts) else lay.sacrum[0]
        if v.disc > 0 and not v.fused_below:
            i_mm = 0.5 * float(v.world((v.xc, 0.5 * v.H, 0.0))[1] + w.world((w.xc, -0.5 * w.H, 0.0))[1])
            canal.append({"id": int(ivd_id(v.vid)), "kind": "disc", **canal_at(i_mm)})
    return {"elements": elements, "canal": canal}


def write_phantoms(out: Path, n: int = 1, seed: int = 0, fov: str = "lumbar", mode: str = "t2w",
                   variant: str | None = None, spacing: Sequence[float] | None = None,
                   orientation: str | None = "random", snapshot: bool = True) -> list[Path]:
    """Write ``n`` phantoms (seeds ``seed .. seed+n-1``) as a BIDS-like dataset; returns the image paths.

    Layout: ``out/rawdata/sub-phantomSSSS/anat/sub-phantomSSSS_acq-sag_T2w.nii.gz`` (``_ct`` for CT) and
    ``out/derivatives_gt/sub-phantomSSSS/sub-phantomSSSS_acq-sag_mod-T2w_seg-{spine,vert}_msk.nii.gz``,
    ``..._phantom.json`` (meta) and, with ``snapshot``, ``..._snp.png``. All writes are atomic.
    """
    if int(n) < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    _check_args(fov, mode, variant)
    out = Path(out)
    paths = []
    snap = None
    if snapshot:
        try:
            from spineps_like.snapshot import save_snapshot as snap
        except ImportError:
            warnings.warn("spineps_like.snapshot is not available; writing no snapshots", stacklevel=2)
    for s in range(int(seed), int(seed) + int(n)):
        ph = make_phantom(s, fov=fov, mode=mode, variant=variant, spacing=spacing, orientation=orientation)
        sub = f"sub-phantom{s:04d}"
        suffix = ph.meta["image_suffix"]
        img_path = out / "rawdata" / sub / "anat" / f"{sub}_acq-sag_{suffix}.nii.gz"
        gt = out / "derivatives_gt" / sub
        stem = f"{sub}_acq-sag_mod-{suffix}"
        save_scan(ph.image, img_path, dtype=np.float32)
        save_mask(ph.semantic, gt / f"{stem}_seg-spine_msk.nii.gz")
        save_mask(ph.instance, gt / f"{stem}_seg-vert_msk.nii.gz")
        atomic_write_json(gt / f"{stem}_phantom.json", ph.meta)
        if snap is not None:
            snap(gt / f"{stem}_snp.png", ph.image, semantic=ph.semantic, instance=ph.instance)
        paths.append(img_path)
    for sub_ds, name in (("rawdata", "spineps-like phantoms"), ("derivatives_gt", "spineps-like phantom ground truth")):
        atomic_write_json(out / sub_ds / "dataset_description.json",
                          {"Name": name, "BIDSVersion": "1.8.0", "DatasetType": "raw" if sub_ds == "rawdata"
                           else "derivative", "GeneratedBy": [{"Name": "spineps_like.phantom",
                                                               "Version": GENERATOR_VERSION}]})
    return paths
