"""sha256 manifests of model folders (``MANIFEST.sha256``, the format ``sha256sum`` writes and checks).

A bundled model folder lists every file it ships with its sha256; the loader verifies the list before it reads a
single weight, so a truncated download, a swapped checkpoint or an edited config is refused with the file's name.
``cd MODEL && sha256sum -c MANIFEST.sha256`` checks the same thing from a shell.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable

from spineps_like.io import atomic_write_text

MANIFEST_NAME = "MANIFEST.sha256"
_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
_SKIP_DIRS = {"__pycache__", ".git"}


class ModelError(ValueError):
    """A model folder that cannot be used; the message is one line naming the folder or file and the problem."""


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def _model_files(folder: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name == MANIFEST_NAME or name.startswith("."):
                continue
            out.append(Path(root, name))
    return out


def write_manifest(folder: str | os.PathLike) -> Path:
    """Write ``MANIFEST.sha256`` listing every file under ``folder`` (hidden files and caches excluded).

    Paths are relative to ``folder`` with forward slashes, so ``sha256sum -c`` works from inside the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: not a folder")
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}" for p in _model_files(folder)]
    return atomic_write_text(folder / MANIFEST_NAME, "\n".join(lines) + "\n")


def read_manifest(folder: str | os.PathLike) -> dict[str, str] | None:
    """{relative path: sha256} from ``folder/MANIFEST.sha256``; None when the folder has no manifest."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    entries: dict[str, str] = {}
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise ModelError(f"{path}:{no}: not a sha256sum line ('<64 hex digits>  <path>')")
        rel = m.group(2).strip()
        if rel.startswith("/") or ".." in Path(rel).parts:
            raise ModelError(f"{path}:{no}: path {rel!r} leaves the model folder")
        entries[rel] = m.group(1).lower()
    return entries


def verify_manifest(folder: str | os.PathLike, required: Iterable[str | os.PathLike] = ()) -> bool:
    """Check every file listed in ``folder/MANIFEST.sha256`` and that each ``required`` file is listed.

    Returns True when verified, False when the folder has no manifest (the caller decides whether to warn).
    Raises :class:`ModelError` naming the file for a missing file, a checksum mismatch, or a required file the
    manifest does not cover.
    """
    folder = Path(folder)
    entries = read_manifest(folder)
    if entries is None:
        return False
    for rel, digest in entries.items():
        p = folder / rel
        if not p.is_file():
            raise ModelError(f"{p}: listed in {MANIFEST_NAME} but missing; the model folder is incomplete")
        got = sha256_file(p)
        if got != digest:
            raise ModelError(
                f"{p}: sha256 mismatch (manifest {digest[:12]}..., file {got[:12]}...); "
                "the file was changed or corrupted, refusing to load"
            )
    require_listed(folder, required, entries)
    return True


def require_listed(folder: str | os.PathLike, files: Iterable[str | os.PathLike],
                   entries: dict[str, str] | None = None) -> None:
    """Raise :class:`ModelError` for the first of ``files`` that ``folder``'s manifest does not list."""
    folder = Path(folder)
    entries = read_manifest(folder) if entries is None else entries
    if entries is None:
        raise ModelError(f"{folder}: no {MANIFEST_NAME}")
    for f in files:
        rel = Path(f).resolve().relative_to(folder.resolve()).as_posix()
        if rel not in entries:
            raise ModelError(f"{folder / rel}: not listed in {MANIFEST_NAME}; refusing to load an unverified file")
