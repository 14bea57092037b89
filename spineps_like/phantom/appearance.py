"""Label map -> image: SynthSeg-style appearance for a tissue label map (the second stage of the phantom engine).

The anatomy stage (:func:`spineps_like.phantom.make_phantom`) gives a tissue map (:data:`~spineps_like.phantom.TISSUES`:
marrow, cortex, nucleus, annulus, CSF, cord, ..., fat, muscle, bowel, vessels, lung, air). This module paints an image
from it, every sample anew, in the way SynthSeg (Billot et al., Medical Image Analysis 2023) trains networks that
segment any contrast: the network may rely on shape only, because intensities, resolution and corruptions are random.

:func:`synthesize` runs these steps, each a function on numpy arrays, every random number from one generator:

1. **Tissue intensities** (:func:`tissue_means`): one Gaussian per tissue, its mean drawn from the contrast family's
   range (T1w, T2w, fat-suppressed T2w/STIR, PD, CT in HU) or uniformly (``random``, SynthSeg's own), its standard
   deviation a random share of the family's spread; a low-frequency texture for marrow and soft tissue.
2. **Partial volume and resolution**: an anisotropic Gaussian point spread, stronger across slices (slice thickness
   ~1-6 mm on the 3 mm model grid), optionally a lower in-plane resolution (down- and up-sampling).
3. **Bias field** (MRI): exp of a smooth random field, optionally a posterior surface-coil fall-off.
4. **Ghosting** (MRI): a faint shifted copy along a random in-plane (phase-encoding) axis.
5. **Noise**: Rician for MRI (magnitude of complex Gaussian noise), kernel-smoothed Gaussian for CT.
6. **Intensity curve**: gamma on the [0, 1]-scaled image (MRI), clipping at a high percentile (saturation) or to a CT
   window.

Labels are never touched: the image is a function of the tissue map and the generator only. Id 0 (padding outside the
image) gets 0 in the normalised output, as nnU-Net pads a normalised image.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from scipy import ndimage as ndi

from spineps_like.phantom.anatomy import TISSUE_ID, TISSUES

#: Contrast families; ``random`` draws every tissue mean uniformly (SynthSeg).
FAMILIES: tuple[str, ...] = ("t1w", "t2w", "stir", "pd", "ct", "random")
#: Draw weights of :func:`draw_family` (MRI of any contrast first, CT a fifth, SynthSeg's uniform draw a quarter).
FAMILY_WEIGHTS: dict[str, float] = {"t1w": 0.15, "t2w": 0.2, "stir": 0.12, "pd": 0.08, "ct": 0.2, "random": 0.25}

#: Default upper bound of the MRI noise sigma, a share of the image's 99th percentile (STIR x1.5).
NOISE_MAX = 0.08

_MARROW = ("marrow", "post_marrow", "sacrum_marrow", "other_marrow")
_CORTEX = ("cortex", "endplate", "post_cortex", "sacrum_cortex", "other_cortex")

# Mean ranges (lo, hi) per tissue. MRI families in [0, 1] (brightest tissue near 1), CT in Hounsfield units. Tissues
# not listed take ``_default``. The ranges follow the physics of each contrast (see the module docstring of
# :data:`ORDERINGS`); degenerated discs, flow voids and bowel gas keep their own ranges in every family.
_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "t2w": {  # TSE T2w: fluid bright, fat bright, marrow intermediate, cortex/ligament dark
        "kidney": (0.35, 0.60),
        "csf": (0.80, 1.00), "fluid": (0.75, 1.00), "fat": (0.55, 0.78), "epidural_fat": (0.50, 0.78),
        "nucleus": (0.45, 0.85), "nucleus_deg": (0.08, 0.30), "marrow": (0.30, 0.52), "post_marrow": (0.25, 0.50),
        "sacrum_marrow": (0.30, 0.55), "other_marrow": (0.28, 0.52), "cord": (0.30, 0.48), "roots": (0.25, 0.45),
        "annulus": (0.06, 0.20), "muscle": (0.10, 0.22), "viscera": (0.18, 0.55), "heart": (0.10, 0.35),
        "blood": (0.01, 0.45), "remnant": (0.10, 0.30), "_default": (0.01, 0.09), "air": (0.0, 0.03),
        "lung": (0.0, 0.05),
    },
    "t1w": {  # T1w: fat brightest, marrow bright (fatty), discs and muscle intermediate, CSF dark
        "kidney": (0.25, 0.42),
        "fat": (0.80, 1.00), "epidural_fat": (0.75, 1.00), "marrow": (0.52, 0.75), "post_marrow": (0.48, 0.75),
        "sacrum_marrow": (0.55, 0.80), "other_marrow": (0.50, 0.75), "nucleus": (0.22, 0.40),
        "nucleus_deg": (0.15, 0.35), "annulus": (0.15, 0.30), "cord": (0.30, 0.45), "roots": (0.25, 0.40),
        "muscle": (0.22, 0.38), "viscera": (0.20, 0.50), "heart": (0.20, 0.40), "csf": (0.10, 0.20),
        "fluid": (0.03, 0.18), "blood": (0.01, 0.35), "remnant": (0.15, 0.35), "_default": (0.01, 0.09),
        "air": (0.0, 0.03), "lung": (0.0, 0.05),
    },
    "stir": {  # fat-suppressed T2w / STIR: fluid bright, fat and marrow dark, noisy and darker overall
        "kidney": (0.40, 0.70),
        "csf": (0.80, 1.00), "fluid": (0.80, 1.00), "nucleus": (0.45, 0.80), "nucleus_deg": (0.08, 0.30),
        "cord": (0.30, 0.48), "roots": (0.25, 0.45), "viscera": (0.20, 0.55), "muscle": (0.12, 0.24),
        "marrow": (0.10, 0.22), "post_marrow": (0.08, 0.22), "sacrum_marrow": (0.10, 0.24),
        "other_marrow": (0.08, 0.22), "annulus": (0.06, 0.20), "heart": (0.15, 0.40), "blood": (0.01, 0.50),
        "fat": (0.01, 0.08), "epidural_fat": (0.01, 0.10), "remnant": (0.08, 0.25), "_default": (0.01, 0.08),
        "air": (0.0, 0.03), "lung": (0.0, 0.05),
    },
    "pd": {  # proton density: little contrast, fat and fluid bright, cortex dark
        "kidney": (0.45, 0.65),
        "fat": (0.75, 0.95), "epidural_fat": (0.70, 0.95), "csf": (0.60, 0.85), "fluid": (0.60, 0.90),
        "nucleus": (0.55, 0.75), "nucleus_deg": (0.25, 0.45), "marrow": (0.50, 0.68), "post_marrow": (0.45, 0.68),
        "sacrum_marrow": (0.50, 0.70), "other_marrow": (0.45, 0.68), "cord": (0.45, 0.60), "roots": (0.40, 0.55),
        "annulus": (0.20, 0.38), "muscle": (0.30, 0.45), "viscera": (0.35, 0.60), "heart": (0.30, 0.50),
        "blood": (0.02, 0.45), "remnant": (0.20, 0.40), "_default": (0.02, 0.12), "air": (0.0, 0.03),
        "lung": (0.0, 0.05),
    },
    "ct": {  # Hounsfield units; bone density, contrast in vessels and kernels vary between scans
        "kidney": (25.0, 180.0),
        "cortex": (450.0, 1400.0), "endplate": (350.0, 1100.0), "post_cortex": (450.0, 1400.0),
        "sacrum_cortex": (400.0, 1300.0), "other_cortex": (400.0, 1300.0), "marrow": (70.0, 320.0),
        "post_marrow": (120.0, 450.0), "sacrum_marrow": (60.0, 320.0), "other_marrow": (100.0, 350.0),
        "remnant": (150.0, 450.0), "nucleus": (40.0, 110.0), "nucleus_deg": (60.0, 160.0),
        "annulus": (60.0, 120.0), "ligament": (50.0, 110.0), "cord": (20.0, 45.0), "roots": (20.0, 45.0),
        "csf": (-5.0, 18.0), "fluid": (-5.0, 25.0), "muscle": (25.0, 60.0), "viscera": (15.0, 70.0),
        "heart": (30.0, 60.0), "blood": (30.0, 320.0), "fat": (-130.0, -70.0), "epidural_fat": (-120.0, -50.0),
        "lung": (-920.0, -700.0), "air": (-1010.0, -980.0), "_default": (20.0, 80.0),
    },
}

#: Orderings of tissue means each family keeps in every draw (strictly brighter first); tested.
ORDERINGS: dict[str, tuple[str, ...]] = {
    "t2w": ("csf", "fat", "marrow", "muscle", "cortex"),
    "t1w": ("fat", "marrow", "muscle", "csf", "cortex"),
    "stir": ("csf", "nucleus", "marrow", "fat"),
    "pd": ("fat", "marrow", "muscle", "cortex"),
    "ct": ("cortex", "marrow", "muscle", "fat", "air"),
}


def draw_family(rng: np.random.Generator, weights: Mapping[str, float] | None = None) -> str:
    """A contrast family drawn with ``weights`` (default :data:`FAMILY_WEIGHTS`)."""
    w = dict(FAMILY_WEIGHTS if weights is None else weights)
    names = sorted(w)
    p = np.array([w[n] for n in names], dtype=float)
    return str(names[int(rng.choice(len(names), p=p / p.sum()))])


def tissue_means(family: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per tissue id (index 0 = padding), drawn for one image of ``family``.

    Families keep their tissues in their ranges (so :data:`ORDERINGS` hold); ``random`` draws means from U(0, 1) and
    standard deviations from U(0, 0.1) as SynthSeg does. Tissues of one kind (the marrows, the cortices) share a base
    draw with a small per-tissue offset, as they do in a real scan.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown contrast family {family!r}; expected one of {', '.join(FAMILIES)}")
    n = len(TISSUES) + 1
    mean = np.zeros(n, np.float32)
    std = np.zeros(n, np.float32)
    if family == "random":
        mean[1:] = rng.uniform(0.0, 1.0, n - 1)
        std[1:] = rng.uniform(0.0, 0.1, n - 1)
        return mean, std
    ranges = _RANGES[family]
    shared = {g: float(rng.random()) for g in ("marrow", "cortex")}
    scale = 1000.0 if family == "ct" else 1.0
    for name in TISSUES:
        lo, hi = ranges.get(name, ranges["_default"])
        group = "marrow" if name in _MARROW else "cortex" if name in _CORTEX else None
        u = float(rng.random()) if group is None else float(np.clip(shared[group] + rng.normal(0, 0.12), 0, 1))
        i = TISSUE_ID[name]
        mean[i] = lo + u * (hi - lo)
        std[i] = float(rng.uniform(0.01, 0.06)) * scale if family == "ct" else float(rng.uniform(0.005, 0.05))
    std[TISSUE_ID["air"]] = 0.0 if family != "ct" else float(rng.uniform(0.0, 10.0))
    return mean, std


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], coarse: tuple[int, ...]) -> np.ndarray:
    """A smooth field of about unit scale: Gaussian noise on a ``coarse`` grid spread over ``shape`` by separable
    Gaussian interpolation weights (one small matrix per axis: far cheaper than a cubic zoom of the whole field)."""
    out = rng.standard_normal(coarse).astype(np.float32)
    for ax, (n, k) in enumerate(zip(shape, coarse)):
        x = np.linspace(0.0, k - 1.0, n, dtype=np.float32)[:, None] - np.arange(k, dtype=np.float32)[None, :]
        w = np.exp(-0.5 * (x / 0.6) ** 2)
        w /= np.sqrt((w * w).sum(1, keepdims=True))  # unit variance of the interpolated noise
        out = np.moveaxis(np.tensordot(w, out, axes=([1], [ax])), 0, ax)
    return np.ascontiguousarray(out, dtype=np.float32)


def _coarse(shape: tuple[int, ...], mm: float, spacing: tuple[float, ...]) -> tuple[int, ...]:
    return tuple(max(2, int(math.ceil(s * sp / mm)) + 1) for s, sp in zip(shape, spacing))


def paint_tissues(tissue: np.ndarray, mean: np.ndarray, std: np.ndarray, rng: np.random.Generator,
                  spacing: tuple[float, ...], texture: float) -> np.ndarray:
    """Step 1: per-voxel Gaussian intensities by tissue, plus a low-frequency texture (marrow and soft-tissue
    heterogeneity) whose amplitude is ``texture`` times each tissue's spread."""
    img = mean[tissue] + std[tissue] * rng.standard_normal(tissue.shape, dtype=np.float32)
    if texture > 0:
        spread = float(mean.max() - mean.min()) or 1.0
        field = _smooth_noise(rng, tissue.shape, _coarse(tissue.shape, 12.0, spacing))
        img += (texture * spread) * field * (tissue != TISSUE_ID["air"])
    return img


