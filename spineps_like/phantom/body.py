"""The body around the spine on the output grid: fat, muscles, airway, lungs, heart, bowel with gas and fluid,
vessels, bladder (:func:`_body`): soft-edged classes giving the calibrated renderer its intensities and the tissue map
its body labels."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from spineps_like.phantom.anatomy import TISSUE_ID, _Layout

# ============================================================================================ body around the spine
def _spine_profiles(lay: _Layout, i_rows: np.ndarray) -> dict[str, np.ndarray]:
    """Cranio-caudal profiles (per output row) of the spine's landmarks, used to place the body around it."""
    pts = []
    for v in lay.verts + lay.sacrum:
        pts.append((v.O[1], v.world((-v.a, 0, 0))[0], v.O[0], v.world((v.xc, 0, 0))[0],
                    v.world((v.xc + v.cap + v.t, 0.2 * v.H, 0))[0], v.O[2], v.b))
    arr = np.array(sorted(pts), dtype=float)
    keys = ["p_front", "p_mid", "p_canal", "p_lam", "r_mid", "b"]
    return {k: np.interp(i_rows, arr[:, 0], arr[:, j + 1]) for j, k in enumerate(keys)}


def _level_i(lay: _Layout, name: str, default: float) -> float:
    for v in lay.verts + lay.sacrum:
        if v.name == name:
            return float(v.O[1])
    return default


def _body_params(rng: np.random.Generator) -> dict[str, float]:
    """Body habitus (mm): subcutaneous fat, muscle thickness, body depth, organ sizes."""
    return {
        "fat": rng.uniform(4.0, 35.0), "musc_neck": rng.uniform(45, 65), "musc_thorax": rng.uniform(14, 26),
        "musc_lumbar": rng.uniform(28, 48), "musc_pelvis": rng.uniform(10, 25), "ant_neck": rng.uniform(42, 60),
        "ant_thorax": rng.uniform(100, 140), "ant_abdomen": rng.uniform(80, 170), "ant_pelvis": rng.uniform(90, 130),
        "neck_half": rng.uniform(50, 64), "aw": rng.uniform(12, 20), "aorta": rng.uniform(9, 13),
        "psoas": rng.uniform(16, 26), "diaph": rng.uniform(-0.6, 0.6), "mw": rng.uniform(40, 60),
        "bladder": rng.uniform(15, 38) if rng.random() < 0.7 else 0.0, "heart": rng.uniform(42, 55),
    }


def _region_weights(lay: _Layout, i_rows: np.ndarray) -> dict[str, np.ndarray]:
    """Soft neck / thorax / abdomen / pelvis weights per row (sum 1), from the vertebral levels."""
    inlet = _level_i(lay, "T1", -1e9) - 10.0
    diaph = _level_i(lay, "T12", 1e9)
    pelvis = _level_i(lay, lay.verts[-1].name, 1e9)

    def step(c, width):
        return np.clip(0.5 + (i_rows - c) / width, 0.0, 1.0)

    s_in, s_di, s_pe = step(inlet, 50.0), step(diaph, 30.0), step(pelvis, 40.0)
    return {"neck": 1 - s_in, "thorax": s_in * (1 - s_di), "abdomen": s_di * (1 - s_pe), "pelvis": s_pe}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray, sigma_mm: float):
    """Zero-mean, unit-variance Gaussian random field with correlation length ~sigma_mm.

    Fine fields are filtered directly; coarse ones are filtered on a grid ~sigma/2 mm and brought up by separable
    linear interpolation (three small matrix products, much faster than ``ndimage.zoom``).
    """
    step = np.maximum(1, np.floor(max(1.0, sigma_mm / 2.0) / np.asarray(spacing))).astype(int)
    if np.all(step == 1):
        out = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), tuple(sigma_mm / spacing), truncate=3.0)
    else:
        cshape = tuple(int(math.ceil(n / f)) + 2 for n, f in zip(shape, step))
        noise = rng.standard_normal(cshape, dtype=np.float32)
        noise = ndi.gaussian_filter(noise, tuple(float(sigma_mm / (s * f)) for s, f in zip(spacing, step)),
                                    mode="wrap", truncate=3.0)
        out = noise
        for ax, (n, f) in enumerate(zip(shape, step)):
            if f == 1:
                out = out[(slice(None),) * ax + (slice(1, n + 1),)]
                continue
            pos = (np.arange(n) + 0.5) / f + 0.5  # output voxel centres in coarse-grid index units
            j0 = np.clip(np.floor(pos).astype(np.intp), 0, cshape[ax] - 2)
            sh = [1, 1, 1]
            sh[ax] = n
            t = (pos - j0).astype(np.float32).reshape(sh)
            lo_ = out.take(j0, axis=ax)
            out = lo_ + t * (out.take(j0 + 1, axis=ax) - lo_)
        out = np.ascontiguousarray(out)
    sample = out.reshape(-1)[::7]
    out -= float(sample.mean(dtype=np.float64))
    out *= 1.0 / (float(sample.std(dtype=np.float64)) + 1e-6)
    return out.astype(np.float32, copy=False)


