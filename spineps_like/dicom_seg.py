"""DICOM-SEG out: the semantic and instance masks of a scan read from DICOM, as DICOM Segmentation objects (highdicom).

Two files go beside the NIfTI masks, in one new series of the source study that references the source series:

- ``..._seg-spine_msk.dcm``: one segment per semantic label present, named as in
  :data:`spineps_like.labels.SEMANTIC_NAMES` ('Vertebra_Corpus_border', 'Spinal_Canal', ...);
- ``..._seg-vert_msk.dcm``: one segment per instance present, named by :func:`spineps_like.labels.instance_name`
  ('L1', 'IVD L1', 'Endplate L1', 'S1' for the sacrum).

Each segment carries a SNOMED CT property type (the vertebra's own code where SNOMED has one, e.g. L1 vertebra,
else the nearest structure: vertebra, vertebral column) in the category 'Anatomical structure', the algorithm
(spineps-like and its version) and the source images frame by frame (BINARY segmentation, empty frames left out).

>>> result = segment(load_scan("dicom/"), ...)                      # doctest: +SKIP
>>> write_dicom_seg(result, "out/")                                 # doctest: +SKIP
{'dicom_seg_semantic': PosixPath('out/sub-dicom_mod-img_seg-spine_msk.dcm'), 'dicom_seg_instance': ...}
>>> read_dicom_seg("out/sub-dicom_mod-img_seg-vert_msk.dcm", result.image)   # doctest: +SKIP
array(...)   # the instance mask again, on the scan's grid, with its ids
"""

from __future__ import annotations

import os
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from spineps_like.dicom import DicomSource
from spineps_like.io import Scan, ScanError, atomic_path, derivative_name, derivatives_dir
from spineps_like.labels import SEMANTIC_NAMES, instance_id, instance_name

#: output kind -> (seg entity of the file name, ContentLabel, SeriesDescription part)
KINDS = {"semantic": ("spine", "SPINE", "semantic"), "instance": ("vert", "VERT", "instances")}


class DicomSegError(ScanError):
    """A DICOM-SEG that cannot be made (the input is not DICOM, or its series cannot be referenced frame by frame)."""


def check_dicom_seg(scan: Scan, what: str = "--dicom-seg") -> DicomSource:
    """The scan's :class:`~spineps_like.dicom.DicomSource`, or a one-line :class:`DicomSegError` saying why no
    DICOM-SEG can reference it. Cheap: call it before any segmentation work."""
    src = getattr(scan, "source", None)
    name = scan.path if scan.path is not None else "image"
    if not isinstance(src, DicomSource):
        raise DicomSegError(f"{name}: {what} needs a DICOM input: a DICOM-SEG references the DICOM images it segments, "
                            "and this scan was not read from DICOM (give the folder of its DICOM series)")
    if src.enhanced and src.frame_order is None:
        raise DicomSegError(f"{src.folder}: {what}: the series is split over {len(src.datasets)} enhanced multi-frame "
                            "files; a DICOM-SEG references one enhanced file or a series of single images")
    try:
        import highdicom  # noqa: F401
    except ImportError:  # pragma: no cover - a dependency
        raise DicomSegError(f"{what}: highdicom is not installed (pip install highdicom)") from None
    return src


# ---------------------------------------------------------------- codes
def _sct(keyword: str):
    from pydicom.sr.codedict import codes

    return getattr(codes.SCT, keyword)


def _concept(code):
    """A highdicom CodedConcept of a pydicom Code, its meaning without SNOMED's ' (body structure)' tag (a meaning
    is at most 64 characters)."""
    import re

    from highdicom.sr import CodedConcept

    meaning = re.sub(r"\s*\([a-z ]+\)$", "", code.meaning)[:64]
    return CodedConcept(code.value, code.scheme_designator, meaning)


_SEMANTIC_CODES = {41: "ArchOfVertebra", 42: "SpinousProcessOfVertebra", 43: "TransverseProcessOrVertebra",
                   44: "TransverseProcessOrVertebra", 45: "SuperiorArticularProcessOfVertebra",
                   46: "SuperiorArticularProcessOfVertebra", 47: "InferiorArticularProcessOfVertebra",
                   48: "InferiorArticularProcessOfVertebra", 49: "Vertebra", 52: "Vertebra", 53: "Vertebra",
                   62: "Vertebra", 60: "SpinalCord", 61: "VertebralCanal", 100: "StructureOfVertebralColumn",
                   26: "Sacrum"}
