"""The phantoms' own renderer (``mode`` t2w / ct / random): tissue classes to a calibrated image with
sub-voxel partial volume, texture, bias, blur and noise. For training images of any contrast see
:mod:`spineps_like.phantom.appearance`."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from spineps_like.phantom.anatomy import _APP, TISSUE_ID, _Layout
from spineps_like.phantom.body import _body, _smooth_field

# (mean, high-frequency texture amplitude, low-frequency texture amplitude) per class.
# t2w: arbitrary units relative to corpus marrow = 1 (scaled afterwards); ct: Hounsfield units.
_T2W = {
    "marrow": (1.0, 0.16, 0.12), "cortex": (0.18, 0.04, 0.0), "endplate": (0.15, 0.04, 0.0),
    "post_marrow": (0.64, 0.16, 0.08), "post_cortex": (0.15, 0.04, 0.0), "sacrum_marrow": (1.05, 0.16, 0.12),
    "sacrum_cortex": (0.18, 0.04, 0.0), "nucleus": (1.0, 0.15, 0.10), "annulus": (0.24, 0.05, 0.03),
    "nucleus_deg": (0.3, 0.06, 0.04), "csf": (2.5, 0.35, 0.35), "cord": (0.72, 0.12, 0.08), "roots": (0.5, 0.05, 0.0),
    "ligament": (0.12, 0.03, 0.02), "epidural_fat": (1.6, 0.15, 0.1), "other_marrow": (0.9, 0.12, 0.08),
    "other_cortex": (0.15, 0.03, 0.0), "remnant": (0.35, 0.05, 0.02),
    "air": (0.0, 0.0, 0.0), "fat": (1.9, 0.12, 0.2), "muscle": (0.22, 0.06, 0.05), "viscera": (0.75, 0.12, 0.3),
    "fluid": (3.6, 0.1, 0.1), "blood": (0.12, 0.05, 0.25), "lung": (0.04, 0.02, 0.02), "heart": (0.35, 0.06, 0.15),
    "kidney": (0.9, 0.12, 0.1),
}
_CT = {
    "marrow": (90.0, 70.0, 30.0), "cortex": (650.0, 90.0, 0.0), "endplate": (520.0, 80.0, 0.0),
    "post_marrow": (260.0, 80.0, 30.0), "post_cortex": (900.0, 120.0, 0.0), "sacrum_marrow": (90.0, 70.0, 30.0),
    "sacrum_cortex": (650.0, 90.0, 0.0), "nucleus": (64.0, 12.0, 5.0), "annulus": (80.0, 12.0, 5.0),
    "nucleus_deg": (95.0, 12.0, 5.0), "csf": (2.0, 5.0, 3.0), "cord": (35.0, 5.0, 3.0), "roots": (30.0, 5.0, 0.0),
    "ligament": (75.0, 10.0, 5.0), "epidural_fat": (-85.0, 10.0, 10.0), "other_marrow": (160.0, 60.0, 20.0),
    "other_cortex": (800.0, 100.0, 0.0), "remnant": (250.0, 40.0, 0.0),
    "air": (-1000.0, 0.0, 0.0), "fat": (-100.0, 10.0, 10.0), "muscle": (48.0, 10.0, 6.0),
    "viscera": (38.0, 12.0, 12.0), "fluid": (8.0, 5.0, 3.0), "blood": (42.0, 5.0, 3.0), "lung": (-840.0, 40.0, 40.0),
    "heart": (42.0, 8.0, 5.0), "kidney": (35.0, 8.0, 5.0),
}


# ============================================================================================ rendering
#: Classes added after generator 1.0: drawn after all others, so that every earlier class keeps its random draw.
_LATER_CLASSES = ("kidney",)


def _intensity_table(mode: str, rng: np.random.Generator) -> dict[str, tuple[float, float, float]]:
    if mode == "t2w":
        t = {k: (m * float(rng.uniform(0.9, 1.1)), h, l_) for k, (m, h, l_) in _T2W.items()
             if k not in _LATER_CLASSES}  # scanner/subject
        hyd = rng.uniform(0.7, 1.3)  # disc hydration of this subject
        t["nucleus"] = (t["nucleus"][0] * hyd, t["nucleus"][1], t["nucleus"][2])
        t["fat"] = (t["fat"][0] * rng.uniform(0.85, 1.15), *t["fat"][1:])
        t["marrow"] = (t["marrow"][0] * rng.uniform(0.9, 1.1), *t["marrow"][1:])
        for k in _LATER_CLASSES:
            m, h, l_ = _T2W[k]
            t[k] = (m * float(rng.uniform(0.9, 1.1)), h, l_)
        return t
    if mode == "ct":
        t = {k: (m + (float(rng.normal(0.0, 6.0)) if -200 < m < 200 else 0.0), h, l_) for k, (m, h, l_) in _CT.items()
             if k not in _LATER_CLASSES}
        bmd = rng.uniform(-40.0, 80.0)  # bone density of this subject
        for k in ("marrow", "sacrum_marrow", "post_marrow", "other_marrow"):
            t[k] = (t[k][0] + bmd, *t[k][1:])
        for k in _LATER_CLASSES:
            m, h, l_ = _CT[k]
            t[k] = (m + float(rng.normal(0.0, 6.0)), h, l_)
        return t
    names = sorted(set(_T2W) - set(_LATER_CLASSES)) + list(_LATER_CLASSES)
    return {k: (float(rng.uniform(0.0, 1.0)), float(rng.uniform(0.0, 0.08)), float(rng.uniform(0.0, 0.12)))
            for k in names}


def _block_mean(a: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Mean over f0 x f1 x f2 blocks (area averaging), as sums of strided views."""
    if f == (1, 1, 1):
        return a.astype(np.float32, copy=False)
    out = None
    for o0 in range(f[0]):
        for o1 in range(f[1]):
            for o2 in range(f[2]):
                part = a[o0::f[0], o1::f[1], o2::f[2]]
                out = part.astype(np.float32) if out is None else out + part
    out *= 1.0 / (f[0] * f[1] * f[2])
    return out


