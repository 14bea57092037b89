"""nnU-Net v2 results folders without trainer-name lookup.

nnU-Net's own ``initialize_from_trained_model_folder`` imports every trainer module to find the class named in the
checkpoint (and with it optional packages such as timm/torchvision). Here the network is built from ``plans.json``
alone (``PlansManager`` -> ``ConfigurationManager`` -> ``get_network_from_plans``), the checkpoint's
``network_weights`` are loaded with ``torch.load(weights_only=True)``, and the predictor is set up with
``nnUNetPredictor.manual_initialization``. That is what any trainer that does not override
``build_network_architecture`` would build — true for nnUNetTrainer and for SPINEPS' models.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from spineps_like.geometry import bbox, spline_resample
from spineps_like.models.manifest import ModelError

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
#: Labels that name a side (costal/articular processes left/right) or an end (superior/inferior endplate): a flip
#: along that axis turns one into the other, so neither test-time mirroring nor training augmentation may flip it.
SIDED_LABELS = (43, 44, 45, 46, 47, 48)
ENDED_LABELS = (52, 53)


def label_safe_mirror_axes(orientation: str, transpose_forward: Sequence[int], labels: Sequence[int],
                           allowed: Sequence[int] = (0, 1, 2)) -> tuple[int, ...]:
    """The network axes (nnU-Net's, after ``transpose_forward``) that may be mirrored without swapping labels.

    ``orientation`` is that of the arrays given to nnU-Net before their axes are reversed (SimpleITK order), e.g.
    'PIR' -> nnU-Net axes R, I, P. Left-right flips are excluded when ``labels`` hold sided labels (43-48),
    cranio-caudal flips when they hold superior/inferior endplates (52, 53).
    """
    codes = orientation[::-1]
    banned = set()
    if set(labels) & set(SIDED_LABELS):
        banned |= set("LR")
    if set(labels) & set(ENDED_LABELS):
        banned |= set("IS")
    return tuple(int(a) for a in allowed if codes[transpose_forward[a]] not in banned)


def available_folds(nnunet_dir: str | os.PathLike) -> list[str]:
    """Fold names ('0', '1', ..., 'all') that hold a checkpoint."""
    d = Path(nnunet_dir)
    out = []
    for f in sorted(d.glob("fold_*")):
        if any((f / c).is_file() for c in CHECKPOINT_NAMES):
            out.append(f.name[len("fold_"):])
    return out


def checkpoint_path(nnunet_dir: str | os.PathLike, fold: str, checkpoint: str | None = None) -> Path:
    """The checkpoint file of ``fold``: ``checkpoint`` ('final', 'best' or a file name), else final, else best."""
    d = Path(nnunet_dir) / f"fold_{fold}"
    if checkpoint is not None:
        name = f"checkpoint_{checkpoint}.pth" if checkpoint in ("final", "best", "latest") else checkpoint
        p = d / name
        if not p.is_file():
            raise ModelError(f"{p}: no such checkpoint")
        return p
    for name in CHECKPOINT_NAMES:
        if (d / name).is_file():
            return d / name
    have = ", ".join(available_folds(nnunet_dir)) or "none"
    raise ModelError(f"{d}: no {' or '.join(CHECKPOINT_NAMES)} (folds with checkpoints: {have})")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load`` a checkpoint with ``weights_only=True``; checkpoints that need full unpickling (older nnU-Net
    versions stored numpy scalars in their logs) are loaded with a warning, since unpickling runs code from the file."""
    import torch

    p = Path(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        warnings.warn(f"{p}: not loadable with weights_only=True; unpickling it fully (only load files you trust)",
                      stacklevel=2)
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{p}: not a readable checkpoint ({msg})") from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise ModelError(f"{p}: not an nnU-Net checkpoint (no 'network_weights')")
    return ckpt


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def configuration_name(nnunet_dir: Path, checkpoint: dict, plans: dict) -> str:
    """The plans configuration a checkpoint was trained with: from its init_args, else the folder name
    (``Trainer__Plans__configuration``), else the only 3D configuration of the plans."""
    conf = (checkpoint.get("init_args") or {}).get("configuration")
    if conf:
        return str(conf)
    parts = nnunet_dir.name.split("__")
    if len(parts) >= 3 and parts[-1] in plans.get("configurations", {}):
        return parts[-1]
    confs = [c for c in plans.get("configurations", {}) if c.startswith("3d")]
    if len(confs) == 1:
        return confs[0]
    raise ModelError(f"{nnunet_dir}: cannot tell which plans configuration the checkpoint uses ({confs})")


def build_network(plans_manager, configuration_manager, dataset_json: dict):
    """The inference network (no deep supervision) of a plans configuration, weights not loaded."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    n_in = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    n_out = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    return get_network_from_plans(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        n_in,
        n_out,
        allow_init=False,
        deep_supervision=False,
    )


def resample_image_threaded(data, new_shape, current_spacing, new_spacing, is_seg: bool = False, order: int = 3,
                            order_z: int = 0, force_separate_z: bool | None = False,
                            separate_z_anisotropy_threshold: float | None = None, *, threads: int | None = None):
    """nnU-Net's ``resample_data_or_seg_to_shape`` (its preprocessing step to the plans' spacing) for images, on
    ``threads`` threads.

    nnU-Net's one-step 3D path is skimage's ``resize`` (spline of ``order``, edge mode, clipped to the channel's
    range) per channel; here it is :func:`spineps_like.geometry.spline_resample` (scipy's zoom-shift algorithm on the
    same grid mapping; cubic one axis at a time, equal to float rounding) and the same clip. Its per-slice ("separate
    z") path, taken for anisotropic spacings, is the same ``resize`` on each slice (here the slices on threads) and
    then nearest neighbour along the slice axis (``order_z`` 0), which nnU-Net computes by ``map_coordinates`` on
    three volume-sized float64 coordinate maps and here is one gather of whole slices (bit for bit). Segmentations,
    ``order_z`` > 0 and single-threaded calls go to nnU-Net's own function.
    ``threads`` defaults to torch's CPU thread count.
    """
    import torch
    from nnunetv2.preprocessing.resampling.default_resampling import (
        ANISO_THRESHOLD, determine_do_sep_z_and_axis, resample_data_or_seg_to_shape,
    )

    threads = torch.get_num_threads() if threads is None else int(threads)
    threshold = ANISO_THRESHOLD if separate_z_anisotropy_threshold is None else separate_z_anisotropy_threshold
    data = data.numpy() if hasattr(data, "numpy") else np.asarray(data)
    separate_z, axis = determine_do_sep_z_and_axis(force_separate_z, current_spacing, new_spacing, threshold)
    if is_seg or order < 2 or data.ndim != 4 or threads < 2 or (separate_z and order_z != 0):
        return resample_data_or_seg_to_shape(data, new_shape, current_spacing, new_spacing, is_seg, order, order_z,
                                             force_separate_z, threshold)
    new_shape = tuple(int(n) for n in new_shape)
    if tuple(data.shape[1:]) == new_shape:
        return data
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    for c in range(data.shape[0]):
        image = data[c]
        if separate_z:
            out[c] = _resample_per_slice(image, new_shape, axis, order, threads)
            continue
        scale = np.asarray(image.shape, dtype=float) / np.asarray(new_shape, dtype=float)
        # skimage's resize is scipy's zoom in grid mode: output voxel j samples input (j + 0.5) * scale - 0.5
        resized = spline_resample(image, scale, 0.5 * scale - 0.5, new_shape, order, threads)  # prefilters in float64
        out[c] = np.clip(resized, image.min(), image.max(), out=resized)
    return out


def _resample_per_slice(image: np.ndarray, new_shape: Sequence[int], axis: int, order: int, threads: int) -> np.ndarray:
    """nnU-Net's separate-z resampling of one channel with ``order_z`` 0: skimage's ``resize`` of every slice across
    ``axis`` (float64, edge mode, no anti-aliasing, as nnU-Net calls it), then the nearest slice for each new one.
    nnU-Net's ``map_coordinates`` samples slice coordinate ``(k + 0.5) * n_old / n_new - 0.5`` (the in-plane ones are
    whole numbers after the resize); scipy's order 0 takes ``floor(x + 0.5)``, clamped (mode 'nearest')."""
    from skimage.transform import resize

    in_plane = tuple(int(n) for a, n in enumerate(new_shape) if a != axis)
    n_old, n_new = image.shape[axis], int(new_shape[axis])
    resized = np.zeros(tuple(n_old if a == axis else int(n) for a, n in enumerate(new_shape)))  # float64, as nnU-Net

    def slices(ids: np.ndarray) -> None:
        for i in ids:
            index = tuple(int(i) if a == axis else slice(None) for a in range(3))
            resized[index] = resize(image[index].astype(float), in_plane, order, mode="edge", anti_aliasing=False)

    chunks = [c for c in np.array_split(np.arange(n_old), min(threads, n_old)) if len(c)]
    with ThreadPoolExecutor(len(chunks)) as pool:
        list(pool.map(slices, chunks))
    if n_old == n_new:
        return resized
    x = float(n_old) / n_new * (np.arange(n_new) + 0.5) - 0.5
    return np.take(resized, np.clip(np.floor(x + 0.5).astype(np.intp), 0, n_old - 1), axis=axis)


def _no_segmentation(seg, *args, **kwargs):
    """Stands in for the segmentation resampling of a preprocessing run without a segmentation: one background
    voxel (nnU-Net still takes its maximum to choose the dtype)."""
    return np.zeros((1,) * np.ndim(seg), np.int8)


def threaded_configuration(configuration_manager, *, resample_segmentation: bool = True):
    """A copy of an nnU-Net ``ConfigurationManager`` whose image resampling runs :func:`resample_image_threaded` when
    the plans name nnU-Net's default resampling function (any other stays as it is).

    ``resample_segmentation=False`` is for ``run_case_npy`` called without a segmentation (nor a previous stage's):
    nnU-Net then resamples the non-zero mask that ``crop_to_nonzero`` made (per label, about 0.2 s on a whole spine)
    and inference discards it; this copy skips that and returns one background voxel for it."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    class ThreadedResamplingConfiguration(ConfigurationManager):
        @property
        def resampling_fn_data(self):
            fn = ConfigurationManager.resampling_fn_data.fget(self)
            if getattr(fn, "func", None) is not resample_data_or_seg_to_shape:
                return fn
            return functools.partial(resample_image_threaded, **fn.keywords)

        @property
        def resampling_fn_seg(self):
            return ConfigurationManager.resampling_fn_seg.fget(self) if resample_segmentation else _no_segmentation

    return ThreadedResamplingConfiguration(configuration_manager.configuration)


#: nnU-Net's normalisation schemes that read the non-zero mask only when ``use_mask_for_norm`` is set
MASK_OPTIONAL_SCHEMES = frozenset({"ZScoreNormalization", "CTNormalization", "NoNormalization",
                                   "RescaleTo01Normalization", "RGBTo01Normalization"})


#: Sliding-window tiles per network call. nnU-Net predicts one tile at a time; on CPU a batch of 4 small tiles runs
#: about 2x faster than 4 calls (benchmarks/README.md), on GPU it fills the device better. Same tiles, same Gaussian.
TILE_BATCH = 4

@functools.cache
def batched_predictor_class():
    """``nnUNetPredictor`` whose sliding window sends ``tile_batch`` tiles per network call (defined on first use)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    class BatchedPredictor(nnUNetPredictor):
        """``nnUNetPredictor``'s sliding window (same slicers, Gaussian weighting, mirroring), with the tiles stacked
        ``tile_batch`` at a time into one forward pass. It accumulates in fp16 on a GPU, as nnU-Net does to save
        memory, and in fp32 on the CPU, which has no fast fp16 arithmetic (faster, and more exact)."""

        tile_batch: int = TILE_BATCH
        #: the state dict the network holds (the one nnU-Net's loop loaded last), None when unknown
        _loaded_parameters: dict | None = None

        @torch.inference_mode()
        def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
            """nnU-Net's, except that one fold predicting scan after scan does not copy its weights into the network
            again before every scan (7 ms per scan for the bundled semantic model, more for wider networks). Its
            thread cap stays; ensembles and a fold the network does not hold go through nnU-Net's own loop."""
            from nnunetv2.configuration import default_num_processes

            params = self.list_of_parameters
            if len(params) != 1 or params[0] is not self._loaded_parameters:
                self._loaded_parameters = None  # unknown until nnU-Net's loop has loaded them all
                prediction = super().predict_logits_from_preprocessed_data(data)
                self._loaded_parameters = params[-1]
                return prediction
            n_threads = torch.get_num_threads()
            torch.set_num_threads(min(default_num_processes, n_threads))
            try:
                return self.predict_sliding_window_return_logits(data).to("cpu")
            finally:
                torch.set_num_threads(n_threads)

        @torch.inference_mode()
        def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers,
                                                           do_on_device: bool = True):
            results_device = self.device if do_on_device else torch.device("cpu")
            data = data.to(results_device)
            patch = tuple(self.configuration_manager.patch_size)
            # nnU-Net accumulates in fp16 to save GPU memory; CPUs have no fast fp16 arithmetic, so accumulate in fp32
            acc = torch.float32 if results_device.type == "cpu" else torch.half
            logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=acc,
                                 device=results_device)
            weight = torch.zeros(data.shape[1:], dtype=acc, device=results_device)
            gaussian = (compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=results_device)
                        if self.use_gaussian else torch.ones(patch, dtype=torch.half, device=results_device)).to(acc)
            n = max(1, int(self.tile_batch))
            for i in range(0, len(slicers), n):
                chunk = slicers[i:i + n]
                x = torch.stack([data[sl] for sl in chunk]).to(self.device)
                pred = self._internal_maybe_mirror_and_predict(x).to(results_device)
                for sl, p in zip(chunk, pred):
                    logits[sl].addcmul_(p, gaussian)
                    weight[sl[1:]] += gaussian
            torch.div(logits, weight, out=logits)
            # nnU-Net's overflow check, for fp16 accumulation (fp32 sums of finite logits cannot overflow)
            if acc == torch.half and torch.any(torch.isinf(logits)):
                raise RuntimeError("inf in the predicted logits (the accumulation overflowed)")
            return logits

    return BatchedPredictor


