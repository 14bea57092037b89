"""Post-processing: make the semantic and instance masks agree voxel for voxel.

Arrays are PIR (axis 0 posterior, axis 1 inferior, axis 2 right); ``spacing`` is mm per array axis.

After :func:`postprocess`:

- instance > 0 exactly where the semantic mask holds a structure other than canal (61) / cord (60);
- vertebra ids (1-25, 27, 28) only on 41-49, IVD ids (100-199) only on 100, endplate ids (200-299) only on 52/53,
  26 exactly on the sacrum; no 62 and no 50/51 remain in the semantic mask.

Steps, in order (each counted in the report):

1. aliases 50/51 -> 49; an unsplit 62 is split and assigned by :func:`spineps_like.assign.assign_ivds_endplates`;
2. class mismatches (an IVD id on bone, a vertebra id on a disc ...) are converted where the meaning is clear
   (a vertebra id v on an endplate -> 200 + v, an endplate id on corpus -> v) and cleared otherwise;
3. holes of each instance are filled (:func:`fill_voids.fill` on its bounding box) where the semantic mask agrees;
4. instance voxels where the semantic mask is background (or canal/cord) are cleared;
5. articular components (45-48) split between instances go to the one holding > ``dominance`` x the runner-up;
   each vertebral body (corpus + endplates) goes to the vertebra holding most of it (a block vertebra's two
   vertebrae may share one); a vertebra without any body voxel is released unless the field of view cut it off;
6. stray pieces: a piece of a vertebra instance not connected to its main body but touching another vertebra goes to
   the vertebra it touches most (contacts across facet joints, 47/48 against 45/46, do not count: an arch cut off
   from its corpus by the field of view rests on the vertebra below through its facets and stays itself);
7. every semantic component still without an instance goes to the touching instance (of a compatible class) with the
   most contact; isolated ones are dropped from both masks (a large one with corpus becomes a new vertebra when
   ``keep_isolated_vertebrae``), and the pieces of the vertebra beyond the topmost / bottommost one that the field
   of view cut off (a spinous tip, a facet) become one new vertebra (``keep_cut_fragments``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple, Sequence

import cc3d
import fill_voids
import numpy as np
from scipy import ndimage

from spineps_like.assign import assign_ivds_endplates, map_aliases, vertebra_ids, vertebra_order, vertebra_voxels
from spineps_like.geometry import bbox, grow_box
from spineps_like.labels import ENDPLATE_OFFSET, IVD_OFFSET, SACRUM_ID, label_mask
from spineps_like.masks import (
    check_mask, check_spacing, count_pairs, dominant_partner, facet_free_contacts, nonzero_index, present_ids,
)

VERTEBRA_BONE: tuple[int, ...] = tuple(range(41, 50))
ARTICULAR: tuple[int, ...] = (45, 46, 47, 48)
#: Semantic labels that must carry an instance id (canal 61 and cord 60 carry none).
INSTANCE_LABELS: tuple[int, ...] = VERTEBRA_BONE + (52, 53, 100, SACRUM_ID)

# instance classes: 1 vertebra, 2 IVD, 3 endplate, 4 sacrum
_V, _I, _E, _S = 1, 2, 3, 4


def semantic_class(semantic: np.ndarray) -> np.ndarray:
    """Instance class each semantic voxel calls for (0 none, 1 vertebra, 2 IVD, 3 endplate, 4 sacrum)."""
    lut = np.zeros(max(int(semantic.max(initial=0)) + 1, 101), dtype=np.uint8)
    lut[list(VERTEBRA_BONE)] = _V
    lut[100] = _I
    lut[[52, 53]] = _E
    lut[SACRUM_ID] = _S
    return lut[semantic]


#: Class of every instance id below 300 (ids from 300 on, and negative ones, are class 0).
_CLASS_OF_ID = np.zeros(301, np.uint8)
_CLASS_OF_ID[1:IVD_OFFSET] = _V
_CLASS_OF_ID[IVD_OFFSET:ENDPLATE_OFFSET] = _I
_CLASS_OF_ID[ENDPLATE_OFFSET:300] = _E
_CLASS_OF_ID[SACRUM_ID] = _S


def instance_class(instance: np.ndarray) -> np.ndarray:
    """Class of each instance id (0 none, 1 vertebra, 2 IVD, 3 endplate, 4 sacrum)."""
    return np.take(_CLASS_OF_ID, np.asarray(instance), mode="clip")


def _flat(a: np.ndarray) -> np.ndarray:
    """A flat view of a C-contiguous array (writes through; never a copy)."""
    if not a.flags.c_contiguous:
        raise ValueError("expected a C-contiguous array")
    return a.reshape(-1)


def _box_of(flat_index: np.ndarray, shape: Sequence[int], margin: int = 0) -> tuple[slice, ...]:
    """Bounding box (slices, grown by ``margin`` and clipped) of the voxels at ``flat_index`` (non-empty)."""
    coords = np.unravel_index(flat_index, shape)
    return grow_box([slice(int(c.min()), int(c.max()) + 1) for c in coords], shape, margin)


def check_consistency(semantic: np.ndarray, instance: np.ndarray) -> list[str]:
    """Problems that break the voxel-for-voxel agreement of the two masks (empty list: consistent)."""
    sem_all = np.asarray(semantic)
    inst_all = np.asarray(instance)
    problems = []
    if sem_all.shape != inst_all.shape:
        return [f"shapes differ: semantic {sem_all.shape}, instance {inst_all.shape}"]
    # voxels where both are 0 are consistent: check only the others
    fg = np.flatnonzero((sem_all != 0) | (inst_all != 0))
    sem = sem_all.reshape(-1)[fg]
    inst = inst_all.reshape(-1)[fg]
    left = sorted(set(present_ids(sem).tolist()) & {50, 51, 62})
    if left:
        problems.append(f"semantic labels {left} remain (aliases / unsplit endplates)")
    need = semantic_class(sem)
    have = instance_class(inst)
    bad = sorted(set(present_ids(inst).tolist()) - {0} - set(range(1, 300)))
    if bad or (need != have).any():  # one pass in the usual, consistent case; the details only when something is off
        n = int(np.count_nonzero((need > 0) & (inst == 0)))
        if n:
            problems.append(f"{n} labelled semantic voxels without an instance id")
        n = int(np.count_nonzero((need == 0) & (inst > 0)))
        if n:
            problems.append(f"{n} instance voxels on semantic background / canal / cord")
        n = int(np.count_nonzero((need > 0) & (inst > 0) & (need != have)))
        if n:
            problems.append(f"{n} voxels whose instance id class does not match the semantic label")
    if bad:
        problems.append(f"instance ids outside the scheme: {bad}")
    return problems


@dataclass
class PostprocessReport:
    """What :func:`postprocess` changed, in voxels or components."""

    aliases_mapped: int = 0
    endplates_split: int = 0
    class_converted: int = 0
    class_cleared: int = 0
    holes_filled: int = 0
    cleared_on_background: int = 0
    articular_relabelled: int = 0
    stray_relabelled: int = 0
    corpus_relabelled: int = 0
    bodyless_released: int = 0
    reassigned_discs_endplates: int = 0
    cut_pieces_detached: int = 0
    missing_assigned: int = 0
    dropped_components: int = 0
    dropped_voxels: int = 0
    added_instances: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def lap(self, step: str) -> None:
        """Record the seconds since the previous lap under ``step``."""
        now = time.perf_counter()
        self.seconds[step] = round(now - self._t, 4)
        self._t = now

    def __post_init__(self) -> None:
        self._t = time.perf_counter()

    def to_dict(self) -> dict:
        return asdict(self)


def _relabel_components(comp: np.ndarray, targets: dict[int, int], inst: np.ndarray, index: np.ndarray) -> int:
    """Write ``targets[c]`` into ``inst`` wherever ``comp == c``; returns the voxels written. ``index``: the flat
    indices of ``comp``'s non-zero voxels (every caller holds them already: no pass over the volume to find them)."""
    if not targets:
        return 0
    lut = np.zeros(max(targets) + 2, dtype=np.int64)  # the last entry (0) stands for every larger component
    for c, v in targets.items():
        lut[c] = v
    new = lut[np.minimum(comp.reshape(-1)[index], len(lut) - 1)]
    keep = new > 0
    idx, new = index[keep], new[keep]
    flat = _flat(inst)
    changed = int(np.count_nonzero(flat[idx] != new))
    flat[idx] = new
    return changed


