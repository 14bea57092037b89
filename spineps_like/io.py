"""Scan I/O: read NIfTI / MetaImage into a :class:`Scan`, atomic writes, BIDS derivative names.

A :class:`Scan` is the one object that carries geometry: a 3D numpy array plus its voxel-to-world affine
(NIfTI convention, RAS+ world). Everything downstream works on bare arrays of a known orientation and spacing.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import tempfile
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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
    #: where a scan read from DICOM came from (:class:`spineps_like.dicom.DicomSource`: series, headers, slice
    #: order), what a DICOM-SEG needs to reference it; None for other inputs
    source: Any = None

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


#: Largest image :func:`load_scan` reads: 2**30 voxels (4 GiB as float32), far above any spine scan (a 512 x 512 x
#: 2000 CT is 2**29). A header declaring more is refused before any data is read (a corrupt header would otherwise
#: end in a bare MemoryError). ``$SPINEPS_LIKE_MAX_VOXELS`` raises or lowers it.
MAX_VOXELS = 2**30

#: NIfTI datatype codes that hold no single real value per voxel, in the user's words.
_NIFTI_UNUSABLE_TYPES = {
    1: "1-bit (binary) voxels, which are not supported",
    32: "complex-valued voxels (complex64); save the magnitude (or real part) as a real-valued image",
    1792: "complex-valued voxels (complex128); save the magnitude (or real part) as a real-valued image",
    2048: "complex-valued voxels (complex256); save the magnitude (or real part) as a real-valued image",
    128: "RGB colour voxels; a scan must be a single-channel greyscale image",
    2304: "RGBA colour voxels; a scan must be a single-channel greyscale image",
}
_MET_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                   "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                   "MET_DOUBLE": 8}


class ScanWarning(UserWarning):
    """Something :func:`load_scan` had to assume (the message says what, and which option made it do so)."""


def max_voxels() -> int:
    """The largest voxel count :func:`load_scan` reads (:data:`MAX_VOXELS` or ``$SPINEPS_LIKE_MAX_VOXELS``)."""
    try:
        return int(os.environ.get("SPINEPS_LIKE_MAX_VOXELS", MAX_VOXELS))
    except ValueError:
        return MAX_VOXELS


def _open_for_reading(p: Path):
    return open(p, "rb")


def _check_file(p: Path) -> int:
    """The file's size; a :class:`ScanError` in plain words for anything that keeps it from being read."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            raise ScanError(f"{p}: broken symbolic link (it points to {os.readlink(p)}, which does not exist)") from None
        raise ScanError(f"{p}: no such file") from None
    except PermissionError:
        raise ScanError(f"{p}: permission denied (a folder on the way cannot be entered)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ScanError(f"{p}: symbolic link loop (the link leads back to itself)") from None
        raise ScanError(f"{p}: cannot be opened ({e.strerror or e})") from None
    import stat as _stat

    if _stat.S_ISDIR(st.st_mode):
        raise ScanError(f"{p}: is a folder, not an image file")
    if not _stat.S_ISREG(st.st_mode):
        raise ScanError(f"{p}: not a regular file (a device, pipe or socket)")
    try:
        with _open_for_reading(p) as f:
            f.read(1)
    except PermissionError:
        raise ScanError(f"{p}: permission denied (no read permission for this user)") from None
    except OSError as e:
        raise ScanError(f"{p}: cannot be read ({e.strerror or e})") from None
    if st.st_size == 0:
        raise ScanError(f"{p}: empty file (0 bytes)")
    return int(st.st_size)


def _plain(e: BaseException) -> str:
    """A library's error as one line in plain words: no ITK source paths, no nibabel jargon."""
    if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)):
        return "compressed data is truncated or corrupt"
    if isinstance(e, MemoryError):
        return "not enough memory to load it"
    text = str(e).strip()
    if not text:
        return type(e).__name__
    if re.search(r"Expected \d+ bytes", text):
        return "file is truncated: it holds fewer bytes than its header declares"
    m = re.search(r"data code (\d+) not supported", text)
    if m:
        return f"unsupported voxel data type (NIfTI datatype code {m.group(1)})"
    lines = []
    for line in text.splitlines():
        line = re.sub(r"\S+\.(?:cxx|cpp|hxx|h|txx):\d+:?", "", line)
        line = re.sub(r"^\s*(?:sitk::ERROR|ITK ERROR|itk::ERROR)\s*:?\s*", "", line)
        line = re.sub(r"\w+\(0x[0-9a-fA-F]+\):\s*", "", line)
        line = re.sub(r"Exception thrown in SimpleITK \w+:\s*", "", line).strip()
        if line:
            lines.append(line)
    return "; ".join(lines)[:300] or type(e).__name__


