"""World-millimetre geometry of the measurements: affines, nearest-voxel look-ups, ray casting, structure boxes and
local frames. Pure helpers shared by the measurement steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: Lateral offsets (mm) of a ray bundle around a structure's mid-sagittal plane.
LR_OFFSETS = np.array([-3.0, -1.5, 0.0, 1.5, 3.0])
#: RAS world: inferior is -z, anterior +y.
WORLD_INFERIOR = np.array([0.0, 0.0, -1.0])
WORLD_ANTERIOR = np.array([0.0, 1.0, 0.0])


def as_affine(spacing_or_affine) -> np.ndarray:
    """A 4 x 4 voxel-to-world affine from three voxel sizes or an affine; ValueError when singular or non-finite."""
    a = np.asarray(spacing_or_affine, dtype=float)
    if a.shape == (4, 4):
        aff = a
    elif a.shape == (3,):
        aff = np.diag([*a, 1.0])
    else:
        raise ValueError(f"expected three voxel sizes or a 4 x 4 affine, got shape {a.shape}")
    if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise ValueError("the affine is singular or holds NaN/inf")
    return aff


def unit(v: np.ndarray) -> np.ndarray | None:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-9 else None


class Lookup:
    """A boolean mask on a box of the grid, sampled at world points by nearest voxel (outside the box: False)."""

    def __init__(self, mask: np.ndarray, lo: np.ndarray, inv_affine: np.ndarray):
        self.mask, self.lo, self.inv = mask, np.asarray(lo, int), inv_affine
        self.smooth: np.ndarray | None = None  # a smoothed copy, made on demand by the users that need one
        # world -> box index (rounded: the nearest voxel), and the flat mask with one False cell appended
        self._m = inv_affine[:3, :3].T.copy()
        self._o = inv_affine[:3, 3] - self.lo
        self._flat = np.append(np.ascontiguousarray(mask, dtype=bool).ravel(), False)
        self._strides = np.array([mask.shape[1] * mask.shape[2], mask.shape[2], 1], np.int64)

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        idx = np.rint(pts @ self._m + self._o).astype(np.int64)
        n0, n1, n2 = self.mask.shape
        i, j, k = idx[..., 0], idx[..., 1], idx[..., 2]
        ok = (i.astype(np.uint64) < n0) & (j.astype(np.uint64) < n1) & (k.astype(np.uint64) < n2)
        flat = np.where(ok, i * self._strides[0] + j * self._strides[1] + k, self._flat.size - 1)
        return self._flat[flat]

    def points(self) -> np.ndarray:
        """World coordinates (N, 3) of the mask's voxels."""
        idx = np.stack(np.nonzero(self.mask), 1) + self.lo
        aff = np.linalg.inv(self.inv)
        return idx @ aff[:3, :3].T + aff[:3, 3]


@dataclass
class Rays:
    length: np.ndarray  # (R,) mm inside the chosen run (NaN: no hit)
    first: np.ndarray  # (R,) t of its first sample
    last: np.ndarray  # (R,) t of its last sample


def cast(lookup: Lookup, origins: np.ndarray, direction: np.ndarray, t0: float, t1: float, step: float,
         run: str = "all") -> Rays:
    """Rays ``origin + t * direction`` for t in [t0, t1]: length inside ``lookup`` and first/last inside sample.

    ``run``: 'all' counts every inside sample (first/last: the outermost); 'last' takes only the last contiguous
    run (the most anterior one on a posterior-to-anterior ray, e.g. the sacral body and not its dorsal wall)."""
    t = np.arange(t0, t1 + step / 2, step)
    pts = origins[:, None, :] + t[None, :, None] * direction[None, None, :]
    inside = lookup(pts)
    s = t.size
    hit = inside.any(1)
    last_i = s - 1 - np.argmax(inside[:, ::-1], 1)
    if run == "last":
        starts = inside & ~np.pad(inside, ((0, 0), (1, 0)))[:, :-1]
        idx = np.where(starts & (np.arange(s)[None, :] <= last_i[:, None]), np.arange(s)[None, :], -1)
        first_i = idx.max(1)
        n = last_i - first_i + 1
    else:
        first_i = np.argmax(inside, 1)
        n = inside.sum(1)
    nan = np.full(len(origins), np.nan)
    return Rays(np.where(hit, n * step, nan), np.where(hit, t[first_i], nan), np.where(hit, t[last_i], nan))


def median(x) -> float:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


def mean(xs) -> float:
    a = np.asarray([x for x in xs if x is not None], float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def rnd(x: float | None, nd: int = 2) -> float | None:
    """``x`` rounded to ``nd`` decimals; None for None/NaN/inf (JSON-safe)."""
    return None if x is None or not np.isfinite(x) else round(float(x), nd)


def rvec(v: np.ndarray, nd: int = 4) -> list[float]:
    return [round(float(x), nd) for x in v]


@dataclass
class Frame:
    """A structure's local axes in world mm: origin, caudal ``u``, anterior ``ap``, ``lr = u x ap`` (right)."""

    origin: np.ndarray
    u: np.ndarray  # caudal
    ap: np.ndarray  # anterior
    lr: np.ndarray
    u_from: str
    ap_from: str


@dataclass
class Struct:
    """One structure's voxels: world centre, its look-up and its bounding box."""

    sid: int
    n: int
    centre: np.ndarray
    lookup: Lookup
    reach: float  # half the box's world diagonal + margin: rays of +-reach cross the whole structure


def box_union(slices: Sequence[tuple[slice, ...] | None], shape: Sequence[int], pad: int = 2):
    """(slices, lower corner) of the union of boxes grown by ``pad`` voxels; None without any box."""
    s = [x for x in slices if x is not None]
    if not s:
        return None
    lo = np.maximum(np.min([[a.start for a in x] for x in s], 0) - pad, 0)
    hi = np.minimum(np.max([[a.stop for a in x] for x in s], 0) + pad, np.asarray(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), lo


def make_struct(sid: int, mask: np.ndarray, lo: np.ndarray, aff: np.ndarray, inv: np.ndarray) -> Struct | None:
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return None
    vox = np.stack(idx, 1).astype(float) + lo
    centre = aff[:3, :3] @ vox.mean(0) + aff[:3, 3]
    diag = aff[:3, :3] @ np.asarray(mask.shape, float)
    return Struct(sid, int(idx[0].size), centre, Lookup(mask, lo, inv), 0.5 * float(np.linalg.norm(diag)) + 3.0)


def centroid(mask: np.ndarray, lo: np.ndarray, aff: np.ndarray, min_voxels: int = 5) -> np.ndarray | None:
    idx = np.nonzero(mask)
    if idx[0].size < min_voxels:
        return None
    c = np.array([i.mean() for i in idx]) + lo
    return aff[:3, :3] @ c + aff[:3, 3]