def _body(lay: _Layout, P, I, R, spacing: np.ndarray, hab: dict, table: dict, rng: np.random.Generator,
          tissue: np.ndarray | None = None):
    """Analytic body around the spine on the output grid: returns (mean, hf amplitude, lf amplitude) arrays.

    ``tissue`` (uint8, output grid, optional) receives the body's tissue labels (:data:`TISSUE_ID`): each class
    where its soft weight passes one half, in the same painting order as the intensities.

    Classes are composited with soft (about one voxel) edges, each inside its own bounding box: subcutaneous fat,
    paraspinal and neck muscles, airway and trachea, lungs, heart, oesophagus, aorta, vena cava, psoas, bowel with gas
    and fluid pockets, bladder; everything outside the body is air.
    """
    i1 = I[0, :, 0].astype(float)
    c = _Canvas(P, I, R, spacing, _body_profiles(lay, i1, spacing, hab), table, tissue)
    lv = {name: _level_i(lay, name, default) for name, default in (
        ("C4", -1e9), ("T1", 1e9), ("T4", -1e9), ("T5", 1e9), ("T10", 1e9), ("T12", 1e9), ("L4", 1e9))}
    lv["last"] = _level_i(lay, lay.verts[-1].name, 1e9)
    _paint_trunk(c, hab)
    _paint_prevertebral(c, lv)
    if c.prof["neck"].max() > 0:
        _paint_neck(c, hab, lv)
    if c.prof["thorax"].max() > 0:
        _paint_thorax(c, hab, lay, lv)
    if (c.prof["abdomen"] + c.prof["pelvis"]).max() > 0:
        _paint_abdomen(c, hab, lay, lv, spacing, rng)
    _paint_aorta(c, hab, lv)
    _kidneys(lay, c, rng)
    return c.mu, c.ahf, c.alf


def _body_profiles(lay: _Layout, i1: np.ndarray, spacing: np.ndarray, hab: dict) -> dict[str, np.ndarray]:
    """Per output row: the spine's landmarks (:func:`_spine_profiles`, the laminae smoothed), the region weights and
    the body's outline from the habitus: skin behind (``p_skin``), fat thickness, front (``p_ant``), half width."""
    prof = _spine_profiles(lay, i1)
    prof["p_lam"] = ndi.gaussian_filter1d(prof["p_lam"], 25.0 / spacing[1], mode="nearest")
    prof.update(_region_weights(lay, i1))
    reg = {k: prof[k] for k in ("neck", "thorax", "abdomen", "pelvis")}
    fat_t = hab["fat"] * (0.6 * reg["neck"] + 0.8 * reg["thorax"] + reg["abdomen"] + 1.3 * reg["pelvis"])
    musc_t = (hab["musc_neck"] * reg["neck"] + hab["musc_thorax"] * reg["thorax"]
              + hab["musc_lumbar"] * reg["abdomen"] + hab["musc_pelvis"] * reg["pelvis"])
    prof["p_skin"] = prof["p_lam"] + musc_t + fat_t
    prof["fat_t"] = fat_t
    ant = (hab["ant_neck"] * reg["neck"] + hab["ant_thorax"] * reg["thorax"] + hab["ant_abdomen"] * reg["abdomen"]
           + hab["ant_pelvis"] * reg["pelvis"])
    prof["p_ant"] = prof["p_front"] - ant
    prof["half"] = hab["neck_half"] * reg["neck"] + 170.0 * (1 - reg["neck"])
    return prof


