"""Scan I/O: read NIfTI / MetaImage into a :class:`Scan`, atomic writes, BIDS derivative names.

A :class:`Scan` is the one object that carries geometry: a 3D numpy array plus its voxel-to-world affine
(NIfTI convention, RAS+ world). Everything downstream works on bare arrays of a known orientation and spacing.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MHA_SUFFIXES = (".mha", ".mhd")


class ScanError(ValueError):
    """A scan file that cannot be used; the message is one line naming the file and the problem."""


@dataclass
class Scan:
    """A 3D image or mask with its voxel-to-world affine (RAS+, as in NIfTI)."""

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes."""
        return tuple(float(s) for s in nib.affines.voxel_sizes(self.affine))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Three-letter axis codes (nibabel: the direction each axis points to), e.g. 'PIR'."""
        return "".join(nib.aff2axcodes(self.affine))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    def with_array(self, array: np.ndarray) -> "Scan":
        """A scan on the same grid holding ``array``."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the grid {self.array.shape}")
        return Scan(array, self.affine.copy(), self.path)

    def to_nifti(self, dtype: np.dtype | type | None = None) -> nib.Nifti1Image:
        arr = self.array if dtype is None else self.array.astype(dtype, copy=False)
        img = nib.Nifti1Image(arr, self.affine)
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        return img


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in NIFTI_SUFFIXES + MHA_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _lps_to_ras_affine(direction: np.ndarray, spacing: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """SimpleITK geometry (LPS world, array in x,y,z index order) as a NIfTI RAS affine."""
    aff = np.eye(4)
    aff[:3, :3] = direction.reshape(3, 3) * spacing[None, :]
    aff[:3, 3] = origin
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ aff


def load_scan(path: str | os.PathLike, *, kind: str = "image") -> Scan:
    """Load a 3D NIfTI (.nii, .nii.gz) or MetaImage (.mha, .mhd) file.

    The array keeps the file's voxel order (x, y, z index order, as nibabel gives it); MetaImage geometry is
    converted from ITK's LPS to RAS so both formats give the same array and affine for the same image.
    ``kind='mask'`` keeps integer data as integers; images are returned as float32.

    Raises :class:`ScanError` with a one-line message for a missing or unreadable file, a non-3D image,
    a zero-sized axis, or NaN/inf values.
    """
    p = Path(path)
    if not p.exists():
        raise ScanError(f"{p}: no such file")
    if p.is_dir():
        raise ScanError(f"{p}: is a folder, not an image file")
    suffix = _suffix(p)
    try:
        if suffix in NIFTI_SUFFIXES:
            img = nib.load(str(p))
            shape = tuple(img.shape)
            if 0 in shape:
                raise ScanError(f"{p}: image has a zero-sized axis, shape {shape}")
            if len(shape) == 4 and shape[3] == 1:
                arr = np.asarray(img.dataobj)[..., 0]
            else:
                arr = np.asanyarray(img.dataobj)
            affine = np.asarray(img.affine, dtype=float)
        elif suffix in MHA_SUFFIXES:
            import SimpleITK as sitk

            img = sitk.ReadImage(str(p))
            if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
                raise ScanError(
                    f"{p}: expected a 3D single-channel image, got {img.GetDimension()}D "
                    f"with {img.GetNumberOfComponentsPerPixel()} components"
                )
            arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # z,y,x -> x,y,z
            affine = _lps_to_ras_affine(
                np.array(img.GetDirection()), np.array(img.GetSpacing()), np.array(img.GetOrigin())
            )
        else:
            raise ScanError(f"{p}: unsupported file type {suffix or '(none)'!r}; use .nii, .nii.gz, .mha or .mhd")
    except ScanError:
        raise
    except Exception as e:  # nibabel / ITK errors are long and varied: one line naming the file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ScanError(f"{p}: not a readable image ({msg})") from None
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ScanError(f"{p}: expected a 3D image, got {arr.ndim}D with shape {tuple(arr.shape)}")
    if 0 in arr.shape:
        raise ScanError(f"{p}: image has a zero-sized axis, shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ScanError(f"{p}: invalid (singular or non-finite) voxel-to-world affine")
    if kind == "mask":
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.isfinite(arr)):
                raise ScanError(f"{p}: mask holds NaN or inf values")
            if not np.all(arr == np.round(arr)):
                raise ScanError(f"{p}: mask holds non-integer values")
        arr = arr.astype(np.int32 if arr.max(initial=0) > 32767 else np.int16, copy=False)
    else:
        arr = arr.astype(np.float32, copy=False)
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise ScanError(f"{p}: image holds {bad} NaN/inf voxels")
    return Scan(arr, affine, p)


# ---------------------------------------------------------------- atomic writes
@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed.

    The temporary name keeps the final suffix (so writers that dispatch on it, like nibabel, work) and starts
    with a dot so that an interrupted write never leaves a file under the real name.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(final) or final.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".part{suffix}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; final files get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def json_safe(obj: object) -> object:
    """``obj`` with numpy scalars/arrays as Python numbers/lists, paths as strings, dict keys as strings, NaN as
    None and +-inf as "inf"/"-inf": strict JSON that any reader (not only Python's) accepts."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        if f != f:
            return None
        if f in (float("inf"), float("-inf")):
            return "inf" if f > 0 else "-inf"
        return f
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def atomic_write_json(path: str | os.PathLike, obj: object) -> Path:
    """Write ``obj`` as indented strict JSON (see :func:`json_safe`), atomically."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def save_scan(scan: Scan, path: str | os.PathLike, *, dtype: np.dtype | type | None = None) -> Path:
    """Write ``scan`` atomically as NIfTI (.nii/.nii.gz) or MetaImage (.mha)."""
    p = Path(path)
    suffix = _suffix(p)
    with atomic_path(p) as tmp:
        if suffix in NIFTI_SUFFIXES:
            nib.save(scan.to_nifti(dtype), str(tmp))
        elif suffix in MHA_SUFFIXES:
            import SimpleITK as sitk

            arr = scan.array if dtype is None else scan.array.astype(dtype, copy=False)
            img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
            lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ scan.affine
            spacing = np.linalg.norm(lps[:3, :3], axis=0)
            img.SetSpacing(spacing.tolist())
            img.SetDirection((lps[:3, :3] / spacing[None, :]).flatten().tolist())
            img.SetOrigin(lps[:3, 3].tolist())
            sitk.WriteImage(img, str(tmp), useCompression=True)
        else:
            raise ValueError(f"{p}: unsupported output type {suffix!r}")
    return p


def save_mask(scan: Scan, path: str | os.PathLike) -> Path:
    """Write an integer mask (uint8 where the labels fit, else uint16)."""
    dtype = np.uint8 if scan.array.max(initial=0) < 256 and scan.array.min(initial=0) >= 0 else np.uint16
    return save_scan(scan, path, dtype=dtype)


# ---------------------------------------------------------------- BIDS-style names
_BIDS_KEY = re.compile(r"^([a-zA-Z0-9]+)-([a-zA-Z0-9]+)$")


def split_bids_name(path: str | os.PathLike) -> tuple[list[tuple[str, str]], str]:
    """'sub-01_ses-1_acq-sag_T2w.nii.gz' -> ([('sub','01'),('ses','1'),('acq','sag')], 'T2w')."""
    name = Path(path).name
    for s in NIFTI_SUFFIXES + MHA_SUFFIXES:
        if name.lower().endswith(s):
            name = name[: -len(s)]
            break
    parts = name.split("_")
    entities = []
    suffix = ""
    for i, part in enumerate(parts):
        m = _BIDS_KEY.match(part)
        if m and i < len(parts) - 1 or (m and len(parts) == 1):
            entities.append((m.group(1), m.group(2)))
        elif i == len(parts) - 1:
            suffix = part
        else:
            entities.append(("desc", part))
    return entities, suffix


def derivative_name(scan_path: str | os.PathLike, seg: str, kind: str, ext: str) -> str:
    """SPINEPS-style derivative file name: sub-01_acq-sag_T2w.nii.gz -> sub-01_acq-sag_mod-T2w_seg-spine_msk.nii.gz.

    ``seg`` is 'spine' (semantic), 'vert' (instance); ``kind`` is 'msk', 'ctd', 'snp' or 'summary'.
    A name without BIDS entities gets ``sub-<stem>``.
    """
    entities, suffix = split_bids_name(scan_path)
    if not any(k == "sub" for k, _ in entities):
        stem = re.sub(r"[^a-zA-Z0-9]", "", "".join(f"{k}{v}" for k, v in entities) + suffix) or "scan"
        entities, suffix = [("sub", stem)], suffix if entities else ""
    keep = [(k, v) for k, v in entities if k not in ("mod", "seg")]
    mod = suffix or "img"
    ent = "_".join(f"{k}-{v}" for k, v in keep)
    return f"{ent}_mod-{mod}_seg-{seg}_{kind}{ext}"


def derivatives_dir(scan_path: str | os.PathLike, derivatives: str = "derivatives_seg") -> Path:
    """Where SPINEPS writes outputs: <dataset>/derivatives_seg/sub-*/[ses-*/] for a BIDS rawdata path,
    else a ``derivatives_seg`` folder beside the scan."""
    p = Path(scan_path).resolve()
    parts = p.parts
    for marker in ("rawdata", "sourcedata"):
        if marker in parts:
            i = len(parts) - 1 - parts[::-1].index(marker)
            rel = [x for x in parts[i + 1 : -1] if x.startswith(("sub-", "ses-"))]
            return Path(*parts[:i]) / derivatives / Path(*rel) if rel else Path(*parts[:i]) / derivatives
    return p.parent / derivatives