def _axes_shape(shape: tuple[int, ...]) -> str:
    return " x ".join(str(int(s)) for s in shape)


def _check_size(p: Path, shape: tuple[int, ...]) -> None:
    if any(int(s) < 0 for s in shape):
        raise ScanError(f"{p}: header is corrupt: negative image size {tuple(int(s) for s in shape)}")
    if 0 in shape:
        raise ScanError(f"{p}: image has a zero-sized axis, shape {tuple(int(s) for s in shape)}")
    n = int(np.prod([int(s) for s in shape], dtype=object))
    if n > max_voxels():
        raise ScanError(f"{p}: header declares {_axes_shape(shape)} = {n:,} voxels ({n * 4 / 2**30:.1f} GiB as "
                        f"float32), more than the {max_voxels():,} this tool reads; the header is corrupt or the "
                        "image far too large")


def _check_spacing(p: Path, spacing, what: str) -> None:
    for i, s in enumerate(spacing):
        s = float(s)
        if not np.isfinite(s):
            raise ScanError(f"{p}: voxel size ({what}) along axis {i} is {s}; the header does not say how large "
                            "the voxels are")
        if s <= 0:
            raise ScanError(f"{p}: voxel size ({what}) along axis {i} is {s:g} mm; voxel sizes must be positive")


def orientation_affine(codes: str, spacing) -> np.ndarray:
    """A voxel-to-world (RAS) affine whose array axes point to ``codes`` (e.g. 'RAS', 'LAS', 'PIR'), origin 0."""
    codes = str(codes).upper()
    pairs = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    if len(codes) != 3 or any(c not in pairs for c in codes) or len({pairs[c][0] for c in codes}) != 3:
        raise ValueError(f"orientation {codes!r}: give three axis codes, one of R/L, A/P and S/I each (e.g. RAS)")
    aff = np.eye(4)
    aff[:3, :3] = 0
    for i, c in enumerate(codes):
        axis, sign = pairs[c]
        aff[axis, i] = sign * float(spacing[i])
    return aff


