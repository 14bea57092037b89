"""Label schemes of spineps-like: SPINEPS/TPTBox semantic labels and instance ids.

Semantic labels (the ``seg-spine`` mask) follow TPTBox's ``Location`` ids; instance ids (the ``seg-vert`` mask)
follow TPTBox's ``v_name2idx``: C1-C7 1-7, T1-T12 8-19, T13 28, L1-L6 20-25, sacrum 26, coccyx 27, IVD 100+v
(v = vertebra above), endplate 200+v (v = vertebra the endplate belongs to).
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path

import numpy as np

from spineps_like.masks import label_counts, present_ids  # noqa: F401  (their home is masks; imported from here too)


class Semantic(IntEnum):
    """Semantic (subregion) labels of the ``seg-spine`` mask (TPTBox ``Location`` ids)."""

    ARCUS = 41
    SPINOUS = 42
    COSTAL_LEFT = 43
    COSTAL_RIGHT = 44
    SUP_ARTICULAR_LEFT = 45
    SUP_ARTICULAR_RIGHT = 46
    INF_ARTICULAR_LEFT = 47
    INF_ARTICULAR_RIGHT = 48
    CORPUS = 49
    ENDPLATE_SUPERIOR = 52
    ENDPLATE_INFERIOR = 53
    CORD = 60
    CANAL = 61
    ENDPLATE = 62
    IVD = 100
    SACRUM = 26


SEMANTIC_NAMES: dict[int, str] = {
    Semantic.ARCUS: "Arcus_Vertebrae",
    Semantic.SPINOUS: "Spinosus_Process",
    Semantic.COSTAL_LEFT: "Costal_Process_Left",
    Semantic.COSTAL_RIGHT: "Costal_Process_Right",
    Semantic.SUP_ARTICULAR_LEFT: "Superior_Articular_Left",
    Semantic.SUP_ARTICULAR_RIGHT: "Superior_Articular_Right",
    Semantic.INF_ARTICULAR_LEFT: "Inferior_Articular_Left",
    Semantic.INF_ARTICULAR_RIGHT: "Inferior_Articular_Right",
    Semantic.CORPUS: "Vertebra_Corpus_border",
    Semantic.ENDPLATE_SUPERIOR: "Vertebral_Body_Endplate_Superior",
    Semantic.ENDPLATE_INFERIOR: "Vertebral_Body_Endplate_Inferior",
    Semantic.CORD: "Spinal_Cord",
    Semantic.CANAL: "Spinal_Canal",
    Semantic.ENDPLATE: "Endplate",
    Semantic.IVD: "Vertebra_Disc",
    Semantic.SACRUM: "Sacrum",
}

#: Labels that belong to a vertebra's bone (the instance phase's input and the vertebra instance).
VERTEBRA_LABELS: tuple[int, ...] = (41, 42, 43, 44, 45, 46, 47, 48, 49)
#: Posterior elements (everything of the vertebra but the corpus).
POSTERIOR_LABELS: tuple[int, ...] = (41, 42, 43, 44, 45, 46, 47, 48)
ENDPLATE_LABELS: tuple[int, ...] = (52, 53, 62)
#: Extra labels some models emit and how they map into the scheme (TPTBox: 50 dense corpus, 51 dens -> corpus).
SEMANTIC_ALIASES: dict[int, int] = {50: 49, 51: 49}

# ---------------------------------------------------------------- instance ids
_CERVICAL = [f"C{i}" for i in range(1, 8)]
_THORACIC = [f"T{i}" for i in range(1, 13)]
_LUMBAR = [f"L{i}" for i in range(1, 7)]

VERTEBRA_NAME_TO_ID: dict[str, int] = {
    **{n: i + 1 for i, n in enumerate(_CERVICAL)},
    **{n: i + 8 for i, n in enumerate(_THORACIC)},
    "T13": 28,
    **{n: i + 20 for i, n in enumerate(_LUMBAR)},
    "S1": 26,
    "Cocc": 27,
}
VERTEBRA_ID_TO_NAME: dict[int, str] = {v: k for k, v in VERTEBRA_NAME_TO_ID.items()}
SACRUM_ID = 26
COCCYX_ID = 27
IVD_OFFSET = 100
ENDPLATE_OFFSET = 200

#: Vertebra ids in anatomical order, top to bottom, with the transitional T13 and L6 in their places.
ANATOMICAL_ORDER: tuple[int, ...] = tuple(
    [VERTEBRA_NAME_TO_ID[n] for n in _CERVICAL + _THORACIC]
    + [28]
    + [VERTEBRA_NAME_TO_ID[n] for n in _LUMBAR]
    + [26, 27]
)


def label_mask(mask: np.ndarray, labels) -> np.ndarray:
    """Boolean array: where ``mask`` holds one of ``labels`` (``np.isin``). For a semantic mask (8-bit): one
    comparison when the labels are a run of consecutive values (``mask - first <= last - first`` in wrapping 8-bit
    arithmetic, ~5x faster than ``np.isin``), else a 256-entry table look-up (~2.5x faster); other integer masks go
    to ``np.isin``."""
    mask = np.asarray(mask)
    if mask.dtype != np.uint8:
        return np.isin(mask, labels)
    wanted = sorted({int(v) for v in labels if 0 <= v < 256})
    if wanted and wanted[-1] - wanted[0] == len(wanted) - 1:
        return np.subtract(mask, np.uint8(wanted[0])) <= np.uint8(wanted[-1] - wanted[0])
    table = np.zeros(256, bool)
    table[wanted] = True
    return table[mask]


def is_vertebra(instance_id: int) -> bool:
    """True for a vertebra id (1-28), sacrum and coccyx included."""
    return 1 <= instance_id <= 28


def ivd_id(vertebra_above: int) -> int:
    """Instance id of the IVD below ``vertebra_above``."""
    return IVD_OFFSET + vertebra_above


def endplate_id(vertebra: int) -> int:
    """Instance id of an endplate of ``vertebra``."""
    return ENDPLATE_OFFSET + vertebra


def instance_name(instance_id: int) -> str:
    """Human-readable name of an instance id, e.g. 20 -> 'L1', 120 -> 'IVD L1', 220 -> 'Endplate L1'."""
    if instance_id in VERTEBRA_ID_TO_NAME:
        return VERTEBRA_ID_TO_NAME[instance_id]
    if IVD_OFFSET < instance_id < ENDPLATE_OFFSET and instance_id - IVD_OFFSET in VERTEBRA_ID_TO_NAME:
        return f"IVD {VERTEBRA_ID_TO_NAME[instance_id - IVD_OFFSET]}"
    if ENDPLATE_OFFSET < instance_id < 300 and instance_id - ENDPLATE_OFFSET in VERTEBRA_ID_TO_NAME:
        return f"Endplate {VERTEBRA_ID_TO_NAME[instance_id - ENDPLATE_OFFSET]}"
    raise ValueError(f"{instance_id} is no instance id of the scheme")


def instance_id(name: str) -> int:
    """Inverse of :func:`instance_name`."""
    if name.startswith("IVD "):
        return ivd_id(VERTEBRA_NAME_TO_ID[name[4:]])
    if name.startswith("Endplate "):
        return endplate_id(VERTEBRA_NAME_TO_ID[name[9:]])
    if name in VERTEBRA_NAME_TO_ID:
        return VERTEBRA_NAME_TO_ID[name]
    raise ValueError(f"{name!r} is no instance name of the scheme")


def all_instance_ids() -> list[int]:
    """Every id the instance mask may hold (vertebrae, IVDs, endplates)."""
    verts = sorted(VERTEBRA_ID_TO_NAME)
    return verts + [ivd_id(v) for v in verts] + [endplate_id(v) for v in verts]


def next_vertebra(v: int, include_transitional: bool = False) -> int | None:
    """The vertebra id below ``v`` in anatomical order (T12 -> L1, or T13 if ``include_transitional``)."""
    order = [i for i in ANATOMICAL_ORDER if include_transitional or i not in (28, 25)]
    if v not in order:
        order = list(ANATOMICAL_ORDER)
    k = order.index(v)
    return order[k + 1] if k + 1 < len(order) else None


def check_semantic(mask: np.ndarray) -> None:
    """Raise ValueError if ``mask`` holds a value outside the semantic scheme."""
    present = np.unique(mask)
    bad = sorted(set(present.tolist()) - {0} - {int(x) for x in Semantic})
    if bad:
        raise ValueError(f"semantic mask holds labels outside the scheme: {bad}")


# ---------------------------------------------------------------- colour tables
#: Colours (RGB 0-255) in the spirit of TPTBox's/ITK-SNAP defaults: one distinct colour per semantic label.
SEMANTIC_COLOURS: dict[int, tuple[int, int, int]] = {
    41: (255, 140, 0),
    42: (255, 215, 0),
    43: (0, 160, 160),
    44: (0, 200, 200),
    45: (180, 0, 180),
    46: (220, 80, 220),
    47: (120, 60, 200),
    48: (160, 110, 240),
    49: (220, 40, 40),
    52: (40, 110, 255),
    53: (0, 60, 160),
    60: (250, 250, 250),
    61: (110, 200, 90),
    62: (70, 130, 255),
    100: (60, 220, 255),
    26: (150, 90, 40),
}


def instance_colour(instance_id: int) -> tuple[int, int, int]:
    """A deterministic, well-spread colour for an instance id (neighbouring vertebrae differ strongly)."""
    import colorsys

    base = instance_id % 100
    hue = (base * 0.618033988749895) % 1.0
    light = {0: 0.5, 1: 0.75, 2: 0.35}[min(instance_id // 100, 2)]
    r, g, b = colorsys.hls_to_rgb(hue, light, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def colour_table(kind: str = "semantic") -> list[tuple[int, str, tuple[int, int, int]]]:
    """Rows (label, name, rgb) of the semantic or instance scheme, sorted by label."""
    if kind == "semantic":
        return [(int(k), SEMANTIC_NAMES[k], SEMANTIC_COLOURS[int(k)]) for k in sorted(SEMANTIC_NAMES)]
    if kind == "instance":
        return [(i, instance_name(i), instance_colour(i)) for i in all_instance_ids()]
    raise ValueError(f"unknown colour table kind {kind!r} (semantic or instance)")


def export_colour_table(path: str | Path, kind: str = "semantic", fmt: str | None = None) -> Path:
    """Write a label colour table for ITK-SNAP (``fmt='itksnap'``, .txt) or 3D Slicer (``fmt='slicer'``, .ctbl).

    ``fmt`` defaults from the suffix: ``.ctbl`` -> slicer, anything else -> itksnap.
    """
    from spineps_like.io import atomic_write_text

    path = Path(path)
    fmt = fmt or ("slicer" if path.suffix == ".ctbl" else "itksnap")
    rows = colour_table(kind)
    if fmt == "itksnap":
        lines = [
            "################################################",
            "# ITK-SnAP Label Description File",
            "# Columns = Index R G B A VIS MSH LABEL",
            "################################################",
            '    0     0    0    0        0  0  0    "Clear Label"',
        ]
        lines += [f'{i:5d} {r:5d} {g:4d} {b:4d}        1  1  1    "{n}"' for i, n, (r, g, b) in rows]
    elif fmt == "slicer":
        lines = ["# Color table file (3D Slicer)", f"# {len(rows) + 1} values", "0 Background 0 0 0 0"]
        lines += [f"{i} {n.replace(' ', '_')} {r} {g} {b} 255" for i, n, (r, g, b) in rows]
    else:
        raise ValueError(f"unknown colour table format {fmt!r} (itksnap or slicer)")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def parse_colour_table(path: str | Path) -> dict[int, tuple[str, tuple[int, int, int]]]:
    """Read an ITK-SNAP or Slicer table written by :func:`export_colour_table` back into {label: (name, rgb)}."""
    import shlex

    out: dict[int, tuple[str, tuple[int, int, int]]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = shlex.split(line)
        idx = int(parts[0])
        if idx == 0:
            continue
        if len(parts) == 8:  # itksnap: idx r g b a vis msh "name"
            out[idx] = (parts[7], (int(parts[1]), int(parts[2]), int(parts[3])))
        else:  # slicer: idx name r g b a
            out[idx] = (parts[1].replace("_", " ") if parts[1].startswith(("IVD_", "Endplate_")) else parts[1],
                        (int(parts[2]), int(parts[3]), int(parts[4])))
    return out
