"""The structures a measurement needs, cut out of the masks once: vertebral bodies (corpus + endplates), their
endplate and posterior-element centres, discs and the spinal canal, each with a world-mm look-up on its own box."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from spineps_like.labels import ANATOMICAL_ORDER, ENDPLATE_OFFSET, IVD_OFFSET, POSTERIOR_LABELS, SACRUM_ID, \
    label_mask
from spineps_like.measure.geometry import Frame, Lookup, Struct, as_affine, box_union, centroid, make_struct

CORPUS = (49, 50, 51)
ENDPLATES = (52, 53, 62)
CANAL = (60, 61)
CORD = (60,)


@dataclass
class Spine:
    """Masks, geometry and the structures cut out of them (filled by :func:`collect`, frames by
    :func:`spineps_like.measure.frames.vertebra_frames`)."""

    sem: np.ndarray
    inst: np.ndarray
    aff: np.ndarray
    inv: np.ndarray
    step: float  # ray sampling step (mm)
    vox_mm3: float
    present: list[int]
    bodies: dict[int, Struct] = field(default_factory=dict)
    discs: dict[int, Struct] = field(default_factory=dict)  # by the vertebra above
    ep_centres: dict[int, tuple[np.ndarray | None, np.ndarray | None]] = field(default_factory=dict)
    post_centres: dict[int, np.ndarray | None] = field(default_factory=dict)
    border: dict[int, bool] = field(default_factory=dict)
    volume: dict[int, float] = field(default_factory=dict)
    canal_pts: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    canal_lookup: Lookup | None = None
    cord_lookup: Lookup | None = None
    frames: dict[int, Frame] = field(default_factory=dict)
    disc_frames: dict[int, Frame] = field(default_factory=dict)
    s1: tuple | None = None  # (last vertebra, S1's frame and depth or None): cache of alignment.s1_frame

    @property
    def verts(self) -> list[int]:
        """Vertebrae with a measured body, top to bottom, without the sacrum."""
        return [v for v in self.present if v != SACRUM_ID and v in self.bodies]

    @property
    def order(self) -> list[int]:
        """:attr:`verts` and the sacrum (when it has a body)."""
        return self.verts + ([SACRUM_ID] if SACRUM_ID in self.bodies else [])

    def neighbours(self, v: int) -> tuple[int | None, int | None]:
        order = self.order
        k = order.index(v)
        return (order[k - 1] if k > 0 else None), (order[k + 1] if k + 1 < len(order) else None)


def collect(semantic: np.ndarray, instance: np.ndarray, spacing_or_affine) -> Spine:
    """Cut bodies, discs and the canal out of a semantic and an instance mask (see :func:`measure` for the labels)."""
    sem = np.asarray(semantic)
    inst = np.asarray(instance)
    if sem.shape != inst.shape or sem.ndim != 3:
        raise ValueError(f"semantic and instance masks must be 3D arrays of one shape, got {sem.shape} and "
                         f"{inst.shape}")
    aff = as_affine(spacing_or_affine)
    inv = np.linalg.inv(aff)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    inst_i = inst.astype(np.int32, copy=False) if inst.dtype.kind not in "iu" or inst.dtype.itemsize > 4 else inst
    boxes = ndimage.find_objects(inst_i)

    def box(i: int):
        return boxes[i - 1] if 0 < i <= len(boxes) else None

    present = [v for v in ANATOMICAL_ORDER if v != 27 and box(v) is not None]
    sp = Spine(sem, inst, aff, inv, float(min(0.25, spacing.min() / 4)), float(abs(np.linalg.det(aff[:3, :3]))),
               present)
    for v in present:
        _collect_body(sp, v, box)
    for v in present:
        d = box(IVD_OFFSET + v)
        if d is None:
            continue
        lo = np.array([a.start for a in d])
        st = make_struct(IVD_OFFSET + v, (inst[d] == IVD_OFFSET + v) & (sem[d] == 100), lo, aff, inv)
        if st is not None:
            sp.discs[v] = st
    canal = label_mask(sem, CANAL)
    canal_idx = np.nonzero(canal)
    if canal_idx[0].size:
        sp.canal_pts = np.stack(canal_idx, 1).astype(float) @ aff[:3, :3].T + aff[:3, 3]
    sp.canal_lookup = Lookup(canal, np.zeros(3, int), inv)
    sp.cord_lookup = Lookup(label_mask(sem, CORD), np.zeros(3, int), inv)
    return sp


def _collect_body(sp: Spine, v: int, box) -> None:
    """Body (corpus + endplates; the sacrum's body part for 26), endplate and posterior centres, volume, border."""
    sem, inst, aff, inv = sp.sem, sp.inst, sp.aff, sp.inv
    bu = box_union([box(v), box(ENDPLATE_OFFSET + v)] if v != SACRUM_ID else [box(v)], inst.shape)
    if bu is None:
        return
    sl, lo = bu
    s_loc, i_loc = sem[sl], inst[sl]
    if v == SACRUM_ID:
        body = (i_loc == v) & ((s_loc == SACRUM_ID) | label_mask(s_loc, CORPUS))
    else:
        body = ((i_loc == v) & label_mask(s_loc, CORPUS)) | ((i_loc == ENDPLATE_OFFSET + v)
                                                            & label_mask(s_loc, ENDPLATES))
        ep = i_loc == ENDPLATE_OFFSET + v
        sp.ep_centres[v] = (centroid(ep & (s_loc == 52), lo, aff), centroid(ep & (s_loc == 53), lo, aff))
        sp.post_centres[v] = centroid((i_loc == v) & label_mask(s_loc, POSTERIOR_LABELS), lo, aff)
    sp.volume[v] = float(((i_loc == v) | (i_loc == ENDPLATE_OFFSET + v)).sum()) * sp.vox_mm3
    st = make_struct(v, body, lo, aff, inv)
    if st is not None:
        sp.bodies[v] = st
        nz = np.nonzero(body.any((1, 2)))[0], np.nonzero(body.any((0, 2)))[0], np.nonzero(body.any((0, 1)))[0]
        sp.border[v] = any(int(n[0]) + lo[k] == 0 or int(n[-1]) + lo[k] == inst.shape[k] - 1
                           for k, n in enumerate(nz))
