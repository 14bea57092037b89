"""Snapshot (QC) pictures of a scan, as PNG: sagittal and coronal mid-planes with overlays, names and flags.

:func:`save_snapshot` writes one picture per scan (``..._seg-spine_snp.png`` beside the masks): the mid-sagittal
slice alone, with the semantic overlay and with the instance overlay, and the coronal plane through the vertebral
bodies with the instance overlay. Given the scan's summary (:meth:`spineps_like.pipeline.SegmentResult.summary`),
each vertebra's name is written at its centre in both instance panels, and the summary's flags are drawn where they
apply (:func:`qc_marks`):

- name colour: white = high confidence, yellow = medium, red = low (``"confidence"`` of the summary's vertebra);
- ``cut``: a vertebra the field of view cuts (``complete`` false); a dashed orange line on the image edge that cuts;
- ``!``: a vertebra an implausibility flag names; magenta: a transitional vertebra (T13, L6);
- ``L3 missing`` (red, dashed box) between two vertebrae whose ids skip a level;
- a banner under the panels: green when nothing is flagged, orange for what deserves a look (no anchor, an
  ambiguous labelling, missing levels, transitional or cut vertebrae, low confidence, advisories), red when the
  result is implausible, with one line per flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spineps_like.geometry import reorient
from spineps_like.io import Scan, atomic_path
from spineps_like.labels import (ANATOMICAL_ORDER, IVD_OFFSET, SACRUM_ID, SEMANTIC_COLOURS, instance_colour,
                                 instance_name)

#: Vertebra ids that only some spines have: their absence is no missing level.
TRANSITIONAL_IDS = (25, 28)  # L6, T13
#: Banner colours by severity.
SEVERITY_COLOURS = {"ok": "#2e7d32", "look": "#ef6c00", "implausible": "#c62828"}
_CONFIDENCE_COLOURS = {"high": "white", "medium": "#ffd54f", "low": "#ff5252", None: "white"}
_BODY_LABELS = (49, 50, 52, 53, 62)


@dataclass
class VertebraMark:
    """Where and how one vertebra is annotated: ``centre`` in PIR voxel coordinates (P, I, R)."""

    id: int
    name: str
    centre: tuple[float, float, float]
    confidence: str | None = None
    flags: tuple[str, ...] = ()  # of "cut", "transitional", "implausible"

    @property
    def text(self) -> str:
        return self.name + (" cut" if "cut" in self.flags else "") + ("!" if "implausible" in self.flags else "")


@dataclass
class QCMarks:
    """What the QC picture draws: per-vertebra marks, missing levels, cut edges and the banner's lines."""

    vertebrae: list[VertebraMark] = field(default_factory=list)
    #: (name of a level missing between two present vertebrae, its place in PIR voxel coordinates)
    missing: list[tuple[str, tuple[float, float, float]]] = field(default_factory=list)
    #: image edges (``top``, ``bottom``) that cut a vertebra
    cut_edges: tuple[str, ...] = ()
    lines: list[str] = field(default_factory=list)
    severity: str = "ok"  # "ok" | "look" | "implausible"


def missing_levels(ids: list[int]) -> list[tuple[int, int, int]]:
    """Levels absent between present vertebrae, as (missing id, id above, id below) in anatomical order.

    T13 and L6 are never missing; nor is anything between the last lumbar vertebra and the sacrum (a spine with
    four lumbar vertebrae), nor above the first or below the last vertebra present.
    """
    order = [v for v in ANATOMICAL_ORDER if v not in TRANSITIONAL_IDS]
    present = sorted((v for v in set(ids) if v in order and v != SACRUM_ID and v < SACRUM_ID), key=order.index)
    out = []
    for a, b in zip(present[:-1], present[1:]):
        for v in order[order.index(a) + 1:order.index(b)]:
            out.append((v, a, b))
    return out


