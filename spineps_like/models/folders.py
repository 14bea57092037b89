"""Model folders: layouts, discovery by name, resolution of a path.

Two layouts are recognised:

* **SPINEPS** — a folder holding ``inference_config.json``. The nnU-Net results folder (``plans.json``,
  ``dataset.json``, ``fold_*/checkpoint_*.pth``) is either that same folder (how SPINEPS' released zips are laid out:
  ``<name>/nnUNetTrainer__nnUNetPlans__3d_fullres/inference_config.json``) or one sub-folder of it (our bundled
  models: ``<name>/inference_config.json`` + ``<name>/<Trainer>__<Plans>__<config>/``). An instance (Unet3D) model
  has a ``*weights*.ckpt`` instead of an nnU-Net folder.
* **nnU-Net** — a plain nnU-Net v2 results folder without a config.

Names are looked up in ``models/`` at the repository root and in every folder of ``$SPINEPS_LIKE_MODELS``
(``os.pathsep`` separated; searched first, so a user folder can shadow a bundled model). As in SPINEPS, a model's name
is its folder's name, or the parent's name when the folder is an nnU-Net ``Trainer__Plans__config`` folder;
matching ignores case.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import spineps_like
from spineps_like.models.config import CONFIG_NAME, InferenceConfig
from spineps_like.models.manifest import MANIFEST_NAME, ModelError

MODELS_ENV = "SPINEPS_LIKE_MODELS"
_MAX_DEPTH = 4


def bundled_models_dir() -> Path:
    """``models/`` at the repository root."""
    return Path(spineps_like.__file__).resolve().parents[1] / "models"


def model_roots() -> list[Path]:
    """Folders searched for models: every existing folder of ``$SPINEPS_LIKE_MODELS``, then the bundled ``models/``."""
    roots = [Path(p).expanduser() for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p.strip()]
    roots.append(bundled_models_dir())
    out: list[Path] = []
    for r in roots:
        if r.is_dir() and r.resolve() not in [o.resolve() for o in out]:
            out.append(r)
    return out


def is_nnunet_dir(path: Path) -> bool:
    """A folder with plans.json, dataset.json and at least one fold_* sub-folder."""
    return (path / "plans.json").is_file() and (path / "dataset.json").is_file() and any(path.glob("fold_*"))


def _is_trainer_folder(name: str) -> bool:
    return name.count("__") >= 2 or "nnUNetPlans" in name


@dataclass(frozen=True)
class ModelFolder:
    """A model on disk.

    ``path`` is the model's root (holds ``inference_config.json`` and ``MANIFEST.sha256`` for SPINEPS layouts, or is
    the nnU-Net folder itself); ``nnunet_dir`` the nnU-Net results folder (None for Unet3D models).
    """

    name: str
    path: Path
    layout: str  # "spineps" or "nnunet"
    nnunet_dir: Path | None

    @property
    def config_path(self) -> Path | None:
        p = self.path / CONFIG_NAME
        return p if p.is_file() else None

    @property
    def manifest_path(self) -> Path | None:
        p = self.path / MANIFEST_NAME
        return p if p.is_file() else None

    def config(self) -> InferenceConfig | None:
        """The parsed inference_config.json (None for a plain nnU-Net folder)."""
        return InferenceConfig.load(self.config_path) if self.config_path else None


def _model_name(path: Path) -> str:
    return path.parent.name if _is_trainer_folder(path.name) else path.name


def _find_nnunet_dir(root: Path) -> Path | None:
    if is_nnunet_dir(root):
        return root
    hits = []
    for dirpath, dirs, _files in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.startswith("fold_"))
        if depth > 2:
            dirs[:] = []
            continue
        if is_nnunet_dir(Path(dirpath)):
            hits.append(Path(dirpath))
            dirs[:] = []
    if len(hits) > 1:
        raise ModelError(f"{root}: holds several nnU-Net folders ({', '.join(h.name for h in hits)}); keep one")
    return hits[0] if hits else None


def open_model_folder(path: str | os.PathLike) -> ModelFolder:
    """Recognise the layout of a model folder given by path.

    A folder that is neither layout but holds exactly one model below it (e.g. an unpacked SPINEPS zip) is accepted.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"{p}: no such model folder")
    if p.is_file() and p.name == CONFIG_NAME:
        p = p.parent
    if not p.is_dir():
        raise ModelError(f"{p}: not a folder")
    if (p / CONFIG_NAME).is_file():
        return ModelFolder(_model_name(p), p, "spineps", _find_nnunet_dir(p))
    if is_nnunet_dir(p):
        return ModelFolder(_model_name(p), p, "nnunet", p)
    found = list(_walk_models(p))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelError(f"{p}: no {CONFIG_NAME} and no nnU-Net results folder (plans.json, dataset.json, fold_*) found")
    raise ModelError(f"{p}: holds several models ({', '.join(str(m.path) for m in found)}); pass one of them")


