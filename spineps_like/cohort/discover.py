"""Find the scans of a cohort and give each one a unique, SPINEPS-named place for its outputs.

Inputs may be a folder (searched recursively), a BIDS dataset (``rawdata/sub-*/[ses-*/]anat/*``), a glob pattern,
a CSV/TSV list (column ``path``, optionally ``semantic_mask``), a single scan file, or a list of any of these.
Masks (``*_msk``, ``*_seg-*``), ``derivatives*`` folders and hidden/temporary files are skipped. A folder that holds
DICOM files itself (files with the 'DICM' preamble) is one scan: its series, read by
:func:`spineps_like.dicom.load_dicom` (a folder holding several series fails with their list).

Outputs go to ``OUT/derivatives_seg/sub-*/[ses-*/]`` for BIDS-like inputs (as SPINEPS lays them out) and to
``OUT/derivatives_seg/<folder relative to the input root>/`` otherwise, so two folders holding the same file name
never collide; file names come from :func:`spineps_like.io.derivative_name`.

>>> entries = discover_scans("/data/study", "/data/study-out")      # doctest: +SKIP
>>> entries[0].key, entries[0].out_dir                               # doctest: +SKIP
('sub-01/ses-1/sub-01_ses-1_acq-sag_mod-T2w', PosixPath('/data/study-out/derivatives_seg/sub-01/ses-1'))
"""

from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from spineps_like.io import derivative_name, split_bids_name

#: Scan file types a cohort picks up (.mhd headers are left out: their .raw/.zraw partner is not a scan).
SCAN_SUFFIXES = (".nii.gz", ".nii", ".mha")
DERIVATIVES = "derivatives_seg"
_MAGIC = set("*?[")


@dataclass(frozen=True)
class ScanEntry:
    """One scan of a cohort: its file, where its outputs go, and its unique key in the manifest."""

    path: Path
    out_dir: Path
    key: str
    semantic_mask: Path | None = None

    def output_path(self, seg: str, kind: str, ext: str) -> Path:
        """Path of one output, e.g. ``output_path('vert', 'msk', '.nii.gz')``."""
        return self.out_dir / derivative_name(self.path, seg, kind, ext)

    def to_task(self) -> dict:
        """A plain, picklable description for workers (paths as strings)."""
        return {"key": self.key, "path": str(self.path), "out_dir": str(self.out_dir),
                "semantic_mask": str(self.semantic_mask) if self.semantic_mask else None}


def is_scan_file(path: Path) -> bool:
    """True for a scan image file: a known suffix, not hidden or temporary, not a mask or segmentation."""
    name = path.name
    low = name.lower()
    if name.startswith(".") or not low.endswith(SCAN_SUFFIXES):
        return False
    stem = name[: -len(next(s for s in SCAN_SUFFIXES if low.endswith(s)))]
    return not (stem.endswith("_msk") or "_seg-" in stem or stem.endswith(("_seg", "_label", "_labels")))


def is_dicom_folder(path: Path, filenames: Iterable[str] | None = None) -> bool:
    """True for a folder that holds a DICOM file itself (not only in subfolders): one non-hidden file, not named like a
    scan or DICOMDIR, with the 'DICM' preamble is enough."""
    from spineps_like.dicom import is_dicom_file

    if filenames is None:
        try:
            filenames = sorted(e.name for e in os.scandir(path) if e.is_file())
        except OSError:
            return False
    for f in filenames:
        if f.startswith(".") or f.upper() == "DICOMDIR" or f.lower().endswith(SCAN_SUFFIXES + (".mhd", ".raw")):
            continue
        if is_dicom_file(path / f):
            return True
    return False


def _walk(root: Path) -> Iterable[Path]:
    """Scan files and DICOM folders under ``root`` (recursive, sorted), skipping derivatives* and hidden folders."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "derivatives")))
        if is_dicom_folder(Path(dirpath), sorted(filenames)):
            yield Path(dirpath)
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if is_scan_file(p):
                yield p


def _bids_layout(rel: Path) -> Path | None:
    """The ``sub-*/[ses-*]`` folders of a path relative to a dataset root (``sub-01/ses-1/anat/x.nii.gz``), or None
    when it does not start with a subject folder."""
    parts = rel.parts[:-1]
    if not parts or not parts[0].startswith("sub-"):
        return None
    keep = [parts[0]] + ([parts[1]] if len(parts) > 1 and parts[1].startswith("ses-") else [])
    return Path(*keep)


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    keep = []
    for part in parts:
        if _MAGIC & set(part):
            break
        keep.append(part)
    return Path(*keep) if keep else Path(".")


def _read_list(path: Path) -> list[tuple[Path, Path | None]]:
    """Rows of a CSV/TSV scan list: column ``path`` (required) and ``semantic_mask`` (optional); relative paths are
    taken relative to the list's folder."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in cols:
            raise ValueError(f"{path}: scan list needs a 'path' column (found: {', '.join(cols) or 'none'})")
        rows = []
        for i, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not row.get("path"):
                continue
            p = Path(row["path"]).expanduser()
            p = p if p.is_absolute() else path.parent / p
            m = row.get("semantic_mask") or None
            mp = None
            if m:
                mp = Path(m).expanduser()
                mp = mp if mp.is_absolute() else path.parent / mp
                if not mp.is_file():
                    raise ValueError(f"{path}: line {i}: semantic mask {mp} not found")
            if not (p.is_file() or p.is_dir()):
                raise ValueError(f"{path}: line {i}: scan {p} not found")
            rows.append((p, mp))
    return rows