def qc_marks(instance: np.ndarray, summary: dict[str, Any] | None = None,
             semantic: np.ndarray | None = None) -> QCMarks:
    """The annotations of the QC picture for an instance mask in PIR and the scan's summary.

    A vertebra's mark sits at the centre of its body (``semantic`` labels 49, 50, 52, 53, 62 within the vertebra)
    when ``semantic`` is given and the vertebra has a body, else at the centre of the whole vertebra.

    ``summary`` is :meth:`~spineps_like.pipeline.SegmentResult.summary` (its ``vertebrae`` rows with ``complete``,
    ``truncated_by`` and ``confidence``, its ``labeling`` and ``plausibility`` entries); without it the vertebrae
    are only named.
    """
    from spineps_like.labeling import centroids

    ins = np.asarray(instance)
    summary = summary or {}
    rows = {int(r["id"]): r for r in summary.get("vertebrae", [])}
    ids = [int(i) for i in np.unique(ins) if 0 < i < IVD_OFFSET]
    cen = centroids(ins, ids)
    if semantic is not None:
        cen.update(centroids(np.where(np.isin(semantic, _BODY_LABELS), ins, 0), ids))
    plaus = summary.get("plausibility") or {}
    flags_text = list(plaus.get("flags", []))
    marks = QCMarks()
    cut_edges: set[str] = set()
    for v in sorted(cen, key=lambda i: ANATOMICAL_ORDER.index(i) if i in ANATOMICAL_ORDER else 99 + i):
        try:
            name = instance_name(v)
        except ValueError:
            name = str(v)
        row = rows.get(v, {})
        f = []
        if row.get("complete") is False:
            f.append("cut")
            cut_edges.update(e for e in row.get("truncated_by", []) if e in ("top", "bottom"))
        if v in TRANSITIONAL_IDS:
            f.append("transitional")
        if any(t.startswith(f"{name}:") or t.startswith(f"{name} and ") or f" and {name}:" in t for t in flags_text):
            f.append("implausible")
        conf = (row.get("confidence") or {}).get("level")
        marks.vertebrae.append(VertebraMark(v, name, tuple(float(x) for x in cen[v]), conf, tuple(f)))
    for v, a, b in missing_levels(ids):
        marks.missing.append((instance_name(v), tuple(float(x) for x in (cen[a] + cen[b]) / 2)))
    marks.cut_edges = tuple(sorted(cut_edges))

    lines: list[str] = [f"implausible: {t}" for t in flags_text]
    labeling = summary.get("labeling") or {}
    if marks.vertebrae and labeling.get("anchor") == "none":
        lines.append("no anchor in view (no sacrum, no C2): the ids are a count from the top, not anatomy")
    if labeling.get("ambiguous"):
        lines.append("labelling ambiguous (T13/L6, counts that disagree or skipped levels: see the summary's notes)")
    if marks.missing:
        lines.append("missing level(s): " + ", ".join(n for n, _ in marks.missing))
    trans = [m.name for m in marks.vertebrae if "transitional" in m.flags]
    if trans:
        lines.append("transitional vertebra: " + ", ".join(trans))
    cut = [f"{m.name} ({', '.join(rows[m.id].get('truncated_by') or []) or 'cut'})" for m in marks.vertebrae
           if "cut" in m.flags]
    if cut:
        lines.append("cut by the field of view: " + ", ".join(cut))
    low = [m for m in marks.vertebrae if m.confidence == "low"]
    if low:
        reasons = sorted({_low_why(rows[m.id]["confidence"]) for m in low} - {""})
        lines.append("low confidence: " + ", ".join(m.name for m in low) + (f" ({'; '.join(reasons)})" if reasons
                                                                              else ""))
    lines.extend(f"advisory: {t}" for t in plaus.get("advisories", []))
    marks.lines = lines
    marks.severity = "implausible" if flags_text else ("look" if lines else "ok")
    return marks


def _low_why(confidence: dict[str, Any]) -> str:
    """Why a vertebra's confidence is low: its body's reason when the body is low, else its id's."""
    body = confidence.get("body") or {}
    return str(body.get("why", "") if body.get("level") == "low" else (confidence.get("id") or {}).get("why", ""))