def _spine_order(ins: np.ndarray, s: np.ndarray, sp: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Vertebra ids of a full instance mask in spine order with their centres and axes (see
    :func:`~spineps_like.assign.vertebra_order`), the sacrum left out; and whether the sacrum is in view."""
    ids, cen, axes = vertebra_order(ins, s, sp)  # it reads vertebra and sacrum ids only
    has_sacrum = bool(len(ids)) and ids[-1] == SACRUM_ID
    if has_sacrum:
        ids, cen, axes = ids[:-1], cen[:-1], axes[:-1]
    return ids, cen, axes, has_sacrum


def _cut_fragment_groups(comp_index: np.ndarray, comp_of: np.ndarray, cands: list[int], ins: np.ndarray,
                         s: np.ndarray, sp: np.ndarray, box: tuple[slice, ...], full_shape: tuple[int, ...],
                         min_mm3: float) -> list[list[int]]:
    """Components (ids ``cands``, bone without an instance; their voxels at flat ``comp_index`` of ``ins``' grid
    with ids ``comp_of``) that are the field-of-view remains of the vertebra above the topmost / below the
    bottommost one: [top group, bottom group], each only when one of its pieces touches the edge of the whole volume
    and the group holds at least ``min_mm3``."""
    if not cands:
        return []
    voxels = {c: comp_index[comp_of == c] for c in cands}
    at_edge = {c: _at_volume_edge(_box_of(v, ins.shape), [b.start for b in box], full_shape) for c, v in voxels.items()}
    vox_mm3 = float(np.prod(sp))
    # a group needs a piece at the edge and min_mm3 in all: without either, the spine order is not needed
    if not any(at_edge.values()) or sum(len(v) for v in voxels.values()) * vox_mm3 < min_mm3:
        return []
    ids, cen, axes, has_sacrum = _spine_order(ins, s, sp)
    if len(ids) == 0:
        return []
    groups: dict[str, list[int]] = {"top": [], "bottom": []}
    touch = {"top": False, "bottom": False}
    sizes = {c: len(v) for c, v in voxels.items()}
    for c in cands:
        vox = voxels[c]
        x = np.array([a.mean() for a in np.unravel_index(vox, ins.shape)], dtype=float)
        if np.dot((x - cen[0]) * sp, axes[0]) < 0:
            side = "top"
        elif not has_sacrum and np.dot((x - cen[-1]) * sp, axes[-1]) > 0:
            side = "bottom"
        else:
            continue
        groups[side].append(c)
        touch[side] |= at_edge[c]
    return [g for side, g in groups.items()
            if g and touch[side] and sum(sizes[c] for c in g) * vox_mm3 >= min_mm3]


def _at_volume_edge(bb: Sequence[slice], offset: Sequence[int], full_shape: Sequence[int]) -> bool:
    """Whether a bounding box ``bb`` of an array placed at ``offset`` in the whole volume reaches one of its faces."""
    lo = np.asarray(offset) + np.array([b.start for b in bb])
    hi = np.asarray(offset) + np.array([b.stop for b in bb])
    return bool((lo == 0).any() or (hi == np.asarray(full_shape)).any())


def _detach_cut_pieces(ins: np.ndarray, s: np.ndarray, sp: np.ndarray, box: tuple[slice, ...],
                       full_shape: tuple[int, ...]) -> int:
    """Clear (in place) the pieces of the topmost / bottommost vertebra that are not connected to its main body, lie
    beyond its corpus centre along the spine and reach the edge of the volume: the remains of the next vertebra,
    which the field of view cut off (e.g. a spinous tip the network painted as the end vertebra). Returns voxels."""
    ids, cen, axes, has_sacrum = _spine_order(ins, s, sp)
    if len(ids) == 0:
        return 0
    ends = [(ids[0], cen[0], -axes[0])]
    if not has_sacrum and len(ids) > 1:
        ends.append((ids[-1], cen[-1], axes[-1]))
    cleared = 0
    for v, c, outward in ends:
        sl = bbox(ins == v)
        pieces = cc3d.connected_components(ins[sl] == v, connectivity=26)
        if pieces.max() < 2:
            continue
        stats = cc3d.statistics(pieces)
        counts = stats["voxel_counts"]
        main = int(np.argmax(counts[1:])) + 1
        offset = np.array([b.start for b in sl])
        in_volume = offset + [b.start for b in box]
        for k in range(1, len(counts)):
            if k == main or counts[k] == 0:
                continue
            x = np.asarray(stats["centroids"][k], dtype=float) + offset
            if (np.dot((x - c) * sp, outward) > 0
                    and _at_volume_edge(stats["bounding_boxes"][k], in_volume, full_shape)):
                ins[sl][pieces == k] = 0
                cleared += int(counts[k])
    return cleared


def _reconcile_corpora(ins: np.ndarray, s: np.ndarray, crumb_share: float = 0.2, merged_ratio: float = 1.8) -> int:
    """One vertebra per vertebral body (in place): each connected body (corpus + endplates, IVDs separate bodies) goes
    to the vertebra holding most of it, from every other vertebra that either owns a body of its own or holds only a
    crumb (< ``crumb_share`` of this body, or of the median body when this one is over ``merged_ratio`` x the
    median: bodies merged across discs; C2 with its dens is not that large). A vertebra sharing a body without owning one is left alone (a block
    vertebra: two vertebrae in one fused body). Returns the voxels relabelled."""
    body = label_mask(s, (49, 52, 53)) & vertebra_voxels(ins)
    if not body.any():
        return 0
    cc = cc3d.connected_components(body, connectivity=6)
    sel = nonzero_index(cc)
    flat = _flat(ins)
    cc_sel = cc.reshape(-1)[sel].astype(np.int64)
    comp, inst, counts = count_pairs(cc_sel, flat[sel].astype(np.int64))
    totals = np.bincount(comp, weights=counts)
    order = np.lexsort((-counts, comp))
    first = np.r_[True, comp[order][1:] != comp[order][:-1]]
    owner_of = dict(zip(comp[order][first].tolist(), inst[order][first].tolist()))
    # a crumb is small against one vertebral body: in a body over twice the median (bodies merged across discs and
    # split again upstream), a share of a median body's size is a vertebra's body, whatever its share of the whole
    typical = float(np.median(totals[np.unique(comp)]))
    # owning a crumb of body is owning no body: else a vertebra of a merged column that also holds most of a stray
    # 5-voxel fragment would hand its whole share of the column to the column's owner
    owners = {w for c, w in owner_of.items() if totals[c] >= crumb_share * typical}
    ref = np.where(totals > merged_ratio * typical, typical, totals)
    moves: dict[tuple[int, int], int] = {}
    for c, v, n in zip(comp.tolist(), inst.tolist(), counts.tolist()):
        w = owner_of[c]
        if v != w and (v in owners or n < crumb_share * ref[c]):
            moves[(c, v)] = w
    if not moves:
        return 0
    # all moves in one pass over the body voxels: (component, vertebra) key -> new vertebra
    base = int(ins.max()) + 1
    move_keys = np.array([c * base + v for c, v in moves], dtype=np.int64)
    move_to = np.array(list(moves.values()), dtype=np.int64)
    order = np.argsort(move_keys)
    move_keys, move_to = move_keys[order], move_to[order]
    keys = cc_sel * base + flat[sel]
    pos = np.minimum(np.searchsorted(move_keys, keys), len(move_keys) - 1)
    hit = move_keys[pos] == keys
    flat[sel[hit]] = move_to[pos[hit]]
    return int(hit.sum())


def _release_bodyless(ins: np.ndarray, s: np.ndarray, box: tuple[slice, ...], full_shape: tuple[int, ...]) -> int:
    """Clear (in place) vertebra instances without corpus voxels unless they touch no other vertebra (facet joints
    aside) and reach the edge of the volume; their voxels then join a touching vertebra (step 7). Returns voxels."""
    vmask = vertebra_voxels(ins)
    idx = nonzero_index(vmask)
    if len(idx) == 0:
        return 0
    flat = _flat(ins)
    vals = flat[idx]
    with_body = present_ids(vals[np.isin(s.reshape(-1)[idx], (49, 52, 53))])
    bodyless = np.setdiff1d(present_ids(vals), with_body)
    if len(bodyless) == 0:
        return 0
    sel = np.isin(vals, bodyless)
    near = _box_of(idx[sel], ins.shape, margin=1)  # every contact of a bodyless vertebra lies in here
    vert = np.where(vmask[near], ins[near], 0)
    a_ids, b_ids, _ = facet_free_contacts(np.where(np.isin(vert, bodyless), vert, 0), vert, s[near])
    touching = set(a_ids[a_ids != b_ids].tolist())
    released = 0
    for v in bodyless.tolist():
        vox = idx[vals == v]
        if v not in touching and _at_volume_edge(_box_of(vox, ins.shape), [b.start for b in box], full_shape):
            continue
        flat[vox] = 0
        released += len(vox)
    return released


def postprocess(
    semantic: np.ndarray,
    instance: np.ndarray,
    spacing: Sequence[float],
    *,
    dominance: float = 2.0,
    keep_isolated_vertebrae: bool = True,
    min_vertebra_mm3: float = 1000.0,
    min_piece_mm3: float = 30.0,
    keep_cut_fragments: bool = True,
) -> tuple[np.ndarray, np.ndarray, PostprocessReport]:
    """Make semantic and instance masks consistent voxel for voxel (see the module docstring).

    Parameters
    ----------
    semantic, instance : (X, Y, Z) int arrays, PIR, same shape
        Semantic mask and full instance mask (vertebrae, IVD 100 + v, endplate 200 + v, sacrum 26).
    spacing : 3 floats
        Voxel size in mm.
    dominance : float
        An articular component split between instances goes to the one holding more than ``dominance`` x the
        runner-up's voxels.
    keep_isolated_vertebrae : bool
        A semantic component that touches no instance but holds corpus and at least ``min_vertebra_mm3`` becomes a
        new vertebra (a vertebra the instance phase missed) instead of being deleted.
    min_piece_mm3 : float
        Stray pieces smaller than this join whatever vertebra surrounds them before the larger ones are judged.
    keep_cut_fragments : bool
        Bone pieces that touch no instance, lie beyond the topmost (or bottommost, when no sacrum is in view)
        vertebra and reach the edge of the volume are what the field of view left of the next vertebra (a spinous
        tip, a facet): together (at least ``min_piece_mm3``) they become one new vertebra instead of being deleted.

    Returns
    -------
    semantic, instance, report
        New arrays (inputs untouched) and a :class:`PostprocessReport`; ``report.problems`` is empty when the
        invariants hold (they always should; it is checked, not assumed). The instance mask is uint16 (int32 when
        the input holds ids past 16 bits).
    """
    sem0 = check_mask(semantic)
    inst0 = check_mask(instance, "instance mask")
    if sem0.shape != inst0.shape:
        raise ValueError(f"instance mask shape {inst0.shape} differs from the semantic mask {sem0.shape}")
    sp = check_spacing(spacing)
    rep = PostprocessReport()
    sem, inst, rep.aliases_mapped = _working_copies(sem0, inst0)
    rep.endplates_split = _split_endplates(sem, inst, sp)  # 1
    rep.lap("1_endplates")
    box = bbox((sem > 0) | (inst > 0), margin=1)
    if box is None:
        return sem, inst, rep
    # C-contiguous working arrays of the box (flat indices address them): views when the box spans the volume (the
    # usual case: the pipeline passes the spine's box), else copies, written back at the end
    s = np.ascontiguousarray(sem[box])
    ins = np.ascontiguousarray(inst[box])
    need = semantic_class(s)
    have = instance_class(ins)
    rep.lap("box")
    rep.class_converted, rep.class_cleared = _convert_classes(ins, need, have)  # 2
    rep.lap("2_classes")
    rep.holes_filled = _fill_holes(ins, need)  # 3
    rep.lap("3_holes")
    rep.cleared_on_background = _clear_background(ins, need)  # 4
    rep.lap("4_background")
    rep.articular_relabelled = _relabel_articular(ins, s, dominance)  # 5
    rep.lap("5_articular")
    rep.corpus_relabelled = _reconcile_corpora(ins, s)  # 5b
    rep.lap("5b_corpora")
    rep.bodyless_released = _release_bodyless(ins, s, box, sem.shape)  # 5c
    rep.lap("5c_bodyless")
    rep.stray_relabelled = _relabel_strays(ins, s, max(1, int(np.ceil(min_piece_mm3 / float(np.prod(sp))))))  # 6
    rep.lap("6_stray")
    if keep_cut_fragments:  # 6b
        rep.cut_pieces_detached = _detach_cut_pieces(ins, s, sp, box, sem.shape)
    rep.lap("6b_cut")
    missing = _missing_components(ins, need)  # 7
    if missing is not None:
        owner = _touching_owners(missing, ins, s)
        rep.missing_assigned = _relabel_components(missing.comp, owner, ins, missing.index)
        rep.added_instances, rep.dropped_components, rep.dropped_voxels = _keep_or_drop(
            missing, owner, ins, s, sp, box, sem.shape, keep_isolated_vertebrae=keep_isolated_vertebrae,
            min_vertebra_mm3=min_vertebra_mm3, min_piece_mm3=min_piece_mm3, keep_cut_fragments=keep_cut_fragments)
    rep.lap("7_missing")
    rep.reassigned_discs_endplates = _reassign_stale(ins, s, sp)  # 8
    rep.lap("8_reassign")
    if not np.may_share_memory(s, sem):
        sem[box] = s
    if not np.may_share_memory(ins, inst):
        inst[box] = ins
    rep.problems = check_consistency(sem, inst)
    rep.lap("check")
    return sem, inst, rep


def _working_copies(sem0: np.ndarray, inst0: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Copies of the checked masks to work on: the semantic mask with its aliases 50/51 mapped to 49 (and how many
    voxels that changed), the instance mask as uint16 (int32 when it holds ids past 16 bits)."""
    sem = map_aliases(sem0)
    mapped = 0 if sem is sem0 else int(np.count_nonzero(sem != sem0))
    sem = sem.astype(sem0.dtype, copy=True)
    # instance ids are below 300: 16-bit working copies halve the bytes of every whole-box pass (post-processing over
    # the five side-by-side phantoms' inputs 608 -> 553 ms, same masks); ids past 16 bits keep 32
    wide = inst0.dtype.itemsize > 2 and int(inst0.max(initial=0)) > np.iinfo(np.uint16).max
    inst = inst0.astype(np.int32 if wide else np.uint16, copy=True)
    return sem, inst, mapped


def _split_endplates(sem: np.ndarray, inst: np.ndarray, sp: np.ndarray) -> int:
    """Step 1 (in place): split the unsplit endplates (62) and give them ids by
    :func:`~spineps_like.assign.assign_ivds_endplates`. Returns their voxels."""
    if not (sem == 62).any():
        return 0
    n = int(np.count_nonzero(sem == 62))
    vert = np.where(instance_class(inst) == _V, inst, 0)
    full, sem_split = assign_ivds_endplates(sem, vert, sp)
    ep = sem == 62
    sem[ep] = sem_split[ep]
    inst[ep] = full[ep]
    return n


def _convert_classes(ins: np.ndarray, need: np.ndarray, have: np.ndarray) -> tuple[int, int]:
    """Step 2 (in place): ids of the wrong class for their semantic label are converted where the meaning is clear
    (a vertebra id on an endplate -> 200 + v, an endplate id on corpus -> v, anything on the sacrum -> 26) and
    cleared otherwise. Returns the voxels converted and cleared."""
    mism = np.flatnonzero((need > 0) & (have > 0) & (need != have))
    flat_ins = _flat(ins)
    nv, hv, iv = _flat(need)[mism], _flat(have)[mism], flat_ins[mism]
    conv = np.zeros(len(mism), dtype=np.int64)
    conv[(nv == _E) & (hv == _V)] = ENDPLATE_OFFSET + iv[(nv == _E) & (hv == _V)]
    conv[(nv == _V) & (hv == _E)] = iv[(nv == _V) & (hv == _E)] - ENDPLATE_OFFSET
    conv[nv == _S] = SACRUM_ID
    converted, cleared = int(np.count_nonzero(conv > 0)), int(np.count_nonzero(conv == 0))
    flat_ins[mism] = conv
    ins[(need == _S)] = SACRUM_ID
    return converted, cleared


def _fill_holes(ins: np.ndarray, need: np.ndarray) -> int:
    """Step 3 (in place): fill the holes of each instance, only where the semantic mask calls for its class and
    nothing else is there. Returns the voxels filled."""
    filled = 0
    boxes = ndimage.find_objects(ins)  # one pass: the bounding box of every id (None where absent)
    ids = np.array([k + 1 for k, b in enumerate(boxes) if b is not None], dtype=np.int64)
    if not len(ids):
        return 0
    for i, cls in zip(ids, instance_class(ids)):
        sl = boxes[int(i) - 1]
        # only empty voxels of the instance's class can be filled: without any in its box, no fill is needed
        cand = (ins[sl] == 0) & (need[sl] == cls)
        if not cand.any():
            continue
        add = fill_voids.fill(ins[sl] == i, in_place=False) & cand
        if add.any():
            ins[sl][add] = i
            filled += int(add.sum())
    return filled


def _clear_background(ins: np.ndarray, need: np.ndarray) -> int:
    """Step 4 (in place): no instance id on background, canal or cord. Returns the voxels cleared."""
    off = (need == 0) & (ins > 0)
    n = int(off.sum())
    ins[off] = 0
    return n


def _relabel_articular(ins: np.ndarray, s: np.ndarray, dominance: float) -> int:
    """Step 5 (in place): an articular component (45-48) split between vertebrae goes to the one holding more than
    ``dominance`` x the runner-up's voxels. Returns the voxels relabelled."""
    art = label_mask(s, ARTICULAR)
    if not art.any():
        return 0
    art_cc = cc3d.connected_components(np.where(art, s, 0), connectivity=26)
    art_index = nonzero_index(art_cc)
    flat_ins = _flat(ins)
    sel = art_index[flat_ins[art_index] > 0]
    a_ids, b_ids, counts = count_pairs(art_cc.reshape(-1)[sel].astype(np.int64), flat_ins[sel].astype(np.int64))
    pairs = np.stack([a_ids, b_ids], axis=1)
    multi = np.bincount(pairs[:, 0]) > 1 if len(pairs) else np.zeros(0, bool)
    keep = multi[pairs[:, 0]] if len(pairs) else np.zeros(0, bool)
    owner = dominant_partner(pairs[keep, 0], pairs[keep, 1], counts[keep], dominance)
    return _relabel_components(art_cc, owner, ins, art_index)


class _VertebraPieces(NamedTuple):
    """The 26-connected pieces of every vertebra instance, each with its instance and whether it is the main one."""

    vmask: np.ndarray  # the vertebra ids of ins (0 elsewhere)
    pieces: np.ndarray  # piece labels
    nz: np.ndarray  # flat indices of the piece voxels
    pv: np.ndarray  # piece of each voxel at nz
    counts: np.ndarray  # voxels per piece
    piece_inst: np.ndarray  # instance of each piece
    main: np.ndarray  # main (largest) piece of each instance
    not_main: np.ndarray  # per piece: not its instance's main piece


def _vertebra_pieces(ins: np.ndarray) -> _VertebraPieces | None:
    """The pieces of the vertebra instances of ``ins`` (None without any vertebra voxel)."""
    vmask = vertebra_ids(ins)
    pieces = cc3d.connected_components(vmask, connectivity=26)
    nz = nonzero_index(pieces)  # pieces and vmask are fresh C-ordered arrays: flat views, no copies
    if len(nz) == 0:
        return None
    pv = pieces.reshape(-1)[nz].astype(np.int64)
    counts = np.bincount(pv)
    piece_ids = np.arange(len(counts))
    piece_inst = np.zeros(len(counts), dtype=np.int64)
    piece_inst[pv] = vmask.reshape(-1)[nz]
    main = np.zeros(int(piece_inst.max()) + 1, dtype=np.int64)
    order = np.lexsort((counts[1:], piece_inst[1:]))  # per instance, largest last
    main[piece_inst[1:][order]] = piece_ids[1:][order]
    not_main = np.zeros(len(counts), bool)
    not_main[1:] = main[piece_inst[1:]] != piece_ids[1:]
    return _VertebraPieces(vmask, pieces, nz, pv, counts, piece_inst, main, not_main)


def _relabel_strays(ins: np.ndarray, s: np.ndarray, min_crumb: int) -> int:
    """Step 6 (in place): stray pieces of vertebra instances (not the main body): crumbs (under ``min_crumb``
    voxels) first join whatever vertebra surrounds them, then larger pieces join the main body of another vertebra
    they touch (never through a facet joint). Returns the voxels relabelled."""
    moved_total = 0
    vp = None  # the pieces of ins as it is (the second pass reuses the first's when that moved nothing)
    for crumbs in (True, False):
        if vp is None:
            vp = _vertebra_pieces(ins)
            if vp is None:
                break
        if crumbs:
            is_stray = vp.not_main & (vp.counts < min_crumb)
            partner = vp.vmask
        else:
            is_stray = vp.not_main
            is_main = np.zeros(len(vp.counts), bool)
            is_main[vp.main[vp.main > 0]] = True
            partner = vp.vmask.copy()
            _flat(partner)[vp.nz[~is_main[vp.pv]]] = 0
        moved = _move_strays(ins, s, vp, is_stray, partner)
        moved_total += moved
        if moved:
            vp = None
    return moved_total


def _move_strays(ins: np.ndarray, s: np.ndarray, vp: _VertebraPieces, is_stray: np.ndarray,
                 partner: np.ndarray) -> int:
    """Give each stray piece (``is_stray`` per piece) the ``partner`` id of another vertebra it touches most
    (contacts across facet joints excluded), in place. Returns the voxels relabelled."""
    if not is_stray.any():
        return 0
    stray_vox = vp.nz[is_stray[vp.pv]]
    stray_img = np.zeros_like(vp.pieces)
    _flat(stray_img)[stray_vox] = vp.pv[is_stray[vp.pv]]
    near = _box_of(stray_vox, ins.shape, margin=1)  # every contact of a stray piece lies in here
    a_ids, b_ids, n = facet_free_contacts(stray_img[near], partner[near], s[near])
    other = b_ids != vp.piece_inst[a_ids]
    owner = dominant_partner(a_ids[other], b_ids[other], n[other], 1.0)
    return _relabel_components(stray_img, owner, ins, stray_vox)


class _Missing(NamedTuple):
    """The 26-connected components of the labelled semantic voxels without an instance (step 7)."""

    comp: np.ndarray  # component labels (0 elsewhere)
    index: np.ndarray  # flat indices of the missing voxels
    of: np.ndarray  # component of each voxel at index
    cls: np.ndarray  # instance class each component calls for, per component id


def _missing_components(ins: np.ndarray, need: np.ndarray) -> _Missing | None:
    """The labelled semantic voxels without an instance, as components (None when there is none)."""
    missing = (need > 0) & (ins == 0)
    if not missing.any():
        return None
    comp = cc3d.connected_components(np.where(missing, need, 0), connectivity=26)
    comp_index = nonzero_index(comp)  # the missing voxels
    comp_of = comp.reshape(-1)[comp_index].astype(np.int64)
    comp_cls = np.zeros(int(comp_of.max()) + 1, dtype=np.uint8)
    comp_cls[comp_of] = _flat(need)[comp_index]
    return _Missing(comp, comp_index, comp_of, comp_cls)


def _touching_owners(m: _Missing, ins: np.ndarray, s: np.ndarray) -> dict[int, int]:
    """For each missing component, the touching instance with the most contact (facet joints aside), its id
    converted to the component's class where the meaning is clear (a vertebra's endplate, an endplate's vertebra)."""
    near = _box_of(m.index, ins.shape, margin=1)
    a_ids, b_ids, n = facet_free_contacts(m.comp[near], ins[near], s[near])
    b_cls = instance_class(b_ids)
    want = m.cls[a_ids]
    cand = np.where(b_cls == want, b_ids, 0)
    cand = np.where((want == _V) & (b_cls == _E), b_ids - ENDPLATE_OFFSET, cand)
    cand = np.where((want == _E) & (b_cls == _V), ENDPLATE_OFFSET + b_ids, cand)
    ok = cand > 0
    return dominant_partner(a_ids[ok], cand[ok], n[ok], 1.0)


def _keep_or_drop(m: _Missing, owner: dict[int, int], ins: np.ndarray, s: np.ndarray, sp: np.ndarray,
                  box: tuple[slice, ...], full_shape: tuple[int, ...], *, keep_isolated_vertebrae: bool,
                  min_vertebra_mm3: float, min_piece_mm3: float, keep_cut_fragments: bool
                  ) -> tuple[list[int], int, int]:
    """Step 7's components that touch no instance (in place): a large one with corpus becomes a new vertebra
    (``keep_isolated_vertebrae``), the field of view's remains of the next vertebra beyond either end one new vertebra
    (``keep_cut_fragments``); the others are dropped from both masks. Returns the new ids, the components and the
    voxels dropped."""
    left = np.setdiff1d(present_ids(m.of), np.fromiter(owner, dtype=np.int64, count=len(owner)))
    if not len(left):
        return [], 0, 0
    sizes = np.bincount(m.of, minlength=len(m.cls))
    has_corpus = np.zeros(len(sizes), bool)
    has_corpus[present_ids(m.of[_flat(s)[m.index] == 49])] = True
    vox_mm3 = float(np.prod(sp))
    added: list[int] = []
    kept: set[int] = set()
    for c in left:
        if (keep_isolated_vertebrae and m.cls[c] == _V and has_corpus[c]
                and sizes[c] * vox_mm3 >= min_vertebra_mm3):
            added, kept = _new_vertebra(ins, m, [int(c)], added, kept)
    if keep_cut_fragments:
        cands = [int(c) for c in left if c not in kept and m.cls[c] == _V]
        for group in _cut_fragment_groups(m.index, m.of, cands, ins, s, sp, box, full_shape, min_piece_mm3):
            added, kept = _new_vertebra(ins, m, group, added, kept)
    dropped = [int(c) for c in left if int(c) not in kept]
    drop = m.index[_flat(ins)[m.index] == 0]
    _flat(s)[drop] = 0
    return added, len(dropped), sum(int(sizes[c]) for c in dropped)


def _new_vertebra(ins: np.ndarray, m: _Missing, comps: list[int], added: list[int], kept: set[int]
                  ) -> tuple[list[int], set[int]]:
    """Components ``comps`` become one new vertebra (in ``ins``), with the lowest id not in use (1-25, sacrum
    aside); without a free id nothing happens. Returns ``added`` and ``kept`` with the new id and ``comps``."""
    used = set(present_ids(ins).tolist())
    free = [v for v in range(1, 26) if v not in used and v != SACRUM_ID]
    if not free:
        return added, kept
    _flat(ins)[m.index[np.isin(m.of, comps)]] = free[0]
    return added + [free[0]], kept | set(comps)


def _reassign_stale(ins: np.ndarray, s: np.ndarray, sp: np.ndarray) -> int:
    """Step 8 (in place): discs and endplates that name a vertebra no longer there (released, dropped, or never
    there) get their ids from the final vertebrae; the others keep theirs. A disc above the topmost vertebra names the
    one out of view (top id - 1, see :func:`~spineps_like.assign.assign_ivds_endplates`): that one is right as it
    is. Returns the voxels whose id changed."""
    flat_ins = _flat(ins)
    disc_or_endplate = (ins >= IVD_OFFSET) & (ins < 300)
    de_index = np.flatnonzero(disc_or_endplate)
    de_ids = flat_ins[de_index]
    # 100 + v, 200 + v -> v, among the vertebrae and the sacrum present: the sacrum's endplate (226) names the
    # sacrum, a disc "below the sacrum" (126) names nothing
    named = de_ids % 100
    named_present = (np.isin(named, present_ids(ins[(ins > 0) & (ins < IVD_OFFSET)]))
                     & ((named != SACRUM_ID) | (de_ids >= ENDPLATE_OFFSET)))
    stale_index = de_index[~named_present]
    if len(stale_index):
        top = _spine_order(ins, s, sp)[0][:1]
        if len(top):
            stale_index = stale_index[flat_ins[stale_index] != IVD_OFFSET + top[0] - 1]
    if not len(stale_index):
        return 0
    stale = np.zeros(ins.shape, bool)
    _flat(stale)[stale_index] = True
    # only the stale voxels are targets: the other discs and endplates are hidden from the assignment (it reads
    # the vertebra ids of ins and the bone of s)
    full, _ = assign_ivds_endplates(np.where(disc_or_endplate & ~stale, 0, s), ins, sp)
    n = int(np.count_nonzero(stale & (full != ins)))
    ins[stale] = full[stale]
    return n
