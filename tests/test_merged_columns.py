"""Issue 27: vertebral bodies that the semantic mask runs together across their discs are split again, each body its
own corpus piece (spineps_like.instance.centres), on the instance network's 3 mm grid and on the scan's own grid."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from spineps_like.evaluation.degrade import body_ids, merge_bodies
from spineps_like.geometry import clamp_spacing, rescale
from spineps_like.instance.centres import corpus_centres
from spineps_like.io import Scan
from spineps_like.phantom import make_phantom

FAST = (1.3, 1.3, 3.9)  # coarse but anisotropic like a sagittal scan, as the phantom tests use
NETWORK_GRID_MM = 3.0  # the bundled instance model's resolution (models/instance-phantom/inference_config.json)


@lru_cache(maxsize=None)
def _phantom(seed: int, fov: str = "lumbar", variant: str | None = None):
    return make_phantom(seed, fov=fov, variant=variant, spacing=FAST, orientation="PIR")


def _misplaced_bodies(labels: np.ndarray, bodies: np.ndarray, share: float = 0.8) -> dict[int, dict[int, int]]:
    """True bodies (vertebra id -> {corpus piece: voxels}) that do not have a corpus piece of their own holding at
    least ``share`` of them: a piece belongs to the body holding most of it."""
    sel = (labels > 0) & (bodies > 0)
    piece, body = labels[sel].astype(np.int64), bodies[sel].astype(np.int64)
    joint = np.bincount(piece * 64 + body, minlength=(int(labels.max()) + 1) * 64).reshape(-1, 64)
    owner = joint.argmax(axis=1)
    bad = {}
    for v in np.unique(body):
        own = np.flatnonzero(owner[1:] == v) + 1
        if len(own) != 1 or joint[own[0], v] < share * np.count_nonzero(bodies == v):
            pieces = np.flatnonzero(joint[:, v])
            bad[int(v)] = {int(k): int(joint[k, v]) for k in pieces}
    return bad


def _on_grid(semantic: np.ndarray, bodies: np.ndarray, affine: np.ndarray, spacing, grid: str):
    if grid == "native":
        return semantic, bodies, spacing
    target = clamp_spacing(spacing, (NETWORK_GRID_MM,) * 3)
    sem = rescale(Scan(semantic, affine), target, order=0)
    return sem.array, rescale(Scan(bodies, affine), target, order=0).array, sem.spacing


def _column(heights_mm, merged: set[int], disc_mm: float = 8.0, radius_mm: float = 20.0, bulge: float = 1.15,
            spacing=(1.0, 1.0, 1.0)):
    """A straight PIR column of cylindrical bodies (``heights_mm``, top first) with discs between them; the discs
    in ``merged`` (index j: below body j) are painted as corpus, ``bulge`` x the bodies' radius (a disc bulges
    beyond its endplates), the others as IVD. Returns the semantic mask, the body id per voxel (1..n) and the
    disc centres (mm along axis 1)."""
    pad = 12.0
    total = sum(heights_mm) + disc_mm * (len(heights_mm) - 1) + 2 * pad
    shape = (int(2 * radius_mm * bulge + 10), int(total / spacing[1]), int(2 * radius_mm * bulge + 10))
    a, s, b = np.meshgrid(*[(np.arange(n) + 0.5) * d for n, d in zip(shape, spacing)], indexing="ij")
    r = np.hypot(a - shape[0] * spacing[0] / 2, b - shape[2] * spacing[2] / 2)
    sem = np.zeros(shape, np.uint8)
    bodies = np.zeros(shape, np.uint8)
    top, disc_centres = pad, []
    for j, h in enumerate(heights_mm):
        body = (s >= top) & (s < top + h) & (r <= radius_mm)
        sem[body], bodies[body] = 49, j + 1
        top += h
        if j < len(heights_mm) - 1:
            disc = (s >= top) & (s < top + disc_mm)
            if j in merged:
                sem[disc & (r <= bulge * radius_mm)] = 49
            else:
                sem[disc & (r <= radius_mm - 1)] = 100
            disc_centres.append(top + disc_mm / 2)
            top += disc_mm
    return sem, bodies, disc_centres


def test_merged_column_is_cut_at_the_bulges_of_its_discs_not_in_equal_parts():
    """Three bodies of unequal height (22, 34, 24 mm) run together across two discs painted as corpus: equal thirds
    of the column would miss both discs by 4-6 mm; the cuts lie in the bulging discs, so each body keeps itself."""
    heights = (24.0, 24.0, 22.0, 34.0, 24.0, 26.0)
    sem, bodies, discs = _column(heights, merged={2, 3})
    cc = corpus_centres(sem, (1.0, 1.0, 1.0))
    assert len(cc) == len(heights), cc.repairs
    assert sum("disc bulge" in r for r in cc.repairs) == 2, cc.repairs
    assert _misplaced_bodies(cc.labels, bodies, share=0.95) == {}
    # the boundary between consecutive pieces lies inside the painted disc
    for j in (2, 3):
        upper = np.flatnonzero((cc.labels == j + 1).any(axis=(0, 2)))
        lower = np.flatnonzero((cc.labels == j + 2).any(axis=(0, 2)))
        boundary = 0.5 * (upper.max() + 1 + lower.min())
        assert abs(boundary - discs[j]) <= 4.0, (j, boundary, discs[j])


def test_column_without_any_disc_signal_is_still_split_by_count():
    """Discs painted as corpus exactly as wide as the bodies (no bulge, no waist): the column is still split into
    its number of bodies, from the height and pitch of its neighbours."""
    sem, bodies, _ = _column((24.0, 26.0, 26.0, 28.0, 28.0, 30.0), merged={2, 3}, bulge=1.0)
    cc = corpus_centres(sem, (1.0, 1.0, 1.0))
    assert len(cc) == 6, cc.repairs
    assert _misplaced_bodies(cc.labels, bodies, share=0.7) == {}


@pytest.mark.parametrize("grid", ["network", "native"])
@pytest.mark.parametrize("discs", [1, 2, 3])
@pytest.mark.parametrize("seed", [9, 14])
def test_lumbar_bodies_merged_across_discs_each_get_their_own_piece(seed, discs, grid):
    """Lumbar phantoms (lordotic, with L5 tilted over the sacrum) whose bodies run together across 1-3 discs: every
    body comes back as its own corpus piece (>= 80% of it), so the network's cutouts are centred on every body."""
    ph = _phantom(seed)
    sem, ins = ph.semantic.array, ph.instance.array
    merged = merge_bodies(sem, ins, ph.semantic.spacing, discs, np.random.default_rng(seed))
    assert np.count_nonzero(merged == 100) < np.count_nonzero(sem == 100)
    arr, bodies, spacing = _on_grid(merged, body_ids(sem, ins), ph.semantic.affine, ph.semantic.spacing, grid)
    cc = corpus_centres(arr, spacing)
    assert any(r.startswith("split corpus") for r in cc.repairs), cc.repairs
    assert _misplaced_bodies(cc.labels, bodies) == {}, cc.repairs
    inside = bodies[tuple(np.round(cc.centres).astype(int).T)]
    assert inside.tolist() == sorted(set(inside.tolist()) - {0}), "one centre in every body, top to bottom"


@pytest.mark.parametrize("seed,fov,variant", [(9, "lumbar", None), (3, "lumbar", "l6"), (4, "lumbar", "block"),
                                              (5, "lumbar", "sacralised_l5"), (6, "lumbar", "collapsed"),
                                              (8, "whole", None)])
def test_exact_masks_keep_one_piece_per_body(seed, fov, variant):
    """Exact masks, plain anatomy and the variants: no body is split, none merged (a block vertebra's two bodies
    are cut at their waist, a collapsed body stays whole)."""
    ph = _phantom(seed, fov, variant)
    sem, ins = ph.semantic.array, ph.instance.array
    bodies = body_ids(sem, ins)
    for grid in ("network", "native"):
        arr, b, spacing = _on_grid(sem, bodies, ph.semantic.affine, ph.semantic.spacing, grid)
        cc = corpus_centres(arr, spacing)
        bad = _misplaced_bodies(cc.labels, b, share=0.8)
        assert bad == {}, (grid, bad, cc.repairs)
