"""DICOM in: a folder of DICOM series (classic single-frame images or enhanced multi-frame files) as a :class:`Scan`.

:func:`spineps_like.io.load_scan` calls :func:`load_dicom` for a folder (or a single ``.dcm``/DICOM file), so a DICOM
series is an input wherever a NIfTI is. Files are read with pydicom; geometry is taken from the images themselves:

- **which files:** every file under the folder (recursively, hidden files skipped) that carries the DICOM preamble
  ('DICM' at byte 128). Other files (text, thumbnails, a file without preamble) are skipped, as are DICOM files without
  pixels (DICOMDIR, reports) and non-image objects (SEG, RTSTRUCT, presentation states, key objects). A file with the
  preamble that cannot be parsed is an error naming it, whichever series it belongs to.
- **which series:** images are grouped by SeriesInstanceUID. One series is taken as is; several need ``series=``
  (``--series``): a SeriesInstanceUID, a SeriesNumber or a SeriesDescription (case-insensitive). Without it the error
  lists the series.
- **slice order:** ImagePositionPatient projected on the slice normal (ImageOrientationPatient's row x column
  direction), ascending; neither the file order nor InstanceNumber is used. The array's axes are (column, row, slice),
  as dcm2niix and ITK lay them out, and the affine maps them to RAS (DICOM's LPS with x and y negated).
- **spacing:** in-plane from PixelSpacing; between slices from the positions (first to last over the slice count), not
  from SliceThickness or SpacingBetweenSlices.
- **values:** the modality transform of each image (RescaleSlope/RescaleIntercept or a Modality LUT; per frame from
  the functional groups of an enhanced file) is applied, so CT is in HU. VOI windows and presentation LUTs are not.

Refused, each with one line naming the folder or file and the problem (:class:`~spineps_like.io.ScanError`): an
empty folder, a folder without DICOM images, a damaged DICOM file, several series without ``series=`` or a selection
that matches none or several, images without position, orientation or pixel spacing, images of different sizes or
pixel spacings, mixed slice orientations, two images at one position (echoes, time points), a gantry tilt (slices
shifted within their plane from one to the next; refused, not resampled), a missing slice (a gap in the positions) and
otherwise non-uniform slice spacing, colour images, and pixel data that cannot be decoded or is truncated.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from spineps_like.io import Scan, ScanError, _plain, max_voxels

#: Modalities of DICOM objects that hold no image to segment (they are skipped when a folder is read).
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG",
                                  "DOC", "FID", "PLAN", "RWV"})
#: Slice orientations: direction cosines of two images differ by at most this to count as one orientation.
ORIENTATION_TOL = 1e-4
#: Two slices closer than this (mm, along the normal) share a position.
DUPLICATE_TOL_MM = 1e-3
#: Slice spacing is uniform when every step is within ``SPACING_RTOL * median + SPACING_ATOL_MM`` of the median step
#: (positions are stored as decimal strings, often rounded to 0.01 mm).
SPACING_RTOL = 0.01
SPACING_ATOL_MM = 0.01
#: A stack is tilted (sheared) when a slice's position drifts more than this fraction of the smallest pixel spacing
#: within the slice plane, away from the line through the first slice along the normal.
TILT_TOL_PIXELS = 0.05


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found in a folder."""

    uid: str
    number: int | None
    description: str
    modality: str
    images: int  # files
    frames: int  # images, or frames of enhanced files
    enhanced: bool

    def describe(self) -> str:
        """'series 3 "T2 SAG" (MR, 20 images, UID 1.2.3)'."""
        num = f"series {self.number}" if self.number is not None else "series (no number)"
        what = f"{self.frames} frames in {self.images} enhanced file{'s' if self.images != 1 else ''}" if self.enhanced \
            else f"{self.images} image{'s' if self.images != 1 else ''}"
        desc = f' "{self.description}"' if self.description else ""
        return f"{num}{desc} ({self.modality or 'no modality'}, {what}, UID {self.uid})"


@dataclass
class DicomSource:
    """Where a :class:`Scan` loaded from DICOM came from (``Scan.source``): what a DICOM-SEG needs to reference it.

    ``datasets`` are the series' headers (pixel data not loaded), in slice order (the array's third axis) for classic
    images; for an enhanced file, the one dataset and ``frame_order[k]``, the (0-based) frame at slice ``k``.
    """

    folder: Path
    series: SeriesInfo
    datasets: list[Any]
    files: list[Path]
    frame_order: list[int] | None = None
    #: every series the folder holds (several: outputs are named after the chosen one)
    all_series: list[SeriesInfo] = field(default_factory=list)

    @property
    def enhanced(self) -> bool:
        return self.series.enhanced


