"""Fixed-size cutouts of the semantic mask around corpus centres, and sparse masks in volume coordinates.

The instance phase works on the semantic mask in PIR orientation on the instance model's grid (axis 0 posterior,
axis 1 inferior, axis 2 right). Each corpus centre gets one cutout of ``size`` voxels whose centre voxel is
``floor(centre)`` (as SPINEPS/TPTBox place it: ``start = floor(centre) - size // 2``). Only the part of a cutout
that sticks out of the volume is zero-padded; the volume itself is never padded or copied.

Input mapping (spineps 2.1.3 ``DEFAULT_LABEL_MAPPING``): posterior elements 41..48 -> 1..8; corpus 49, dense corpus
50 and dens 51 -> 9; everything else (endplates 52/53/62, IVD, canal, cord, sacrum 26) -> 0. A model folder may
override it with its ``mapping``. The network sees the mapped labels one-hot encoded (channel 0 = background).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from spineps_like.geometry import bbox

#: spineps 2.1.3 ``DEFAULT_LABEL_MAPPING`` (semantic label -> network input label); unlisted labels map to 0.
SPINEPS_INPUT_MAPPING: dict[int, int] = {41: 1, 42: 2, 43: 3, 44: 4, 45: 5, 46: 6, 47: 7, 48: 8, 49: 9, 50: 9, 51: 9}
#: Output classes of the instance network: background, vertebra above, centre vertebra, vertebra below.
BACKGROUND, ABOVE, CENTRE, BELOW = 0, 1, 2, 3
CLASS_NAMES: dict[int, str] = {ABOVE: "above", CENTRE: "centre", BELOW: "below"}
#: Mapped input labels that swap under a left/right flip (costal, superior and inferior articular processes).
LR_SWAP_INPUT: dict[int, int] = {3: 4, 4: 3, 5: 6, 6: 5, 7: 8, 8: 7}


# ---------------------------------------------------------------- boxes and sparse masks
Box = tuple[tuple[int, int, int], tuple[int, int, int]]  # (start, stop), stop exclusive, volume coordinates


def box_intersection(a: Box, b: Box) -> Box | None:
    """Intersection of two boxes, or None when they do not overlap."""
    lo = tuple(max(x, y) for x, y in zip(a[0], b[0]))
    hi = tuple(min(x, y) for x, y in zip(a[1], b[1]))
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return lo, hi  # type: ignore[return-value]


def box_union(a: Box, b: Box) -> Box:
    """Smallest box holding both boxes."""
    return (tuple(min(x, y) for x, y in zip(a[0], b[0])),  # type: ignore[return-value]
            tuple(max(x, y) for x, y in zip(a[1], b[1])))


def box_slices(box: Box, origin: Sequence[int] = (0, 0, 0)) -> tuple[slice, slice, slice]:
    """Slices selecting ``box`` in an array whose voxel [0, 0, 0] lies at ``origin``."""
    return tuple(slice(lo - o, hi - o) for lo, hi, o in zip(box[0], box[1], origin))  # type: ignore[return-value]


@dataclass(frozen=True)
class SparseMask:
    """A binary mask stored as its tight bounding box: ``mask`` holds voxels ``start .. start + mask.shape``."""

    start: tuple[int, int, int]
    mask: np.ndarray
    count: int = field(default=-1, compare=False)

    def __post_init__(self) -> None:
        if self.mask.dtype != bool or self.mask.ndim != 3:
            raise ValueError(f"SparseMask needs a 3D bool array, got {self.mask.ndim}D {self.mask.dtype}")
        if self.count < 0:
            object.__setattr__(self, "count", int(np.count_nonzero(self.mask)))

    @property
    def stop(self) -> tuple[int, int, int]:
        return tuple(s + n for s, n in zip(self.start, self.mask.shape))  # type: ignore[return-value]

    @property
    def box(self) -> Box:
        return self.start, self.stop

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Where the mask lies in the volume."""
        return box_slices(self.box)

    @classmethod
    def from_dense(cls, mask: np.ndarray, start: Sequence[int] = (0, 0, 0)) -> "SparseMask | None":
        """Crop a dense boolean array (whose voxel [0,0,0] lies at ``start``) to its bounding box; None if empty."""
        mask = np.asarray(mask, dtype=bool)
        box = bbox(mask)
        if box is None:
            return None
        return cls(tuple(int(s) + b.start for s, b in zip(start, box)),  # type: ignore[arg-type]
                   np.ascontiguousarray(mask[box]))

    def crop(self, box: Box) -> np.ndarray:
        """The mask's voxels inside ``box`` as a bool array of the box's shape (zeros outside the mask)."""
        out = np.zeros(tuple(h - l for l, h in zip(*box)), dtype=bool)
        inter = box_intersection(self.box, box)
        if inter is not None:
            out[box_slices(inter, box[0])] = self.mask[box_slices(inter, self.start)]
        return out

    def count_in(self, box: Box) -> int:
        """Number of mask voxels inside ``box``."""
        inter = box_intersection(self.box, box)
        if inter is None:
            return 0
        if inter == self.box:
            return self.count
        return int(np.count_nonzero(self.mask[box_slices(inter, self.start)]))

    def overlap(self, other: "SparseMask", within: Box | None = None) -> int:
        """Number of voxels in both masks (optionally only inside ``within``)."""
        inter = box_intersection(self.box, other.box)
        if inter is not None and within is not None:
            inter = box_intersection(inter, within)
        if inter is None:
            return 0
        return int(np.count_nonzero(self.mask[box_slices(inter, self.start)] & other.mask[box_slices(inter, other.start)]))

    def to_dense(self, shape: Sequence[int]) -> np.ndarray:
        """The mask on a full volume of ``shape`` (for tests and debugging; the pipeline never needs this)."""
        out = np.zeros(tuple(shape), dtype=bool)
        vol: Box = ((0, 0, 0), tuple(int(s) for s in shape))  # type: ignore[assignment]
        inter = box_intersection(self.box, vol)
        if inter is not None:
            out[box_slices(inter)] = self.mask[box_slices(inter, self.start)]
        return out


