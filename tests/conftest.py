"""Shared fixtures: the real TPTBox sample crops (found through the installed package, never copied)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest


def tptbox_sample(kind: str) -> dict[str, Path]:
    """Paths of the TPTBox sample crop 'mri' or 'ct': image, semantic (subreg) and instance (vert) masks."""
    import TPTBox

    folder = Path(TPTBox.__file__).parent / "tests" / f"sample_{kind}"
    files = sorted(folder.glob("*.nii.gz"))
    out = {
        "image": next(f for f in files if "_seg-" not in f.name),
        "semantic": next(f for f in files if "_seg-subreg" in f.name),
        "instance": next(f for f in files if "_seg-vert" in f.name),
    }
    return out


@lru_cache(maxsize=None)
def tptbox_crop(kind: str):
    """(semantic array, instance array, spacing) of the TPTBox sample crop 'mri' or 'ct', loaded once."""
    from spineps_like.io import load_scan

    paths = tptbox_sample(kind)
    sem = load_scan(paths["semantic"], kind="mask")
    inst = load_scan(paths["instance"], kind="mask")
    return sem.array, inst.array, sem.spacing


@pytest.fixture(scope="session")
def sample_mri() -> dict[str, Path]:
    return tptbox_sample("mri")


@pytest.fixture(scope="session")
def sample_ct() -> dict[str, Path]:
    return tptbox_sample("ct")