class _Canvas:
    """The output grid's mean, hf and lf amplitude arrays (and optional tissue labels) that the body's classes are
    painted on (:meth:`blend`), each inside its own bounding box (:meth:`box`), with soft edges (:meth:`soft`)."""

    def __init__(self, P, I, R, spacing: np.ndarray, prof: dict[str, np.ndarray], table: dict,
                 tissue: np.ndarray | None) -> None:
        self.P, self.I, self.R = P, I, R
        self.p1, self.i1, self.r1 = P[:, 0, 0].astype(float), I[0, :, 0].astype(float), R[0, 0, :].astype(float)
        self.prof, self.table, self.tissue = prof, table, tissue
        self.ramp = float(max(spacing.min(), 0.7)) * 1.2
        shape = (P.shape[0], I.shape[1], R.shape[2])
        self.mu = np.full(shape, table["air"][0], np.float32)
        self.ahf = np.full(shape, table["air"][1], np.float32)
        self.alf = np.full(shape, table["air"][2], np.float32)

    def soft(self, d):
        """Weight 0..1 of a signed distance (mm, positive inside) across an edge about one voxel wide."""
        return np.clip(0.5 + d * (1.0 / self.ramp), 0.0, 1.0)

    def box(self, p_lo, p_hi, i_lo, i_hi, r_lo=-1e9, r_hi=1e9):
        """Slices of the output grid inside the mm box, and the coordinates/profiles there (or None)."""
        sl = []
        for v, lo, hi in ((self.p1, p_lo, p_hi), (self.i1, i_lo, i_hi), (self.r1, r_lo, r_hi)):
            a, b = np.searchsorted(v, lo - self.ramp), np.searchsorted(v, hi + self.ramp, side="right")
            if b <= a:
                return None
            sl.append(slice(int(a), int(b)))
        sl = tuple(sl)
        pr = {k: v[sl[1]].astype(np.float32)[None, :, None] for k, v in self.prof.items()}
        return sl, self.P[sl[0]], self.I[:, sl[1]], self.R[..., sl[2]], pr

    def rows(self, i_lo, i_hi, key, lo_off, hi_off):
        """p range of a profile (+ offsets) over the rows in [i_lo, i_hi]."""
        m = (self.i1 >= i_lo - 5) & (self.i1 <= i_hi + 5)
        if not m.any():
            return None
        v = self.prof[key][m]
        return float(v.min() + lo_off), float(v.max() + hi_off)

    def blend(self, sl, w, cls) -> None:
        """Paint class ``cls`` with weight ``w`` over the box ``sl`` (and its tissue label where ``w`` > 0.5)."""
        m, h, l_ = self.table[cls]
        sub = self.mu[sl]
        w = np.broadcast_to(w, sub.shape)
        sub += w * (m - sub)
        sub = self.ahf[sl]
        sub += w * (h - sub)
        sub = self.alf[sl]
        sub += w * (l_ - self.alf[sl])
        if self.tissue is not None:
            self.tissue[sl][w > 0.5] = TISSUE_ID[cls]


def _paint_trunk(c: _Canvas, hab: dict) -> None:
    """The body (fat; the neck is round-ish: its lateral border recedes towards the front and back) and the
    posterior paraspinal / neck muscles under the subcutaneous fat."""
    sl, Pb, Ib, Rb, pr = c.box(-1e9, 1e9, -1e9, 1e9)
    dr = np.abs(Rb - pr["r_mid"])
    half_p = 0.5 * (pr["p_skin"] - pr["p_ant"])
    ell = 1.0 - ((Pb - 0.5 * (pr["p_ant"] + pr["p_skin"])) / half_p) ** 2
    half_eff = np.where(pr["neck"] > 0.5, pr["half"] * np.sqrt(np.clip(ell, 0.05, 1.0)) + 10.0, pr["half"])
    body = c.soft(np.minimum(np.minimum(Pb - pr["p_ant"], pr["p_skin"] - Pb), half_eff - dr))
    c.blend(sl, body, "fat")
    mw = hab["mw"] * (1 - pr["neck"]) + (pr["half"] - 8.0) * pr["neck"]
    post = c.soft(np.minimum(np.minimum(Pb - (pr["p_canal"] - 4.0), (pr["p_skin"] - pr["fat_t"]) - Pb), mw - dr))
    c.blend(sl, post * body, "muscle")