def _lut(ids: np.ndarray, colour) -> np.ndarray:
    """RGBA lookup (max_id+1, 4) for the ids present."""
    n = int(ids.max(initial=0)) + 1
    lut = np.zeros((n, 4), dtype=np.float32)
    for i in ids:
        if i > 0:
            lut[i, :3] = np.asarray(colour(int(i)), dtype=np.float32) / 255.0
            lut[i, 3] = 0.55
    return lut


def _sagittal_index(semantic: np.ndarray | None, n: int) -> int:
    """The sagittal slice (axis 2 in PIR) through the spine's middle, or the array's middle without a mask."""
    if semantic is not None and semantic.any():
        counts = (semantic > 0).sum(axis=(0, 1))
        return int(np.argmax(counts)) if counts.max() > 0 else n // 2
    return n // 2


def _coronal_index(semantic: np.ndarray | None, instance: np.ndarray | None, n: int) -> int:
    """The coronal slice (axis 0 in PIR) through the vertebral bodies (most body voxels), else through the most
    mask voxels, else the array's middle."""
    for mask in ((np.isin(semantic, _BODY_LABELS) if semantic is not None else None),
                 (instance > 0) & (instance < IVD_OFFSET) if instance is not None else None,
                 (semantic > 0) if semantic is not None else None):
        if mask is not None and mask.any():
            return int(np.argmax(mask.sum(axis=(1, 2))))
    return n // 2


