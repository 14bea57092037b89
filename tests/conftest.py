"""Shared fixtures: the real TPTBox sample crops (found through the installed package, never copied)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

from spineps_like.phantom import tptbox_sample  # noqa: F401  (the tests import it from here too)


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
