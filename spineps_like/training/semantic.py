"""Train the semantic nnU-Net on phantoms and write a SPINEPS-layout model folder.

Steps (each a function, so tests and other datasets can reuse them):

1. :func:`phantom_cases` — phantoms from :func:`spineps_like.phantom.make_phantom`: T2w-like and domain-randomised
   images over several fields of view, anatomical variants, spacings and orientations.
2. :func:`prepare_case` — exactly what inference does before nnU-Net: MRI intensity normalisation, reorientation to
   PIR, each axis resampled into the model's resolution range (images cubic, masks nearest).
3. :func:`write_raw_dataset` — an nnU-Net raw dataset (imagesTr/labelsTr as PIR NIfTI read by SimpleITKIO, the same
   axis order inference hands to nnU-Net; dataset.json with consecutive indices named by the scheme's labels).
4. :func:`small_plans` — a small plans.json written directly (PlainConvUNet, features 8..64, a ~80x80x24 patch in
   P, I, R at 1.2 x 1.2 x 3 mm: ~0.4-0.5 s per iteration of batch 2 on 2 CPU cores), then nnU-Net's fingerprint
   extraction and DefaultPreprocessor.
5. :func:`train` — a minimal ``nnUNetTrainer`` subclass (iterations instead of 1000 epochs, CPU, no torch.compile,
   a checkpoint every epoch, resumable), constructed directly, never looked up by name.
6. :func:`export_model_folder` — inference_config.json + the nnU-Net folder (weights-only checkpoint) + TRAINING.md
   + MANIFEST.sha256, every file <= 16 MB.

Run::

    python -m spineps_like.training.semantic --out models/spineps_like_semantic --n-train 60 --seed 0 --iterations 3000
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from spineps_like.geometry import to_model_grid
from spineps_like.io import Scan, atomic_write_json, atomic_write_text, save_mask, save_scan
from spineps_like.assign import map_aliases
from spineps_like.labels import SEMANTIC_NAMES, Semantic
from spineps_like.models.config import CONFIG_NAME
from spineps_like.models.manifest import MANIFEST_NAME, ModelError, write_manifest
from spineps_like.phantom import VARIANTS as PHANTOM_VARIANTS
from spineps_like.phantom_sets import EVALUATION_SEEDS, check_training_seeds
from spineps_like.semantic import normalize_intensity

#: Model grid: PIR, P and I fixed at 1.2 mm, R (the sagittal slice axis) kept between 2 and 4 mm.
RESOLUTION_RANGE: list[list[float]] = [[1.2, 1.2, 2.0], [1.2, 1.2, 4.0]]
#: nnU-Net's own target spacing (P, I, R).
TARGET_SPACING: tuple[float, float, float] = (1.2, 1.2, 3.0)
#: Patch in P, I, R voxels (96 x 96 x 72 mm).
PATCH_SIZE: tuple[int, int, int] = (80, 80, 24)
PLANS_NAME = "SmallCPUPlans"
CONFIGURATION = "3d_fullres"
TRAINER_NAME = "SpinepsLikeSemanticTrainer"
MAX_FILE_BYTES = 16 * 1024 * 1024
FOVS = ("lumbar", "thoracic", "cervical", "whole")
#: Phantom seeds of the evaluation sets (development and test, :mod:`spineps_like.phantom_sets`): training never
#: draws them, and :func:`run_training` refuses specs that hold one.
HELD_OUT_SEEDS = EVALUATION_SEEDS
#: Labels of a synthetic-appearance dataset, fixed so that runs (and fine-tuning from the bundled model) agree.
TRAINING_LABELS: tuple[int, ...] = (26, 41, 42, 43, 44, 45, 46, 47, 48, 49, 52, 53, 60, 61, 100)
#: Modalities of a model trained with synthetic appearance (SPINEPS' config names).
SYNTH_MODALITIES: tuple[str, ...] = ("T2w", "T1w", "PD", "CT")
#: Variants a training draw picks from by default: those of phantom generator 1.0, so that a recorded command
#: (seed, n) draws the same phantoms after newer variants were added; ``--variants`` widens it (e.g. listhesis).
VARIANTS = ("block", "collapsed", "l6", "t13", "sacralised_l5", "narrow_discs")


# ---------------------------------------------------------------- data
def prepare_case(
    image: Scan,
    semantic: Scan,
    *,
    orientation: str = "PIR",
    resolution_range: Sequence | None = RESOLUTION_RANGE,
    normalize: bool = True,
) -> tuple[Scan, Scan]:
    """Bring an image and its semantic mask onto the model grid exactly as :func:`~spineps_like.semantic.predict_semantic`
    brings an input there (normalisation, reorientation, resampling); aliases such as 50 -> 49 are applied."""
    if image.shape != semantic.shape or not np.allclose(image.affine, semantic.affine, atol=1e-4):
        raise ValueError(f"image {image.shape} and semantic mask {semantic.shape} are not on the same grid")
    arr = normalize_intensity(image.array) if normalize else image.array.astype(np.float32)
    img = to_model_grid(Scan(arr, image.affine), orientation, resolution_range, order=3)
    seg = to_model_grid(Scan(map_aliases(semantic.array), semantic.affine), orientation, resolution_range, order=0)
    if seg.shape != img.shape or not np.allclose(seg.affine, img.affine, atol=1e-4):
        raise AssertionError("image and mask ended on different model grids")
    return img, Scan(seg.array, img.affine.copy())


@dataclass
class CaseSpec:
    """How one training phantom is drawn (recorded in TRAINING.md)."""

    case_id: str
    seed: int
    fov: str
    mode: str
    variant: str | None


def case_specs(n: int, seed: int, *, t2w_fraction: float = 0.5, fovs: Sequence[str] = FOVS,
               variant_fraction: float = 0.3, variants: Sequence[str] = VARIANTS) -> list[CaseSpec]:
    """Deterministic draw of ``n`` phantom specs: FOVs cycled, T2w-like vs. domain-randomised, some variants."""
    from spineps_like.phantom import visible_variants

    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        mode = "t2w" if rng.random() < t2w_fraction else "random"
        fov = fovs[i % len(fovs)]
        pool = [v for v in visible_variants(fov) if v in variants]
        variant = str(rng.choice(pool)) if rng.random() < variant_fraction and pool else None
        seed_i = int(rng.integers(0, 2**31 - 1))
        while seed_i in HELD_OUT_SEEDS:  # never draw an evaluation phantom (no draw of the bundled models did)
            seed_i = int(rng.integers(0, 2**31 - 1))
        specs.append(CaseSpec(f"phantom_{i:04d}", seed_i, fov, mode, variant))
    return specs


def phantom_cases(specs: Iterable[CaseSpec], **prepare_kwargs) -> Iterator[tuple[str, Scan, Scan]]:
    """(case_id, image, semantic) on the model grid for each spec (phantoms with random spacing and orientation)."""
    from spineps_like.phantom import make_phantom

    for s in specs:
        ph = make_phantom(s.seed, fov=s.fov, mode=s.mode, variant=s.variant, spacing=None, orientation="random")
        img, seg = prepare_case(ph.image, ph.semantic, **prepare_kwargs)
        yield s.case_id, img, seg


def write_raw_dataset(cases: Iterable[tuple[str, Scan, Scan]], raw_dir: str | os.PathLike, *,
                      channel_name: str = "T2w", labels: Sequence[int] | None = None) -> dict:
    """Write an nnU-Net raw dataset and return its dataset.json.

    Label indices are consecutive (0 background, then the scheme labels in ascending order: those given, else those
    present in the masks) and named by the scheme (TPTBox ``Location`` names), so the folder is readable without
    our config. Images are read by SimpleITKIO, i.e. in the axis order predict_semantic hands arrays to nnU-Net.
    """
    raw = Path(raw_dir)
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    written: list[tuple[str, Path]] = []
    present: set[int] = set()
    for case_id, img, seg in cases:
        save_scan(Scan(img.array.astype(np.float32), img.affine), raw / "imagesTr" / f"{case_id}_0000.nii.gz")
        tmp = raw / "labelsTr" / f".{case_id}.scheme.nii.gz"
        save_mask(seg, tmp)
        written.append((case_id, tmp))
        present |= set(np.unique(seg.array).tolist()) - {0}
    if not written:
        raise ValueError("write_raw_dataset: no cases")
    scheme = {int(s) for s in Semantic}
    wanted = sorted(present) if labels is None else sorted(labels)
    bad = sorted(set(wanted) - scheme)
    if bad:
        raise ValueError(f"write_raw_dataset: labels {bad} are outside the semantic scheme")
    lut = np.zeros(256, dtype=np.uint8)
    for i, lab in enumerate(wanted, 1):
        lut[lab] = i
    import nibabel as nib

    for case_id, tmp in written:
        m = nib.load(str(tmp))
        arr = np.asarray(m.dataobj)
        stray = sorted(set(np.unique(arr).tolist()) - set(wanted) - {0})
        if stray:
            raise ValueError(f"write_raw_dataset: case {case_id} holds labels {stray} not in {wanted}")
        save_mask(Scan(lut[arr], m.affine), raw / "labelsTr" / f"{case_id}.nii.gz")
        tmp.unlink()
    dataset_json = {
        "name": raw.name,
        "description": "spineps-like phantoms on the semantic model grid (PIR)",
        "channel_names": {"0": channel_name},
        "labels": {"background": 0, **{SEMANTIC_NAMES[lab]: i for i, lab in enumerate(wanted, 1)}},
        "numTraining": len(written),
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "SimpleITKIO",
    }
    atomic_write_json(raw / "dataset.json", dataset_json)
    return dataset_json


# ---------------------------------------------------------------- plans
def small_plans(
    dataset_name: str,
    spacing: Sequence[float],
    patch_size: Sequence[int],
    *,
    median_shape: Sequence[int] | None = None,
    base_features: int = 8,
    max_features: int = 64,
    n_conv_encoder: int = 2,
    n_conv_decoder: int = 1,
    batch_size: int = 2,
    normalization: str = "ZScoreNormalization",
    intensity_properties: dict | None = None,
    plans_name: str = PLANS_NAME,
) -> dict:
    """An nnU-Net v2 plans dict with one ``3d_fullres`` configuration of a small PlainConvUNet.

    ``spacing`` and ``patch_size`` are in nnU-Net's axis order (the reverse of the PIR arrays, as SimpleITK reads
    them). The topology (pooling per axis, kernel sizes, a patch divisible by them) comes from nnU-Net's
    ``get_pool_and_conv_props``; features double per stage from ``base_features`` up to ``max_features``.
    """
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    spacing = [float(s) for s in spacing]
    _, pool, conv, patch, _ = get_pool_and_conv_props(spacing, list(patch_size), 4, 999999)
    n = len(pool)
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": [min(max_features, base_features * 2**i) for i in range(n)],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[int(k) for k in ks] for ks in conv],
            "strides": [[int(s) for s in st] for st in pool],
            "n_conv_per_stage": [n_conv_encoder] * n,
            "n_conv_per_stage_decoder": [n_conv_decoder] * (n - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    resample = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    conf = {
        "data_identifier": f"{plans_name}_{CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": int(batch_size),
        "patch_size": [int(p) for p in patch],
        "median_image_size_in_voxels": [int(m) for m in (median_shape or patch)],
        "spacing": spacing,
        "normalization_schemes": [normalization],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resample,
        "resampling_fn_seg_kwargs": {**resample, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resample, "order": 1},
        "architecture": arch,
        "batch_dice": False,
    }
    props = intensity_properties or {"0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": 0.0,
                                           "percentile_00_5": 0.0, "percentile_99_5": 1.0, "std": 1.0}}
    return {
        "dataset_name": dataset_name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": [int(m) for m in (median_shape or patch)],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: conf},
        "experiment_planner_used": "spineps_like.training.semantic.small_plans",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": props,
    }


def _nnunet_env(work: Path) -> dict[str, Path]:
    paths = {k: work / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for k, p in paths.items():
        p.mkdir(parents=True, exist_ok=True)
        os.environ[k] = str(p)
    return paths


def plan_and_preprocess(dataset_id: int, dataset_name: str, *, spacing_pir: Sequence[float],
                        patch_pir: Sequence[int], batch_size: int = 2, base_features: int = 8,
                        max_features: int = 64, num_processes: int = 2,
                        normalization: str = "ZScoreNormalization") -> dict:
    """Fingerprint (nnU-Net), write :func:`small_plans`, run nnU-Net's DefaultPreprocessor. Needs the nnUNet_* env."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    pre = Path(os.environ["nnUNet_preprocessed"]) / dataset_name
    fp = DatasetFingerprintExtractor(dataset_id, num_processes, verbose=False).run(overwrite_existing=True)
    median_shape = np.median(np.asarray(fp["shapes_after_crop"]), 0).round().astype(int).tolist()
    plans = small_plans(
        dataset_name, list(spacing_pir)[::-1], list(patch_pir)[::-1], median_shape=median_shape,
        batch_size=batch_size, base_features=base_features, max_features=max_features,
        intensity_properties=fp["foreground_intensity_properties_per_channel"], normalization=normalization,
    )
    pre.mkdir(parents=True, exist_ok=True)
    atomic_write_json(pre / f"{PLANS_NAME}.json", plans)
    shutil.copy(Path(os.environ["nnUNet_raw"]) / dataset_name / "dataset.json", pre / "dataset.json")
    DefaultPreprocessor(verbose=False).run(dataset_id, CONFIGURATION, PLANS_NAME, num_processes=num_processes)
    return plans


