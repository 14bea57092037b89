"""Spine measurements from the masks (issue 29): vertebral body heights and Genant grade, discs, listhesis and the
canal's antero-posterior diameter.

Everything is a pure function of the semantic and instance masks plus their geometry (voxel size or affine) and is
measured in world millimetres, so the numbers do not depend on the array's orientation. See
:func:`~spineps_like.measure.spine.measure` and docs/measurements.md for the definitions.
"""

from spineps_like.measure.spine import (
    GENANT_THRESHOLDS,
    LISTHESIS_MIN_FRACTION,
    UNITS,
    genant_grade,
    measure,
    measurements_table,
    meyerding_grade,
)

__all__ = ["GENANT_THRESHOLDS", "LISTHESIS_MIN_FRACTION", "UNITS", "genant_grade", "measure", "measurements_table",
           "meyerding_grade"]