def point_spread(img: np.ndarray, rng: np.random.Generator, slice_axis: int, *, max_inplane: float = 1.2,
                 max_slice: float = 1.0, p_lowres: float = 0.25) -> tuple[np.ndarray, dict]:
    """Step 2: anisotropic Gaussian blur (in-plane up to ``max_inplane`` voxels, across slices up to ``max_slice``),
    and with probability ``p_lowres`` an in-plane resolution 1.3-2.5x coarser (block-averaged, then linear back)."""
    sig = [float(rng.uniform(0.0, max_inplane)) for _ in range(img.ndim)]
    sig[slice_axis] = float(rng.uniform(0.0, max_slice))
    info = {"blur_vox": [round(s, 2) for s in sig]}
    if max(sig) > 0.1:
        img = ndi.gaussian_filter(img, [s if s > 0.1 else 0.0 for s in sig], truncate=3.0)
    if rng.random() < p_lowres:
        f = float(rng.uniform(1.3, 2.5))
        zoom = [1.0 if ax == slice_axis else 1.0 / f for ax in range(img.ndim)]
        small = ndi.zoom(img, zoom, order=1, grid_mode=True, mode="nearest")
        back = ndi.zoom(small, [s / t for s, t in zip(img.shape, small.shape)], order=1, grid_mode=True,
                        mode="nearest")
        back = back[tuple(slice(0, s) for s in img.shape)]
        if back.shape != img.shape:  # zoom rounding: pad by edge values
            back = np.pad(back, [(0, s - b) for s, b in zip(img.shape, back.shape)], mode="edge")
        img = back
        info["lowres"] = round(f, 2)
    return np.ascontiguousarray(img, dtype=np.float32), info