def write_splits(preprocessed_dir: Path, case_ids: Sequence[str], seed: int, val_fraction: float = 0.2) -> list:
    """One train/val split (fold 0), seeded; at least one validation case (the training case itself when n = 1)."""
    ids = sorted(case_ids)
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(len(ids)))
    n_val = max(1, int(round(len(ids) * val_fraction))) if len(ids) > 1 else 0
    val = sorted(ids[i] for i in order[:n_val]) or ids
    train = sorted(ids[i] for i in order[n_val:]) or ids
    splits = [{"train": train, "val": val}]
    atomic_write_json(preprocessed_dir / "splits_final.json", splits)
    return splits


# ---------------------------------------------------------------- training
@functools.cache
def trainer_class():
    """The minimal nnUNetTrainer subclass (defined on first use: importing nnU-Net's trainer is slow)."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class SpinepsLikeSemanticTrainer(nnUNetTrainer):
        """nnUNetTrainer with an iteration budget, a checkpoint every epoch and no torch.compile."""

        iterations = 250
        iterations_per_epoch = 50
        val_iterations = 5
        #: Network axes that may be mirrored (set by :func:`train` from the labels: never a side or an end flip).
        mirror_axes: tuple[int, ...] = (0, 1, 2)
        #: In-plane rotation range; nnU-Net's +-180 deg for anisotropic patches would turn superior endplates into
        #: inferior ones, +-30 deg covers real sagittal tilt.
        max_rotation_deg = 30.0
        #: "sgd" (nnU-Net's SGD, Nesterov momentum 0.99) or "adamw" (AMSGrad AdamW, as nnUNetTrainerAdam):
        #: AdamW reaches all labels within a CPU-sized iteration budget, SGD's poly schedule is tuned for 250k.
        optimizer_name = "sgd"
        #: initial learning rate (None: nnU-Net's 1e-2)
        learning_rate: float | None = None
        #: share of each batch centred on a random voxel of a random foreground label (nnU-Net: 0.33)
        oversample_foreground = 0.33
        #: images are tissue maps, painted per patch by :class:`~spineps_like.training.synthetic.SynthesizeAppearance`
        synthetic_appearance = False
        synthesis_seed = 0
        #: share of painted patches that are negatives: no spine in the image, none in the labels
        synthesis_negatives = 0.0
        #: upper bound of the painted MRI noise (None: synthesize's default)
        synthesis_noise_max = None

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch = int(min(self.iterations_per_epoch, self.iterations))
            self.num_epochs = int(math.ceil(self.iterations / self.num_iterations_per_epoch))
            self.num_val_iterations_per_epoch = int(self.val_iterations)
            self.save_every = 1
            self.oversample_foreground_percent = float(self.oversample_foreground)
            if self.learning_rate is not None:
                self.initial_lr = float(self.learning_rate)

        def configure_optimizers(self):
            if self.optimizer_name == "sgd":
                return super().configure_optimizers()
            from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

            opt = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay,
                                    amsgrad=True)
            return opt, PolyLRScheduler(opt, self.initial_lr, self.num_epochs)

        def _do_i_compile(self) -> bool:
            return False

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            from nnunetv2.configuration import ANISO_THRESHOLD
            from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

            patch = self.configuration_manager.patch_size
            dummy_2d = (max(patch) / patch[0]) > ANISO_THRESHOLD
            rot = (-math.radians(self.max_rotation_deg), math.radians(self.max_rotation_deg))
            initial = get_patch_size(patch, rot, rot, rot, (0.85, 1.25))
            if dummy_2d:
                initial[0] = patch[0]
            self.print_to_log_file(f"do_dummy_2d_data_aug: {dummy_2d}; mirror axes {self.mirror_axes}; rotation "
                                   f"+-{self.max_rotation_deg} deg")
            self.inference_allowed_mirroring_axes = tuple(self.mirror_axes)
            return rot, dummy_2d, initial, tuple(self.mirror_axes)

        def plot_network_architecture(self) -> None:  # needs hiddenlayer/graphviz; not wanted here
            return None

        def _with_synthesis(self, transforms, stream: int):
            if not self.synthetic_appearance:
                return transforms
            from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

            from spineps_like.training.synthetic import synthesis_transform_class

            synth = synthesis_transform_class()(seed=[self.synthesis_seed, stream, self.current_epoch],
                                                spacing=self.configuration_manager.spacing,
                                                negatives=self.synthesis_negatives,
                                                noise_max=self.synthesis_noise_max)
            return ComposeTransforms([synth, *transforms.transforms])

        def get_training_transforms(self, *args, **kwargs):
            return self._with_synthesis(nnUNetTrainer.get_training_transforms(*args, **kwargs), 0)

        def get_validation_transforms(self, *args, **kwargs):
            return self._with_synthesis(nnUNetTrainer.get_validation_transforms(*args, **kwargs), 1)

    SpinepsLikeSemanticTrainer.__name__ = SpinepsLikeSemanticTrainer.__qualname__ = TRAINER_NAME
    return SpinepsLikeSemanticTrainer


def train(dataset_name: str, *, iterations: int, iterations_per_epoch: int = 50, val_iterations: int = 5,
          fold: int | str = 0, device: str = "cpu", resume: bool = False, optimizer: str = "sgd",
          learning_rate: float | None = None, oversample_foreground: float = 0.33, synthetic_appearance: bool = False,
          synthesis_seed: int = 0, init_weights: str | os.PathLike | None = None, export_only: bool = False,
          negatives: float = 0.0, noise_max: float | None = None):
    """Train fold ``fold`` of the preprocessed dataset; returns the trainer (its output_folder holds the checkpoints).

    ``export_only``: load the fold's checkpoint_latest.pth and return without training (to export a run that was
    stopped, or a checkpoint of a run still going).
    ``synthetic_appearance``: the dataset's images are tissue maps, painted anew for every patch; ``negatives`` of
    those patches lose their spine (image and labels: :func:`spineps_like.phantom.appearance.without_spine`);
    ``noise_max`` bounds their MRI noise (None: the painter's default).
    ``init_weights``: a checkpoint (or model folder) whose network weights start a fresh run (fine-tuning); the
    architecture and labels must be the same. Ignored when resuming.
    """
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    pre = Path(os.environ["nnUNet_preprocessed"]) / dataset_name
    plans = load_json(str(pre / f"{PLANS_NAME}.json"))
    dataset_json = load_json(str(pre / "dataset.json"))
    from spineps_like.models.config import label_value
    from spineps_like.models.nnunet import label_safe_mirror_axes

    cls = trainer_class()
    cls.iterations, cls.iterations_per_epoch, cls.val_iterations = iterations, iterations_per_epoch, val_iterations
    cls.optimizer_name, cls.learning_rate, cls.oversample_foreground = optimizer, learning_rate, oversample_foreground
    cls.synthetic_appearance, cls.synthesis_seed = bool(synthetic_appearance), int(synthesis_seed)
    cls.synthesis_negatives = float(negatives)
    cls.synthesis_noise_max = None if noise_max is None else float(noise_max)
    labels = [label_value(n) for n in dataset_json["labels"] if n not in ("background", "ignore")]
    cls.mirror_axes = label_safe_mirror_axes("PIR", plans["transpose_forward"], labels)
    out_fold = fold_dir(dataset_name, fold)
    latest = out_fold / "checkpoint_latest.pth"
    final = out_fold / "checkpoint_final.pth"
    if export_only and not (latest.is_file() or final.is_file()):
        raise ModelError(f"{out_fold}: no checkpoint to export")
    if export_only and not latest.is_file():
        latest = final  # a finished run: nnU-Net removes checkpoint_latest.pth at its end
    cont = bool((resume or export_only) and latest.is_file())
    plans["continue_training"] = cont  # popped by nnUNetTrainer.__init__
    trainer = cls(plans=plans, configuration=CONFIGURATION, fold=fold, dataset_json=dataset_json,
                  device=torch.device(device))
    if cont:
        trainer.load_checkpoint(str(latest))
    elif init_weights is not None:
        load_initial_weights(trainer, init_weights)
    if not export_only:
        trainer.run_training()
    return trainer


def fold_dir(dataset_name: str, fold: int | str) -> Path:
    """The trainer's output folder of ``fold`` under ``$nnUNet_results`` (checkpoints, logs)."""
    return (Path(os.environ["nnUNet_results"]) / dataset_name / f"{TRAINER_NAME}__{PLANS_NAME}__{CONFIGURATION}"
            / f"fold_{fold}")


def initial_checkpoint(source: str | os.PathLike) -> Path:
    """The checkpoint file of ``source``: a .pth file, or a model folder / name (its first fold's final checkpoint)."""
    p = Path(source)
    if p.is_file():
        return p
    from spineps_like.models import find_model
    from spineps_like.models.nnunet import available_folds, checkpoint_path

    folder = find_model(str(source))
    if folder.nnunet_dir is None:
        raise ModelError(f"{folder.path}: no nnU-Net results folder to start from")
    return checkpoint_path(folder.nnunet_dir, available_folds(folder.nnunet_dir)[0], None)


def load_initial_weights(trainer, source: str | os.PathLike) -> None:
    """Start ``trainer``'s network from the weights of ``source`` (strict: same architecture, same labels)."""
    import torch

    ck = torch.load(initial_checkpoint(source), map_location="cpu", weights_only=False)
    if not trainer.was_initialized:
        trainer.initialize()
    net = trainer.network.module if hasattr(trainer.network, "module") else trainer.network
    try:
        net.load_state_dict(ck["network_weights"])
    except RuntimeError as e:
        raise ModelError(f"{source}: its weights do not fit this network ({str(e).splitlines()[0]})") from None
    trainer.print_to_log_file(f"network initialised from {source}")


# ---------------------------------------------------------------- export
def _strip_checkpoint(src: Path, dst: Path, fold: int | str) -> None:
    import torch

    ck = torch.load(src, map_location="cpu", weights_only=False)  # our own fresh checkpoint
    slim = {
        "network_weights": ck["network_weights"],
        "trainer_name": ck.get("trainer_name", TRAINER_NAME),
        "init_args": {"configuration": CONFIGURATION, "fold": fold},
        "inference_allowed_mirroring_axes": tuple(int(a) for a in ck.get("inference_allowed_mirroring_axes") or (0, 1, 2)),
        "current_epoch": int(ck.get("current_epoch", 0)),
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, dst)


def inference_config(dataset_json: dict, *, name: str, fold: int | str, resolution_range: Sequence,
                     orientation: str = "PIR", step_size: float = 0.5,
                     modality: Sequence[str] = ("T2w", "T1w")) -> dict:
    """The SPINEPS inference_config.json of a model trained here."""
    labels = {str(i): n for n, i in dataset_json["labels"].items() if i != 0 and n != "ignore"}
    return {
        "log_name": name,
        "modality": list(modality),
        "acquisition": "sag",
        "modeltype": "nnunet",
        "model_expected_orientation": list(orientation),
        "available_folds": 1 if str(fold) == "0" else [str(fold)],
        "inference_augmentation": False,
        "resolution_range": [list(map(float, r)) for r in resolution_range],
        "default_step_size": step_size,
        "labels": labels,
        "expected_inputs": ["img"],
    }


def export_model_folder(results_dir: Path, out: Path, *, fold: int | str, config: dict, training_md: str,
                        image_channel: str | None = None, checkpoint: str | None = None) -> Path:
    """Write the SPINEPS-layout model folder ``out`` (replaced atomically) and its manifest.

    ``image_channel``: the model was trained on tissue maps painted per patch (``--appearance synth``); the folder's
    plans then normalise an image (:func:`~spineps_like.training.synthetic.inference_plans`) and its dataset.json
    names the channel ``image_channel``. The tissue-map fingerprint is not copied.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    nn = tmp / results_dir.name
    nn.mkdir(parents=True)
    if image_channel is None:
        for f in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
            shutil.copy(results_dir / f, nn / f)
    else:
        from spineps_like.training.synthetic import inference_plans

        atomic_write_json(nn / "plans.json", inference_plans(json.loads((results_dir / "plans.json").read_text())))
        ds = json.loads((results_dir / "dataset.json").read_text())
        ds["channel_names"] = {"0": image_channel}
        ds["description"] = "spineps-like: trained on phantom tissue maps painted per patch (any MRI contrast, CT)"
        atomic_write_json(nn / "dataset.json", ds)
    src_fold = results_dir / f"fold_{fold}"
    ck = src_fold / f"checkpoint_{checkpoint or 'final'}.pth"
    if not ck.is_file() and checkpoint is None:
        ck = src_fold / "checkpoint_best.pth"
    _strip_checkpoint(ck, nn / f"fold_{fold}" / "checkpoint_final.pth", fold)
    for extra in ("progress.png",):
        if (src_fold / extra).is_file():
            shutil.copy(src_fold / extra, nn / f"fold_{fold}" / extra)
    atomic_write_json(tmp / CONFIG_NAME, config)
    atomic_write_text(tmp / "TRAINING.md", training_md)
    big = [p for p in tmp.rglob("*") if p.is_file() and p.stat().st_size > MAX_FILE_BYTES]
    if big:
        raise ModelError(f"{big[0].relative_to(tmp)}: {big[0].stat().st_size / 2**20:.1f} MB exceeds the 16 MB limit")
    write_manifest(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def write_random_model(
    out: str | os.PathLike,
    *,
    labels: Sequence[int] = (41, 49, 60, 61, 100),
    spacing_pir: Sequence[float] = (1.5, 1.5, 2.0),
    patch_pir: Sequence[int] = (32, 32, 16),
    resolution_range: Sequence | None = ((1.5, 1.5, 2.0), (1.5, 1.5, 4.0)),
    orientation: str = "PIR",
    features: tuple[int, int] = (4, 8),
    seed: int = 0,
    layout: str = "spineps",
    manifest: bool = True,
) -> Path:
    """A model folder with random weights of a tiny plan (for tests, smoke runs and benchmarks of the machinery).

    ``layout='spineps'``: ``out/inference_config.json`` + ``out/<Trainer>__<Plans>__3d_fullres/`` (+ manifest);
    ``layout='nnunet'``: ``out`` is a plain nnU-Net results folder. Returns ``out``.
    """
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from spineps_like.models.nnunet import build_network

    out = Path(out)
    dataset_json = {
        "channel_names": {"0": "T2w"},
        "labels": {"background": 0, **{SEMANTIC_NAMES[lab]: i for i, lab in enumerate(sorted(labels), 1)}},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    plans = small_plans("Dataset999_Random", list(spacing_pir)[::-1], list(patch_pir)[::-1], batch_size=1,
                        base_features=features[0], max_features=features[1], n_conv_encoder=1)
    nn = out if layout == "nnunet" else out / f"nnUNetTrainer__{PLANS_NAME}__{CONFIGURATION}"
    (nn / "fold_0").mkdir(parents=True, exist_ok=True)
    atomic_write_json(nn / "plans.json", plans)
    atomic_write_json(nn / "dataset.json", dataset_json)
    pm = PlansManager(plans)
    torch.manual_seed(seed)
    net = build_network(pm, pm.get_configuration(CONFIGURATION), dataset_json)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": CONFIGURATION, "fold": 0},
                "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 0},
               nn / "fold_0" / "checkpoint_final.pth")
    if layout != "nnunet":
        cfg = inference_config(dataset_json, name=out.name, fold=0, resolution_range=resolution_range or [],
                               orientation=orientation)
        if resolution_range is None:
            cfg["resolution_range"] = list(spacing_pir)
        atomic_write_json(out / CONFIG_NAME, cfg)
        if manifest:
            write_manifest(out)
    return out


# ---------------------------------------------------------------- driver
@dataclass
class SemanticTrainingRun:
    """All parameters of one training run (recorded in TRAINING.md and the work folder)."""

    out: str
    n_train: int
    seed: int
    iterations: int
    work: str
    iterations_per_epoch: int = 50
    val_iterations: int = 5
    t2w_fraction: float = 0.5
    fovs: tuple[str, ...] = FOVS
    resolution_range: list = field(default_factory=lambda: [list(r) for r in RESOLUTION_RANGE])
    target_spacing: tuple[float, ...] = TARGET_SPACING
    patch_size: tuple[int, ...] = PATCH_SIZE
    batch_size: int = 2
    base_features: int = 8
    max_features: int = 64
    fold: str = "0"
    dataset_id: int = 901
    da_processes: int = 0
    threads: int = 2
    name: str = ""
    optimizer: str = "sgd"
    learning_rate: float | None = None
    oversample_foreground: float = 0.33
    #: "phantom": the phantoms' own renderer (T2w-like / randomised images, fixed per case); "synth": tissue maps,
    #: painted anew for every patch (SynthSeg-style, any MRI contrast and CT; :mod:`spineps_like.training.synthetic`)
    appearance: str = "phantom"
    #: model folder, name or checkpoint whose weights start the run (fine-tuning); None: random initialisation
    init_from: str | None = None
    #: share of negative patches (synth only): the spine removed from image and labels
    negatives: float = 0.0
    #: anatomical variants the phantom draw picks from
    variants: tuple[str, ...] = VARIANTS
    #: synth only: upper bound of the painted MRI noise (None: the painter's default); not part of the data key
    noise_max: float | None = None

    def data_key(self) -> str:
        d = {k: v for k, v in asdict(self).items()
             if k in ("n_train", "seed", "t2w_fraction", "fovs", "resolution_range", "target_spacing", "patch_size",
                      "batch_size", "base_features", "max_features", "dataset_id", "appearance")}
        if tuple(self.variants) != VARIANTS:  # keys of runs with the default draw stay as they were
            d["variants"] = list(self.variants)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _training_md(run: SemanticTrainingRun, argv: Sequence[str], specs: list[CaseSpec], trainer, seconds: float,
                 dataset_json: dict) -> str:
    import nnunetv2
    import torch

    log = trainer.logger
    try:
        dice = [round(float(x), 4) for x in log.get_value("dice_per_class_or_region", step=-1)]
        ema = round(float(log.get_value("ema_fg_dice", step=-1)), 4)
        train_loss = round(float(log.get_value("train_losses", step=-1)), 4)
    except (IndexError, KeyError, TypeError):
        dice, ema, train_loss = [], float("nan"), float("nan")
    names = [n for n, i in sorted(dataset_json["labels"].items(), key=lambda kv: kv[1]) if i != 0]
    modes = {m: sum(s.mode == m for s in specs) for m in sorted({s.mode for s in specs})}
    fovs = {f: sum(s.fov == f for s in specs) for f in sorted({s.fov for s in specs})}
    variants = {v: sum(str(s.variant) == v for s in specs) for v in sorted({str(s.variant) for s in specs})}
    lines = [
        f"# {run.name}: semantic nnU-Net trained on phantoms"
        + (" with synthetic appearance (SynthSeg-style)" if run.appearance == "synth" else ""),
        "",
        "Exact command (reproducible: same seed -> same phantoms, same split):",
        "",
        "```",
        "python -m spineps_like.training.semantic " + " ".join(argv),
        "```",
        "",
        (f"- seed: {run.seed}; training phantoms: {run.n_train} ({modes}); FOVs {fovs}; variants {variants}"
         if run.appearance != "synth" else
         f"- seed: {run.seed}; training anatomies: {run.n_train} phantom tissue maps; FOVs {fovs}; variants {variants}"),
        f"- phantom generator: {_generator_version(run)}",
        (f"- appearance: {run.appearance}" + (
            " (every patch painted anew from its tissue map: contrast family drawn from "
            f"{_family_weights()}, random tissue intensities, blur, bias, ghosting, noise, gamma, clipping; "
            f"spineps_like.phantom.appearance); negatives (spine removed from image and labels): {run.negatives:g}"
            + (f"; MRI noise up to {run.noise_max:g} of the 99th percentile" if run.noise_max is not None else "")
            if run.appearance == "synth" else " (the phantoms' own images)")),
        f"- initialised from: {run.init_from or 'random weights'}",
        f"- model grid: PIR, resolution_range {run.resolution_range}; nnU-Net spacing (P, I, R) {list(run.target_spacing)}",
        f"- network: PlainConvUNet, features {run.base_features}..{run.max_features}, patch (P, I, R) "
        f"{list(run.patch_size)}, batch {run.batch_size}; plans {PLANS_NAME}, trainer {TRAINER_NAME}",
        f"- optimizer: {run.optimizer}, initial lr {trainer.initial_lr}, poly decay; foreground oversampling "
        f"{run.oversample_foreground}",
        f"- augmentation: nnU-Net default except mirroring only along network axes {trainer.mirror_axes} and "
        f"rotation +-{trainer.max_rotation_deg:g} deg (left/right and superior/inferior labels must not swap)",
        f"- iterations: {run.iterations} ({trainer.num_epochs} epochs x {trainer.num_iterations_per_epoch}); "
        f"fold {run.fold}; device {trainer.device}; training time {_training_minutes(trainer, seconds):.1f} min "
        "(sum of nnU-Net's epoch times)",
        f"- last epoch: train loss {train_loss}; EMA pseudo-Dice {ema}; pseudo-Dice per label "
        f"{dict(zip(names, dice))} (nnU-Net's patch-level validation estimate, not an evaluation)",
        f"- software: python {platform.python_version()}, torch {torch.__version__}, nnunetv2 {nnunetv2.__version__ if hasattr(nnunetv2, '__version__') else _dist_version('nnunetv2')}",
        "",
        "The checkpoint holds the network weights only (optimizer state stripped). Files are listed with sha256 in "
        f"{MANIFEST_NAME}; `sha256sum -c {MANIFEST_NAME}` inside this folder checks them.",
        "",
    ]
    return "\n".join(lines)


GENERATOR_STAMP = "phantom_generator.txt"


def _generator_version(run: SemanticTrainingRun) -> str:
    """The phantom generator version the work folder's data was drawn with (written when the data was made)."""
    p = Path(run.work) / GENERATOR_STAMP
    return p.read_text().strip() if p.is_file() else "not recorded"


def _training_minutes(trainer, seconds: float) -> float:
    """Minutes spent in epochs, from nnU-Net's epoch timestamps (all legs of a resumed run); ``seconds`` without."""
    log = getattr(trainer, "logger", None)
    log = getattr(log, "local_logger", log)  # nnU-Net >= 2.6 wraps its LocalLogger in a MetaLogger
    try:
        d = log.my_fantastic_logging
        return sum(e - s for s, e in zip(d["epoch_start_timestamps"], d["epoch_end_timestamps"])) / 60.0
    except (AttributeError, KeyError, TypeError):
        return seconds / 60.0


def _family_weights() -> dict:
    from spineps_like.phantom.appearance import FAMILY_WEIGHTS

    return dict(FAMILY_WEIGHTS)


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:  # noqa: BLE001
        return "unknown"


def _newest_checkpoint(results_dir: Path, fold: int | str) -> str:
    return "latest" if (results_dir / f"fold_{fold}" / "checkpoint_latest.pth").is_file() else "final"


def run_training(run: SemanticTrainingRun, argv: Sequence[str] = (), *, resume: bool = False,
                 specs: list[CaseSpec] | None = None, cases: Iterable[tuple[str, Scan, Scan]] | None = None,
                 export_only: bool = False, resume_from: str | os.PathLike | None = None,
                 prepare_only: bool = False) -> Path:
    """Generate data (unless the work folder already holds it for the same parameters), plan, preprocess, train and
    export. ``cases`` replaces the phantoms (e.g. a hand-made dataset); ``specs`` the phantom draw.
    ``export_only``: export the work folder's newest checkpoint (checkpoint_latest.pth) without training.
    ``resume_from``: a checkpoint saved from an earlier session (e.g. committed beside the model); it continues the run
    in a fresh work folder, whose data this function regenerates deterministically from the same parameters.
    ``prepare_only``: stop once the data is written and preprocessed (returns the work folder), e.g. to prepare the
    next run while another trains."""
    import torch

    torch.set_num_threads(max(1, run.threads))
    os.environ["nnUNet_n_proc_DA"] = str(run.da_processes)
    os.environ["nnUNet_compile"] = "false"
    t0 = time.perf_counter()
    work = Path(run.work)
    env = _nnunet_env(work)
    dataset_name = f"Dataset{run.dataset_id:03d}_{run.name or 'SpinepsLikeSemantic'}"
    raw = env["nnUNet_raw"] / dataset_name
    pre = env["nnUNet_preprocessed"] / dataset_name
    stamp = work / "data_key.txt"
    key = run.data_key()
    specs = specs if specs is not None else case_specs(run.n_train, run.seed, t2w_fraction=run.t2w_fraction,
                                                      fovs=run.fovs, variants=run.variants)
    if cases is None:
        check_training_seeds(s.seed for s in specs)  # hand-made specs too: never an evaluation phantom
    from_phantoms = cases is None
    have_data = stamp.is_file() and stamp.read_text().strip() == key and (pre / "splits_final.json").is_file()
    if export_only and not have_data:
        raise ModelError(f"{work}: holds no training data for these parameters; nothing to export")
    if not have_data:
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(pre, ignore_errors=True)
        synth = run.appearance == "synth"
        if cases is None and synth:
            from spineps_like.training.synthetic import tissue_cases

            cases = tissue_cases(specs, run.target_spacing)
        elif cases is None:
            cases = phantom_cases(specs, orientation="PIR", resolution_range=run.resolution_range)
        dataset_json = write_raw_dataset(cases, raw, channel_name="tissue" if synth else "T2w",
                                         labels=TRAINING_LABELS if synth else None)
        plan_and_preprocess(run.dataset_id, dataset_name, spacing_pir=run.target_spacing, patch_pir=run.patch_size,
                            batch_size=run.batch_size, base_features=run.base_features,
                            max_features=run.max_features, num_processes=max(1, min(2, os.cpu_count() or 1)),
                            normalization="NoNormalization" if synth else "ZScoreNormalization")
        ids = [p.name[: -len(".nii.gz")] for p in sorted((raw / "labelsTr").glob("*.nii.gz"))]
        write_splits(pre, ids, run.seed)
        from spineps_like.phantom import GENERATOR_VERSION

        atomic_write_text(work / GENERATOR_STAMP, (GENERATOR_VERSION if from_phantoms else "none (cases given)") + "\n")
        atomic_write_text(stamp, key + "\n")
        resume = False
    if prepare_only:
        return work
    dataset_json = json.loads((raw / "dataset.json").read_text())
    fold: int | str = int(run.fold) if run.fold.isdigit() else run.fold
    if resume_from is not None:
        src = Path(resume_from)
        if not src.is_file():
            raise ModelError(f"{src}: no such checkpoint to resume from")
        out_fold = fold_dir(dataset_name, fold)
        out_fold.mkdir(parents=True, exist_ok=True)
        latest = out_fold / "checkpoint_latest.pth"
        if not latest.is_file():  # a checkpoint the work folder already holds is newer
            shutil.copy(src, latest)
        resume = True
    trainer = train(dataset_name, iterations=run.iterations, iterations_per_epoch=run.iterations_per_epoch,
                    val_iterations=run.val_iterations, fold=fold, resume=resume, optimizer=run.optimizer,
                    learning_rate=run.learning_rate, oversample_foreground=run.oversample_foreground,
                    synthetic_appearance=run.appearance == "synth", synthesis_seed=run.seed,
                    init_weights=run.init_from, export_only=export_only, negatives=run.negatives,
                    noise_max=run.noise_max)
    seconds = time.perf_counter() - t0
    results_dir = Path(trainer.output_folder_base)
    config = inference_config(dataset_json, name=run.name or Path(run.out).name, fold=fold,
                              resolution_range=run.resolution_range,
                              modality=SYNTH_MODALITIES if run.appearance == "synth" else ("T2w", "T1w"))
    md = _training_md(run, [a for a in argv if a != "--export-only"], specs, trainer, seconds, dataset_json)
    if export_only:
        md += (f"\nExported with `--export-only` after epoch {trainer.current_epoch} of {trainer.num_epochs} "
               f"({trainer.current_epoch * trainer.num_iterations_per_epoch} iterations).\n")
    return export_model_folder(results_dir, Path(run.out), fold=fold, config=config, training_md=md,
                               image_channel="MRI or CT" if run.appearance == "synth" else None,
                               checkpoint=_newest_checkpoint(results_dir, fold) if export_only else None)


def default_work_dir(name: str) -> Path:
    """``work_tmp/train_semantic_<name>`` at the repository root (git-ignored, outside ``models/``)."""
    from spineps_like.models.folders import bundled_models_dir

    return bundled_models_dir().parent / "work_tmp" / f"train_semantic_{name}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spineps_like.training.semantic", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="model folder to write (replaced when it exists)")
    p.add_argument("--n-train", type=int, default=60, help="number of training phantoms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=3000, help="training iterations (batches)")
    p.add_argument("--iterations-per-epoch", type=int, default=50)
    p.add_argument("--val-iterations", type=int, default=5, help="validation batches per epoch")
    p.add_argument("--work", type=Path, default=None, help="nnU-Net raw/preprocessed/results folder "
                   "(default: work_tmp/train_semantic_<name> at the repository root, git-ignored); keep it to resume")
    p.add_argument("--resume", action="store_true", help="continue from the work folder's checkpoint_latest.pth")
    p.add_argument("--resume-from", type=Path, default=None, help="continue from a saved checkpoint (e.g. one "
                   "committed by an earlier session) in a fresh work folder: the data is regenerated from the same "
                   "parameters first")
    p.add_argument("--prepare-only", action="store_true", help="write and preprocess the data, then stop")
    p.add_argument("--export-only", action="store_true", help="export the work folder's checkpoint_latest.pth to "
                   "--out without training (a stopped run, or a look at a run still going)")
    p.add_argument("--t2w-fraction", type=float, default=0.5, help="share of T2w-like phantoms (rest randomised)")
    p.add_argument("--fovs", nargs="+", default=list(FOVS), choices=list(FOVS))
    p.add_argument("--patch", type=int, nargs=3, default=list(PATCH_SIZE), metavar=("P", "I", "R"))
    p.add_argument("--spacing", type=float, nargs=3, default=list(TARGET_SPACING), metavar=("P", "I", "R"),
                   help="nnU-Net target spacing in mm")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--features", type=int, nargs=2, default=[8, 64], metavar=("BASE", "MAX"))
    p.add_argument("--fold", default="0", help="'0' (80/20 split) or 'all'")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--da-processes", type=int, default=0, help="nnU-Net augmentation worker processes; 0 (inline) "
                   "is fastest on 2 cores: 0.6 s/iteration vs 3 s with one worker process")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="sgd: nnU-Net's default; adamw: AMSGrad AdamW (faster to reach every label on a CPU budget)")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: nnU-Net's 1e-2)")
    p.add_argument("--oversample-foreground", type=float, default=0.33,
                   help="share of patches centred on a random foreground label (nnU-Net's default 0.33)")
    p.add_argument("--appearance", choices=("phantom", "synth"), default="phantom",
                   help="phantom: the phantoms' own images; synth: tissue maps painted anew per patch with a random "
                   "contrast family (T1w, T2w, STIR, PD, CT, random), SynthSeg-style")
    p.add_argument("--negatives", type=float, default=0.0, help="synth only: share of patches with the spine "
                   "removed from image and labels (a model that finds no spine where there is none)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=[v for v in PHANTOM_VARIANTS if v],
                   help="anatomical variants the phantom draw picks from (default: generator 1.0's, so that older "
                   "commands draw the same phantoms; add e.g. listhesis)")
    p.add_argument("--noise-max", type=float, default=None, help="synth only: upper bound of the painted MRI noise "
                   "as a share of the 99th percentile (default 0.08; above it half the draws lie between 0.08 and "
                   "this: low-SNR scans)")
    p.add_argument("--init-from", default=None, help="model folder, name or checkpoint to start from (fine-tuning)")
    p.add_argument("--name", default=None, help="model name (default: the --out folder name)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if not 0.0 <= a.negatives < 1.0 or (a.negatives and a.appearance != "synth"):
        raise SystemExit("error: --negatives must lie in [0, 1) and needs --appearance synth")
    if a.noise_max is not None and (not 0.0 < a.noise_max <= 1.0 or a.appearance != "synth"):
        raise SystemExit("error: --noise-max must lie in (0, 1] and needs --appearance synth")
    if a.n_train < 1 or a.iterations < 1:
        raise SystemExit("error: --n-train and --iterations must be >= 1")
    name = a.name or a.out.name
    run = SemanticTrainingRun(
        out=str(a.out), n_train=a.n_train, seed=a.seed, iterations=a.iterations,
        work=str(a.work or default_work_dir(name)), iterations_per_epoch=a.iterations_per_epoch,
        val_iterations=a.val_iterations, t2w_fraction=a.t2w_fraction, fovs=tuple(a.fovs),
        target_spacing=tuple(a.spacing), patch_size=tuple(a.patch), batch_size=a.batch_size,
        base_features=a.features[0], max_features=a.features[1], fold=str(a.fold), da_processes=a.da_processes,
        threads=a.threads, name="".join(c if c.isalnum() else "_" for c in name), optimizer=a.optimizer,
        learning_rate=a.lr, oversample_foreground=a.oversample_foreground, appearance=a.appearance,
        init_from=a.init_from, negatives=a.negatives, variants=tuple(a.variants), noise_max=a.noise_max,
    )
    try:
        out = run_training(run, argv, resume=a.resume, export_only=a.export_only, resume_from=a.resume_from,
                           prepare_only=a.prepare_only)
    except ModelError as e:
        raise SystemExit(f"error: {e}") from None
    print(out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