def _paint_prevertebral(c: _Canvas, lv: dict[str, float]) -> None:
    """The prevertebral strip (longus colli in the neck, thin in the upper thorax) and lateral neck muscles."""
    pr_rng = c.rows(-1e9, lv["T4"], "p_front", -20.0, 0.0)
    if not pr_rng:
        return
    bx = c.box(pr_rng[0], pr_rng[1] + 40.0, -1e9, lv["T4"] + 20.0)
    if bx:
        s, Pb, Ib, Rb, pr = bx
        prev = 4.0 + 10.0 * np.clip((Ib - lv["C4"]) / 40.0, 0, 1)
        w = c.soft(np.minimum(np.minimum(Pb - (pr["p_front"] - prev), pr["p_canal"] + 4.0 - Pb),
                              pr["b"] + 14.0 - np.abs(Rb - pr["r_mid"])))
        c.blend(s, w * np.maximum(pr["neck"], 0.25 * pr["thorax"]), "muscle")


def _paint_neck(c: _Canvas, hab: dict, lv: dict[str, float]) -> None:
    """Neck: lateral and anterior neck muscles (scalenes, sternocleidomastoid, strap muscles), then the airway,
    carotid arteries / jugular veins as flow voids, and the thyroid / larynx in front of the airway."""
    i_hi = float(c.i1[c.prof["neck"] > 0].max())
    rg = c.rows(-1e9, i_hi, "p_ant", 0.0, 0.0)
    bx = c.box(rg[0], float(c.prof["p_front"][c.i1 <= i_hi + 5].max()), -1e9, i_hi)
    if not bx:
        return
    s, Pb, Ib, Rb, pr = bx
    prev = 4.0 + 10.0 * np.clip((Ib - lv["C4"]) / 40.0, 0, 1)
    p_aw = pr["p_front"] - prev - 0.5 * hab["aw"]
    dr = np.abs(Rb - pr["r_mid"])
    neck_m = c.soft(np.minimum(np.minimum(Pb - (pr["p_ant"] + pr["fat_t"]), pr["p_canal"] + 4.0 - Pb),
                               pr["half"] - pr["fat_t"] - 6.0 - dr))
    c.blend(s, neck_m * pr["neck"], "muscle")
    c.blend(s, c.soft(np.minimum(0.5 * hab["aw"] - np.abs(Pb - p_aw), 9.0 - dr)) * pr["neck"], "air")
    for side in (-1.0, 1.0):
        d = 5.0 - np.sqrt((Pb - (p_aw + 2.0)) ** 2 + (Rb - pr["r_mid"] - side * 24.0) ** 2)
        c.blend(s, c.soft(d) * pr["neck"], "blood")
    front = c.soft(np.minimum(np.minimum(p_aw - 0.5 * hab["aw"] - 2.0 - Pb, Pb - (pr["p_ant"] + pr["fat_t"])),
                              22.0 - dr))
    c.blend(s, front * pr["neck"], "viscera")