@dataclass
class SparsePrediction:
    """The instance network's prediction for one cutout, in volume coordinates.

    Attributes
    ----------
    index : int
        Cutout index; cutouts are ordered top to bottom like the corpus centres.
    centre : tuple of int
        Volume voxel at the cutout's centre (``floor`` of the corpus centre).
    window : Box
        The part of the volume the cutout sees (its placement clipped to the volume).
    classes : dict
        ``{ABOVE: SparseMask, CENTRE: SparseMask, BELOW: SparseMask}``; a class the network did not predict is absent.
    """

    index: int
    centre: tuple[int, int, int]
    window: Box
    classes: dict[int, SparseMask] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not any(m.count for m in self.classes.values())


# ---------------------------------------------------------------- cutouts
class Cutouts(NamedTuple):
    """A batch of cutouts and their placement in the volume.

    ``labels`` is (K, P, I, R) uint8 mapped input labels (0 = background), the compact form the network one-hot
    encodes batch by batch; ``one_hot`` gives the (K, C, P, I, R) bool form. ``offsets`` (K, 3) int is the volume voxel
    of each cutout's voxel [0, 0, 0] (negative where it sticks out); ``shape`` is the volume shape.
    """

    labels: np.ndarray
    offsets: np.ndarray
    shape: tuple[int, int, int]

    @property
    def size(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.labels.shape[1:])  # type: ignore[return-value]

    def window(self, k: int) -> Box:
        """Cutout ``k``'s placement clipped to the volume."""
        lo = tuple(int(max(0, o)) for o in self.offsets[k])
        hi = tuple(int(min(s, o + n)) for o, n, s in zip(self.offsets[k], self.size, self.shape))
        return lo, hi  # type: ignore[return-value]

    def centre(self, k: int) -> tuple[int, int, int]:
        return tuple(int(o + n // 2) for o, n in zip(self.offsets[k], self.size))  # type: ignore[return-value]

    def one_hot(self, n_channels: int = 10) -> np.ndarray:
        """(K, C, P, I, R) bool one-hot encoding (channel 0 = background)."""
        return one_hot(self.labels, n_channels)


def input_lut(mapping: dict[int, int] | None = None, max_label: int = 255) -> np.ndarray:
    """Look-up table semantic label -> network input label (uint8, length ``max_label + 1``)."""
    mapping = SPINEPS_INPUT_MAPPING if mapping is None else {int(k): int(v) for k, v in mapping.items()}
    lut = np.zeros(max(max_label, max(mapping, default=0)) + 1, dtype=np.uint8)
    for k, v in mapping.items():
        if k < 0 or not 0 <= v <= 255:
            raise ValueError(f"input mapping {k} -> {v} is out of range (labels >= 0, inputs 0..255)")
        lut[k] = v
    return lut


def map_input(semantic: np.ndarray, mapping: dict[int, int] | None = None) -> np.ndarray:
    """Map semantic labels to network input labels (41..48 -> 1..8, 49/50/51 -> 9, rest 0 by default)."""
    semantic = np.asarray(semantic)
    if semantic.size and semantic.min() < 0:
        raise ValueError(f"semantic mask holds negative labels (min {semantic.min()})")
    lut = input_lut(mapping, int(semantic.max(initial=0)))
    return lut[semantic]


def one_hot(labels: np.ndarray, n_channels: int = 10) -> np.ndarray:
    """One-hot encode (K, ...) integer labels into (K, C, ...) bool; labels >= ``n_channels`` become background."""
    labels = np.where(labels < n_channels, labels, 0)
    return (labels[:, None] == np.arange(n_channels, dtype=labels.dtype).reshape(1, -1, *([1] * (labels.ndim - 1))))


def cutout_offsets(centres: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Volume voxel of each cutout's [0, 0, 0]: ``floor(centre) - size // 2``."""
    return np.floor(centres).astype(np.int64) - np.asarray(size, dtype=np.int64) // 2


def _check(semantic: np.ndarray, centres: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    if semantic.ndim != 3:
        raise ValueError(f"semantic mask must be 3D, got shape {semantic.shape}")
    size_t = tuple(int(s) for s in size)
    if len(size_t) != 3 or min(size_t) < 1:
        raise ValueError(f"cutout size must be three positive ints, got {tuple(size)}")
    centres = np.asarray(centres, dtype=float).reshape(-1, 3) if np.size(centres) else np.zeros((0, 3))
    if not np.all(np.isfinite(centres)):
        raise ValueError("corpus centres hold NaN or inf")
    outside = (centres < 0) | (centres > np.asarray(semantic.shape) - 1)
    if outside.any():
        k = int(np.flatnonzero(outside.any(axis=1))[0])
        raise ValueError(f"corpus centre {k} {centres[k].round(1).tolist()} lies outside the volume {semantic.shape}")
    return centres, size_t  # type: ignore[return-value]


def extract_cutouts(semantic: np.ndarray, centres: np.ndarray, size: Sequence[int], *,
                    mapping: dict[int, int] | None = None) -> Cutouts:
    """Fixed-size cutouts of the (mapped) semantic mask around each corpus centre.

    Parameters
    ----------
    semantic : (P, I, R) int array
        Semantic mask in PIR orientation on the instance model's grid.
    centres : (K, 3) float array
        Corpus centres in voxel coordinates, sorted top to bottom.
    size : 3 ints
        Cutout size in voxels (the model's ``cutout_size``).
    mapping : dict, optional
        Semantic label -> input label; default :data:`SPINEPS_INPUT_MAPPING`.

    Returns
    -------
    Cutouts
        ``labels`` (K, *size) uint8 mapped labels, zero where the cutout sticks out of the volume, ``offsets``
        (K, 3) placement; ``Cutouts.one_hot()`` gives the network's one-hot input.

    Examples
    --------
    >>> sem = np.zeros((10, 10, 10), np.uint8); sem[0, 0, 0] = 49
    >>> c = extract_cutouts(sem, np.array([[0.0, 0.0, 0.0]]), (4, 4, 4))
    >>> c.offsets.tolist(), int(c.labels[0, 2, 2, 2])
    ([[-2, -2, -2]], 9)
    """
    semantic = np.asarray(semantic)
    centres, size_t = _check(semantic, centres, size)
    if semantic.size and semantic.min() < 0:
        raise ValueError(f"semantic mask holds negative labels (min {semantic.min()})")
    lut = input_lut(mapping, int(semantic.max(initial=0)))
    offsets = cutout_offsets(centres, size_t)
    out = np.zeros((len(centres), *size_t), dtype=np.uint8)
    shape = np.asarray(semantic.shape)
    for k, off in enumerate(offsets):
        lo = np.maximum(off, 0)
        hi = np.minimum(off + size_t, shape)
        if np.any(hi <= lo):
            continue
        src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        dst = tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(lo, hi, off))
        out[(k, *dst)] = lut[semantic[src]]
    return Cutouts(out, offsets, tuple(int(s) for s in semantic.shape))  # type: ignore[arg-type]


def cutout_targets(instance: np.ndarray, vertebra_ids: Sequence[int], cutouts: Cutouts,
                   centre_index: Sequence[int] | None = None) -> np.ndarray:
    """Training targets for each cutout: 1 above / 2 centre / 3 below from a ground-truth instance mask.

    ``vertebra_ids`` lists the vertebrae top to bottom; cutout ``k`` is centred on ``vertebra_ids[centre_index[k]]``
    (default ``centre_index[k] = k``) and its targets mark the previous id as above and the next one as below.
    Voxels where the input is background stay 0, so the network learns to label only vertebra voxels it can see.
    """
    ids = [int(v) for v in vertebra_ids]
    centre_index = list(range(len(ids))) if centre_index is None else [int(j) for j in centre_index]
    if len(centre_index) != len(cutouts.labels):
        raise ValueError(f"{len(centre_index)} centre vertebrae for {len(cutouts.labels)} cutouts")
    if any(not 0 <= j < len(ids) for j in centre_index):
        raise ValueError(f"centre_index {centre_index} points outside the {len(ids)} vertebra ids")
    out = np.zeros(cutouts.labels.shape, dtype=np.uint8)
    shape = np.asarray(instance.shape)
    size = np.asarray(cutouts.size)
    for k, (off, jc) in enumerate(zip(cutouts.offsets, centre_index)):
        lo, hi = np.maximum(off, 0), np.minimum(off + size, shape)
        if np.any(hi <= lo):
            continue
        src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        dst = tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(lo, hi, off))
        inst = instance[src]
        tgt = out[(k, *dst)]
        for cls, j in ((ABOVE, jc - 1), (CENTRE, jc), (BELOW, jc + 1)):
            if 0 <= j < len(ids):
                tgt[inst == ids[j]] = cls
        tgt[cutouts.labels[(k, *dst)] == 0] = 0
    return out


def sparse_prediction(classes: np.ndarray, k: int, batch: Cutouts) -> SparsePrediction:
    """Turn cutout ``k``'s dense class map into a :class:`SparsePrediction` in volume coordinates."""
    window = batch.window(k)
    off = batch.offsets[k]
    inner = classes[tuple(slice(int(lo - o), int(hi - o)) for lo, hi, o in zip(window[0], window[1], off))]
    pred = SparsePrediction(index=k, centre=batch.centre(k), window=window)
    for c in (ABOVE, CENTRE, BELOW):
        m = SparseMask.from_dense(inner == c, window[0])
        if m is not None:
            pred.classes[c] = m
    return pred