def _walk_models(root: Path):
    for dirpath, dirs, files in os.walk(root):
        d = Path(dirpath)
        depth = len(d.relative_to(root).parts)
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and not x.startswith("fold_") and x != "__pycache__")
        if CONFIG_NAME in files:
            dirs[:] = []
            yield ModelFolder(_model_name(d), d, "spineps", None)
        elif "plans.json" in files and "dataset.json" in files and is_nnunet_dir(d):
            dirs[:] = []
            yield ModelFolder(_model_name(d), d, "nnunet", d)
        elif depth >= _MAX_DEPTH:
            dirs[:] = []


def discover_models(roots: list[Path] | None = None) -> dict[str, ModelFolder]:
    """{name: ModelFolder} of every model below the search roots (see :func:`model_roots`).

    Cheap: only folder listings are read, no config is parsed and no weight is opened. The first of two models with
    the same name (case-insensitive) wins; the shadowed one is reported with a warning.
    """
    out: dict[str, ModelFolder] = {}
    for root in model_roots() if roots is None else roots:
        for m in _walk_models(Path(root)):
            key = m.name.lower()
            if key in out:
                if out[key].path.resolve() != m.path.resolve():
                    warnings.warn(f"model {m.name!r} at {m.path} is shadowed by {out[key].path}", stacklevel=2)
                continue
            out[key] = m
    return out


def find_model(name: str | os.PathLike) -> ModelFolder:
    """A model by name (see :func:`discover_models`) or by path.

    Raises :class:`ModelError` with a one-line message listing the names found when the name is unknown.
    """
    s = str(name)
    if os.sep in s or (os.altsep and os.altsep in s) or Path(s).is_dir():
        m = open_model_folder(s)
    else:
        models = discover_models()
        if s.lower() not in models:
            where = ", ".join(str(r) for r in model_roots()) or "(no model folder exists)"
            names = ", ".join(sorted(m.name for m in models.values())) or "none"
            raise ModelError(f"unknown model {s!r}; models found: {names} (searched {where}; add folders with ${MODELS_ENV})")
        m = models[s.lower()]
    if m.layout == "spineps" and m.nnunet_dir is None:
        m = ModelFolder(m.name, m.path, m.layout, _find_nnunet_dir(m.path))
    return m


def read_instance_folder(folder: Path) -> tuple[Path, dict, Path]:
    """(config path, config, weights file) of a SPINEPS-layout instance model folder: ``inference_config.json`` of a
    'unet' model and exactly one ``*.ckpt`` (or ``*.pt``) weights file. Raises :class:`ModelError` naming the file and
    the problem. Reads no weights (no torch needed)."""
    import json

    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise ModelError(f"{folder}: no {CONFIG_NAME}; not an instance model")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{cfg_path}: not a JSON object")
    modeltype = str(config.get("modeltype", "unet")).lower()
    if modeltype != "unet":
        raise ModelError(f"{cfg_path}: modeltype is {modeltype!r}, an instance model needs 'unet'")
    ckpts = sorted(folder.glob("**/*.ckpt")) or sorted(folder.glob("**/*.pt"))
    weights = [c for c in ckpts if "weights" in c.name] or ckpts
    if len(weights) != 1:
        raise ModelError(f"{folder}: expected one *.ckpt or *.pt weights file, found {len(weights)}")
    return cfg_path, config, weights[0]