def _nifti_header(p: Path, suffix: str, size: int, assume_orientation: str | None):
    """Read the raw NIfTI header (before nibabel 'fixes' anything) and refuse what cannot be used.

    Returns (header, affine or None): the affine when the header has no orientation and ``assume_orientation`` gave
    one."""
    with _open_for_reading(p) as f:
        first = f.read(4)
    gz = first[:2] == b"\x1f\x8b"
    looks_nifti = len(first) == 4 and (348 in (int.from_bytes(first, "little"), int.from_bytes(first, "big"))
                                       or 540 in (int.from_bytes(first, "little"), int.from_bytes(first, "big")))
    if gz and suffix == ".nii":
        raise ScanError(f"{p}: gzip-compressed data under a .nii name; rename the file to .nii.gz")
    if not gz and suffix == ".nii.gz":
        if looks_nifti:
            raise ScanError(f"{p}: an uncompressed NIfTI under a .nii.gz name; rename the file to .nii")
        raise ScanError(f"{p}: not a readable image (not gzip-compressed, as its .nii.gz name says, and no NIfTI "
                        "header)")
    try:
        with (gzip.open(p, "rb") if gz else _open_for_reading(p)) as f:
            head = f.read(544)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        raise ScanError(f"{p}: {_plain(e)}") from None
    sizes = {int.from_bytes(head[:4], "little"): "<", int.from_bytes(head[:4], "big"): ">"} if len(head) >= 4 else {}
    if 348 in sizes:
        cls, hsize, endian = nib.Nifti1Header, 348, sizes[348]
    elif 540 in sizes:
        cls, hsize, endian = nib.Nifti2Header, 540, sizes[540]
    else:
        raise ScanError(f"{p}: not a readable image (no NIfTI header at its start)")
    if len(head) < hsize:
        raise ScanError(f"{p}: file is truncated: {len(head)} bytes, shorter than a NIfTI header ({hsize})")
    try:
        hdr = cls(head[:hsize], endianness=endian, check=False)
    except Exception as e:
        raise ScanError(f"{p}: NIfTI header is corrupt ({_plain(e)})") from None
    code = int(hdr["datatype"])
    if code in _NIFTI_UNUSABLE_TYPES:
        raise ScanError(f"{p}: holds {_NIFTI_UNUSABLE_TYPES[code]}")
    try:
        dtype = hdr.get_data_dtype()
    except Exception:
        raise ScanError(f"{p}: unsupported voxel data type (NIfTI datatype code {code})") from None
    dim = [int(d) for d in hdr["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise ScanError(f"{p}: header is corrupt: it declares {ndim} axes (1 to 7 are possible)")
    shape = tuple(dim[1 : ndim + 1])
    _check_size(p, shape)
    if ndim < 3 or (ndim > 3 and any(s != 1 for s in shape[3:])):
        raise ScanError(f"{p}: expected a 3D image, got {ndim}D with shape {shape}")
    _check_spacing(p, [float(x) for x in hdr["pixdim"][1:4]], "pixdim")
    n = int(np.prod(shape, dtype=object))
    if not gz:
        need = int(float(hdr["vox_offset"])) + n * dtype.itemsize
        if size < need:
            raise ScanError(f"{p}: file is truncated or its header is inconsistent with its data: the header declares "
                            f"{_axes_shape(shape)} voxels of {dtype.name} ({need:,} bytes with the header), the file "
                            f"has {size:,} bytes")
    affine = None
    if int(hdr["qform_code"]) <= 0 and int(hdr["sform_code"]) <= 0:
        if assume_orientation is None:
            raise ScanError(f"{p}: header has no orientation (qform and sform codes are 0), so left/right and "
                            "head/feet are unknown; if you know where the array axes point, pass e.g. "
                            "--assume-orientation RAS")
        spacing = [float(x) for x in hdr["pixdim"][1:4]]
        affine = orientation_affine(assume_orientation, spacing)
        warnings.warn(ScanWarning(f"{p}: header has no orientation; assumed {assume_orientation.upper()} with voxel "
                                  f"sizes {tuple(round(s, 4) for s in spacing)} mm (--assume-orientation)"),
                      stacklevel=3)
    return hdr, affine


def _metaimage_header(p: Path, size: int) -> None:
    """Read a MetaImage header (text ``Key = value`` lines) and check what ITK would only print to stderr or fail
    on with its own words: channels, dimensions, spacing, the data file, and truncated or corrupt (compressed) data."""
    with _open_for_reading(p) as f:
        raw = f.read(65536)
    fields: dict[str, str] = {}
    offset = None
    pos = 0
    for line in raw.split(b"\n"):
        pos += len(line) + 1
        try:
            text = line.decode("ascii").strip()
        except UnicodeDecodeError:
            break
        if "=" not in text:
            if text:
                break
            continue
        key, value = (s.strip() for s in text.split("=", 1))
        fields[key.lower()] = value
        if key.lower() == "elementdatafile":
            offset = pos
            break
    if "ndims" not in fields or offset is None:
        raise ScanError(f"{p}: not a readable image (no MetaImage header: NDims and ElementDataFile lines)")
    try:
        ndims = int(fields["ndims"])
        shape = tuple(int(x) for x in fields.get("dimsize", "").split())
        channels = int(fields.get("elementnumberofchannels", "1"))
        spacing = [float(x) for x in (fields.get("elementspacing") or fields.get("elementsize") or "").split()]
    except ValueError:
        raise ScanError(f"{p}: MetaImage header is corrupt (NDims, DimSize, ElementSpacing or "
                        "ElementNumberOfChannels is not a number)") from None
    if channels > 1:
        raise ScanError(f"{p}: holds {channels} values per voxel (colour or vector data); a scan must be a "
                        "single-channel greyscale image")
    if len(shape) != ndims:
        raise ScanError(f"{p}: MetaImage header is corrupt: NDims = {ndims} but DimSize has {len(shape)} values")
    _check_size(p, shape)
    if ndims != 3:
        raise ScanError(f"{p}: expected a 3D image, got {ndims}D with shape {shape}")
    if spacing:
        _check_spacing(p, spacing[:3], "ElementSpacing")
    itemsize = _MET_TYPE_BYTES.get(fields.get("elementtype", "").upper())
    data_file = fields["elementdatafile"]
    if data_file.upper() == "LOCAL":
        data_path, start = p, offset
    elif "%" in data_file or data_file.upper().startswith("LIST") or " " in data_file:
        return  # slice lists and patterns: ITK checks them
    else:
        data_path, start = (p.parent / data_file), int(fields.get("headersize", "0") or 0)
        if not data_path.is_file():
            raise ScanError(f"{p}: its data file {data_path} (ElementDataFile) does not exist")
        size = data_path.stat().st_size
        start = max(start, 0)
    if itemsize is None:
        return
    need = int(np.prod(shape, dtype=object)) * itemsize
    if fields.get("compresseddata", "false").lower() == "true":
        got, err = 0, None
        d = zlib.decompressobj()
        try:
            with _open_for_reading(data_path) as f:
                f.seek(start)
                while got <= need:
                    chunk = f.read(1 << 20)
                    if not chunk:
                        break
                    got += len(d.decompress(chunk, need + 1 - got))
                    if d.eof:
                        break
        except zlib.error as e:
            err = str(e)
        if err is not None:
            raise ScanError(f"{p}: compressed image data is corrupt ({err.split(':')[-1].strip()}); the file is damaged")
        if got < need:
            raise ScanError(f"{p}: compressed image data is truncated or corrupt: it holds {got:,} of the {need:,} "
                            "bytes the header declares")
    elif size - start < need:
        raise ScanError(f"{p}: file is truncated or its header is inconsistent with its data: the header declares "
                        f"{need:,} bytes of data, the file holds {max(size - start, 0):,}")


def _has_dicom_preamble(p: Path) -> bool:
    """'DICM' at byte 128: a DICOM file (checked only for names that are not NIfTI/MetaImage)."""
    try:
        with _open_for_reading(p) as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_input(path: str | os.PathLike) -> bool:
    """True for what :func:`load_scan` reads as DICOM: a folder, a ``.dcm`` file, or a file with the DICM preamble."""
    p = Path(path)
    if _suffix(p) in NIFTI_SUFFIXES + MHA_SUFFIXES:
        return False
    if p.is_dir():
        return True
    try:
        return p.is_file() and (_suffix(p) == ".dcm" or _has_dicom_preamble(p))
    except OSError:
        return False


def load_scan(path: str | os.PathLike, *, kind: str = "image", assume_orientation: str | None = None,
              series: str | int | None = None) -> Scan:
    """Load a 3D NIfTI (.nii, .nii.gz) or MetaImage (.mha, .mhd) file, or a DICOM series.

    The array keeps the file's voxel order (x, y, z index order, as nibabel gives it); MetaImage geometry is
    converted from ITK's LPS to RAS so both formats give the same array and affine for the same image.
    ``kind='mask'`` keeps integer data as integers; images are returned as float32.

    Raises :class:`ScanError` with a one-line message naming the file for anything that cannot be used: a missing,
    unreadable or empty file, a symbolic link loop, a file that is not an image or whose compression does not match
    its name, corrupt or truncated data, complex or colour voxels, a non-3D image, a zero-sized axis, a header that
    declares more than :func:`max_voxels` voxels, a zero, negative or NaN voxel size, a singular affine, NaN/inf
    values, and a NIfTI without orientation (qform and sform codes 0). For the last, ``assume_orientation`` (axis
    codes such as 'RAS') reads the array axes as pointing that way, with a :class:`ScanWarning` saying so.

    A folder (or an enhanced multi-frame DICOM file) is read as a DICOM series by :func:`spineps_like.dicom.load_dicom`:
    the array's axes are (column, row, slice), slices in order along the slice normal, and ``Scan.source`` says which
    series it was. ``series`` picks one series of a folder that holds several (a SeriesInstanceUID, SeriesNumber or
    SeriesDescription); without it such a folder is refused with a list of its series.
    """
    p = Path(path)
    source = None
    dicom = p.is_dir() and is_dicom_input(p)  # a folder: a DICOM series
    if not dicom:
        size = _check_file(p)  # a clear error for a missing or unreadable file before any sniffing
        suffix = _suffix(p)
        dicom = is_dicom_input(p)
    if series is not None and not dicom:
        raise ScanError(f"{p}: --series (series=) picks a series of a DICOM folder; this is not one")
    try:
        if dicom:
            from spineps_like.dicom import load_dicom

            loaded = load_dicom(p, series=series)
            arr, affine, source = loaded.array, loaded.affine, loaded.source
        elif suffix in NIFTI_SUFFIXES:
            hdr, assumed = _nifti_header(p, suffix, size, assume_orientation)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # nibabel's own header 'fixes' are refused above
                img = nib.load(str(p))
                shape = tuple(img.shape)
                if 0 in shape:
                    raise ScanError(f"{p}: image has a zero-sized axis, shape {shape}")
                if len(shape) > 3 and all(s == 1 for s in shape[3:]):
                    arr = np.asarray(img.dataobj).reshape(shape[:3])
                else:
                    arr = np.asanyarray(img.dataobj)
            affine = np.asarray(img.affine if assumed is None else assumed, dtype=float)
        elif suffix in MHA_SUFFIXES:
            import SimpleITK as sitk

            _metaimage_header(p, size)
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
            raise ScanError(f"{p}: unsupported file type {suffix or '(none)'!r}; use .nii, .nii.gz, .mha, .mhd or a "
                            "folder of DICOM files")
    except ScanError:
        raise
    except MemoryError:
        raise ScanError(f"{p}: not enough memory to load it") from None
    except Exception as e:  # nibabel / ITK errors are long and varied: one line naming the file, in plain words
        raise ScanError(f"{p}: not a readable image ({_plain(e)})") from None
    arr = np.asarray(arr)
    if arr.dtype.fields is not None or np.iscomplexobj(arr):
        raise ScanError(f"{p}: holds {'complex-valued' if np.iscomplexobj(arr) else 'colour (structured)'} voxels; "
                        "a scan must be a single-channel real-valued image")
    if arr.ndim != 3:
        raise ScanError(f"{p}: expected a 3D image, got {arr.ndim}D with shape {tuple(arr.shape)}")
    if 0 in arr.shape:
        raise ScanError(f"{p}: image has a zero-sized axis, shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ScanError(f"{p}: invalid (singular or non-finite) voxel-to-world affine")
    try:
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
    except MemoryError:
        raise ScanError(f"{p}: not enough memory to load it") from None
    return Scan(arr, affine, p, source)


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
