"""Clinical grades and thresholds of the measurements, each with its source."""

from __future__ import annotations

import numpy as np

#: Genant's semi-quantitative grades: height loss below 20% is grade 0, 20-25% grade 1, 25-40% grade 2, above 40%
#: grade 3 (Genant HK et al., J Bone Miner Res 1993;8:1137-1148).
GENANT_THRESHOLDS: tuple[float, float, float] = (0.20, 0.25, 0.40)
#: Below this slip fraction (of the lower body's depth) no listhesis is reported (Meyerding grade 0): the offsets of
#: a normal spine's posterior walls (different depths, lordosis) reach ~1 mm, 3-6% of a body's depth.
LISTHESIS_MIN_FRACTION = 0.08


def genant_grade(loss: float | None) -> int | None:
    """Genant grade of a height loss (fraction): 0 (< 20%), 1 (20-25%), 2 (25-40%), 3 (> 40%); None for None/NaN."""
    if loss is None or not np.isfinite(loss):
        return None
    t1, t2, t3 = GENANT_THRESHOLDS
    return 0 if loss < t1 else 1 if loss < t2 else 2 if loss <= t3 else 3


def meyerding_grade(fraction: float | None) -> int | None:
    """Meyerding grade of a slip fraction: 0 (none, below :data:`LISTHESIS_MIN_FRACTION`), 1 (< 25%), 2 (25-50%),
    3 (50-75%), 4 (75-100%), 5 (> 100%, spondyloptosis); by the absolute value (retrolisthesis too)."""
    if fraction is None or not np.isfinite(fraction):
        return None
    f = abs(fraction)
    if f < LISTHESIS_MIN_FRACTION:
        return 0
    return 1 if f < 0.25 else 2 if f < 0.5 else 3 if f < 0.75 else 4 if f <= 1.0 else 5
