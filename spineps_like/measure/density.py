"""CT bone density: trabecular attenuation (HU) of each vertebral body, endplate attenuation, and opportunistic
osteoporosis screening at L1.

Region of interest (ROI) of a body's trabecular bone: the corpus voxels (semantic 49, CT aliases 50/51) of the
vertebra, without its endplates (52/53, instance 200+v), whose centre lies at least :data:`CORE_EROSION_MM` from the
nearest voxel outside the body (corpus + endplates; world mm, anisotropic voxels respected). The erosion removes the
cortical shell (~1 mm), the endplates and the partial volume of a 3-4 mm slice at the body's surface; for small
bodies whose core would hold fewer than :data:`MIN_CORE_VOXELS` voxels it falls back to 3 and then 2 mm
(``trabecular_roi_erosion_mm`` says which). The body's posterior 20% of depth is not excluded: the phantoms and
SPINEPS' masks carry no basivertebral vein.

Endplate attenuation: the mean of each endplate's voxels (superior 52 / inferior 53 of instance 200+v).

Screening (:func:`osteoporosis_screen`) uses L1's trabecular mean: <= 110 HU 'likely' (high specificity), <= 160 HU
'possible' (high sensitivity), else 'unlikely' (Pickhardt PJ, Pooler BD, Lauder T, del Rio AM, Bruce RJ, Binkley
N., "Opportunistic screening for osteoporosis using abdominal computed tomography scans obtained for other
indications", Ann Intern Med 2013;158(8):588-595: L1 trabecular attenuation <= 160 HU was > 90% sensitive and
<= 110 HU > 90% specific for DXA-defined osteoporosis). Thresholds hold for non-contrast and portal-venous CT at
120 kVp; they are not defined for MRI: without a CT image (:func:`is_ct`) the fields are None.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from spineps_like.labels import ENDPLATE_OFFSET, VERTEBRA_NAME_TO_ID
from spineps_like.measure.geometry import rnd
from spineps_like.measure.structures import CORPUS, Spine

#: Erosion (mm) of a body's trabecular ROI from its surface.
CORE_EROSION_MM = 4.0
#: Fewest voxels of a trabecular ROI before the erosion falls back (3 mm, then 2 mm).
MIN_CORE_VOXELS = 20
#: L1 trabecular attenuation thresholds (HU) of :func:`osteoporosis_screen` (Pickhardt et al. 2013).
OSTEOPOROSIS_HU: tuple[float, float] = (110.0, 160.0)


def osteoporosis_screen(l1_hu: float | None) -> str | None:
    """'likely' (<= 110 HU), 'possible' (<= 160 HU) or 'unlikely' for L1's trabecular attenuation; None without."""
    if l1_hu is None or not np.isfinite(l1_hu):
        return None
    specific, sensitive = OSTEOPOROSIS_HU
    return "likely" if l1_hu <= specific else "possible" if l1_hu <= sensitive else "unlikely"


def trabecular_roi(sp: Spine, v: int) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(ROI mask on the body's box, the box's lower corner, erosion in mm) of vertebra v, or None."""
    body = sp.bodies.get(v)
    if body is None:
        return None
    mask, lo = body.lookup.mask, body.lookup.lo
    box = tuple(slice(int(a), int(a) + n) for a, n in zip(lo, mask.shape))
    corpus = mask & np.isin(sp.sem[box], CORPUS) & (sp.inst[box] == v)
    spacing = np.linalg.norm(sp.aff[:3, :3], axis=0)
    dist = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    for erosion in (CORE_EROSION_MM, 3.0, 2.0):
        roi = corpus & (dist >= erosion)
        if roi.sum() >= MIN_CORE_VOXELS:
            return roi, lo, erosion
    return None


def density_records(sp: Spine, image: np.ndarray, vrec: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Add trabecular and endplate attenuation to ``vrec``; return the spine-level screening fields."""
    img = np.asarray(image)
    if img.shape != sp.sem.shape:
        raise ValueError(f"the image's shape {img.shape} differs from the masks' {sp.sem.shape}")
    for v, rec in vrec.items():
        roi = trabecular_roi(sp, v)
        vals = np.zeros(0)
        if roi is not None:
            m, lo, erosion = roi
            box = tuple(slice(int(a), int(a) + n) for a, n in zip(lo, m.shape))
            vals = img[box][m].astype(float)
        rec.update({"trabecular_hu_mean": rnd(vals.mean() if vals.size else None, 1),
                    "trabecular_hu_median": rnd(np.median(vals) if vals.size else None, 1),
                    "trabecular_hu_sd": rnd(vals.std() if vals.size else None, 1),
                    "trabecular_roi_volume_mm3": rnd(vals.size * sp.vox_mm3, 1),
                    "trabecular_roi_erosion_mm": roi[2] if roi is not None else None})
        for side, label in (("superior", 52), ("inferior", 53)):
            sel = np.zeros(0)
            if v in sp.bodies:
                lk = sp.bodies[v].lookup
                box = tuple(slice(int(a), int(a) + n) for a, n in zip(lk.lo, lk.mask.shape))
                sel = img[box][(sp.inst[box] == ENDPLATE_OFFSET + v) & (sp.sem[box] == label)]
            rec[f"endplate_{side}_hu_mean"] = rnd(float(sel.mean()) if sel.size >= 5 else None, 1)
    l1 = vrec.get(VERTEBRA_NAME_TO_ID["L1"])
    l1_hu = l1["trabecular_hu_mean"] if l1 is not None and l1["complete"] is not False else None
    return {"l1_trabecular_hu_mean": l1_hu, "osteoporosis_screen": osteoporosis_screen(l1_hu)}


def is_ct(image: np.ndarray, modality: str | None = None) -> bool:
    """``modality == 'ct'``; without a modality, an image whose 1st percentile is at most -500 (air in HU)."""
    if modality is not None:
        return modality.lower() == "ct"
    img = np.asarray(image)
    sample = img.reshape(-1)[:: max(1, img.size // 200_000)]
    return bool(sample.size and np.percentile(sample, 1) <= -500.0)


#: The density fields of a record, None where there is no CT image.
DENSITY_FIELDS = ("trabecular_hu_mean", "trabecular_hu_median", "trabecular_hu_sd", "trabecular_roi_volume_mm3",
                  "trabecular_roi_erosion_mm", "endplate_superior_hu_mean", "endplate_inferior_hu_mean")
