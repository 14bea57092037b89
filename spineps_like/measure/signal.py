"""MRI disc signal: the nucleus / CSF signal ratio of each disc, a proxy of disc degeneration on T2w images.

A degenerating nucleus pulposus loses water and darkens on T2w MRI (Pfirrmann CWA, Metzdorf A, Zanetti M, Hodler J,
Boos N., "Magnetic resonance classification of lumbar intervertebral disc degeneration", Spine 2001;26:1873-1878:
grades I-II bright as CSF, III intermediate, IV-V dark). Normalising the nucleus's intensity by the CSF's removes the
scanner's arbitrary scale (the signal-intensity ratio of e.g. Niemeläinen R et al., "Quantitative measurement of
intervertebral disc signal using MRI", Clin Radiol 2008;63:252-255).

Regions of interest, world mm (anisotropic voxels respected):

- **nucleus**: the disc's voxels (semantic 100, instance 100+v) within a cylinder about the disc's cranio-caudal
  axis through the middle of its depth, of radius :data:`NUCLEUS_RADIUS_FRACTION` of the disc's depth (the central
  half of the depth and as wide: the annulus and the disc's rim excluded), and at least :data:`NUCLEUS_EROSION_MM`
  from any voxel outside the disc (the endplates' partial volume); without such voxels the erosion is dropped;
- **CSF**: canal voxels without cord (semantic 61; the cord is 60) at least :data:`CSF_EROSION_MM` from any other
  label, whose position along the disc's cranio-caudal axis lies within :data:`CSF_LEVEL_MM` of the disc's centre
  (the nearby levels), and within 50 mm of it; at least :data:`MIN_CSF_VOXELS` of them, else no ratio.

``disc_csf_signal_ratio`` = mean(nucleus) / mean(CSF). On T2w, healthy nuclei are roughly half as bright as CSF and
degenerated ones a fraction of it; the ratio is not defined on CT (None) and carries no meaning on T1w, where CSF is
dark. No threshold is applied: a cut-off depends on sequence and field strength.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from spineps_like.measure.geometry import rnd
from spineps_like.measure.structures import Spine

#: Radius of the nucleus ROI's cylinder, as a fraction of the disc's depth.
NUCLEUS_RADIUS_FRACTION = 0.25
#: Least distance (mm) of a nucleus ROI voxel from any voxel outside the disc.
NUCLEUS_EROSION_MM = 1.0
#: Least distance (mm) of a CSF voxel from any other label (cord, epidural fat, bone).
CSF_EROSION_MM = 1.0
#: CSF within this distance (mm) of the disc's centre along its axis counts as the disc's level.
CSF_LEVEL_MM = 20.0
#: Fewest CSF voxels for a ratio.
MIN_CSF_VOXELS = 10
#: The fields this step adds to a disc record (None without an MRI image).
SIGNAL_FIELDS = ("nucleus_signal_au", "csf_signal_au", "disc_csf_signal_ratio", "nucleus_roi_volume_mm3")
CSF_LABEL = 61


def _world(idx: np.ndarray, aff: np.ndarray) -> np.ndarray:
    return idx @ aff[:3, :3].T + aff[:3, 3]


def csf_voxels(sp: Spine) -> tuple[np.ndarray, np.ndarray]:
    """(voxel indices (N, 3), world mm (N, 3)) of the eroded CSF (see the module docstring)."""
    csf = sp.sem == CSF_LABEL
    boxes = ndimage.find_objects(csf.astype(np.uint8))
    if not boxes or boxes[0] is None:
        return np.zeros((0, 3), int), np.zeros((0, 3))
    box = boxes[0]
    spacing = np.linalg.norm(sp.aff[:3, :3], axis=0)
    dist = ndimage.distance_transform_edt(np.pad(csf[box], 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    idx = np.argwhere(dist >= CSF_EROSION_MM) + np.array([s.start for s in box])
    return idx, _world(idx.astype(float), sp.aff)


def nucleus_voxels(sp: Spine, v: int, depth_mm: float | None) -> np.ndarray:
    """Voxel indices (N, 3) of disc 100+v's nucleus ROI (see the module docstring); empty without a depth."""
    d, f = sp.discs.get(v), sp.disc_frames.get(v)
    if d is None or f is None or depth_mm is None or not np.isfinite(depth_mm):
        return np.zeros((0, 3), int)
    mask, lo = d.lookup.mask, d.lookup.lo
    spacing = np.linalg.norm(sp.aff[:3, :3], axis=0)
    dist = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    idx = np.argwhere(mask) + lo
    rel = _world(idx.astype(float), sp.aff) - f.origin
    # the middle of the disc's depth along its antero-posterior axis (the disc's centre may sit off it)
    a = rel @ f.ap
    mid = 0.5 * (a.min() + a.max())
    radial = np.hypot(a - mid, rel @ f.lr)
    inner = radial <= NUCLEUS_RADIUS_FRACTION * depth_mm
    eroded = inner & (dist[tuple((idx - lo).T)] >= NUCLEUS_EROSION_MM)
    return idx[eroded] if eroded.any() else idx[inner]


def disc_signal_records(sp: Spine, image: np.ndarray, drec: list[dict[str, Any]]) -> None:
    """Add the nucleus and CSF signal and their ratio to each disc record of ``drec`` (MRI image on the masks'
    grid)."""
    img = np.asarray(image)
    if img.shape != sp.sem.shape:
        raise ValueError(f"the image's shape {img.shape} differs from the masks' {sp.sem.shape}")
    csf_idx, csf_pts = csf_voxels(sp)
    csf_val = img[tuple(csf_idx.T)].astype(float) if csf_idx.size else np.zeros(0)
    for rec in drec:
        v = rec["id"] - 100
        nuc = nucleus_voxels(sp, v, rec.get("depth_mm"))
        nuc_mean = float(img[tuple(nuc.T)].astype(float).mean()) if len(nuc) else float("nan")
        csf_mean = float("nan")
        f = sp.disc_frames.get(v)
        if f is not None and csf_pts.shape[0]:
            rel = csf_pts - f.origin
            near = (np.abs(rel @ f.u) <= CSF_LEVEL_MM) & (np.einsum("ij,ij->i", rel, rel) <= 50.0 ** 2)
            if near.sum() >= MIN_CSF_VOXELS:
                csf_mean = float(csf_val[near].mean())
        ratio = nuc_mean / csf_mean if np.isfinite(csf_mean) and csf_mean > 0 else float("nan")
        rec.update({"nucleus_signal_au": rnd(nuc_mean, 2), "csf_signal_au": rnd(csf_mean, 2),
                    "disc_csf_signal_ratio": rnd(ratio, 3), "nucleus_roi_volume_mm3": rnd(len(nuc) * sp.vox_mm3, 1)})