def _pydicom():
    import pydicom

    return pydicom


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True for a file with the DICOM preamble ('DICM' at byte 128); False for anything else, unreadable included."""
    try:
        from pydicom.misc import is_dicom

        return bool(is_dicom(path))
    except (OSError, ValueError):
        return False


def dicom_files(folder: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(DICOM files, other files) under ``folder``, recursively, sorted; hidden files and folders are skipped."""
    folder = Path(folder)
    found, other = [], []

    def onerror(e: OSError) -> None:
        if isinstance(e, PermissionError):
            raise ScanError(f"{e.filename or folder}: permission denied (the folder cannot be read)")
        raise ScanError(f"{e.filename or folder}: cannot be read ({e.strerror or e})")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=onerror):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            p = Path(dirpath) / f
            (found if p.is_file() and is_dicom_file(p) else other).append(p)
    return found, other


def _read_header(path: Path):
    pydicom = _pydicom()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's notes on odd values: not the user's problem here
            return pydicom.dcmread(str(path), stop_before_pixels=True)
    except PermissionError:
        raise ScanError(f"{path}: permission denied (no read permission for this user)") from None
    except Exception as e:
        raise ScanError(f"{path}: damaged DICOM file: its header cannot be read ({_plain(e)})") from None


_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


def _is_image(path: Path, ds) -> bool:
    """True for an image to read; False for a DICOM object without one (DICOMDIR, SEG, SR, raw data, ...); a
    :class:`ScanError` for a file whose header is not readable (pydicom may parse a damaged file to nothing)."""
    meta = getattr(ds, "file_meta", None)
    sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    if "DirectoryRecordSequence" in ds or str(sop or "") == _DICOMDIR_SOP_CLASS:
        return False
    if not sop:
        raise ScanError(f"{path}: damaged DICOM file: its header cannot be read (no SOP Class UID found)")
    if str(ds.get("Modality", "")).upper() in NON_IMAGE_MODALITIES:
        return False
    return "Rows" in ds and "Columns" in ds


def _is_enhanced(ds) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds


