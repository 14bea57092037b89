"""Per-vertebra, per-disc and per-level measurements from a semantic and an instance mask.

All measurements are taken in world millimetres (voxel index -> affine -> mm), along each structure's own anatomical
axes, by casting rays through the masks and counting the samples that fall inside (nearest-voxel look-up, 0.25 mm
steps or finer). Nothing depends on the array's axis order or direction, and anisotropic voxels only cost resolution.

The frame of a vertebra:

- **cranio-caudal axis** ``u`` (pointing caudally): the line from the centre of its superior endplate (semantic 52,
  instance 200+v) to the centre of its inferior endplate (53); without both endplates, the line from the disc above to
  the disc below (or from one disc through the body's centre), then from the vertebra above to the one below, else
  the scan's inferior direction;
- **antero-posterior axis** ``ap`` (pointing anteriorly): from the centre of the spinal canal (61, with the cord 60)
  at the body's level to the body's centre, made orthogonal to ``u``; without a canal, from the vertebra's own
  posterior elements; else the scan's anterior direction;
- **left-right axis**: ``u x ap``.

The body is the corpus (49, with the CT aliases 50/51) of instance v plus its endplates (instance 200+v). Rays are
cast in a small bundle (five lateral offsets, +-3 mm around the mid-sagittal plane, times three to five offsets
along the other axis) and the bundle's median is reported.

Definitions (TotalSegmentator's spine report and Genant's semi-quantitative method):

- depth: the body's antero-posterior extent through its centre (median over rays within +-25% of its height);
  width: its left-right extent through the centre of the depth;
- heights ``posterior`` / ``middle`` / ``anterior``: cranio-caudal extents at 15 / 50 / 85% of the depth, counted
  from the posterior wall (the canal side) towards the front;
- neighbours' reference height: the mean posterior height of the vertebrae directly above and below that have a
  measured body and are not cut by the field of view;
- Genant height loss: ``1 - min(anterior, middle) / max(posterior, neighbours' reference)``; grade 0 below 20%,
  1 for 20-25%, 2 for 25-40%, 3 above 40% (:data:`GENANT_THRESHOLDS`); shape (grade >= 1 only): ``crush`` when all
  three heights are at most 80% of the neighbours' reference, else ``wedge`` when the anterior height is the lowest,
  else ``biconcave``; no grade and no shape for a vertebra the field of view cut, nor for C1/C2 (C2's body carries
  the dens), which are no neighbours' reference either;
- middle-height loss against the neighbours: ``1 - middle / mean(neighbours' middle heights)``: the loss of the
  body's centre height, what a phantom's ``height_loss`` records;
- disc heights at 15 / 50 / 85% of the disc's own depth, along the mean axis of its two vertebrae; disc height index:
  the disc's mean height (of the three) over the mean of its vertebrae's mean body heights;
- listhesis: the offset of the upper body's posterior wall over the lower body's, both sampled at the same distances
  from the disc (10-30% of the smaller body height, at least 2 mm), along the antero-posterior axis of the two bodies'
  bisecting frame (the mean of their axes); positive = anterolisthesis. The fraction is that offset over the lower
  body's depth at the same heights; Meyerding grade 1 below 25%, 2 for 25-50%, 3 for 50-75%, 4 for 75-100%, 5 beyond,
  and 0 (none) below :data:`LISTHESIS_MIN_FRACTION`. Over the sacrum (L5/S1) the lower body is S1 in its own
  frame (:func:`~spineps_like.measure.alignment.s1_frame`: its superior plane and the sacrum's most anterior run
  4 mm below it) and v's height stands for S1's; S1's wall is the sacrum mask's, i.e. the front of the sacral canal.
  Not measured where the upper body is cut by the field of view;
- canal antero-posterior diameter: at each body's and disc's centre, the extent of canal + cord along the level's
  antero-posterior axis through the canal's centre at that level (canal voxels within +-2.5 mm of the level's plane);
  canal and cord cross-sectional areas and the stenosis flag: :mod:`spineps_like.measure.canal`;
- endplate planes, disc / segment / wedge angles, lumbar lordosis, thoracic kyphosis, coronal Cobb angle:
  :mod:`spineps_like.measure.alignment`; CT trabecular and endplate attenuation and the L1 osteoporosis screen:
  :mod:`spineps_like.measure.density`; the MRI disc / CSF signal ratio: :mod:`spineps_like.measure.signal`.

The steps, each a module of this package: :mod:`~spineps_like.measure.structures` (cut the structures out of the
masks), :mod:`~spineps_like.measure.frames`, :mod:`~spineps_like.measure.bodies`,
:mod:`~spineps_like.measure.listhesis`, :mod:`~spineps_like.measure.discs`, :mod:`~spineps_like.measure.canal`,
:mod:`~spineps_like.measure.alignment`, :mod:`~spineps_like.measure.density`, :mod:`~spineps_like.measure.signal`;
:mod:`~spineps_like.measure.geometry` holds the ray casting.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Mapping, Sequence

import numpy as np

from spineps_like.measure.alignment import alignment_records
from spineps_like.measure.bodies import body_records, grade_bodies
from spineps_like.measure.canal import canal_records
from spineps_like.measure.density import DENSITY_FIELDS, density_records, is_ct
from spineps_like.measure.discs import disc_records
from spineps_like.measure.frames import disc_frames, vertebra_frames
from spineps_like.measure.grades import GENANT_THRESHOLDS, LISTHESIS_MIN_FRACTION, genant_grade, meyerding_grade
from spineps_like.measure.listhesis import add_listhesis
from spineps_like.measure.signal import SIGNAL_FIELDS, disc_signal_records
from spineps_like.measure.structures import collect

__all__ = ["GENANT_THRESHOLDS", "LISTHESIS_MIN_FRACTION", "UNITS", "genant_grade", "measure", "measurements_table",
           "meyerding_grade", "table_csv"]

#: Units of the record fields, by suffix.
UNITS: dict[str, str] = {"_mm": "mm", "_mm2": "mm^2", "_mm3": "mm^3", "_deg": "degrees", "_hu": "HU",
                         "_hu_mean": "HU", "_hu_median": "HU", "_hu_sd": "HU", "ratio": "1 (dimensionless)",
                         "loss": "1 (fraction)", "fraction": "1 (fraction)", "index": "1 (dimensionless)",
                         "grade": "ordinal", "stenosis": "category (none, relative, absolute)",
                         "screen": "category (unlikely, possible, likely)", "axis": "unit vector (RAS world)",
                         "centre_mm": "mm (RAS world)",
                         "_au": "image intensity (arbitrary units)"}


def measure(semantic: np.ndarray, instance: np.ndarray, spacing_or_affine, complete: Mapping[int, bool] | None = None,
            image: np.ndarray | None = None, modality: str | None = None) -> dict[str, Any]:
    """Measure every vertebra, disc and canal level in a pair of masks.

    Parameters
    ----------
    semantic : the ``seg-spine`` mask (labels 41-49, 52/53, 60, 61, 100, 26).
    instance : the ``seg-vert`` mask on the same grid (vertebra v, IVD 100+v, endplate 200+v).
    spacing_or_affine : three voxel sizes (mm, along the array's axes) or the 4 x 4 voxel-to-world affine.
    complete : {vertebra id: False if the field of view cut it} (the labelling's ``complete``); None: a vertebra
        whose body touches the array's border counts as cut.
    image : the scan on the same grid (optional): with a CT in HU, trabecular and endplate attenuation and the
        osteoporosis screen (:mod:`spineps_like.measure.density`); with an MRI, each disc's nucleus / CSF signal
        ratio (:mod:`spineps_like.measure.signal`); the fields of the other modality (all of them without an
        image) are None.
    modality : 'ct' or 'mr' (optional); None: CT when the image's 1st percentile is at most -500 (air in HU).

    Returns
    -------
    {"vertebrae": [...], "discs": [...], "canal": [...], "spine": [one record], "units": {...}}: one dict per
    structure, top to bottom; units by field-name suffix (:data:`UNITS`), None where a value could not be measured.
    """
    sp = collect(semantic, instance, spacing_or_affine)
    sp.frames = vertebra_frames(sp)
    vrec, geo = body_records(sp, complete)
    grade_bodies(sp, vrec, geo)
    sp.disc_frames = disc_frames(sp)
    add_listhesis(sp, vrec, geo)
    drec = disc_records(sp, geo)
    crec = canal_records(sp)
    spine = alignment_records(sp, geo, vrec, drec)
    ct = image is not None and is_ct(image, modality)
    if ct:
        spine.update(density_records(sp, image, vrec))
    else:
        for rec in vrec.values():
            rec.update(dict.fromkeys(DENSITY_FIELDS))
        spine.update({"l1_trabecular_hu_mean": None, "osteoporosis_screen": None})
    if image is not None and not ct:
        disc_signal_records(sp, image, drec)
    else:
        for d in drec:
            d.update(dict.fromkeys(SIGNAL_FIELDS))
    return {"vertebrae": [vrec[v] for v in sp.verts], "discs": drec, "canal": crec, "spine": [spine],
            "units": dict(UNITS)}


# ---------------------------------------------------------------- tables
def measurements_table(measurements: Mapping[str, Any], **extra: Any) -> list[dict[str, Any]]:
    """One flat row per structure (vertebra, disc, canal level, the spine as a whole) with a ``structure`` column,
    for a CSV or a cohort table; ``extra`` columns (e.g. ``scan='sub-01'``) come first. Lists become ';'-joined
    strings."""
    rows = []
    for kind, key in (("vertebra", "vertebrae"), ("disc", "discs"), ("canal", "canal"), ("spine", "spine")):
        for rec in measurements.get(key, []):
            row = {**extra, "structure": kind}
            for k, val in rec.items():
                row[k] = ";".join(str(x) for x in val) if isinstance(val, (list, tuple)) else val
            rows.append(row)
    return rows


def table_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """``rows`` (from :func:`measurements_table`) as CSV text, columns in first-seen order."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return buf.getvalue()