def _paint_thorax(c: _Canvas, hab: dict, lay: _Layout, lv: dict[str, float]) -> None:
    """Thorax: trachea (to the carina), lungs, heart, oesophagus, under a dome-shaped diaphragm."""
    rg = c.rows(lv["T1"] - 30.0, lv["T5"], "p_front", -36.0, -16.0)
    bx = c.box(rg[0], rg[1], lv["T1"] - 30.0, lv["T5"]) if rg else None
    if bx:
        s, Pb, Ib, Rb, pr = bx
        tr = c.soft(np.minimum(8.0 - np.sqrt((Pb - (pr["p_front"] - 26.0)) ** 2 + (Rb - pr["r_mid"] - 2.0) ** 2),
                               lv["T5"] - Ib))
        c.blend(s, tr * pr["thorax"], "air")
    i_th = float(c.i1[c.prof["thorax"] > 0].max()) + 10.0
    rg = c.rows(-1e9, i_th, "p_canal", 0.0, 12.0)
    bx = c.box(float(c.prof["p_ant"].min()), rg[1], -1e9, i_th)
    if not bx:
        return
    s, Pb, Ib, Rb, pr = bx
    dr = np.abs(Rb - pr["r_mid"])
    pf_d = float(np.interp(lv["T12"], c.i1, c.prof["p_front"]))
    i_d = lv["T12"] + hab["diaph"] * 20.0 - 0.35 * np.clip(pf_d - Pb, 0, 150)
    th = pr["thorax"] * c.soft(i_d - Ib) * c.soft(np.minimum(Pb - pr["p_ant"], pr["half"] - dr))
    lung = c.soft(np.minimum(np.minimum(dr - (pr["b"] + 5.0), pr["p_canal"] + 10.0 - Pb), Pb - (pr["p_ant"] + 25.0)))
    c.blend(s, lung * th, "lung")
    i_t7 = _level_i(lay, "T7", 0.5 * (lv["T4"] + lv["T10"]))
    pf7 = float(np.interp(i_t7, c.i1, c.prof["p_front"]))
    hr = hab["heart"]
    heart = hr * (1.0 - np.sqrt(((Pb - (pf7 - 28.0 - hr)) / hr) ** 2 + ((Ib - i_t7 - 10.0) / (1.2 * hr)) ** 2
                                + ((Rb - pr["r_mid"] + 15.0) / (1.2 * hr)) ** 2))
    c.blend(s, c.soft(heart) * th, "heart")
    eso = c.soft(7.0 - np.sqrt((Pb - (pr["p_front"] - 9.0)) ** 2 + (Rb - pr["r_mid"] - 4.0) ** 2))
    c.blend(s, eso * pr["thorax"], "muscle")


def _paint_abdomen(c: _Canvas, hab: dict, lay: _Layout, lv: dict[str, float], spacing: np.ndarray,
                   rng: np.random.Generator) -> None:
    """Abdomen and pelvis: bowel (soft tissue with gas and fluid pockets), psoas, vena cava, bladder."""
    abd = c.prof["abdomen"] + c.prof["pelvis"]
    s, Pb, Ib, Rb, pr = c.box(-1e9, 1e9, float(c.i1[abd > 0].min()), 1e9)
    sh = tuple(x.stop - x.start for x in s)
    v1 = _smooth_field(rng, sh, spacing, 7.0)
    v2 = _smooth_field(rng, sh, spacing, 12.0)
    gut = c.soft(pr["p_front"] - 22.0 - Pb) * c.soft(pr["p_skin"] - 20.0 - Pb) * (pr["abdomen"] + pr["pelvis"])
    gut = gut * c.soft(np.minimum(Pb - pr["p_ant"], pr["half"] - np.abs(Rb - pr["r_mid"])))
    c.blend(s, gut * c.soft((v2 + 0.3) * 6.0), "viscera")
    c.blend(s, gut * c.soft((v1 - 1.3) * 8.0), "air")
    c.blend(s, gut * c.soft((-v1 - 1.6) * 8.0), "fluid")
    i_t12, i_l5 = lv["T12"], lv["last"]
    rg = c.rows(i_t12, 1e9, "p_mid", -35.0, 35.0)
    bx = c.box(rg[0], rg[1], i_t12, 1e9) if rg else None
    if bx:
        s, Pb, Ib, Rb, pr = bx
        psoas_r = hab["psoas"] * np.clip((Ib - i_t12) / 120.0, 0, 1) ** 0.7
        for side in (-1.0, 1.0):
            rc = pr["r_mid"] + side * (pr["b"] + 0.75 * psoas_r)
            d = psoas_r - np.sqrt((Pb - (pr["p_mid"] - 0.15 * (pr["p_mid"] - pr["p_front"]))) ** 2 + (Rb - rc) ** 2)
            c.blend(s, c.soft(d) * (pr["abdomen"] + pr["pelvis"]) * (psoas_r > 1.0), "muscle")
    rg = c.rows(lv["T10"], i_l5, "p_front", -30.0, 0.0)
    bx = c.box(rg[0], rg[1], lv["T10"], i_l5) if rg else None
    if bx:
        s, Pb, Ib, Rb, pr = bx
        ivc = c.soft(np.minimum(10.0 - np.sqrt(((Pb - (pr["p_front"] - 13.0)) * 1.4) ** 2
                                               + (Rb - pr["r_mid"] - pr["b"] * 0.45 - 8.0) ** 2), i_l5 - Ib))
        c.blend(s, ivc * pr["abdomen"], "blood")
    if hab["bladder"] > 0 and "S3" in {v.name for v in lay.sacrum}:
        _paint_bladder(c, hab["bladder"], lay)