def bias_field(shape: tuple[int, ...], rng: np.random.Generator, spacing: tuple[float, ...], *, strength: float,
               coil_axis: int | None) -> np.ndarray:
    """Step 3: multiplicative field exp(s * smooth noise), plus an exponential fall-off along ``coil_axis``."""
    field = np.exp(strength * _smooth_noise(rng, shape, _coarse(shape, 60.0, spacing)))
    if coil_axis is not None:
        n = shape[coil_axis]
        depth = np.linspace(0.0, 1.0, n, dtype=np.float32)
        if rng.random() < 0.5:
            depth = depth[::-1]
        sh = [1] * len(shape)
        sh[coil_axis] = n
        field = field * np.exp(-float(rng.uniform(0.2, 1.2)) * depth).reshape(sh)
    return field.astype(np.float32)


def ghost(img: np.ndarray, rng: np.random.Generator, axis: int) -> np.ndarray:
    """Step 4: a faint copy shifted by a quarter to a half of the field along the phase-encoding ``axis``."""
    shift = int(img.shape[axis] * rng.uniform(0.25, 0.5))
    return img + float(rng.uniform(0.03, 0.15)) * np.roll(img, shift, axis=axis)


def rician(img: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Step 5 (MRI): magnitude of the image plus complex Gaussian noise of std ``sigma``."""
    if sigma <= 0:
        return img
    re = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    im = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.sqrt(re * re + im * im)


#: Body tissues a negative sample's spine is replaced with (:func:`without_spine`).
_NEGATIVE_FILL = ("muscle", "fat", "viscera", "air")


def _noise_share(rng: np.random.Generator, noise_max: float, factor: float) -> float:
    """MRI noise sigma over the 99th percentile (see :func:`synthesize`'s ``noise_max``)."""
    if noise_max <= NOISE_MAX or rng.random() < 0.5:
        return float(rng.uniform(0.0, factor * min(noise_max, NOISE_MAX)))
    return float(rng.uniform(factor * NOISE_MAX, factor * noise_max))


def without_spine(tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A negative sample: the tissue map with no spine in it (for training a model not to find one where there is
    none). Half of the draws replace every spine tissue (:data:`~spineps_like.phantom.TISSUES` before the body's)
    by one random body tissue, so the body around stays; the other half fill the whole map with one body tissue, which
    :func:`synthesize` paints as texture, bias and noise only (an empty, constant or noise image). Padding (0) stays."""
    tissue = np.asarray(tissue)
    fill = TISSUE_ID[_NEGATIVE_FILL[int(rng.integers(len(_NEGATIVE_FILL)))]]
    first_body = TISSUE_ID["air"]  # the body's tissues follow the spine's
    out = tissue.copy()
    if rng.random() < 0.5:
        out[(tissue > 0) & (tissue < first_body)] = fill
    else:
        out[tissue > 0] = fill
    return out


def synthesize(tissue: np.ndarray, rng: np.random.Generator, *, family: str | None = None,
               spacing: tuple[float, ...] = (3.0, 1.2, 1.2), slice_axis: int = 0,
               normalize: bool = True, noise_max: float = NOISE_MAX) -> tuple[np.ndarray, dict]:
    """An image painted from the tissue map ``tissue`` (ids of :data:`~spineps_like.phantom.TISSUES`, 0 = padding).

    Parameters
    ----------
    tissue : integer array (2D or 3D)
        Tissue ids; never modified.
    rng : numpy Generator
        The only source of randomness: the same generator state gives the same image.
    family : one of :data:`FAMILIES`, optional
        Contrast family; drawn from :data:`FAMILY_WEIGHTS` when None.
    spacing : voxel size in mm per axis (sets the scale of texture and bias fields).
    slice_axis : the axis across sagittal slices (thick-slice blur, never the ghosting axis).
    normalize : z-score the image over the non-padding voxels (nnU-Net's ``ZScoreNormalization``), padding 0.
    noise_max : MRI noise sigma as a share of the 99th percentile, upper bound (STIR x1.5). At the default
        (:data:`NOISE_MAX`) sigma is uniform below it; above it, half of the draws are uniform below the default and
        half between the default and ``noise_max`` (low-SNR scans: fat-suppressed, fast, small coils).

    Returns
    -------
    (image float32 of ``tissue.shape``, info dict of the drawn parameters)
    """
    tissue = np.asarray(tissue)
    if tissue.ndim not in (2, 3):
        raise ValueError(f"tissue map must be 2D or 3D, got shape {tissue.shape}")
    if tissue.size and (int(tissue.max()) > len(TISSUES) or int(tissue.min()) < 0):
        raise ValueError(f"tissue ids must lie in 0..{len(TISSUES)}")
    spacing = tuple(float(s) for s in spacing)[: tissue.ndim]
    family = draw_family(rng) if family is None else family
    lab = tissue.astype(np.intp, copy=False)
    mean, std = tissue_means(family, rng)
    ct = family == "ct"
    info: dict = {"family": family}
    img = paint_tissues(lab, mean, std, rng, spacing, texture=float(rng.uniform(0.0, 0.05)))
    img, psf = point_spread(img, rng, slice_axis)
    info.update(psf)
    if ct:
        sigma = float(rng.uniform(3.0, 40.0))
        noise = rng.standard_normal(img.shape, dtype=np.float32)
        k = float(rng.uniform(0.0, 0.8))
        if k > 0.1:
            noise = ndi.gaussian_filter(noise, k)
            noise /= float(noise.std()) + 1e-6
        img = img + sigma * noise
        lo, hi = (-1024.0, 3071.0) if rng.random() < 0.7 else (float(rng.uniform(-1024, -200)),
                                                                float(rng.uniform(400, 1500)))
        img = np.clip(img, lo, hi)
        info.update(noise_hu=round(sigma, 1), window=(round(lo), round(hi)))
    else:
        inplane = [ax for ax in range(img.ndim) if ax != slice_axis]
        img = np.clip(img, 0.0, None)
        strength = float(rng.uniform(0.0, 0.5))
        coil = inplane[0] if rng.random() < 0.5 else None
        img *= bias_field(img.shape, rng, spacing, strength=strength, coil_axis=coil)
        if rng.random() < 0.2:
            img = ghost(img, rng, int(rng.choice(inplane)))
        sigma = _noise_share(rng, noise_max, 1.5 if family == "stir" else 1.0) * float(np.percentile(img, 99) + 1e-6)
        img = rician(img, rng, sigma)
        top = float(img.max()) + 1e-6
        gamma = float(np.exp(rng.normal(0.0, 0.35)))
        img = (img / top) ** gamma
        if rng.random() < 0.3:
            img = np.minimum(img, float(np.percentile(img, rng.uniform(98.0, 99.9))))
        info.update(bias=round(strength, 3), noise_rel=round(sigma, 4), gamma=round(gamma, 3))
    img = img.astype(np.float32, copy=False)
    if normalize:
        inside = tissue != 0
        vals = img[inside] if not inside.all() else img
        m, s = (float(vals.mean()), float(vals.std())) if vals.size else (0.0, 1.0)
        img = (img - m) / max(s, 1e-6)
        if not inside.all():
            img[~inside] = 0.0
    return img, info