_ORDINAL = {1: "First", 2: "Second", 3: "Third", 4: "Fourth", 5: "Fifth", 6: "Sixth", 7: "Seventh", 8: "Eighth",
            9: "Ninth", 10: "Tenth", 11: "Eleventh", 12: "Twelfth"}
_REGION = {"C": "Cervical", "T": "Thoracic", "L": "Lumbar"}


def _instance_code(value: int):
    from pydicom.sr.codedict import codes

    name = instance_name(value)
    base = name.split(" ", 1)[-1]
    if value == 26:
        return codes.SCT.Sacrum
    if value == 27:
        return codes.SCT.CoccygealVertebraStructure
    if name.startswith("IVD "):
        key = f"IntervertebralDiscStructureOf{_ORDINAL.get(int(base[1:]), '')}{_REGION.get(base[0], '')}Vertebra" \
            if base[1:].isdigit() else ""
        return getattr(codes.SCT, key) if key in codes.SCT.dir("IntervertebralDisc") else \
            codes.SCT.StructureOfVertebralColumn
    key = f"{base}Vertebra"
    return getattr(codes.SCT, key) if key in codes.SCT.dir(key) else codes.SCT.Vertebra


def _label_of(kind: str, value: int) -> str:
    return SEMANTIC_NAMES.get(value, str(value)) if kind == "semantic" else instance_name(value)


def _value_of(kind: str, label: str) -> int:
    if kind == "semantic":
        by_name = {v: k for k, v in SEMANTIC_NAMES.items()}
        if label not in by_name:
            raise ValueError(f"segment {label!r} is no semantic label of the scheme")
        return int(by_name[label])
    return instance_id(label)


def _descriptions(kind: str, values: list[int]) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from spineps_like import __version__

    algorithm = hd.AlgorithmIdentificationSequence(name="spineps-like", version=str(__version__),
                                                   family=codes.cid7162.ArtificialIntelligence)
    out = []
    for i, v in enumerate(values, start=1):
        code = _sct(_SEMANTIC_CODES.get(v, "Vertebra")) if kind == "semantic" else _instance_code(v)
        out.append(hd.seg.SegmentDescription(
            segment_number=i, segment_label=_label_of(kind, v),
            segmented_property_category=_concept(codes.SCT.AnatomicalStructure),
            segmented_property_type=_concept(code),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm))
    return out


