"""Training on fresh synthetic images: tissue maps in the nnU-Net dataset, the appearance painted per patch.

The raw dataset of a ``--appearance synth`` run holds, in place of images, the phantoms' tissue label maps
(:attr:`spineps_like.phantom.Phantom.tissue`) on the model grid, stored as a float channel that nnU-Net neither
normalises (``NoNormalization``) nor resamples (the phantoms are drawn at nnU-Net's target spacing, so preprocessing
only transposes and copies). :class:`SynthesizeAppearance` is the first transform of every training and validation
batch: it paints each patch with :func:`spineps_like.phantom.appearance.synthesize` (random contrast family,
intensities, blur, bias, noise, gamma; z-scored as nnU-Net's ``ZScoreNormalization`` would), before nnU-Net's own
spatial and intensity augmentation. No two patches share an appearance.

:func:`inference_plans` turns the training plans into the plans of the exported model: the one channel is an image
normalised with ``ZScoreNormalization``, so any loader (ours, SPINEPS', nnU-Net's) runs the folder unchanged.
"""

from __future__ import annotations

import copy
from typing import Iterable, Iterator, Sequence

import numpy as np

from spineps_like.io import Scan
from spineps_like.assign import map_aliases

#: nnU-Net array axes of the PIR model grid as SimpleITK reads it: (R, I, P); R is the sagittal slice axis.
SLICE_AXIS = 0


def tissue_case(seed: int, *, fov: str, variant: str | None, spacing_pir: Sequence[float]) -> tuple[Scan, Scan]:
    """(tissue map as float32 image, semantic mask) of one phantom drawn directly on the PIR model grid."""
    from spineps_like.phantom import make_phantom

    ph = make_phantom(seed, fov=fov, mode="t2w", variant=variant, spacing=tuple(spacing_pir), orientation="PIR")
    lab = map_aliases(ph.semantic.array)
    tissue = ph.tissue.array.astype(np.float32)
    return Scan(tissue, ph.tissue.affine.copy()), Scan(lab, ph.tissue.affine.copy())


def tissue_cases(specs: Iterable, spacing_pir: Sequence[float]) -> Iterator[tuple[str, Scan, Scan]]:
    """(case_id, tissue map, semantic) for each :class:`~spineps_like.training.semantic.CaseSpec`."""
    for s in specs:
        img, seg = tissue_case(s.seed, fov=s.fov, variant=s.variant, spacing_pir=spacing_pir)
        yield s.case_id, img, seg


def synthesis_transform_class():
    """:class:`SynthesizeAppearance`, a batchgeneratorsv2 transform (defined on first use: the import is slow)."""
    import torch
    from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform

    from spineps_like.phantom.appearance import draw_family, synthesize, without_spine

    class SynthesizeAppearance(BasicTransform):
        """Replace channel 0 (a tissue map) by an image synthesised from it; labels are untouched, except in a
        negative sample (probability ``negatives``), whose spine is removed from the map and from the labels.

        ``noise_max``: upper bound of the MRI noise (:func:`~spineps_like.phantom.appearance.synthesize`), None for
        its default. ``spacing`` is the patch's voxel size in nnU-Net's axis order; ``jitter`` a random scale and shift of the
        z-scored result (a patch's statistics are not the whole scan's, which inference normalises over).
        """

        def __init__(self, seed, spacing: Sequence[float], families: dict[str, float] | None = None,
                     jitter: tuple[float, float] = (0.25, 0.3), negatives: float = 0.0,
                     noise_max: float | None = None):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.spacing = tuple(float(s) for s in spacing)
            self.families = families
            self.jitter = jitter
            self.negatives = float(negatives)
            self.noise_max = noise_max

        def get_parameters(self, **data_dict) -> dict:
            return {"negative": self.negatives > 0 and self.rng.random() < self.negatives}

        def apply(self, data_dict, **params):
            data_dict["image"] = self._paint(data_dict["image"], params["negative"])
            if params["negative"] and data_dict.get("segmentation") is not None:
                seg = data_dict["segmentation"].clone()
                seg[seg > 0] = 0  # padding (-1) stays padding
                data_dict["segmentation"] = seg
            return data_dict

        def _paint(self, img: torch.Tensor, negative: bool) -> torch.Tensor:
            tissue = np.rint(img[0].numpy()).astype(np.uint8)
            if negative:
                tissue = without_spine(tissue, self.rng)
            spacing = self.spacing[-tissue.ndim:]
            family = draw_family(self.rng, self.families)
            extra = {} if self.noise_max is None else {"noise_max": float(self.noise_max)}
            out, _ = synthesize(tissue, self.rng, family=family, spacing=spacing,
                                slice_axis=SLICE_AXIS if tissue.ndim == 3 else -1, **extra)
            scale = float(np.exp(self.rng.uniform(-self.jitter[0], self.jitter[0])))
            out = out * scale + float(self.rng.uniform(-self.jitter[1], self.jitter[1]))
            res = img.clone()
            res[0] = torch.from_numpy(out)
            return res

    return SynthesizeAppearance


def inference_plans(plans: dict) -> dict:
    """The exported model's plans: every configuration's channel normalised with ``ZScoreNormalization`` (training
    read tissue maps with ``NoNormalization``); intensity properties of the label map are dropped."""
    out = copy.deepcopy(plans)
    for conf in out["configurations"].values():
        if "normalization_schemes" in conf:
            conf["normalization_schemes"] = ["ZScoreNormalization" for _ in conf["normalization_schemes"]]
    out["foreground_intensity_properties_per_channel"] = {
        "0": {"max": 1.0, "mean": 0.0, "median": 0.0, "min": 0.0, "percentile_00_5": 0.0, "percentile_99_5": 1.0,
              "std": 1.0}}
    return out