def _paint_bladder(c: _Canvas, rb: float, lay: _Layout) -> None:
    """The bladder (radius ``rb`` mm, fluid) in front of the sacrum, below S3."""
    i_s3 = _level_i(lay, "S3", 1e9)
    pf_s1 = float(np.interp(_level_i(lay, "S1", 0.0), c.i1, c.prof["p_front"]))
    bx = c.box(pf_s1 - 60.0 - rb, pf_s1 - 60.0 + rb, i_s3 + 25.0 - rb, i_s3 + 25.0 + rb)
    if bx:
        s, Pb, Ib, Rb, pr = bx
        d = rb * (1.0 - np.sqrt(((Pb - (pf_s1 - 60.0)) / rb) ** 2 + ((Ib - (i_s3 + 25.0)) / rb) ** 2
                                + ((Rb - pr["r_mid"]) / (1.2 * rb)) ** 2))
        c.blend(s, c.soft(d) * pr["pelvis"], "fluid")


def _paint_aorta(c: _Canvas, hab: dict, lv: dict[str, float]) -> None:
    """The descending aorta (left-anterior of the spine), T4 to L4."""
    ra, i_t4, i_l4 = hab["aorta"], lv["T4"], lv["L4"]
    rg = c.rows(i_t4, i_l4, "p_front", -2.0 - 2 * ra, -2.0)
    bx = c.box(rg[0], rg[1], i_t4, i_l4) if rg else None
    if bx:
        s, Pb, Ib, Rb, pr = bx
        d = ra - np.sqrt((Pb - (pr["p_front"] - 2.0 - ra)) ** 2 + (Rb - (pr["r_mid"] - 0.4 * pr["b"] - 6.0)) ** 2)
        c.blend(s, c.soft(np.minimum(d, np.minimum(Ib - i_t4, i_l4 - Ib))) * (1 - pr["neck"]), "blood")


def _kidneys(lay: _Layout, c: _Canvas, rng: np.random.Generator) -> None:
    """Both kidneys in the paravertebral gutters, lateral of the psoas: ellipsoids about 110 x 55 x 40 mm
    (cranio-caudal, left-right, antero-posterior), the left centred near L1, the right 10-25 mm lower. Drawn last,
    with the last random numbers of the body, so that adding them left every other class unchanged."""
    size = rng.uniform(0.85, 1.15)
    drop = rng.uniform(10.0, 25.0)
    lateral = rng.uniform(55.0, 75.0)
    i_l1 = _level_i(lay, "L1", float("nan"))
    if not math.isfinite(i_l1) or c.prof["abdomen"].max() <= 0:
        return
    hi, hr, hp = 55.0 * size, 27.0 * size, 20.0 * size
    for side, di in ((-1.0, 0.0), (1.0, drop)):  # left (-r), right (+r, lower)
        ic = i_l1 + di
        rows = (c.i1 >= ic - hi) & (c.i1 <= ic + hi)
        if not rows.any():
            continue
        pc = float(np.interp(ic, c.i1, c.prof["p_mid"]))
        bx = c.box(pc - hp - 5.0, pc + hp + 5.0, ic - hi, ic + hi)
        if not bx:
            continue
        s, Pb, Ib, Rb, pr = bx
        rc = pr["r_mid"] + side * lateral
        d = 1.0 - np.sqrt(((Pb - pc) / hp) ** 2 + ((Ib - ic) / hi) ** 2 + ((Rb - rc) / hr) ** 2)
        c.blend(s, c.soft(d * hp) * pr["abdomen"], "kidney")
