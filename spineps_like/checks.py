"""Checks before the expensive work: is the image worth segmenting, can the outputs be written, do the models and
the device exist. Each check raises a one-line error naming the file, folder or option and the problem.

>>> from spineps_like.checks import preflight      # doctest: +SKIP
>>> preflight(scan, out_dir="out/", semantic_model="semantic-phantom", instance_model="instance-phantom")  # doctest: +SKIP

Thresholds (documented in README "Inputs and outputs"):

- :data:`MIN_AXIS_VOXELS`: every axis needs at least 3 voxels (a single slice is a 2D image; the pipeline is 3D);
- :data:`MIN_DISTINCT_VALUES`: at least 8 distinct intensities (counted on up to 2 million voxels spread over the
  volume); fewer is a blank, constant or label image, not a scan;
- :data:`MIN_SIGNAL_FRACTION`: at least 0.1% of the voxels must differ from the most common value (the background).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from spineps_like.io import Scan, ScanError
from spineps_like.models.manifest import ModelError

MIN_AXIS_VOXELS = 3
MIN_DISTINCT_VALUES = 8
MIN_SIGNAL_FRACTION = 1e-3
_SAMPLE = 2_000_000


class PreflightError(ValueError):
    """An output folder, model or device that cannot be used; one line naming it and the problem."""


def _name(scan: Scan) -> str:
    return str(scan.path) if scan.path is not None else "image"


def check_shape(scan: Scan) -> None:
    """Refuse an image that is not really 3D (an axis with fewer than :data:`MIN_AXIS_VOXELS` voxels)."""
    thin = [(i, n) for i, n in enumerate(scan.shape) if n < MIN_AXIS_VOXELS]
    if thin:
        i, n = thin[0]
        raise ScanError(f"{_name(scan)}: only {n} slice{'s' if n != 1 else ''} along axis {i} (shape "
                        f"{tuple(scan.shape)}); a 2D image cannot be segmented in 3D (at least {MIN_AXIS_VOXELS} "
                        "voxels per axis are needed)")


def check_signal(scan: Scan) -> None:
    """Refuse an image with no usable signal: all zero, constant, too few distinct values, or almost nothing but
    background (see the module's thresholds)."""
    a = np.asarray(scan.array)
    lo, hi = float(a.min()), float(a.max())
    if lo == hi:
        what = "all zero" if lo == 0 else f"constant (every voxel is {lo:g})"
        raise ScanError(f"{_name(scan)}: no usable signal: the image is {what}")
    flat = a.ravel()
    sample = flat[:: max(1, flat.size // _SAMPLE)]
    values, counts = np.unique(sample, return_counts=True)
    if len(values) < MIN_DISTINCT_VALUES:
        raise ScanError(f"{_name(scan)}: no usable signal: only {len(values)} distinct values (at least "
                        f"{MIN_DISTINCT_VALUES} expected); a blank, thresholded or label image, not a scan")
    background = values[np.argmax(counts)]
    signal = int(np.count_nonzero(flat != background))
    if signal < MIN_SIGNAL_FRACTION * flat.size:
        raise ScanError(f"{_name(scan)}: no usable signal: only {signal} of {flat.size} voxels differ from the "
                        f"background value {float(background):g}")


def check_image(scan: Scan) -> None:
    """:func:`check_shape` and :func:`check_signal`."""
    check_shape(scan)
    check_signal(scan)


def check_output_dir(out: str | os.PathLike, what: str = "--out") -> None:
    """The output folder is (or can be made) a folder this process can write in. Nothing is left behind: folders
    made for the test and the probe file are removed again."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise PreflightError(f"{what} {out}: is a file, not a folder")
    existing = out
    while not existing.exists():
        if existing.is_symlink():
            raise PreflightError(f"{what} {out}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightError(f"{what} {out}: {existing} is a file, so the folder cannot be made")
    made: list[Path] = []
    try:
        for d in reversed([out, *out.parents]):
            if not d.exists():
                d.mkdir()
                made.append(d)
        fd, probe = tempfile.mkstemp(prefix=".spineps-like-write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except PermissionError:
        raise PreflightError(f"{what} {out}: not writable (permission denied)") from None
    except OSError as e:
        raise PreflightError(f"{what} {out}: cannot be created or written ({e.strerror or e})") from None
    finally:
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass


def check_semantic_model(name: Any) -> Any:
    """The semantic model folder exists, is an nnU-Net model with a checkpoint, its config and JSON files parse and
    its manifest (when it has one) matches: everything :func:`~spineps_like.models.load_semantic_model` reads, but
    the network. Returns the :class:`~spineps_like.models.ModelFolder`."""
    from spineps_like.models import find_model, verify_manifest
    from spineps_like.models.nnunet import available_folds, read_json

    folder = find_model(name)
    if folder.nnunet_dir is None:
        raise ModelError(f"{folder.path}: no nnU-Net results folder (plans.json, dataset.json, fold_*) inside; "
                         "not a semantic model")
    verify_manifest(folder.path)
    cfg = folder.config()
    if cfg is not None and (cfg.modeltype != "nnunet" or "SEG" in cfg.modalities):
        raise ModelError(f"{cfg.path}: not a semantic nnU-Net model (modeltype {cfg.modeltype})")
    read_json(folder.nnunet_dir / "plans.json")
    read_json(folder.nnunet_dir / "dataset.json")
    if not available_folds(folder.nnunet_dir):
        raise ModelError(f"{folder.nnunet_dir}: no fold_*/checkpoint_*.pth inside; the model has no weights")
    return folder


def check_instance_model(name: Any) -> Any:
    """The instance model folder exists, has a valid ``inference_config.json`` of a 'unet' model and one weights
    file, and its manifest (when it has one) matches. Returns the folder's path."""
    from spineps_like.models import find_model, verify_manifest
    from spineps_like.models.folders import read_instance_folder

    folder = find_model(name).path
    cfg_path, _, weights = read_instance_folder(folder)
    if weights.stat().st_size == 0:
        raise ModelError(f"{weights}: empty weights file")
    verify_manifest(folder, required=[cfg_path, weights])
    return folder


_DEVICE = re.compile(r"(cpu|cuda|mps)(?::(\d+))?")


def _torch_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def _cpu_only_torch_wheel() -> bool:
    """PyTorch's CPU-only wheels carry the local version tag '+cpu' (e.g. 2.13.0+cpu)."""
    v = _torch_version()
    return v is not None and v.endswith("+cpu")


def check_device(device: str, what: str = "--device") -> None:
    """The device is one torch knows and it is there: 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    m = _DEVICE.fullmatch(str(device))
    if not m:
        raise PreflightError(f"{what} {device}: unknown device; use cpu, cuda, cuda:N or mps")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return
    if kind == "cuda" and _cpu_only_torch_wheel():  # answered from the wheel's version, without importing torch (~3 s)
        raise PreflightError(f"{what} {device}: CUDA is not available here (a CPU-only build of torch, torch "
                             f"{_torch_version()}); use --device cpu")
    import torch

    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA GPU or driver found"
            raise PreflightError(f"{what} {device}: CUDA is not available here ({build}, torch {torch.__version__}); "
                                 "use --device cpu")
        n = torch.cuda.device_count()
        if index is not None and int(index) >= n:
            raise PreflightError(f"{what} {device}: there {'is' if n == 1 else 'are'} only {n} CUDA device(s)")
    elif not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise PreflightError(f"{what} {device}: Apple's MPS is not available here; use --device cpu")


def preflight(scan: Scan | None = None, *, out_dir: str | os.PathLike | None = None, semantic_model: Any = None,
              instance_model: Any = None, need_semantic: bool = True, need_instance: bool = True,
              device: str = "cpu") -> None:
    """Everything that can be checked before the first phase runs, cheapest first. Models given as loaded objects
    are not checked again; ``None`` means the bundled default."""
    from spineps_like.pipeline import DEFAULT_INSTANCE_MODEL, DEFAULT_SEMANTIC_MODEL

    if scan is not None:
        check_image(scan)
    if out_dir is not None:
        check_output_dir(out_dir)
    if need_semantic and (semantic_model is None or isinstance(semantic_model, (str, os.PathLike))):
        check_semantic_model(semantic_model or DEFAULT_SEMANTIC_MODEL)
    if need_instance and (instance_model is None or isinstance(instance_model, (str, os.PathLike))):
        check_instance_model(instance_model or DEFAULT_INSTANCE_MODEL)
    check_device(device)