def _int_or_none(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _series_info(uid: str, datasets: Sequence[Any]) -> SeriesInfo:
    ds = datasets[0]
    enhanced = any(_is_enhanced(d) for d in datasets)
    frames = sum(_int_or_none(d.get("NumberOfFrames")) or 1 for d in datasets)
    return SeriesInfo(uid=uid, number=_int_or_none(ds.get("SeriesNumber")),
                      description=str(ds.get("SeriesDescription", "") or "").strip(),
                      modality=str(ds.get("Modality", "") or ""), images=len(datasets), frames=frames,
                      enhanced=enhanced)


def _scan_folder(path: Path) -> tuple[dict[str, list[tuple[Path, Any]]], list[Path], list[Path]]:
    """({series uid: [(file, header)]}, DICOM files, other files) of a folder or a single file."""
    if path.is_dir():
        files, other = dicom_files(path)
    else:
        files, other = ([path], []) if is_dicom_file(path) else ([], [path])
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for f in files:
        ds = _read_header(f)
        if not _is_image(f, ds):
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        groups.setdefault(uid, []).append((f, ds))
    return groups, files, other


def _sort_key(info: SeriesInfo) -> tuple:
    return (info.number is None, info.number or 0, info.description, info.uid)


def list_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """The DICOM image series under ``folder``, by SeriesNumber."""
    groups, _, _ = _scan_folder(Path(folder))
    return sorted((_series_info(uid, [d for _, d in items]) for uid, items in groups.items()), key=_sort_key)


def _listing(infos: Sequence[SeriesInfo]) -> str:
    return "; ".join(i.describe() for i in infos)


def _select(where: Path, groups: dict[str, list[tuple[Path, Any]]], series: str | int | None):
    infos = {uid: _series_info(uid, [d for _, d in items]) for uid, items in groups.items()}
    ordered = sorted(infos.values(), key=_sort_key)
    if series is None or str(series).strip() == "":
        if len(infos) == 1:
            return next(iter(infos)), ordered
        raise ScanError(f"{where}: holds {len(infos)} DICOM series; choose one with --series (API: series=) by its "
                        f"number, description or UID: {_listing(ordered)}")
    s = str(series).strip()
    hits = [i for i in ordered if i.uid == s]
    if not hits and s.lstrip("+-").isdigit():
        hits = [i for i in ordered if i.number == int(s)]
    if not hits:
        hits = [i for i in ordered if i.description.casefold() == s.casefold()]
    if not hits:
        raise ScanError(f"{where}: no DICOM series matches --series {s!r} (a SeriesInstanceUID, SeriesNumber or "
                        f"SeriesDescription); the folder holds: {_listing(ordered)}")
    if len(hits) > 1:
        raise ScanError(f"{where}: --series {s!r} matches {len(hits)} DICOM series; give the UID: {_listing(hits)}")
    return hits[0].uid, ordered


# ---------------------------------------------------------------- geometry
@dataclass
class _Frame:
    file: Path
    ds: Any
    frame: int | None  # 0-based frame of an enhanced file; None for a classic image
    position: np.ndarray | None
    orientation: np.ndarray | None
    spacing: np.ndarray | None

    def where(self) -> str:
        return f"{self.file} (frame {self.frame + 1})" if self.frame is not None else str(self.file)


def _floats(v, n: int) -> np.ndarray | None:
    if v is None:
        return None
    try:
        a = np.array([float(x) for x in v], dtype=float)
    except (TypeError, ValueError):
        return None
    return a if a.shape == (n,) and np.all(np.isfinite(a)) else None


def _group_value(item, shared, sequence: str, keyword: str):
    for fg in (item, shared):
        if fg is not None and sequence in fg and len(fg[sequence].value):
            v = fg[sequence].value[0].get(keyword)
            if v is not None:
                return v
    return None


def _frames(items: Sequence[tuple[Path, Any]]) -> list[_Frame]:
    frames: list[_Frame] = []
    kinds = {_is_enhanced(ds) for _, ds in items}
    if len(kinds) > 1:
        raise ScanError(f"{items[0][0].parent}: series {items[0][1].get('SeriesInstanceUID', '')} mixes enhanced "
                        "multi-frame files and single images; not one 3D volume")
    for f, ds in items:
        if _is_enhanced(ds):
            shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
            for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
                frames.append(_Frame(
                    f, ds, i,
                    _floats(_group_value(item, shared, "PlanePositionSequence", "ImagePositionPatient"), 3),
                    _floats(_group_value(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                    _floats(_group_value(item, shared, "PixelMeasuresSequence", "PixelSpacing"), 2)))
        else:
            n = _int_or_none(ds.get("NumberOfFrames")) or 1
            if n > 1:
                raise ScanError(f"{f}: a multi-frame image without per-frame geometry (not an enhanced CT/MR image); "
                                "its frames cannot be placed in 3D")
            frames.append(_Frame(f, ds, None, _floats(ds.get("ImagePositionPatient"), 3),
                                 _floats(ds.get("ImageOrientationPatient"), 6), _floats(ds.get("PixelSpacing"), 2)))
    return frames


def _axis_name(v: np.ndarray) -> str:
    """The patient direction (LPS letters) a unit vector is closest to, e.g. 'L' or 'P'."""
    i = int(np.argmax(np.abs(v)))
    return "LPS"[i] if v[i] > 0 else "RAI"[i]


def _plane_name(iop: np.ndarray) -> str:
    n = np.cross(iop[:3], iop[3:])
    return {0: "sagittal", 1: "coronal", 2: "axial"}[int(np.argmax(np.abs(n)))] + \
        f" (rows {_axis_name(iop[:3])}, columns {_axis_name(iop[3:])})"


def _geometry(label: str, frames: list[_Frame]) -> tuple[list[int], np.ndarray]:
    """(order: the frames' indices along the slice normal, ascending; the RAS affine of (column, row, slice))."""
    for what, attr, tag in (("position", "position", "ImagePositionPatient"),
                            ("orientation", "orientation", "ImageOrientationPatient"),
                            ("pixel spacing", "spacing", "PixelSpacing")):
        bad = [fr for fr in frames if getattr(fr, attr) is None]
        if bad:
            raise ScanError(f"{bad[0].where()}: no usable {tag} (the image's {what} in the patient is unknown); not a "
                            f"cross-sectional image that can be placed in 3D (a localizer, screen capture or "
                            f"secondary capture?)")
    sizes = Counter((int(fr.ds.Rows), int(fr.ds.Columns)) for fr in frames)
    if len(sizes) > 1:
        desc = ", ".join(f"{n} of {r} x {c}" for (r, c), n in sizes.most_common())
        raise ScanError(f"{label}: images of different sizes ({desc} pixels); not one 3D volume")
    iop0 = frames[0].orientation
    groups: list[tuple[np.ndarray, int]] = []
    for fr in frames:
        for i, (o, n) in enumerate(groups):
            if np.max(np.abs(fr.orientation - o)) <= ORIENTATION_TOL:
                groups[i] = (o, n + 1)
                break
        else:
            groups.append((fr.orientation, 1))
    if len(groups) > 1:
        desc = ", ".join(f"{n} {_plane_name(o)}" for o, n in sorted(groups, key=lambda g: -g[1]))
        raise ScanError(f"{label}: mixed slice orientations ({desc}); a 3D volume has one orientation (a localizer "
                        "series?)")
    row, col = iop0[:3], iop0[3:]
    if (abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3
            or abs(float(row @ col)) > 1e-3):
        raise ScanError(f"{label}: ImageOrientationPatient {list(iop0)} is not two perpendicular unit vectors")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    spacings = np.array([fr.spacing for fr in frames])
    if np.any(spacings <= 0):
        raise ScanError(f"{label}: PixelSpacing {list(spacings[np.any(spacings <= 0, axis=1)][0])} mm; pixel sizes "
                        "must be positive")
    if np.max(np.abs(spacings - spacings[0])) > 1e-4 * max(1.0, float(spacings[0].max())):
        raise ScanError(f"{label}: images with different pixel spacings (from {list(spacings.min(axis=0))} to "
                        f"{list(spacings.max(axis=0))} mm); not one 3D volume")
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    pos = np.array([fr.position for fr in frames])
    d = pos @ normal
    order = [int(i) for i in np.argsort(d, kind="stable")]
    ds_ = d[order]
    n = len(frames)
    if n == 1:
        raise ScanError(f"{label}: a single image (one slice); a 2D image cannot be segmented in 3D (give the folder "
                        "holding the whole series)")
    steps = np.diff(ds_)
    dup = np.flatnonzero(steps < DUPLICATE_TOL_MM)
    if dup.size:
        a, b = frames[order[dup[0]]], frames[order[dup[0] + 1]]
        positions = n - dup.size
        raise ScanError(f"{label}: {n} images at only {positions} slice positions (e.g. {a.where()} and {b.where()} "
                        f"both at {ds_[dup[0]]:.2f} mm along the slice normal): several echoes, time points or repeats "
                        "in one series, not one 3D volume")
    pixel = float(spacings[0].min())
    drift = (pos[order] - np.outer(ds_, normal)) - (pos[order[0]] - ds_[0] * normal)
    off = np.linalg.norm(drift, axis=1)
    if off.max() > TILT_TOL_PIXELS * pixel:
        angle = float(np.degrees(np.arctan2(off[-1], ds_[-1] - ds_[0])))
        tilt_tag = frames[0].ds.get("GantryDetectorTilt")
        tag = f"; GantryDetectorTilt {float(tilt_tag):g} degrees" if tilt_tag not in (None, "") else ""
        raise ScanError(f"{label}: gantry tilt: the slices shift {off.max():.2f} mm within their plane across the stack "
                        f"(the stack leans {angle:.2f} degrees off the slice normal{tag}); tilted stacks are refused, "
                        "not resampled: resample the series to a stack perpendicular to its slices first")
    med = float(np.median(steps))
    tol = SPACING_RTOL * med + SPACING_ATOL_MM
    off_steps = np.flatnonzero(np.abs(steps - med) > tol)
    if off_steps.size:
        i = int(off_steps[np.argmax(steps[off_steps])])
        a, b = frames[order[i]], frames[order[i + 1]]
        ratio = steps[i] / med
        if ratio > 1.5 and abs(ratio - round(ratio)) * med <= tol * round(ratio) and \
                np.all(np.abs(np.delete(steps, off_steps) - med) <= tol):
            missing = int(sum(round(steps[j] / med) - 1 for j in off_steps))
            raise ScanError(f"{label}: missing slice{'s' if missing != 1 else ''}: a gap of {steps[i]:.2f} mm between "
                            f"{a.where()} and {b.where()} ({ds_[i]:.2f} and {ds_[i + 1]:.2f} mm along the slice "
                            f"normal) where the other slices are {med:.2f} mm apart; {missing} slice"
                            f"{'s are' if missing != 1 else ' is'} missing from the series (an incomplete transfer?)")
        raise ScanError(f"{label}: non-uniform slice spacing: steps from {steps.min():.2f} to {steps.max():.2f} mm "
                        f"along the slice normal (e.g. {steps[i]:.2f} mm between {a.where()} and {b.where()}); "
                        "refused, not resampled: a 3D volume needs evenly spaced slices")
    step = (ds_[-1] - ds_[0]) / (n - 1)
    lps = np.eye(4)
    lps[:3, 0] = row * spacings[0][1]  # along a row: the column index; PixelSpacing[1] is the column spacing
    lps[:3, 1] = col * spacings[0][0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = pos[order[0]]
    return order, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


# ---------------------------------------------------------------- pixels
def _read_pixels(path: Path):
    """(dataset, stored pixel array) of one file; refuses colour images, missing, truncated or undecodable pixels."""
    pydicom = _pydicom()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path))
    except PermissionError:
        raise ScanError(f"{path}: permission denied (no read permission for this user)") from None
    except MemoryError:
        raise ScanError(f"{path}: not enough memory to load it") from None
    except Exception as e:
        raise ScanError(f"{path}: damaged DICOM file: it cannot be read ({_plain(e)})") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ScanError(f"{path}: DICOM image without pixel data")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if spp != 1 or not photometric.startswith("MONOCHROME"):
        raise ScanError(f"{path}: a colour image ({photometric}, {spp} samples per pixel); a scan must be a "
                        "single-channel greyscale image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except MemoryError:
        raise ScanError(f"{path}: not enough memory to load it") from None
    except Exception as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if ts is not None and ts.is_compressed:
            try:
                from pydicom.pixels import get_decoder

                available = get_decoder(ts).is_available
            except Exception:
                available = False
            if not available:
                raise ScanError(f"{path}: pixel data compressed as {ts.name}, which this installation cannot decode; "
                                "install pylibjpeg with its plugins (pip install pylibjpeg pylibjpeg-libjpeg "
                                "pylibjpeg-openjpeg) or convert the series to uncompressed DICOM") from None
        raise ScanError(f"{path}: damaged DICOM file: its pixel data cannot be read ({_plain(e)})") from None
    return ds, arr


def _rescale(arr: np.ndarray, ds, item=None, shared=None) -> np.ndarray:
    """Stored values -> modality values (e.g. HU): a classic image's own RescaleSlope/Intercept or Modality LUT
    (pydicom), an enhanced frame's Pixel Value Transformation functional group."""
    if item is None and shared is None:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    slope = _group_value(item, shared, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _group_value(item, shared, "PixelValueTransformationSequence", "RescaleIntercept")
    if slope is None and intercept is None:
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    out = arr.astype(np.float64)
    if slope is not None:
        out *= float(slope)
    if intercept is not None:
        out += float(intercept)
    return out


def _volume(frames: list[_Frame], order: list[int]) -> np.ndarray:
    rows, cols = int(frames[0].ds.Rows), int(frames[0].ds.Columns)
    vol = np.empty((cols, rows, len(frames)), np.float32)
    cache: dict[Path, tuple[Any, np.ndarray]] = {}
    for k, i in enumerate(order):
        fr = frames[i]
        if fr.frame is None:
            ds, arr = _read_pixels(fr.file)
            plane = _rescale(arr, ds)
        else:
            if fr.file not in cache:
                cache = {fr.file: _read_pixels(fr.file)}  # one enhanced file at a time
            ds, arr = cache[fr.file]
            nframes = _int_or_none(ds.get("NumberOfFrames")) or 1
            arr3 = arr.reshape((nframes, *arr.shape[-2:])) if arr.ndim == 2 else arr
            if arr3.shape[0] != nframes:
                raise ScanError(f"{fr.file}: holds {arr3.shape[0]} frames of pixel data, its header says {nframes}")
            shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
            plane = _rescale(arr3[fr.frame], ds, ds.PerFrameFunctionalGroupsSequence[fr.frame], shared)
        if plane.shape != (rows, cols):
            raise ScanError(f"{fr.where()}: pixel data of {plane.shape[0]} x {plane.shape[1]} pixels, its header "
                            f"says {rows} x {cols}")
        vol[:, :, k] = plane.T
    return vol


# ---------------------------------------------------------------- the entry point
def load_dicom(path: str | os.PathLike, *, series: str | int | None = None) -> Scan:
    """Load one DICOM series from a folder (or one enhanced multi-frame file) as a float32 :class:`Scan` on the
    series' own grid, with ``Scan.source`` a :class:`DicomSource`. See the module's notes for what is read and what is
    refused (:class:`~spineps_like.io.ScanError`, one line naming the folder or file)."""
    p = Path(path)
    if p.is_dir():
        try:
            with os.scandir(p) as it:
                empty = next(it, None) is None
        except PermissionError:
            raise ScanError(f"{p}: permission denied (the folder cannot be read)") from None
        if empty:
            raise ScanError(f"{p}: empty folder: no DICOM files (nor any other file) in it")
    groups, files, other = _scan_folder(p)
    if not files:
        if p.is_file():
            raise ScanError(f"{p}: not a DICOM file (no 'DICM' preamble)")
        eg = ", ".join(x.name for x in other[:3]) + (", ..." if len(other) > 3 else "")
        raise ScanError(f"{p}: no DICOM files in this folder ({len(other)} other file{'s' if len(other) != 1 else ''}: "
                        f"{eg}; DICOM files start with the 'DICM' preamble)" if other else
                        f"{p}: no DICOM files in this folder (only hidden files or empty subfolders)")
    if not groups:
        raise ScanError(f"{p}: {len(files)} DICOM file{'s' if len(files) != 1 else ''} but no image series (only "
                        "DICOMDIR, reports, segmentations or other objects without pixels)")
    uid, ordered = _select(p, groups, series)
    items = groups[uid]
    info = next(i for i in ordered if i.uid == uid)
    label = f"{p}: {info.describe()}" if p.is_dir() else str(p)
    if not uid:
        raise ScanError(f"{p}: images without a SeriesInstanceUID; they cannot be grouped into a series")
    frames = _frames(items)
    n = len(frames) * int(frames[0].ds.Rows) * int(frames[0].ds.Columns)
    if n > max_voxels():
        raise ScanError(f"{label}: {len(frames)} images of {int(frames[0].ds.Rows)} x {int(frames[0].ds.Columns)} = "
                        f"{n:,} voxels, more than the {max_voxels():,} this tool reads")
    order, affine = _geometry(label, frames)
    vol = _volume(frames, order)
    if frames[0].frame is None:  # classic images: one per slice, in slice order
        source = DicomSource(p, info, [frames[i].ds for i in order], [frames[i].file for i in order], None, ordered)
    elif len(items) == 1:  # one enhanced file: the frame at each slice
        source = DicomSource(p, info, [items[0][1]], [items[0][0]], [frames[i].frame for i in order], ordered)
    else:  # several enhanced files of one series (rare): no per-slice reference
        source = DicomSource(p, info, [ds for _, ds in items], [f for f, _ in items], None, ordered)
    return Scan(vol, affine, p, source)


def output_name(scan: Scan) -> Path:
    """The path derivative names are made from: the folder itself, or, when the folder holds several series, the
    folder with the chosen series' number added (``dicom`` -> ``dicom-series3``; a BIDS-named folder
    ``sub-01_ses-1_T2w`` -> ``sub-01_ses-1_acq-series3_T2w``), so two series of one folder never share outputs."""
    src = getattr(scan, "source", None)
    p = Path(scan.path) if scan.path is not None else Path("scan")
    if not isinstance(src, DicomSource) or len(src.all_series) < 2:
        return p
    from spineps_like.io import split_bids_name

    tag = f"series{src.series.number}" if src.series.number is not None else \
        "series" + "".join(ch for ch in src.series.uid if ch.isalnum())[-8:]
    entities, suffix = split_bids_name(p)
    if any(k == "sub" for k, _ in entities):
        ents = [f"{k}-{v}" for k, v in entities if k != "acq"] + [f"acq-{tag}"]
        return p.with_name("_".join(ents + ([suffix] if suffix else [])))
    return p.with_name(f"{p.name}-{tag}")
