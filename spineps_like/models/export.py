"""Export of our model folders to folders SPINEPS 2.1.3 loads unchanged.

SPINEPS finds models by ``inference_config.json`` below ``$SPINEPS_SEGMENTOR_MODELS`` (or a path handed to
``get_actual_model``) and needs, per model type:

* **semantic** (``modeltype: nnunet``): ``inference_config.json`` *inside* the nnU-Net results folder
  (TPTBox' ``load_inf_model`` reads ``plans.json``/``dataset.json``/``fold_*/checkpoint_final.pth`` from the folder
  holding the config; the model's name is the parent's name because the folder name contains ``nnUNetPlans``).
  The checkpoint must carry ``trainer_name`` and ``init_args['configuration']``; ``labels`` values must be TPTBox
  ``Location`` names, vertebra names or integers; modalities must be SPINEPS ``Modality`` names.
* **instance** (``modeltype: unet``): ``inference_config.json`` with ``modality: SEG`` (how SPINEPS tells an instance
  model from a semantic one) and exactly one ``*weights*.ckpt``, restored with ``PLNet.load_from_checkpoint``, which
  first builds spineps' ``Unet3D(dim=16, channels=10)`` and, when the state dict does not fit, the newer
  ``PLNet(dim=hparams['dim'], num_channels=hparams['num_channels'])``; ``dim_mults`` is fixed to ``(1, 2, 4, 8)``.
  The checkpoint's ``hyper_parameters`` are therefore written so that the newer class rebuilds our network's shape.
  ``corpus_size_cleaning``/``vert_size_threshold`` are voxel counts on the model grid in SPINEPS; they are rescaled
  from SPINEPS' reference grid (0.75 x 0.75 x 1.65 mm) to the model's resolution so they keep their volume in mm^3.

Both exported folders get a ``MANIFEST.sha256`` (SPINEPS ignores it; our loaders verify it), so
:func:`spineps_like.models.load_semantic_model` and :func:`spineps_like.instance.network.load_instance_model` load
the very same folders.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from spineps_like.io import atomic_path, atomic_write_json
from spineps_like.models.config import CONFIG_NAME
from spineps_like.models.manifest import MANIFEST_NAME, ModelError, write_manifest

__all__ = ["SPINEPS_MODALITIES", "SPINEPS_REFERENCE_VOXEL_MM3", "SPINEPS_VERSION", "describe_export",
           "export_instance", "export_semantic", "export_spineps", "list_models", "spineps_label_name"]

#: The SPINEPS release the exported folders are written for (and tested against).
SPINEPS_VERSION = "2.1.3"
#: ``spineps.seg_enums.Modality`` members in 2.1.3.
SPINEPS_MODALITIES = ("T2w", "T1w", "Vibe", "CT", "SEG", "MPR", "PD")
#: spineps' instance ``PLNet`` (both versions) hard-codes these; other values cannot be restored by SPINEPS.
_SPINEPS_DIM_MULTS = (1, 2, 4, 8)
_SPINEPS_OUT_DIM = 4
_SPINEPS_GROUPS = 8
#: Options spineps' newer ``PLNet.__init__`` reads from its hyper-parameters (training settings; unused at inference).
_PLNET_TRAINING_HPARAMS = {"n_epoch": 0, "lr": 1e-4, "lr_end_factor": 0.01, "l2_reg_w": 1e-4, "dsc_loss_w": 1.0}
#: Voxel volume (mm^3) SPINEPS' voxel-count thresholds (corpus_size_cleaning 100, vert_size_threshold 250) were tuned
#: for: its instance model's grid, 0.75 x 0.75 x 1.65 mm.
SPINEPS_REFERENCE_VOXEL_MM3 = 0.75 * 0.75 * 1.65
_SIZE_THRESHOLDS = {"corpus_size_cleaning": 100, "vert_size_threshold": 250}
#: nnU-Net results folder name SPINEPS' released semantic models use.
_DEFAULT_NNUNET_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def spineps_label_name(label: int) -> str:
    """The string SPINEPS resolves to ``label``: the TPTBox ``Location`` name when there is one, else the number.

    >>> spineps_label_name(49), spineps_label_name(100), spineps_label_name(26)
    ('Vertebra_Corpus_border', 'Vertebra_Disc', 'Sacrum')
    """
    try:
        from TPTBox import Location

        return Location(int(label)).name
    except (ImportError, ValueError):
        return str(int(label))


def _fresh_dir(path: Path, overwrite: bool, source: Path) -> None:
    if Path(source).resolve().is_relative_to(path.resolve()):
        raise ModelError(f"{path}: is the source model's own folder; export to another folder")
    if path.exists():
        if not overwrite:
            raise ModelError(f"{path}: already exists; pass overwrite=True to replace it")
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _semantic_config(model: Any) -> dict[str, Any]:
    """SPINEPS inference_config.json of a loaded :class:`~spineps_like.models.SemanticModel`."""
    cfg = model.config
    mods = [m for m in cfg.modalities if m in SPINEPS_MODALITIES]
    if not mods:
        raise ModelError(f"{model.folder.path}: modalities {list(cfg.modalities)} are none of SPINEPS' "
                         f"{list(SPINEPS_MODALITIES)}")
    rr = cfg.resolution_range
    if rr is None:  # plain nnU-Net folder: the plans' spacing (nnU-Net order is reversed PIR)
        rr = [float(s) for s in model.nnunet.configuration_manager.spacing[::-1]]
    out = {k: v for k, v in cfg.raw.items() if k not in ("labels",)}  # keep SPINEPS' optional keys (has_c1, ...)
    out.update({
        "log_name": cfg.log_name,
        "modality": mods if len(mods) > 1 else mods[0],
        "acquisition": cfg.acquisition,
        "modeltype": "nnunet",
        "model_expected_orientation": list(cfg.orientation),
        "available_folds": [str(f) for f in model.default_folds],
        "inference_augmentation": bool(cfg.inference_augmentation),
        "resolution_range": rr,
        "default_step_size": float(cfg.default_step_size),
        "labels": {str(i): spineps_label_name(lab) for i, lab in sorted(cfg.labels.items()) if i != 0},
        "expected_inputs": list(cfg.raw.get("expected_inputs", ["img"])),
    })
    return out


def export_semantic(model_name: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = True,
                    verify: bool = True) -> Path:
    """Export a semantic nnU-Net model as ``out_dir/<name>/<Trainer>__<Plans>__<config>/`` (config inside).

    Returns the folder holding ``inference_config.json`` (what SPINEPS' ``get_actual_model`` and our
    :func:`~spineps_like.models.load_semantic_model` both take).
    """
    import torch

    from spineps_like.models import load_semantic_model
    from spineps_like.models.nnunet import checkpoint_path, load_checkpoint

    model = load_semantic_model(model_name, verify=verify)  # validates manifest, labels and weights
    src = model.nnunet.dir
    nn_name = src.name if "nnUNetPlans" in src.name else _DEFAULT_NNUNET_FOLDER
    root = Path(out_dir) / model.name
    _fresh_dir(root, overwrite, src)
    dst = root / nn_name
    dst.mkdir()
    for f in ("plans.json", "dataset.json"):
        shutil.copyfile(src / f, dst / f)
    for fold in model.default_folds:
        ck_src = checkpoint_path(src, fold, model.nnunet.checkpoint)
        ck_dst = dst / f"fold_{fold}" / "checkpoint_final.pth"
        ck_dst.parent.mkdir()
        ck = load_checkpoint(ck_src)
        init_args = dict(ck.get("init_args") or {})
        if "trainer_name" in ck and init_args.get("configuration") and ck_src.name == ck_dst.name:
            shutil.copyfile(ck_src, ck_dst)  # already what TPTBox' predictor reads: copy the bytes
        else:  # add what TPTBox' predictor reads (trainer name, plans configuration)
            init_args["configuration"] = model.nnunet.configuration
            slim = {"network_weights": ck["network_weights"], "trainer_name": model.nnunet.trainer_name,
                    "init_args": init_args,
                    "inference_allowed_mirroring_axes": tuple(model.nnunet.allowed_mirroring_axes)}
            with atomic_path(ck_dst) as tmp:
                torch.save(slim, tmp)
    atomic_write_json(dst / CONFIG_NAME, _semantic_config(model))
    write_manifest(dst)
    return dst


def _instance_checkpoint(network: Any, source: Path) -> dict[str, Any]:
    arch = network.architecture()
    problems = []
    if tuple(arch["dim_mults"]) != _SPINEPS_DIM_MULTS:
        problems.append(f"dim_mults {tuple(arch['dim_mults'])} (SPINEPS builds {_SPINEPS_DIM_MULTS})")
    if arch["out_dim"] != _SPINEPS_OUT_DIM:
        problems.append(f"out_dim {arch['out_dim']} (SPINEPS builds {_SPINEPS_OUT_DIM})")
    if arch["init_dim"] != arch["dim"]:
        problems.append(f"init_dim {arch['init_dim']} != dim {arch['dim']}")
    if arch["groups"] != _SPINEPS_GROUPS:
        problems.append(f"GroupNorm groups {arch['groups']} (SPINEPS uses {_SPINEPS_GROUPS})")
    if problems:
        raise ModelError(f"{source}: network cannot be restored by SPINEPS' PLNet: {'; '.join(problems)}")
    from spineps_like.instance.network import lightning_checkpoint

    hparams = {"dim": int(arch["dim"]), "num_channels": int(arch["channels"]),
               "channelwise": int(arch["channels"]) != 1, "do2D": False, **_PLNET_TRAINING_HPARAMS,
               "architecture": arch, "exported_from": str(source)}
    ckpt = lightning_checkpoint(network, hyper_parameters=hparams)
    ckpt["pytorch-lightning_version"] = "2.4.0"
    return ckpt


def export_instance(model_name: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = True,
                    verify: bool = True) -> Path:
    """Export an instance (Unet3D) model as ``out_dir/<name>/`` with ``inference_config.json`` + ``<name>_weights.ckpt``.

    Returns the model folder (what SPINEPS' ``get_actual_model`` and our ``load_instance_model`` both take).
    """
    import torch

    from spineps_like.instance.network import load_instance_model
    from spineps_like.models.folders import find_model

    folder = find_model(model_name).path
    model = load_instance_model(folder, verify=verify)
    if verify and not model.verified:
        raise ModelError(f"{folder}: no {MANIFEST_NAME}; export needs a verified model folder (or verify=False)")
    ckpt = _instance_checkpoint(model.network, folder)  # refuses networks SPINEPS' PLNet cannot rebuild
    cfg = dict(model.config)
    mods = cfg.get("modality", "SEG")
    if "SEG" not in (mods if isinstance(mods, (list, tuple)) else [mods]):
        raise ModelError(f"{folder / CONFIG_NAME}: modality {mods!r} lacks 'SEG'; SPINEPS would take it for a "
                         "semantic model")
    # SPINEPS applies these as voxel counts on the model's grid; keep their physical volume on a coarser grid
    # (at 3 mm, 100 voxels = 2700 mm^3 would delete every corpus left after SPINEPS' 2-voxel erosion)
    if model.resolution_range is None:
        raise ModelError(f"{folder / CONFIG_NAME}: no resolution_range; SPINEPS needs the instance model's spacing")
    rr = np.asarray(model.resolution_range, dtype=float)
    voxel_mm3 = float(np.prod(rr if rr.ndim == 1 else rr[0]))
    for key, default in _SIZE_THRESHOLDS.items():
        cfg[key] = max(1, round(float(cfg.get(key, default)) * SPINEPS_REFERENCE_VOXEL_MM3 / voxel_mm3))
    cfg.update({
        "modeltype": "unet",
        "expected_inputs": ["seg"],
        "cutout_size": list(model.cutout_size),
        "mapping": {str(k): int(v) for k, v in model.mapping.items()},
    })
    root = Path(out_dir) / folder.name
    _fresh_dir(root, overwrite, folder)
    atomic_write_json(root / CONFIG_NAME, cfg)
    with atomic_path(root / f"{folder.name}_weights.ckpt") as tmp:
        torch.save(ckpt, tmp)
    write_manifest(root)
    return root


def export_spineps(out_dir: str | os.PathLike, semantic_model: str | os.PathLike | None = "semantic-phantom",
                   instance_model: str | os.PathLike | None = "instance-phantom", *, overwrite: bool = True,
                   verify: bool = True) -> list[Path]:
    """Write our models as SPINEPS 2.1.3 model folders below ``out_dir`` (``SPINEPS_SEGMENTOR_MODELS=out_dir``).

    Parameters
    ----------
    out_dir
        Folder to write into (created); each model goes to ``out_dir/<model name>/``.
    semantic_model, instance_model
        Names (bundled or in ``$SPINEPS_LIKE_MODELS``) or folder paths; None skips that model.
    overwrite
        Replace an existing export of the same name.
    verify
        Refuse source folders whose ``MANIFEST.sha256`` is missing (instance) or does not match.

    Returns
    -------
    list of Path
        The exported folders that hold ``inference_config.json``, semantic first.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if semantic_model is not None:
        paths.append(export_semantic(semantic_model, out, overwrite=overwrite, verify=verify))
    if instance_model is not None:
        paths.append(export_instance(instance_model, out, overwrite=overwrite, verify=verify))
    if not paths:
        raise ValueError("export_spineps: nothing to export (both semantic_model and instance_model are None)")
    return paths


def describe_export(paths: list[Path]) -> str:
    """One line per exported folder: kind, name and path (for the CLI)."""
    lines = []
    for p in paths:
        cfg = json.loads((p / CONFIG_NAME).read_text())
        name = p.parent.name if "nnUNetPlans" in p.name else p.name
        lines.append(f"{cfg['modeltype']:7s} {name:24s} {p}")
    return "\n".join(lines)


def list_models() -> list[dict[str, str]]:
    """One row per model found by :func:`~spineps_like.models.discover_models` (for ``spineps-like models list``):
    name, kind (semantic / instance / classifier / unknown), layout, manifest (yes/no) and path. Reads only configs."""
    from spineps_like.models.folders import discover_models

    rows = []
    for m in sorted(discover_models().values(), key=lambda m: m.name.lower()):
        kind = "semantic" if m.layout == "nnunet" else "unknown"
        if m.config_path is not None:
            try:
                cfg = json.loads(m.config_path.read_text())
                mods = cfg.get("modality", [])
                mods = mods if isinstance(mods, list) else [mods]
                kind = {"unet": "instance", "classifier": "classifier"}.get(cfg.get("modeltype"), "semantic")
                if cfg.get("modeltype") == "nnunet" and "SEG" in mods:
                    kind = "instance"
            except (OSError, json.JSONDecodeError):
                kind = "unreadable"
        rows.append({"name": m.name, "kind": kind, "layout": m.layout,
                     "manifest": "yes" if m.manifest_path is not None else "no", "path": str(m.path)})
    return rows