def _sources(item: str | os.PathLike) -> tuple[Path, list[tuple[Path, Path | None]]]:
    """(root, [(scan, semantic_mask)]) for one input item."""
    s = str(item)
    p = Path(s).expanduser()
    if p.is_dir():
        root = p / "rawdata" if (p / "rawdata").is_dir() else p
        return root, [(f, None) for f in _walk(root)]
    if p.is_file():
        if p.suffix.lower() in (".csv", ".tsv"):
            rows = _read_list(p)
            if not rows:
                return p.parent, []
            root = Path(os.path.commonpath([str(r[0].resolve().parent) for r in rows]))
            return root, [(r[0].resolve(), r[1]) for r in rows]
        if not p.name.lower().endswith(SCAN_SUFFIXES):
            from spineps_like.dicom import is_dicom_file

            if not is_dicom_file(p):
                raise ValueError(f"{p}: not a scan (.nii.gz, .nii, .mha, a DICOM file or folder), folder or scan list "
                                 "(.csv, .tsv)")
        return p.parent, [(p, None)]
    if _MAGIC & set(s):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(s), recursive=True))
        files = [f for f in files if (f.is_file() and is_scan_file(f) or f.is_dir() and is_dicom_folder(f))
                 and not any(x.startswith("derivatives") for x in f.parts)]
        return _glob_root(os.path.expanduser(s)), [(f, None) for f in files]
    raise ValueError(f"{s}: no such file or folder")


def discover_scans(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    modalities: Sequence[str] | None = None,
    derivatives: str = DERIVATIVES,
) -> list[ScanEntry]:
    """The scans of a cohort with their output folders and keys, sorted by key.

    Parameters
    ----------
    inputs : folder, BIDS dataset, glob pattern, CSV/TSV list (column ``path``, optional ``semantic_mask``), scan
        file, or a list of these.
    out_dir : the cohort's output folder; outputs go below ``out_dir/derivatives``.
    modalities : keep only scans whose BIDS suffix is one of these (e.g. ``['T2w']``); case-insensitive.
    derivatives : name of the derivatives folder (SPINEPS: ``derivatives_seg``).

    Raises
    ------
    ValueError for an input that does not exist or two scans that would write the same outputs.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise ValueError("no cohort inputs given")
    out_root = Path(out_dir).expanduser().resolve() / derivatives
    wanted = {m.lower() for m in modalities} if modalities else None
    by_key: dict[str, ScanEntry] = {}
    seen: set[Path] = set()
    for item in items:
        root, found = _sources(item)
        root = root.resolve()
        for scan, mask in found:
            scan = scan.resolve()
            if scan in seen:
                continue
            seen.add(scan)
            if wanted is not None and split_bids_name(scan)[1].lower() not in wanted:
                continue
            marks = [i for i, x in enumerate(scan.parts) if x in ("rawdata", "sourcedata")]
            if marks:  # inside a BIDS dataset, wherever the input pointed to
                rel = Path(*scan.parts[marks[-1] + 1:])
            else:
                try:
                    rel = scan.relative_to(root)
                except ValueError:
                    rel = Path(scan.name)
            if out_root in scan.parents:
                continue  # outputs of an earlier run inside an input folder
            layout = _bids_layout(rel)
            if layout is not None and len(rel.parts) > len(layout.parts) + 1 and rel.parent.name != "anat":
                continue  # BIDS: anatomical scans only (not dwi/, func/, fmap/, ...)
            folder = out_root / (layout if layout is not None else rel.parent)
            stem = derivative_name(scan, "spine", "msk", ".nii.gz")[: -len("_seg-spine_msk.nii.gz")]
            key = (folder.relative_to(out_root) / stem).as_posix()
            if key in by_key:
                raise ValueError(f"{scan} and {by_key[key].path} would write the same outputs "
                                 f"({folder / stem}_*); rename one or list them in separate cohorts")
            by_key[key] = ScanEntry(scan, folder, key, mask.resolve() if mask else None)
    return [by_key[k] for k in sorted(by_key)]