# ---------------------------------------------------------------- writing
def seg_dataset(mask: Scan | np.ndarray, source: DicomSource, kind: str, *, series_uid: str, series_number: int,
                instance_number: int = 1):
    """One DICOM-SEG (a pydicom Dataset) of ``mask`` (on the source series' grid as loaded: column, row, slice), or
    None when the mask is empty."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    from spineps_like import __version__

    arr = np.asarray(mask.array if isinstance(mask, Scan) else mask)
    rows, cols = int(source.datasets[0].Rows), int(source.datasets[0].Columns)
    slices = len(source.frame_order) if source.frame_order is not None else len(source.datasets)
    if arr.shape != (cols, rows, slices):
        raise DicomSegError(f"{source.folder}: a mask of shape {arr.shape} is not on the grid of the DICOM series "
                            f"({cols} x {rows} x {slices})")
    values = [int(v) for v in np.unique(arr) if v != 0]
    if not values:
        return None
    lut = np.zeros(max(values) + 1, np.uint16)
    lut[values] = np.arange(1, len(values) + 1)
    frames = lut[arr].transpose(2, 1, 0)  # (slice, row, column)
    if source.frame_order is not None:  # an enhanced file: SEG frame f is the source's frame f
        by_frame = np.empty_like(frames)
        by_frame[np.asarray(source.frame_order)] = frames
        frames = by_frame
    entity, content_label, what = KINDS[kind]
    ref = source.series
    desc = f"spineps-like {what}" + (f" of {ref.description}" if ref.description else "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = hd.seg.Segmentation(
            source_images=source.datasets, pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_descriptions(kind, values), series_instance_uid=series_uid,
            series_number=series_number, sop_instance_uid=generate_uid(), instance_number=instance_number,
            manufacturer="spineps-like", manufacturer_model_name="spineps-like", software_versions=str(__version__),
            device_serial_number="none", content_label=content_label, content_description=desc[:64],
            series_description=desc[:64])
    return seg


def dicom_seg_datasets(result: Any) -> dict[str, Any]:
    """{'dicom_seg_semantic': Dataset, 'dicom_seg_instance': Dataset} for a
    :class:`~spineps_like.pipeline.SegmentResult` of a DICOM input (a mask without any label gives no file)."""
    from pydicom.uid import generate_uid

    source = check_dicom_seg(result.image)
    series_uid = generate_uid()
    number = (source.series.number or 0) % 1000 + 1000
    out: dict[str, Any] = {}
    for i, (kind, mask) in enumerate((("semantic", result.semantic), ("instance", result.instance)), start=1):
        if mask is None:
            continue
        ds = seg_dataset(mask, source, kind, series_uid=series_uid, series_number=number, instance_number=i)
        if ds is not None:
            out[f"dicom_seg_{kind}"] = ds
    return out


def dicom_seg_paths(result: Any, out_dir: str | os.PathLike | None = None, *,
                    name_from: str | os.PathLike | None = None) -> dict[str, Path]:
    """Where :func:`write_dicom_seg` writes (beside ``SegmentResult.save``'s files for the same arguments)."""
    src = Path(name_from or result.image.path or "scan")
    folder = Path(out_dir) if out_dir is not None else derivatives_dir(src)
    return {f"dicom_seg_{kind}": folder / derivative_name(src, entity, "msk", ".dcm")
            for kind, (entity, _, _) in KINDS.items()}


def write_dicom_seg(result: Any, out_dir: str | os.PathLike | None = None, *,
                    name_from: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write the DICOM-SEG files of a segmentation of a DICOM input, all or nothing (atomic renames at the end);
    returns {kind: path}. Raises :class:`DicomSegError` when the input was not DICOM."""
    with ExitStack() as stack:
        return _stage_segs(stack, result, out_dir, name_from)


def _stage_segs(stack: ExitStack, result: Any, out_dir: str | os.PathLike | None,
                name_from: str | os.PathLike | None) -> dict[str, Path]:
    """Build the DICOM-SEG datasets and write them to temporary names that ``stack`` renames into place when it
    closes without an error; returns {kind: final path}."""
    datasets = dicom_seg_datasets(result)
    paths = {k: p for k, p in dicom_seg_paths(result, out_dir, name_from=name_from).items() if k in datasets}
    for k, p in paths.items():
        tmp = stack.enter_context(atomic_path(p))
        datasets[k].save_as(str(tmp), enforce_file_format=True)
    return paths


def save_with_dicom_seg(result: Any, out_dir: str | os.PathLike | None = None, *,
                        name_from: str | os.PathLike | None = None, **save_kwargs: Any) -> dict[str, Path]:
    """``result.save(...)`` and the DICOM-SEG files, all or nothing: the SEGs are built first (an error there writes
    nothing), then every file is renamed into place together."""
    with ExitStack() as stack:
        paths = _stage_segs(stack, result, out_dir, name_from)
        saved = result.save(out_dir, name_from=name_from, **save_kwargs)
    return {**saved, **paths}


# ---------------------------------------------------------------- reading back
def read_dicom_seg(path: str | os.PathLike, scan: Scan) -> np.ndarray:
    """A DICOM-SEG written by :func:`write_dicom_seg` as a label mask on ``scan``'s grid (the DICOM input it
    references), with the semantic labels or instance ids its segment names stand for (highdicom reads it)."""
    import highdicom as hd

    source = check_dicom_seg(scan, what="read_dicom_seg")
    seg = hd.seg.segread(str(path))
    kind = "instance" if str(seg.get("ContentLabel", "")) == KINDS["instance"][1] else "semantic"
    values = {int(s.SegmentNumber): _value_of(kind, str(s.SegmentLabel)) for s in seg.SegmentSequence}
    if source.frame_order is not None:
        uid = str(source.datasets[0].SOPInstanceUID)
        planes = seg.get_pixels_by_source_frame(uid, [f + 1 for f in source.frame_order], combine_segments=True,
                                                relabel=False)
    else:
        planes = seg.get_pixels_by_source_instance([str(d.SOPInstanceUID) for d in source.datasets],
                                                   combine_segments=True, relabel=False)
    lut = np.zeros(max(values) + 1 if values else 1, np.int32)
    for number, value in values.items():
        lut[number] = value
    out = lut[np.asarray(planes)].transpose(2, 1, 0)
    return out.astype(np.int16 if out.max(initial=0) < 32768 else np.int32)