class NnUNetModel:
    """An nnU-Net results folder ready for sliding-window prediction.

    Folds are loaded lazily and cached; :meth:`predictor` returns an ``nnUNetPredictor`` set to the requested
    folds, tile step size and mirroring.
    """

    def __init__(self, nnunet_dir: str | os.PathLike, *, device: str = "cpu", checkpoint: str | None = None):
        import torch
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.dir = Path(nnunet_dir)
        self.checkpoint = checkpoint
        self.dataset_json = read_json(self.dir / "dataset.json")
        self.plans = read_json(self.dir / "plans.json")
        self.folds = available_folds(self.dir)
        if not self.folds:
            raise ModelError(f"{self.dir}: no fold_*/checkpoint_final.pth or checkpoint_best.pth")
        self._weights: dict[str, dict] = {}
        first = load_checkpoint(checkpoint_path(self.dir, self.folds[0], checkpoint))
        self._weights[self.folds[0]] = first["network_weights"]
        self.trainer_name = str(first.get("trainer_name", "nnUNetTrainer"))
        mirror = first.get("inference_allowed_mirroring_axes")
        try:
            self.plans_manager = PlansManager(self.plans)
            self.configuration = configuration_name(self.dir, first, self.plans)
            configuration_manager = self.plans_manager.get_configuration(self.configuration)
            self.configuration_manager = threaded_configuration(configuration_manager)
            #: for our own preprocessing of an image alone (no segmentation): see threaded_configuration
            self.image_configuration_manager = threaded_configuration(configuration_manager,
                                                                      resample_segmentation=False)
            self.label_manager = self.plans_manager.get_label_manager(self.dataset_json)
            self.network = build_network(self.plans_manager, self.configuration_manager, self.dataset_json)
        except (KeyError, RuntimeError, ImportError, TypeError, AssertionError) as e:
            raise ModelError(f"{self.dir / 'plans.json'}: cannot build the network ({type(e).__name__}: {e})") from None
        self._check_weights(self.folds[0], first["network_weights"])
        ndim = len(self.configuration_manager.patch_size)
        self.allowed_mirroring_axes = tuple(mirror) if mirror is not None else tuple(range(ndim))
        self.device = torch.device(device)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice for every CPU predictor
            self._predictor = batched_predictor_class()(
                tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                perform_everything_on_device=self.device.type != "cpu", device=self.device,
                verbose=False, verbose_preprocessing=False, allow_tqdm=False,
            )
        self._predictor.manual_initialization(
            self.network, self.plans_manager, self.configuration_manager, [first["network_weights"]],
            self.dataset_json, self.trainer_name, self.allowed_mirroring_axes,
        )

    def _check_weights(self, fold: str, weights: dict) -> None:
        expected = self.network.state_dict()
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        bad = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or bad:
            what = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                    else f"shape mismatch at {bad[:2]}")
            raise ModelError(
                f"{self.dir}/fold_{fold}: checkpoint does not fit the network of plans.json ({what}); "
                f"was it trained with a custom architecture (trainer {self.trainer_name})?"
            )

    def weights(self, fold: str) -> dict:
        """The state dict of ``fold`` (loaded once, then cached)."""
        if fold not in self.folds:
            raise ModelError(f"{self.dir}: fold {fold!r} has no checkpoint (available: {', '.join(self.folds)})")
        if fold not in self._weights:
            w = load_checkpoint(checkpoint_path(self.dir, fold, self.checkpoint))["network_weights"]
            self._check_weights(fold, w)
            self._weights[fold] = w
        return self._weights[fold]

    def preprocess_image(self, image: np.ndarray, properties: dict) -> tuple[np.ndarray, dict]:
        """nnU-Net's preprocessing of an image alone (``run_case_npy`` without a segmentation): transpose, crop to the
        non-zero box, normalise, resample to the plans' spacing. Returns the network's input and ``properties``
        with nnU-Net's crop and shape entries.

        nnU-Net takes the crop box from the non-zero mask with its holes filled (scipy's ``binary_fill_holes``,
        about 10-20 ms per scan here) and keeps that mask for normalising within it. When no channel normalises
        within the mask, the filled mask is never read and its box is that of the non-zero voxels (a hole lies inside
        the box of what encloses it): the filling is skipped, and the data and properties are nnU-Net's. Otherwise,
        and for any other preprocessor class, nnU-Net's own ``run_case_npy`` runs."""
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
        from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

        pm, cm = self.plans_manager, self.image_configuration_manager
        preprocessor = cm.preprocessor_class(verbose=False)
        if (cm.preprocessor_class is not DefaultPreprocessor or any(cm.use_mask_for_norm)
                or not set(cm.normalization_schemes) <= MASK_OPTIONAL_SCHEMES):
            data, _, properties = preprocessor.run_case_npy(image, None, properties, pm, cm, self.dataset_json)
            return data, properties
        # nnU-Net's steps, in its order and memory layout (the normalisation's mean and std depend on it)
        data = image.astype(np.float32)
        data = data.transpose([0, *[i + 1 for i in pm.transpose_forward]])
        original_spacing = [properties["spacing"][i] for i in pm.transpose_forward]
        properties["shape_before_cropping"] = data.shape[1:]
        nonzero = data[0] != 0
        for c in range(1, data.shape[0]):
            nonzero |= data[c] != 0
        box = bbox(nonzero) or tuple(slice(0, n) for n in nonzero.shape)  # nnU-Net keeps all of an empty image
        data = data[(slice(None), *box)]
        properties["bbox_used_for_cropping"] = [[b.start, b.stop] for b in box]
        properties["shape_after_cropping_and_before_resampling"] = data.shape[1:]
        target_spacing = list(cm.spacing)
        if len(target_spacing) < len(data.shape[1:]):  # a 2D configuration keeps the slice spacing
            target_spacing = [original_spacing[0]] + target_spacing
        new_shape = compute_new_shape(data.shape[1:], original_spacing, target_spacing)
        inside = np.zeros((1, *data.shape[1:]), np.int8)  # "inside the mask" everywhere: not read without mask use
        data = preprocessor._normalize(data, inside, cm, pm.foreground_intensity_properties_per_channel)
        return cm.resampling_fn_data(data, new_shape, original_spacing, target_spacing), properties

    def predictor(self, folds: Sequence[str], *, step_size: float, mirroring: bool,
                  mirror_axes: Sequence[int] | None = None):
        """The nnUNetPredictor set to ``folds`` (an ensemble when several), ``step_size`` and ``mirroring``
        (over ``mirror_axes`` when given, else the checkpoint's allowed axes)."""
        if not 0 < step_size <= 1:
            raise ValueError(f"step_size must be in (0, 1], got {step_size}")
        p = self._predictor
        p.list_of_parameters = [self.weights(str(f)) for f in folds]
        p.tile_step_size = float(step_size)
        axes = self.allowed_mirroring_axes if mirror_axes is None else tuple(mirror_axes)
        p.allowed_mirroring_axes = axes
        p.use_mirroring = bool(mirroring) and len(axes) > 0
        return p