def _render(app: np.ndarray, f: tuple[int, int, int], lay: _Layout, spacing: np.ndarray, out_lo: np.ndarray,
            mode: str, rngs: dict[str, np.random.Generator], hab: dict,
            tissue: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Image on the output grid: area-averaged spine classes over the analytic body, texture, bias, blur, noise.
    ``tissue`` (output grid, filled with the spine's tissue labels) receives the body's labels where it is 0."""
    table = _intensity_table(mode, rngs["intensity"])
    lut = np.array([table[n] if n != "none" else (0.0, 0.0, 0.0) for n in _APP], dtype=np.float32)
    frac = _block_mean((app > 0).view(np.uint8), f)
    s_mu = _block_mean(lut[:, 0][app], f)
    s_hf = _block_mean(lut[:, 1][app], f)
    s_lf = _block_mean(lut[:, 2][app], f)
    shape = frac.shape
    P = (out_lo[0] + np.arange(shape[0]) * spacing[0]).astype(np.float32)[:, None, None]
    I = (out_lo[1] + np.arange(shape[1]) * spacing[1]).astype(np.float32)[None, :, None]
    R = (out_lo[2] + np.arange(shape[2]) * spacing[2]).astype(np.float32)[None, None, :]
    body_tissue = None if tissue is None else np.full(shape, TISSUE_ID["air"], np.uint8)
    b_mu, b_hf, b_lf = _body(lay, P, I, R, spacing, hab, table, rngs["body"], body_tissue)
    if tissue is not None:
        np.copyto(tissue, body_tissue, where=tissue == 0)
    keep = 1.0 - frac
    img = b_mu * keep + s_mu
    amp_hf = b_hf * keep + s_hf
    amp_lf = b_lf * keep + s_lf
    rn = rngs["noise"]
    t_hf = _smooth_field(rn, shape, spacing, 0.45)
    t_lf = _smooth_field(rn, shape, spacing, 4.0)
    img += amp_hf * t_hf + amp_lf * t_lf
    info: dict = {}
    if mode == "t2w":
        gain = float(rn.uniform(55.0, 140.0))
        img = np.maximum(img, 0.0) * gain
        img *= _bias_field(rn, shape, P, strength=rn.uniform(0.2, 0.6), coil=True)
        img = _blur(img, rn.uniform(0.25, 0.55))
        sigma = float(rn.uniform(0.05, 0.10)) * gain
        img = _rician(rn, img, sigma)
        info.update(gain=round(gain, 2), noise_sigma=round(sigma, 2))
    elif mode == "ct":
        img = _blur(img, rn.uniform(0.35, 0.7))
        sigma = float(rn.uniform(25.0, 85.0))
        noise = ndi.gaussian_filter(rn.standard_normal(shape, dtype=np.float32), (0.6, 0.6, 0.0))  # kernel texture
        img = img + noise * (sigma / (float(noise.reshape(-1)[::7].std()) + 1e-6))
        img = np.clip(img, -1024.0, 3071.0)
        info.update(noise_sigma_hu=round(sigma, 1))
    else:
        gamma = float(np.exp(rn.uniform(-0.6, 0.6)))
        img = np.clip(img, 0.0, None)
        img = (img / (img.max() + 1e-6)) ** gamma
        img *= _bias_field(rn, shape, P, strength=rn.uniform(0.0, 0.8), coil=rn.random() < 0.5)
        img = _blur(img, rn.uniform(0.0, 1.2))
        sigma = float(rn.uniform(0.0, 0.08))
        img = _rician(rn, img, sigma) if rn.random() < 0.5 else img + sigma * rn.standard_normal(shape).astype(
            np.float32)
        img = img * float(rn.uniform(200.0, 2000.0)) + float(rn.uniform(-100.0, 100.0))
        info.update(gamma=round(gamma, 3), noise_sigma=round(sigma, 4))
    info["intensity_means"] = {k: round(float(v[0]), 4) for k, v in sorted(table.items())}
    return img.astype(np.float32), info


def _bias_field(rn: np.random.Generator, shape, P, strength: float, coil: bool) -> np.ndarray:
    """Smooth multiplicative field: separable low-frequency cosines (+ a posterior surface coil fall-off)."""
    out = np.ones((1, 1, 1), np.float32)
    for ax in range(3):
        n = shape[ax]
        x = np.linspace(-1.0, 1.0, n, dtype=np.float32)
        f = np.zeros(n, np.float32)
        for k in (1, 2):
            f += float(rn.normal(0.0, strength / (2 * k))) * np.cos(k * math.pi * (x + float(rn.uniform(-1, 1))) / 2)
        sh = [1, 1, 1]
        sh[ax] = n
        out = out * np.exp(f).reshape(sh)
    if coil:
        depth = (P.max() - P) / max(float(P.max() - P.min()), 1.0)
        out = out * np.exp(-float(strength) * 1.2 * depth).astype(np.float32)
    return out


def _blur(img: np.ndarray, sigma_vox_inplane: float) -> np.ndarray:
    """In-plane (P, I) Gaussian point-spread; the slice profile along R comes from the sub-voxel averaging."""
    if sigma_vox_inplane <= 0.05:
        return img
    return ndi.gaussian_filter(img, (sigma_vox_inplane, sigma_vox_inplane, 0.0))


def _rician(rn: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise (Rician statistics, a noise floor in the air)."""
    if sigma <= 0:
        return img
    n1 = rn.standard_normal(img.shape, dtype=np.float32) * sigma
    n2 = rn.standard_normal(img.shape, dtype=np.float32) * sigma
    return np.sqrt((img + n1) ** 2 + n2 ** 2)


# ============================================================================================ public API