def snapshot_figure(image: Scan, semantic: Scan | None = None, instance: Scan | None = None, *,
                    title: str | None = None, summary: dict[str, Any] | None = None):
    """The QC picture as a matplotlib Figure (see the module docstring); all scans on one grid, shown in PIR
    (sagittal: anterior left, head up; coronal: the patient's right on the right, head up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = reorient(image, "PIR")
    sem = reorient(semantic, "PIR").array if semantic is not None else None
    ins = reorient(instance, "PIR").array if instance is not None else None
    k_sag = _sagittal_index(sem if sem is not None else ins, img.shape[2])
    k_cor = _coronal_index(sem, ins, img.shape[0])
    sp = img.spacing
    marks = qc_marks(ins, summary, sem) if ins is not None else None
    banner = marks is not None and summary is not None  # no summary (or no instances): no claim about flags
    sem_lut = _lut(np.unique(sem), lambda i: SEMANTIC_COLOURS.get(i, (255, 255, 255))) if sem is not None else None
    ins_lut = _lut(np.unique(ins), instance_colour) if ins is not None else None
    data = img.array.astype(np.float32)

    # (name, plane, 2D image, overlay, aspect); sagittal rows: superior -> inferior, columns: anterior -> posterior;
    # coronal rows: superior -> inferior, columns: the patient's left -> right
    sag = lambda a: a[:, :, k_sag].T  # noqa: E731
    cor = lambda a: a[k_cor, :, :]  # noqa: E731
    panels = [("sagittal", "sag", sag(data), None, sp[1] / sp[0])]
    if sem is not None:
        panels.append(("sagittal semantic", "sag", sag(data), sem_lut[sag(sem)], sp[1] / sp[0]))
    if ins is not None:
        panels.append(("sagittal instances", "sag", sag(data), ins_lut[sag(ins)], sp[1] / sp[0]))
        panels.append(("coronal instances", "cor", cor(data), ins_lut[cor(ins)], sp[1] / sp[2]))
    elif sem is not None:
        panels.append(("coronal semantic", "cor", cor(data), sem_lut[cor(sem)], sp[1] / sp[2]))
    else:
        panels.append(("coronal", "cor", cor(data), None, sp[1] / sp[2]))

    widths = [p[2].shape[1] for p in panels]
    heights = [p[2].shape[0] * p[4] for p in panels]
    # each panel 3.2 inches wide at most; the tallest panel sets the height
    scale = min(3.2 / max(w, 1) for w in widths)
    panel_w = [max(w * scale, 1.2) for w in widths]
    panel_h = float(np.clip(max(heights) * scale, 2.0, 9.0))
    n_lines = len(marks.lines) if marks is not None else 0
    banner_h = (0.3 + 0.16 * max(n_lines, 1)) if banner else 0.0
    fig_w = max(sum(panel_w) + 0.2 * len(panels), 6.0)
    fig_h = panel_h + 0.5 + banner_h + (0.25 if title else 0.0)
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=110)
    grid = fig.add_gridspec(1, len(panels), width_ratios=panel_w, left=0.01, right=0.99,
                            top=1.0 - (0.45 + (0.25 if title else 0.0)) / fig_h, bottom=(banner_h + 0.05) / fig_h,
                            wspace=0.05)
    lo, hi = np.percentile(data, [0.5, 99.5]) if data.size else (0.0, 1.0)
    for j, (name, plane, base, overlay, aspect) in enumerate(panels):
        ax = fig.add_subplot(grid[0, j])
        ax.imshow(base, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, interpolation="nearest")
        if overlay is not None:
            ax.imshow(overlay, aspect=aspect, interpolation="nearest")
        index = k_sag if plane == "sag" else k_cor
        ax.set_title(f"{name} ({'R' if plane == 'sag' else 'P'} {index})", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_gid(name)
        if plane == "cor":
            ax.text(0.0, 1.0, "L", transform=ax.transAxes, fontsize=7, color="white", va="top", ha="left")
            ax.text(1.0, 1.0, "R", transform=ax.transAxes, fontsize=7, color="white", va="top", ha="right")
        if marks is None or "instances" not in name:
            continue
        xy = (lambda c: (c[0], c[1])) if plane == "sag" else (lambda c: (c[2], c[1]))  # noqa: E731
        for m in marks.vertebrae:
            x, y = xy(m.centre)
            colour = "#e040fb" if "transitional" in m.flags else _CONFIDENCE_COLOURS.get(m.confidence, "white")
            box = dict(boxstyle="round,pad=0.15", fc="black", alpha=0.55, lw=1.0,
                       ec="#ff1744" if "implausible" in m.flags else "none")
            ax.text(x, y, m.text, color=colour, fontsize=6, ha="center", va="center", bbox=box, gid=f"vertebra:{m.id}",
                    fontweight="bold" if m.flags else "normal")
        for miss, c in marks.missing:
            x, y = xy(c)
            ax.text(x, y, f"{miss} missing", color="#ff5252", fontsize=6, ha="center", va="center",
                    gid=f"missing:{miss}", bbox=dict(boxstyle="round,pad=0.15", fc="black", alpha=0.6, ec="#ff5252",
                                                     ls="--"))
        rows = base.shape[0]
        for edge in marks.cut_edges:
            y = -0.5 if edge == "top" else rows - 0.5
            ax.axhline(y, color="orange", ls="--", lw=2.0, gid=f"cut:{edge}")
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 - 0.05 / fig_h, va="top")
    if banner:
        text = "\n".join(marks.lines) if marks.lines else "no flags: plausible, anchored, complete levels"
        head = {"ok": "QC ok", "look": "QC: look", "implausible": "QC: implausible"}[marks.severity]
        fig.text(0.01, (banner_h - 0.02) / fig_h, f"{head}\n{text}", fontsize=6.5, va="top", ha="left",
                 color="white", gid="banner", wrap=True,
                 bbox=dict(boxstyle="square,pad=0.4", fc=SEVERITY_COLOURS[marks.severity], ec="none"))
    return fig


def save_snapshot(path: str | Path, image: Scan, semantic: Scan | None = None, instance: Scan | None = None,
                  *, title: str | None = None, summary: dict[str, Any] | None = None) -> Path:
    """Write the QC picture of :func:`snapshot_figure` as a PNG (atomically); returns ``path``."""
    import matplotlib.pyplot as plt

    fig = snapshot_figure(image, semantic, instance, title=title, summary=summary)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)
