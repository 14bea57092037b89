"""Inter-Dice fusion of per-cutout vertebra predictions into one vertebra instance mask.

Each cutout ``k`` (centred on corpus centre ``k``, top to bottom) predicts up to three vertebrae: above, centre and
below. The same vertebra is therefore seen by up to three neighbouring cutouts. Fusion follows SPINEPS (step 5 of
/work/shared/reference/spineps-reference.md) with these changes where it is weak:

* Agreement is a *windowed* Dice: two predictions are compared only inside the part of the volume both cutouts see,
  so a vertebra cut off by one cutout's border still agrees with the full view of its neighbour.
* Groups are formed by complete-linkage agglomeration (every pair in a group agrees, Dice > ``dice_threshold``) and
  hold at most one prediction per cutout: a cutout's above/centre/below can never be merged into one vertebra.
* Voting is coverage-aware: in a group of three a voxel needs a strict majority of the members whose cutout *sees*
  it, not of all members, so truncated views do not erase voxels only one cutout can see (groups of one or two and
  low-agreement groups take the union, as in SPINEPS).
* A cutout's vertebra is the instance at its corpus centre voxel (else the one holding most of its centre
  prediction), not whichever prediction happened to be committed.
* Groups are committed most consistent first (SPINEPS' ``(members + 1) * score``); one that overlaps committed
  vertebrae by more than ``duplicate_overlap`` is skipped as a duplicate; an empty group is skipped, never fatal.
* Afterwards every cutout's centre prediction must own one instance: a centre whose vertebra was lost is recovered
  from its own prediction; an instance holding the centres of two disagreeing predictions is split between them;
  an instance without a centre is kept only when two cutouts agree on it or it lies beyond the first/last centre.
  Every such step is written to ``FusionResult.decisions``/``warnings``; nothing is dropped or merged silently.

All Dice and vote computations run on bounding boxes of the sparse masks; the only volume-sized array is the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import cc3d
import fill_voids
import numpy as np
from scipy import ndimage

from spineps_like.instance.cutouts import (
    CENTRE, CLASS_NAMES, Box, SparseMask, SparsePrediction, box_intersection, box_slices, box_union,
)
from spineps_like.masks import label_counts, nonzero_coords

Key = tuple[int, int]  # (cutout index, class)


@dataclass
class FusionGroup:
    """Predictions fused into one vertebra candidate and what became of them."""

    members: tuple[Key, ...]
    score: float
    status: str = "pending"  # committed / duplicate / empty / dropped
    instance: int = 0  # final id (0 if not committed or later removed)
    note: str = ""


@dataclass
class FusionResult:
    """Output of :func:`fuse_predictions`.

    Attributes
    ----------
    instance : (P, I, R) uint16 array
        Vertebra instances with ids 1..K top to bottom (by mean axis-1 coordinate).
    centre_ids : dict
        Cutout index -> id of the instance its centre prediction lies in (0 where none).
    groups : list of FusionGroup
        Every group in commit order with its fate.
    warnings : list of str
        Problems a reader should look at (lost, merged, split, duplicate centres, empty cutouts).
    decisions : list of str
        Everything fusion decided, in order.
    """

    instance: np.ndarray
    centre_ids: dict[int, int]
    groups: list[FusionGroup]
    warnings: list[str] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)

    @property
    def n_instances(self) -> int:
        return int(self.instance.max(initial=0))

    def summary(self) -> dict:
        """JSON-serialisable account of the fusion (for a scan's summary file)."""
        return {
            "n_instances": self.n_instances,
            "centre_ids": {str(k): v for k, v in self.centre_ids.items()},
            "groups": [{"members": [_name(k) for k in g.members], "score": round(g.score, 3), "status": g.status,
                        "instance": g.instance, "note": g.note} for g in self.groups],
            "warnings": list(self.warnings),
            "decisions": list(self.decisions),
        }


def _name(key: Key) -> str:
    return f"{key[0]}:{CLASS_NAMES.get(key[1], key[1])}"


class _Fuser:
    def __init__(self, predictions: Sequence[SparsePrediction], shape: tuple[int, int, int], *, dice_threshold: float,
                 duplicate_overlap: float, min_voxels: int, min_instance_voxels: int, min_fragment_voxels: int,
                 same_vertebra_dice: float, windowed: bool, fill_holes: bool, max_span: int):
        self.shape = shape
        self.dice_threshold = dice_threshold
        self.duplicate_overlap = duplicate_overlap
        self.min_voxels = min_voxels
        self.min_instance_voxels = min_instance_voxels
        self.min_fragment_voxels = min_fragment_voxels
        self.same_vertebra_dice = same_vertebra_dice
        self.windowed = windowed
        self.fill_holes = fill_holes
        self.max_span = max_span
        self.warnings: list[str] = []
        self.decisions: list[str] = []
        self.preds = sorted(predictions, key=lambda p: p.index)
        self.n_cutouts = (self.preds[-1].index + 1) if self.preds else 0
        self.nodes: dict[Key, SparseMask] = {}
        self.windows: dict[Key, Box] = {}
        self.centre_of: dict[int, tuple[int, int, int]] = {
            p.index: tuple(int(np.clip(c, 0, n - 1)) for c, n in zip(p.centre, shape)) for p in self.preds}
        self.out = np.zeros(shape, dtype=np.uint16)
        self.next_id = 1
        self.group_of_id: dict[int, FusionGroup] = {}
        self.inst_box: dict[int, Box] = {}

    def log(self, msg: str, warn: bool = False) -> None:
        self.decisions.append(msg)
        if warn:
            self.warnings.append(msg)

    # ------------------------------------------------------------ nodes and agreement
    def collect(self) -> None:
        seen: set[int] = set()
        vol: Box = ((0, 0, 0), self.shape)
        for p in self.preds:
            if p.index in seen:
                raise ValueError(f"two predictions for cutout {p.index}")
            seen.add(p.index)
            if p.empty:
                self.log(f"cutout {p.index}: the network predicted no vertebra; skipped", warn=True)
                continue
            if CENTRE not in p.classes:
                self.log(f"cutout {p.index}: no centre vertebra predicted", warn=True)
            for c, m in sorted(p.classes.items()):
                if box_intersection(m.box, vol) != m.box:
                    raise ValueError(f"prediction {_name((p.index, c))} lies outside the volume {self.shape}")
                if m.count < self.min_voxels:
                    self.log(f"{_name((p.index, c))}: {m.count} voxels, below min_voxels={self.min_voxels}; ignored")
                    continue
                self.nodes[(p.index, c)] = m
                self.windows[(p.index, c)] = p.window

    def dice(self, a: Key, b: Key) -> float | None:
        """Windowed Dice of two predictions; None when too little of them is visible to both cutouts."""
        ma, mb = self.nodes[a], self.nodes[b]
        if not self.windowed:
            return 2.0 * ma.overlap(mb) / (ma.count + mb.count)
        w = box_intersection(self.windows[a], self.windows[b])
        if w is None:
            return None
        ca, cb = ma.count_in(w), mb.count_in(w)
        need = max(self.min_voxels, 0.1 * min(ma.count, mb.count))
        if max(ca, cb) < need:
            return None  # neither is visible in the shared window: no evidence either way
        return 2.0 * ma.overlap(mb, within=w) / (ca + cb)

    def pair_dices(self) -> dict[tuple[Key, Key], float | None]:
        keys = sorted(self.nodes)
        out: dict[tuple[Key, Key], float | None] = {}
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                if b[0] == a[0]:
                    continue
                if b[0] - a[0] > self.max_span:
                    break
                out[(a, b)] = self.dice(a, b)
        return out

    # ------------------------------------------------------------ grouping
    def group(self, dices: dict[tuple[Key, Key], float | None]) -> list[FusionGroup]:
        cluster: dict[Key, int] = {k: i for i, k in enumerate(sorted(self.nodes))}
        members: dict[int, list[Key]] = {i: [k] for k, i in cluster.items()}

        def d(a: Key, b: Key) -> float | None:
            return dices[(a, b)] if (a, b) in dices else dices.get((b, a), 0.0)

        edges = [(v, a, b) for (a, b), v in dices.items() if v is not None and v > self.dice_threshold]
        for _, a, b in sorted(edges, key=lambda e: (-e[0], e[1], e[2])):
            ca, cb = cluster[a], cluster[b]
            if ca == cb:
                continue
            ma, mb = members[ca], members[cb]
            if {k[0] for k in ma} & {k[0] for k in mb}:
                continue  # one prediction per cutout: a cutout's classes are different vertebrae
            cross = [d(x, y) for x in ma for y in mb]
            if any(v is not None and v <= self.dice_threshold for v in cross):
                continue  # complete linkage: every pair that can be compared must agree
            for k in mb:
                cluster[k] = ca
            members[ca] = sorted(ma + mb)
            del members[cb]
        groups = []
        for mem in members.values():
            pairs = [v for i, x in enumerate(mem) for y in mem[i + 1:] if (v := d(x, y)) is not None]
            groups.append(FusionGroup(tuple(mem), float(np.mean(pairs)) if pairs else 0.0))

        def priority(g: FusionGroup) -> tuple:
            n = len(g.members)
            has_centre = any(c == CENTRE for _, c in g.members)
            return (-(n + 1) * g.score, -n, not has_centre, -sum(self.nodes[k].count for k in g.members), g.members)

        return sorted(groups, key=priority)

    # ------------------------------------------------------------ committing
    def fused_mask(self, g: FusionGroup) -> SparseMask | None:
        masks = [self.nodes[k] for k in g.members]
        box = masks[0].box
        for m in masks[1:]:
            box = box_union(box, m.box)
        votes = np.zeros(tuple(h - l for l, h in zip(*box)), dtype=np.uint8)
        cover = np.zeros_like(votes)
        for k, m in zip(g.members, masks):
            votes[box_slices(m.box, box[0])] += m.mask
            w = box_intersection(self.windows[k], box)
            if w is not None:
                cover[box_slices(w, box[0])] += 1
        n = len(masks)
        low_agreement = g.score < 0.3 + 0.15 * (4 - n)  # SPINEPS: low-agreement groups take the union
        if n <= 2 or low_agreement:
            need = np.ones_like(cover)  # SPINEPS: groups of one or two take the union
        else:  # a strict majority of the members whose cutout sees the voxel
            need = cover // 2 + 1
        return SparseMask.from_dense((votes >= need) & (votes > 0), box[0])

    def commit(self, groups: list[FusionGroup]) -> None:
        for g in groups:
            names = "+".join(_name(k) for k in g.members)
            fused = self.fused_mask(g)
            if fused is None or fused.count == 0:
                g.status, g.note = "empty", "no voxel got enough votes"
                self.log(f"group {names}: fused mask empty; skipped")
                continue
            region = self.out[fused.slices]
            taken = region[fused.mask]
            n_taken = int(np.count_nonzero(taken))
            if n_taken > self.duplicate_overlap * fused.count:
                ids = np.unique(taken[taken > 0]).tolist()
                g.status = "duplicate"
                g.note = f"{n_taken / fused.count:.0%} overlaps instances {ids}"
                self.log(f"group {names} (score {g.score:.2f}): skipped, {g.note}")
                continue
            new = fused.mask & (region == 0)
            region[new] = self.next_id
            g.status, g.instance = "committed", self.next_id
            self.group_of_id[self.next_id] = g
            self.inst_box[self.next_id] = fused.box
            extra = f", {n_taken} voxels already taken" if n_taken else ""
            self.log(f"group {names} (score {g.score:.2f}): committed as instance {self.next_id} "
                     f"({int(new.sum())} voxels{extra})")
            self.next_id += 1

    # ------------------------------------------------------------ checks on the centres
    def shares(self, key: Key) -> tuple[int, float, float]:
        """(instance holding most of a node's voxels, its share, share still free)."""
        m = self.nodes[key]
        counts = np.bincount(self.out[m.slices][m.mask], minlength=1)
        free = counts[0] / m.count
        counts[0] = 0
        best = int(counts.argmax())
        return best, (counts[best] / m.count if best else 0.0), free

    def owner(self, key: Key) -> int:
        """The instance of cutout ``key[0]``'s centre: the one at its corpus centre voxel, else the one holding the
        majority of its centre prediction, else 0."""
        at_centre = int(self.out[self.centre_of[key[0]]])
        if at_centre:
            return at_centre
        best, share, _ = self.shares(key)
        return best if share >= 0.5 else 0

    def centre_keys(self) -> list[Key]:
        return [k for k in sorted(self.nodes) if k[1] == CENTRE]

    def recover_lost(self) -> None:
        for key in self.centre_keys():
            if self.owner(key):
                continue
            _, _, free = self.shares(key)
            if free < 0.5:
                self.log(f"cutout {key[0]}: its centre prediction lies mostly in other vertebrae; no own instance",
                         warn=True)
                continue
            m = self.nodes[key]
            region = self.out[m.slices]
            new = m.mask & (region == 0)
            if int(new.sum()) < self.min_instance_voxels:
                self.log(f"cutout {key[0]}: centre vertebra not fused and only {int(new.sum())} free voxels; lost",
                         warn=True)
                continue
            region[new] = self.next_id
            g = FusionGroup((key,), 0.0, "committed", self.next_id, "recovered from the centre prediction")
            self.group_of_id[self.next_id] = g
            self.inst_box[self.next_id] = m.box
            self.log(f"cutout {key[0]}: centre vertebra was not fused; recovered from its own prediction as "
                     f"instance {self.next_id}", warn=True)
            self.next_id += 1

    def split_merged(self) -> None:
        by_owner: dict[int, list[Key]] = {}
        for key in self.centre_keys():
            best = self.owner(key)
            if best:
                by_owner.setdefault(best, []).append(key)
        for inst, keys in sorted(by_owner.items()):
            if len(keys) < 2:
                continue
            # centres whose own predictions agree are one vertebra seen from two centres (a duplicate centre)
            clusters: list[list[Key]] = []
            for k in keys:
                for cl in clusters:
                    if all((self.dice(k, o) or 0.0) >= self.same_vertebra_dice for o in cl):
                        cl.append(k)
                        break
                else:
                    clusters.append([k])
            cut = ", ".join(str(k[0]) for k in keys)
            if len(clusters) == 1:
                self.log(f"instance {inst}: holds the centres of cutouts {cut}, whose predictions agree "
                         f"(two corpus centres in one vertebra)", warn=True)
                continue
            sizes = self.split(inst, clusters)
            if sizes:
                self.log(f"instance {inst}: held the centres of cutouts {cut} whose predictions disagree; split into "
                         f"{len(clusters)} vertebrae of {sizes} voxels", warn=True)
            else:
                self.log(f"instance {inst}: holds the centres of cutouts {cut} whose predictions disagree, but they "
                         f"do not separate it into vertebrae of a plausible size; kept as one (possible merge)",
                         warn=True)

    def split(self, inst: int, clusters: list[list[Key]]) -> list[int]:
        """Split instance ``inst`` between centre clusters; returns the part sizes, or [] when not plausible.

        The cluster with the smallest (most specific) prediction claims its voxels first, so a prediction that
        spans two vertebrae gives way to the one that sees only its own; unclaimed voxels go to the nearest claim.
        """
        box = self.inst_box[inst]
        sl = box_slices(box)
        region = self.out[sl]
        inside = region == inst
        masks = []
        for cl in clusters:
            cm = np.zeros(region.shape, dtype=bool)
            for k in cl:
                cm |= self.nodes[k].crop(box)
            masks.append(cm & inside)
        order = sorted(range(len(clusters)), key=lambda i: int(masks[i].sum()))
        claim = np.zeros(region.shape, dtype=np.uint8)
        for i in order:
            claim[masks[i] & (claim == 0)] = i + 1
        if not claim.any():
            return []
        _, idx = ndimage.distance_transform_edt(claim == 0, return_indices=True)
        nearest = np.where(inside, claim[tuple(idx)], 0)
        total = int(inside.sum())
        sizes = [int(np.count_nonzero(nearest == i + 1)) for i in range(len(clusters))]
        if min(sizes) < max(self.min_instance_voxels, 0.15 * total):
            return []
        ids = [inst] + [self.next_id + i for i in range(len(clusters) - 1)]
        for i, new_id in enumerate(ids):
            region[nearest == i + 1] = new_id
        g = self.group_of_id.get(inst)
        for new_id, cl in zip(ids[1:], clusters[1:]):
            self.group_of_id[new_id] = FusionGroup(tuple(cl), 0.0, "committed", new_id, f"split from instance {inst}")
            self.inst_box[new_id] = box
        if g is not None:
            g.note = (g.note + "; " if g.note else "") + "split"
        self.next_id += len(clusters) - 1
        return sizes

    def drop_uncentred(self) -> None:
        owned = set()
        for key in self.centre_keys():
            owned.add(self.owner(key))
        for inst, g in sorted(self.group_of_id.items()):
            if inst in owned or g.status != "committed":
                continue
            slots = {k + c - CENTRE for k, c in g.members}
            beyond = any(s < 0 or s >= self.n_cutouts for s in slots)
            n_cut = len({k for k, _ in g.members})
            if n_cut >= 2 or beyond:
                why = "beyond the first/last corpus centre" if beyond else f"{n_cut} cutouts agree"
                self.log(f"instance {inst}: no corpus centre inside; kept ({why})")
                continue
            self.out[self.out == inst] = 0
            g.status, g.note = "dropped", "no corpus centre and only one cutout predicts it"
            self.log(f"instance {inst} ({'+'.join(_name(k) for k in g.members)}): dropped, no corpus centre and "
                     f"only one cutout predicts it")

    # ------------------------------------------------------------ clean-up and numbering
    def clean(self) -> None:
        objs = ndimage.find_objects(self.out)
        for i, sl in enumerate(objs, start=1):
            if sl is None:
                continue
            region = self.out[sl]
            mask = region == i
            if self.min_fragment_voxels > 0:
                cc, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
                if n > 1:
                    sizes = label_counts(cc)
                    sizes[0] = 0
                    small = (sizes < self.min_fragment_voxels) & (np.arange(len(sizes)) != sizes.argmax())
                    small[0] = False
                    if small.any():
                        drop = small[cc]
                        region[drop] = 0
                        mask &= ~drop
                        self.log(f"instance {i}: removed {int(small.sum())} fragments ({int(drop.sum())} voxels) "
                                 f"below {self.min_fragment_voxels} voxels")
            if self.fill_holes:
                filled = fill_voids.fill(mask, in_place=False)
                holes = filled & ~mask & (region == 0)
                region[holes] = i
            size = int(np.count_nonzero(region == i))
            if size < self.min_instance_voxels:
                region[region == i] = 0
                g = self.group_of_id.get(i)
                if g is not None:
                    g.status, g.note = "dropped", f"{size} voxels < min_instance_voxels"
                self.log(f"instance {i}: {size} voxels, below min_instance_voxels={self.min_instance_voxels}; removed",
                         warn=True)

    def renumber(self) -> dict[int, int]:
        heights = []
        for i, sl in enumerate(ndimage.find_objects(self.out), start=1):
            if sl is not None:
                heights.append((float(nonzero_coords(self.out[sl] == i)[1].mean()) + sl[1].start, i))
        lut = np.zeros(max(self.next_id, int(self.out.max(initial=0)) + 1), dtype=np.uint16)
        new_of_old = {}
        for new, (_, old) in enumerate(sorted(heights), start=1):
            lut[old] = new
            new_of_old[old] = new
        self.out = lut[self.out]
        return new_of_old


#: Size limits in mm^3 (SPINEPS drops vertebrae below 250 voxel-mm^3).
MIN_PREDICTION_MM3, MIN_INSTANCE_MM3, MIN_FRAGMENT_MM3 = 30.0, 250.0, 100.0


def fuse_predictions(predictions: Sequence[SparsePrediction], shape: Sequence[int], *,
                     spacing: Sequence[float] | None = None, dice_threshold: float = 0.3,
                     duplicate_overlap: float = 0.6, min_voxels: int | None = None,
                     min_instance_voxels: int | None = None, min_fragment_voxels: int | None = None,
                     same_vertebra_dice: float = 0.75, windowed_dice: bool = True, fill_holes: bool = False,
                     max_span: int = 2) -> FusionResult:
    """Fuse per-cutout above/centre/below predictions into one vertebra instance mask.

    Parameters
    ----------
    predictions : sequence of SparsePrediction
        One per cutout (empty ones allowed), as :func:`~spineps_like.instance.network.predict_cutouts` returns.
    shape : 3 ints
        Shape of the instance grid.
    spacing : 3 floats, optional
        Voxel size of the instance grid in mm; sets the default size limits (30 / 250 / 100 mm^3). Without it the
        limits are taken as voxel counts.
    dice_threshold : float
        Two predictions agree when their (windowed) Dice exceeds this (SPINEPS: 0.3).
    duplicate_overlap : float
        A group overlapping committed vertebrae by more than this share of its voxels is a duplicate (SPINEPS: 0.6).
    min_voxels : int, optional
        Class predictions smaller than this are ignored (noise).
    min_instance_voxels, min_fragment_voxels : int, optional
        Instances / non-largest connected fragments smaller than this are removed (logged).
    same_vertebra_dice : float
        Two centre predictions agreeing at least this much are one vertebra (a duplicate corpus centre, not a merge).
    windowed_dice : bool
        Compare predictions only where both cutouts see (False: SPINEPS' plain Dice).
    fill_holes : bool
        Fill enclosed holes of each instance (never over another instance). Off by default: predictions are
        restricted to vertebra input voxels, so a hole is a voxel the semantic mask calls something else.
    max_span : int
        Predictions are compared with cutouts at most this many indices away (SPINEPS: 2).

    Returns
    -------
    FusionResult
        ``instance`` (uint16, ids 1..K top to bottom), ``centre_ids``, ``groups``, ``warnings`` and ``decisions``.
    """
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or min(shape_t) < 1:
        raise ValueError(f"fusion grid shape must be three positive ints, got {tuple(shape)}")
    if not 0 <= dice_threshold < 1 or not 0 < duplicate_overlap <= 1:
        raise ValueError(f"dice_threshold must lie in [0, 1) and duplicate_overlap in (0, 1], got "
                         f"{dice_threshold}, {duplicate_overlap}")
    vox = float(np.prod(spacing)) if spacing is not None else 1.0
    if not vox > 0:
        raise ValueError(f"spacing must be positive, got {spacing}")

    def limit(given: int | None, mm3: float) -> int:
        return int(given) if given is not None else max(1, math.ceil(mm3 / vox))

    min_voxels = limit(min_voxels, MIN_PREDICTION_MM3)
    min_instance_voxels = limit(min_instance_voxels, MIN_INSTANCE_MM3)
    min_fragment_voxels = limit(min_fragment_voxels, MIN_FRAGMENT_MM3)
    f = _Fuser(predictions, shape_t, dice_threshold=dice_threshold, duplicate_overlap=duplicate_overlap,  # type: ignore[arg-type]
               min_voxels=min_voxels, min_instance_voxels=min_instance_voxels, min_fragment_voxels=min_fragment_voxels,
               same_vertebra_dice=same_vertebra_dice, windowed=windowed_dice, fill_holes=fill_holes, max_span=max_span)
    if not f.preds:
        f.log("no cutout predictions: empty vertebra mask", warn=True)
        return FusionResult(f.out, {}, [], f.warnings, f.decisions)
    f.collect()
    groups = f.group(f.pair_dices())
    f.commit(groups)
    f.recover_lost()
    f.split_merged()
    f.drop_uncentred()
    f.clean()
    new_of_old = f.renumber()
    all_groups = list(groups) + [g for i, g in sorted(f.group_of_id.items()) if g not in groups]
    for g in all_groups:
        g.instance = new_of_old.get(g.instance, 0) if g.status == "committed" else 0
    centre_ids: dict[int, int] = {}
    for p in f.preds:
        key = (p.index, CENTRE)
        centre_ids[p.index] = f.owner(key) if key in f.nodes else 0
        if centre_ids[p.index] == 0 and not p.empty:
            f.log(f"cutout {p.index}: its centre vertebra has no instance in the result", warn=True)
    if f.out.max(initial=0) == 0:
        f.log("fusion produced no vertebra", warn=True)
    return FusionResult(f.out, centre_ids, all_groups, f.warnings, f.decisions)
