"""A small, fully known synthetic spine for tests of the instance phase (not a phantom for training).

Vertebrae are laid out along a curve C(s) (arc length s in mm) in a PIR grid: every voxel takes the arc length and
the (posterior, lateral) offset of its nearest curve point, and each structure is a band of s and a region of the
offset plane: corpus (box around the curve), IVD, endplates (62 layers at both ends of the corpus), canal, arcus
(a U around the canal: pedicles + lamina), spinous and costal processes, and articular processes that reach across
the disc level to form facet joints (the superior one of vertebra k+1 in front of the inferior one of vertebra k).
The ground-truth instance mask follows the TPTBox scheme (IVD 100 + vertebra above, endplate 200 + own vertebra).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree


@dataclass
class Synth:
    semantic: np.ndarray
    instance: np.ndarray
    spacing: tuple[float, float, float]
    ids: list[int]


def make_spine(
    ids: list[int] | None = None,
    *,
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5),
    height: float = 20.0,
    gap: float = 7.0,
    bend_deg: float = 0.0,
    lateral_bend_deg: float = 0.0,
    endplates: bool = False,
    block: int | None = None,
    sacrum: bool = False,
    costal: list[float] | None = None,
    heights: list[float] | None = None,
    margin: float = 12.0,
    dens: float = 0.0,
) -> Synth:
    """Synthetic spine with vertebrae ``ids`` (top to bottom).

    ``bend_deg`` bends the spine in the sagittal plane (total tangent turn, lordosis-like), ``lateral_bend_deg`` in the
    coronal plane; ``block`` fuses vertebra ``block`` with the next one (the disc becomes corpus); ``sacrum`` adds a
    sacrum block (26) below the last disc; ``costal`` gives each vertebra's costal-process length in mm (0 = none);
    ``dens`` > 0 puts a dens of that length (a narrow peg of corpus) on top of the first vertebra.
    """
    ids = list(ids or [20, 21, 22, 23, 24])
    n = len(ids)
    hs = list(heights or [height] * n)
    costal = list(costal if costal is not None else [12.0] * n)
    ra, rb = 11.0, 15.0  # corpus half depth (P) and half width (R)
    c, w = 5.0, 5.0  # canal half size, bone thickness of the arch
    # arc-length bands: vertebra k occupies [s0[k], s0[k] + hs[k]], then a disc of ``gap``
    s0 = np.concatenate([[0.0], np.cumsum([h + gap for h in hs])[:-1]])
    total = s0[-1] + hs[-1] + (gap + 25.0 if sacrum else 0.0)
    # curve: constant curvature in the P-I plane and in the R-I plane
    ss = np.arange(-15.0 - dens, total + 15.0, 0.25)
    kp = np.deg2rad(bend_deg) / max(total, 1.0)
    kl = np.deg2rad(lateral_bend_deg) / max(total, 1.0)
    theta_p = kp * (ss - total / 2)
    theta_l = kl * (ss - total / 2)
    tang = np.stack([np.sin(theta_p), np.cos(theta_p) * np.cos(theta_l), np.sin(theta_l)], axis=1)
    tang /= np.linalg.norm(tang, axis=1, keepdims=True)
    pts = np.cumsum(tang * 0.25, axis=0)
    # frame: N posterior (+axis 0) orthogonal to T, L = T x N then sign so that it points to +axis 2
    nrm = np.array([1.0, 0.0, 0.0]) - tang[:, :1] * tang
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    lat = np.cross(tang, nrm)
    lat *= np.sign(lat[:, 2:3] + 1e-12)
    lo = pts.min(0) - np.array([ra + margin, margin, rb + 20.0 + margin])
    hi = pts.max(0) + np.array([ra + 2 * c + w + 22.0 + margin, margin, rb + 20.0 + margin])
    sp = np.asarray(spacing, float)
    shape = tuple(int(np.ceil((h - l) / s)) + 1 for l, h, s in zip(lo, hi, sp))
    grid = np.stack(np.meshgrid(*[np.arange(k) for k in shape], indexing="ij"), axis=-1).reshape(-1, 3) * sp + lo
    _, j = cKDTree(pts).query(grid)
    s = ss[j]
    off = grid - pts[j]
    a = np.einsum("ij,ij->i", off, nrm[j])  # posterior offset from the corpus axis
    b = np.einsum("ij,ij->i", off, lat[j])  # lateral offset (+ = right)
    sem = np.zeros(len(grid), np.int16)
    ins = np.zeros(len(grid), np.int16)

    def put(sel: np.ndarray, label: int, inst: int) -> None:
        sem[sel] = label
        ins[sel] = inst

    canal = (a > ra) & (a < ra + 2 * c) & (np.abs(b) < c)
    put(canal, 61, 0)
    for k, v in enumerate(ids):
        top, bot = s0[k], s0[k] + hs[k]
        h = hs[k]
        band = (s >= top) & (s < bot)
        corpus = band & (np.abs(a) <= ra) & (np.abs(b) <= rb)
        put(corpus, 49, v)
        if endplates:
            e = 1.01 * max(sp)
            put(corpus & (s < top + e), 62, 200 + v)
            put(corpus & (s >= bot - e), 62, 200 + v)
        arch = (s >= top + 0.1 * h) & (s < top + 0.9 * h)
        ring = (a > ra) & (a <= ra + 2 * c + w) & (np.abs(b) <= c + w) & ~canal
        put(arch & ring, 41, v)
        spin = (s >= top + 0.3 * h) & (s < bot + 0.4 * gap) & (a > ra + 2 * c + w) & (a <= ra + 2 * c + w + 18) & (
            np.abs(b) <= w / 2)
        put(spin, 42, v)
        if costal[k] > 0:
            cs = (s >= top + 0.3 * h) & (s < top + 0.7 * h) & (a > ra) & (a <= ra + w)
            put(cs & (b < -(c + w)) & (b >= -(c + w + costal[k])), 43, v)
            put(cs & (b > c + w) & (b <= c + w + costal[k]), 44, v)
        side = (np.abs(b) >= c) & (np.abs(b) <= c + w)
        front = (a > ra + c) & (a <= ra + c + w / 2)
        back = (a > ra + c + w / 2) & (a <= ra + c + w)
        if k > 0:  # superior articular reaches up to the disc level above (front half)
            sup = side & front & (s >= top - 0.5 * gap - 0.15 * h) & (s < top + 0.3 * h)
            put(sup & (b < 0), 45, v)
            put(sup & (b > 0), 46, v)
        if k < n - 1:  # inferior articular reaches down past the disc (back half)
            inf = side & back & (s >= top + 0.6 * h) & (s < bot + gap + 0.05 * h)
            put(inf & (b < 0), 47, v)
            put(inf & (b > 0), 48, v)
        if k < n - 1 or sacrum:
            disc = (s >= bot) & (s < bot + gap) & (np.abs(a) <= ra - 1) & (np.abs(b) <= rb - 1)
            if block == k:
                put((s >= bot) & (s < bot + gap) & (np.abs(a) <= ra) & (np.abs(b) <= rb), 49, v)
                # the fused disc space belongs half to each vertebra
                put((s >= bot + gap / 2) & (s < bot + gap) & (np.abs(a) <= ra) & (np.abs(b) <= rb), 49, ids[k + 1])
            else:
                put(disc, 100, 100 + v)
    if dens > 0:
        put((s >= -dens) & (s < 0) & (np.abs(a) <= 4.0) & (np.abs(b) <= 4.0), 49, ids[0])
    if sacrum:
        top = s0[-1] + hs[-1] + gap
        sac = (s >= top) & (s < top + 25.0) & (np.abs(a) <= ra) & (np.abs(b) <= rb + 8)
        put(sac, 26, 26)
    if block is not None and endplates:
        # no endplates inside a block vertebra
        v0, v1 = ids[block], ids[block + 1]
        bot = s0[block] + hs[block]
        e = 1.01 * max(sp)
        fused = (s >= bot - e) & (s < bot + gap + e) & (np.abs(a) <= ra) & (np.abs(b) <= rb)
        sel = fused & np.isin(sem, (62,))
        sem[sel] = 49
        ins[sel] = np.where(s[sel] < bot + gap / 2, v0, v1)
    return Synth(sem.reshape(shape), ins.reshape(shape), tuple(float(x) for x in sp), ids)


def phantom_ids(semantic: np.ndarray, ph, confirm: bool = True) -> tuple[dict[int, int], object]:
    """The pipeline's instance steps (geometric vertebrae, ids, post-processing, sacrum, labelling) on ``semantic``
    (a phantom's semantic mask in PIR, possibly degraded); ({GT vertebra: our id holding most of it}, sacrum report)."""
    from spineps_like.assign import assign_ivds_endplates
    from spineps_like.geometry import reorient
    from spineps_like.instance.geometric import geometric_instances
    from spineps_like.io import Scan
    from spineps_like.labeling import label_vertebrae
    from spineps_like.postprocess import postprocess
    from spineps_like.sacrum import confirm_sacrum

    sp = reorient(ph.semantic, "PIR").spacing
    vert = geometric_instances(semantic, sp)
    inst, sem = assign_ivds_endplates(semantic, vert, sp)
    sem, inst, _ = postprocess(sem, inst, sp)
    rep = None
    if confirm:
        sem, inst, rep = confirm_sacrum(sem, inst, sp)
    out, _ = label_vertebrae(inst, sem, sp)
    gt = reorient(Scan(ph.instance.array, ph.instance.affine), "PIR").array
    pairs = {}
    for g in [int(v) for v in np.unique(gt) if 0 < v < 26]:
        ids, n = np.unique(out[(gt == g) & (out > 0) & (out < 100)], return_counts=True)
        pairs[g] = int(ids[np.argmax(n)]) if len(ids) else 0
    return pairs, rep
