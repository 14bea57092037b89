"""Semantic phase: clean-up, N4, prediction through nnU-Net on the model grid, training export."""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest

from spineps_like.geometry import to_model_grid
from spineps_like.io import Scan, load_scan
from spineps_like.labels import Semantic
from spineps_like.models import load_semantic_model, write_manifest
from spineps_like.semantic import clean_semantic, n4_bias_correction, normalize_intensity, predict_semantic
from spineps_like.training.semantic import (
    prepare_case,
    write_random_model,
    write_raw_dataset,
)

SCHEME = {int(s) for s in Semantic} | {0}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = write_random_model(tmp_path_factory.mktemp("m") / "tiny", labels=(41, 49, 60, 61, 100))
    return load_semantic_model(folder)


def _ras_scan(shape=(40, 48, 14), spacing=(0.9, 0.8, 3.3), seed=0) -> Scan:
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = (-15.0, 20.0, -7.0)
    img = np.random.default_rng(seed).normal(200, 30, shape).astype(np.float32)
    return Scan(img, aff)


# ---------------------------------------------------------------- clean-up
def test_clean_semantic_removes_small_far_and_fills_holes():
    m = np.zeros((60, 80, 30), np.uint8)
    m[10:30, 10:30, 8:22] = 49  # corpus ...
    m[18:22, 18:22, 13:17] = 0  # ... with an enclosed hole
    m[30:40, 12:28, 10:20] = 61  # canal around the cord
    m[33:37, 16:24, 13:17] = 60
    m[10:30, 33:37, 8:22] = 100  # disc 3 voxels below the corpus (inside the region margin)
    m[45:47, 70:71, 25:26] = 41  # 2 voxels: small
    m[50:58, 60:78, 0:6] = 49  # big, but far from the spine
    out = clean_semantic(m, (1.0, 1.0, 1.0), canal_gap_mm=None, column_canal_mm=None, stats=(st := {}))
    assert out[18:22, 18:22, 13:17].min() == 49  # hole filled with the corpus label
    assert (out[33:37, 16:24, 13:17] == 60).all()  # the cord is not a hole of the canal
    assert (out[10:30, 33:37, 8:22] == 100).all()  # nearby component kept
    assert not out[45:47, 70:71, 25:26].any()  # small blob removed
    assert not out[50:58, 60:78, 0:6].any()  # far component removed
    assert st == {"small_removed": 2, "canal_removed": 0, "column_removed": 0, "arch_removed": 0,
                  "region_removed": 8 * 18 * 6, "holes_filled": 4 * 4 * 4}
    assert (m[45, 70, 25] == 41) and (m[50, 60, 0] == 49)  # input untouched
    # with the anatomical rules on, the far corpus goes already because it is far from the canal
    clean_semantic(m, (1.0, 1.0, 1.0), stats=(st := {}))
    assert st["column_removed"] == 8 * 18 * 6 and st["region_removed"] == 0


def test_clean_semantic_keeps_one_canal_tube_in_mm():
    """Canal pieces split by a stenosis stay; CSF-like fluid away from the tube goes; distances are in mm."""
    m = np.zeros((50, 90, 20), np.uint8)
    m[30:40, 0:40, 6:14] = 61  # canal with the cord inside
    m[33:37, 0:40, 8:12] = 60
    m[30:40, 50:80, 6:14] = 61  # below a 10 mm stenosis gap: same tube
    m[15:29, 0:80, 6:14] = 49  # corpus in front, touching neither canal piece's fluid blob
    m[30:40, 20:30, 18:19] = 61  # 5 voxels beside the tube along the 3 mm axis: 15 mm, kept
    m[2:12, 60:75, 6:14] = 61  # fluid 18 mm in front of the tube (bladder-like), but touching no spine label
    out = clean_semantic(m, (1.0, 1.0, 3.0), keep_spine_region=False, stats=(st := {}))
    assert (out[30:40, 50:80, 6:14] == 61).all() and (out[33:37, 0:40, 8:12] == 60).all()
    assert (out[30:40, 20:30, 18:19] == 61).all()
    assert not out[2:12, 60:75, 6:14].any()
    assert st["canal_removed"] == 10 * 15 * 8
    # at 1 mm along the last axis the side piece is 5 mm away, at 4 mm it is 20 mm away
    assert clean_semantic(m, (1.0, 1.0, 4.0), keep_spine_region=False)[30, 20, 18] == 0
    # the rule can be switched off
    assert (clean_semantic(m, (1.0, 1.0, 3.0), canal_gap_mm=None, keep_spine_region=False)[2:12, 60:75, 6:14]
            == 61).all()


def test_clean_semantic_anterior_column_chains_beyond_the_canal():
    """Bodies near the canal stay, bodies beyond the canal's extent stay through the column, a body-like blob in
    front of the sacrum goes; without any canal nothing is judged."""
    m = np.zeros((40, 110, 16), np.uint8)
    m[30:38, 0:40, 4:12] = 61  # canal ends at row 40
    pieces = [(0, 12), (16, 28), (33, 45), (50, 62), (67, 79)]  # corpora with gaps of 4-5 mm, no discs drawn
    for lo, hi in pieces:
        m[15:29, lo:hi, 4:12] = 49
    m[15:29, 12:16, 4:12] = 100  # the disc between the first two corpora
    m[0:8, 95:105, 4:12] = 49  # blob: > 20 mm from the canal and 18 mm from the last corpus
    out = clean_semantic(m, (1.0, 1.0, 1.0), keep_spine_region=False, stats=(st := {}))
    for lo, hi in pieces:  # (67, 79) is 28 mm from the canal: kept through the column
        assert (out[15:29, lo:hi, 4:12] == 49).all()
    assert (out[15:29, 12:16, 4:12] == 100).all()
    assert not out[0:8, 95:105, 4:12].any()
    assert st["column_removed"] == 8 * 10 * 8
    no_canal = np.where(m == 61, 0, m)
    clean_semantic(no_canal, (1.0, 1.0, 1.0), keep_spine_region=False, stats=(st := {}))
    assert st["column_removed"] == 0
    # the sacrum belongs to the column: below the last corpus, 30+ mm beyond the canal's end, it stays
    m[15:29, 80:92, 4:12] = 26
    assert (clean_semantic(m, (1.0, 1.0, 1.0), keep_spine_region=False)[15:29, 80:92, 4:12] == 26).all()
    assert (clean_semantic(m, (1.0, 1.0, 1.0), column_canal_mm=None, keep_spine_region=False)[0:8, 95:105, 4:12]
            == 49).all()


def test_clean_semantic_arch_rings_the_canal():
    """The arch touching the canal stays with its spinous process, a process cut off by a small gap stays through the
    chain, a bone-like spot in the back muscles goes; distances are in mm; without canal nothing is judged."""
    m = np.zeros((70, 40, 30), np.uint8)
    m[10:20, 0:40, 11:19] = 49  # corpus column
    m[22:30, 0:40, 11:19] = 61  # canal behind it
    m[30:34, 5:15, 8:22] = 41  # arcus on the canal's back wall
    m[34:50, 8:12, 13:17] = 42  # spinous process, connected to the arcus: 16 mm long
    m[52:56, 8:12, 13:17] = 42  # its tip beyond a 2 mm gap: 22 mm from the canal, chains to the process
    m[64:68, 25:29, 2:6] = 45  # a spot 35 mm behind the canal and 18.5 mm from the tip
    m[64:68, 0:4, 24:28] = 26  # sacrum-like signal in the skin, 35 mm behind the canal: not the column
    out = clean_semantic(m, (1.0, 1.0, 1.0), keep_spine_region=False, stats=(st := {}))
    assert not out[64:68, 0:4, 24:28].any() and st["column_removed"] == 4 * 4 * 4
    assert (out[30:34, 5:15, 8:22] == 41).all() and (out[34:50, 8:12, 13:17] == 42).all()
    assert (out[52:56, 8:12, 13:17] == 42).all()
    # nearest spot-tip voxels: 9 rows, 14 columns and 8 slices apart, sqrt(9^2 + 14^2 + 8^2) = 18.5 mm > 15 mm
    assert not out[64:68, 25:29, 2:6].any()
    assert st["arch_removed"] == 4 * 4 * 4
    # at half the spacing everything is near: the spot chains (and the tip starts within 20 mm)
    clean_semantic(m, (0.5, 0.5, 0.5), keep_spine_region=False, stats=(st := {}))
    assert st["arch_removed"] == 0
    assert clean_semantic(m, (1.0, 1.0, 1.0), arch_canal_mm=None, keep_spine_region=False)[65, 26, 3] == 45
    clean_semantic(np.where(m == 61, 0, m), (1.0, 1.0, 1.0), keep_spine_region=False, stats=(st := {}))
    assert st["arch_removed"] == 0


def test_clean_semantic_thresholds_are_in_mm():
    m = np.zeros((30, 30, 30), np.uint8)
    m[5:25, 5:25, 5:25] = 49
    m[5:7, 27, 10] = 42  # 2 voxels, touching nothing but inside the region margin
    assert clean_semantic(m, (1.0, 1.0, 1.0))[5, 27, 10] == 0  # 2 mm^3 < 27.8 mm^3
    assert clean_semantic(m, (3.0, 3.0, 3.0))[5, 27, 10] == 42  # 54 mm^3 stays
    assert clean_semantic(m, (1.0, 1.0, 1.0), min_volume_mm3=1)[5, 27, 10] == 42
    empty = np.zeros((5, 5, 5), np.uint8)
    assert not clean_semantic(empty, (1, 1, 1)).any()
    with pytest.raises(ValueError, match="3D"):
        clean_semantic(np.zeros((5, 5), np.uint8), (1, 1))


@pytest.mark.parametrize("seed", range(3))
def test_within_limit_per_component_equals_all_pairwise_distances(seed):
    """The canal/column rules' per-component test (a sampled pass, then every point of the components still open)
    against the definition: some point of the component within the limit of some reference point, in mm."""
    from scipy.spatial.distance import cdist

    from spineps_like.semantic import _within

    rng = np.random.default_rng(seed)
    n = 12
    component = rng.integers(1, n + 1, 3000)
    component[component == 5] = 6  # a component without points: never within
    centres = rng.integers(0, 80, (n + 1, 3))  # each component a cluster of points, some near the reference
    pts = centres[component] + rng.integers(-6, 7, (len(component), 3))
    reference = rng.integers(30, 45, (200, 3))
    spacing = (0.5, 0.5, 4.0)
    d = cdist(pts * np.array(spacing), reference * np.array(spacing)).min(axis=1)
    for limit in (1.0, 8.0, 20.0):
        expected = np.array([(d[component == c] <= limit).any() for c in range(1, n + 1)])
        assert np.array_equal(_within(reference, pts, component, n, spacing, limit), expected)
        assert np.array_equal(_within(reference, pts, component, n, spacing, limit, sample_step=1), expected)
    assert 0 < expected.sum() < n - 1  # the case tells within from not within
    assert not _within(reference[:0], pts, component, n, spacing, 5.0).any()


def test_within_counts_a_point_exactly_at_the_limit_along_one_axis():
    """The bounding-box pre-filter must not drop a point whose distance equals the limit along a single axis."""
    from spineps_like.semantic import _within

    spacing = (0.7, 1.3, 3.3)
    reference = np.array([[10, 10, 10]])
    limit = 2 * 3.3  # two voxels along axis 2
    pts = np.array([[10, 10, 12], [10, 10, 7], [40, 40, 40]])  # at the limit, one voxel beyond, far
    component = np.array([1, 2, 3])
    assert _within(reference, pts, component, 3, spacing, limit).tolist() == [True, False, False]
    assert _within(pts, reference, np.array([1]), 1, spacing, limit).tolist() == [True]


# ---------------------------------------------------------------- intensities
def test_normalize_intensity_and_n4_removes_a_smooth_bias():
    x = normalize_intensity(np.array([[[-1024.0, 0.0, 3000.0]]]))
    assert x.min() == 0 and x.max() == pytest.approx(1500)
    assert normalize_intensity(np.array([[[10.0, 20.0]]])).max() == 10  # never scaled up

    shape, sp = (96, 96, 12), (2.0, 2.0, 4.0)
    g = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, sp)], indexing="ij")
    body = ((g[0] - 96) ** 2 + (g[1] - 96) ** 2) < 80**2
    bias = np.exp(0.5 * (g[0] / 192 - 0.5) - 0.4 * (g[1] / 192 - 0.5))
    rng = np.random.default_rng(1)
    img = normalize_intensity(body * 600 * bias + np.abs(rng.normal(0, 5, shape)))
    cor = n4_bias_correction(img, sp)
    cv = lambda a: a[body].std() / a[body].mean()  # noqa: E731
    assert cor.shape == img.shape and cor.dtype == np.float32
    assert cv(cor) < cv(img) / 3
    assert np.array_equal(n4_bias_correction(np.zeros(shape), sp), np.zeros(shape))


# ---------------------------------------------------------------- prediction
def test_predict_semantic_real_network_on_input_grid(model, sample_mri):
    scan = load_scan(sample_mri["image"])  # a real PIR 1.5 mm crop: R gets resampled into [2, 4] mm
    t = {}
    out = predict_semantic(scan, model, timings=t)
    assert out.shape == scan.shape and np.allclose(out.affine, scan.affine)
    assert set(np.unique(out.array).tolist()) <= SCHEME and out.array.dtype == np.uint8
    assert {"prepare", "resample", "predict", "clean", "restore", "total"} <= set(t)
    ras = _ras_scan()
    out = predict_semantic(ras, model, mirroring=True, step_size=0.75, n4=True)
    assert out.orientation == "RAS" and out.shape == ras.shape and np.allclose(out.affine, ras.affine)


def _constant_output(model_dir, index: int, label_override: dict | None = None):
    """Make the network's last layer predict ``index`` everywhere (zero weights, large bias)."""
    import torch

    ck_path = next(model_dir.rglob("checkpoint_final.pth"))
    ck = torch.load(ck_path, weights_only=True)
    w = ck["network_weights"]
    key = sorted(k for k in w if k.startswith("decoder.seg_layers.") and k.endswith(".weight"))[-1]
    w[key].zero_()
    b = w[key[: -len("weight")] + "bias"]
    b.zero_()
    b[index] = 10.0
    torch.save(ck, ck_path)
    if label_override:
        cfg = json.loads((model_dir / "inference_config.json").read_text())
        cfg["labels"].update(label_override)
        (model_dir / "inference_config.json").write_text(json.dumps(cfg))
    write_manifest(model_dir)


def test_output_indices_map_through_the_config_labels(tmp_path):
    d = write_random_model(tmp_path / "const", labels=(41, 49, 60, 61, 100))
    _constant_output(d, 2)
    scan = _ras_scan(seed=3)
    assert np.unique(predict_semantic(scan, load_semantic_model(d)).array).tolist() == [49]
    _constant_output(d, 2, {"2": "Spinal_Canal"})  # the config decides, not dataset.json
    assert np.unique(predict_semantic(scan, load_semantic_model(d)).array).tolist() == [61]


@pytest.mark.parametrize("restore", ["nearest", "linear"])
def test_orientation_resolution_and_axis_order_are_honoured(model, monkeypatch, restore):
    """A fake network that thresholds its input: the bright box must come back where it is in the RAS scan, both
    through nnU-Net's full path ('nearest': labels on the model grid) and from nnU-Net's own grid ('linear':
    cropped to the non-zero box and resampled to the plans' spacing, probabilities interpolated from there)."""
    import torch

    shape, spacing = (16, 50, 60), (3.3, 0.7, 0.8)  # sagittal slices, stored R, A, S
    aff = np.diag([*spacing, 1.0])
    img = np.full(shape, 10.0, np.float32)
    img[:, :3] = 0.0  # a zero margin: nnU-Net crops it away, so the network grid is offset from the model grid
    img[2:9, 5:20, 30:55] = 500.0  # an off-centre box: any flip or axis swap would move it
    scan = Scan(img, aff)
    seen = {}

    class FakePredictor:
        def predict_single_npy_array(self, arr, props):
            seen["shape"], seen["spacing"] = arr.shape, props["spacing"]
            return np.where(arr[0] > 250, 2, 0).astype(np.uint8)  # index 2 -> label 49

        def predict_logits_from_preprocessed_data(self, data):
            seen["network_shape"] = tuple(data.shape)
            mid = (data.max() + data.min()) / 2  # data are z-scored by nnU-Net here
            logits = torch.zeros((len(model.lut), *data.shape[1:]))
            logits[2] = (data[0] - mid) / (data.max() - data.min()) * 20  # a soft edge between voxels
            return logits

    monkeypatch.setattr(model.nnunet, "predictor", lambda *a, **k: FakePredictor())
    out = predict_semantic(scan, model, restore=restore)
    grid = to_model_grid(scan, "PIR", model.config.resolution_range)
    assert grid.orientation == "PIR" and np.allclose(grid.spacing, (1.5, 1.5, 3.3))  # P, I clamped to 1.5, R kept
    if restore == "nearest":
        assert seen["shape"] == (1, *grid.shape[::-1])  # SimpleITK axis order, as nnU-Net was trained
        assert np.allclose(seen["spacing"], grid.spacing[::-1])
    else:  # nnU-Net's grid: R resampled to the plans' 2.0 mm, the zero rows cropped
        assert seen["network_shape"][0] == 1 and seen["network_shape"][1] == round(grid.shape[2] * 3.3 / 2.0)
    assert set(np.unique(out.array).tolist()) == {0, 49}
    truth = img > 250
    dice = 2 * np.sum(truth & (out.array == 49)) / (truth.sum() + (out.array == 49).sum())
    assert dice > (0.95 if restore == "linear" else 0.9), dice


# ---------------------------------------------------------------- back to the input grid
def _oblique_ref(shape=(36, 44, 10), spacing=(0.6, 0.7, 3.3), codes="LPS") -> Scan:
    """An empty reference scan stored in ``codes`` orientation."""
    ornt = nib.orientations.axcodes2ornt(codes)
    aff = np.linalg.inv(nib.orientations.inv_ornt_aff(ornt, shape)) @ np.diag([*spacing, 1.0])
    aff[:3, 3] += (4.0, -7.0, 2.5)
    return Scan(np.zeros(shape, np.float32), aff)


def test_labels_from_probabilities_equals_whole_volume_interpolation(monkeypatch):
    """The bounding-box, separable interpolation gives exactly what resampling every label over the whole volume
    gives, also where the foreground touches the grid's edge."""
    import spineps_like.semantic as sem
    from scipy import ndimage as ndi

    ref = _oblique_ref()
    grid = to_model_grid(ref, "PIR", [[1.2, 1.2, 2.0], [1.2, 1.2, 4.0]], order=0)
    rng = np.random.default_rng(1)
    logits = ndi.gaussian_filter(rng.standard_normal((4, *grid.shape)), (0, 1.5, 1.5, 1.0)) * 6
    logits[0] += 1.5
    logits[0, :, :4] += 50  # background only in the top rows: the foreground box is smaller than the grid ...
    logits[0, -3:] += 50
    logits[1:, 0] += 60  # ... and touches the posterior edge
    probs = np.exp(logits - logits.max(0))
    probs = (probs / probs.sum(0)).astype(np.float32)
    fast = sem.labels_from_probabilities(probs, [0, 49, 61, 100], grid.affine, ref)
    # split into slabs over threads, from a strided view of the probabilities, interpolating every voxel (share 0)
    # or only those in cells with mixed labels (share 1), with and without clean-up overrides: the same labels
    strided = np.ascontiguousarray(probs.transpose(0, 3, 2, 1)).transpose(0, 3, 2, 1)
    network = sem.labels_from_probabilities(probs, [0, 49, 61, 100], grid.affine, Scan(probs[0], grid.affine))
    cleaned = network.copy()
    cleaned[network == 61] = 0  # the clean-up removed a label ...
    cleaned[8:12, 10:14, 2:5] = 49  # ... and painted one
    with_override = []
    # normalized: labels far below the winner at every corner of a cell are not interpolated there
    for share, normalized in ((0.0, False), (1.0, False), (1.0, True)):
        monkeypatch.setattr(sem, "SPARSE_RESTORE_SHARE", share)
        for threads in (1, 2, 3):
            assert np.array_equal(sem.labels_from_probabilities(strided, [0, 49, 61, 100], grid.affine, ref,
                                                                threads=threads, normalized=normalized), fast)
            with_override.append(sem.labels_from_probabilities(strided, [0, 49, 61, 100], grid.affine, ref,
                                                               override=cleaned, threads=threads,
                                                               normalized=normalized))
    assert all(np.array_equal(w, with_override[0]) for w in with_override)
    # the removed label is gone (but for a voxel between two other labels), the painted block is there
    assert (with_override[0] == 61).sum() <= 0.01 * (fast == 61).sum()
    assert (with_override[0] == 49).sum() > (fast == 49).sum() + 30
    monkeypatch.setattr(sem, "axis_aligned_map", lambda *a, **k: None)
    slow = sem.labels_from_probabilities(probs, [0, 49, 61, 100], grid.affine, ref)
    assert fast.shape == ref.shape and len(np.unique(fast)) == 4
    assert np.array_equal(fast, slow)


@pytest.mark.parametrize("n_labels", [12, 40])
def test_labels_from_probabilities_candidate_bits_beyond_eight_labels(n_labels):
    """With more labels than a byte has bits (16- and 64-bit candidate sets), interpolating only each voxel's
    candidate labels gives the labels of interpolating all of them."""
    from scipy import ndimage as ndi

    from spineps_like.semantic import labels_from_probabilities

    ref = _oblique_ref()
    grid = to_model_grid(ref, "PIR", [[1.2, 1.2, 2.0], [1.2, 1.2, 4.0]], order=0)
    rng = np.random.default_rng(n_labels)
    logits = ndi.gaussian_filter(rng.standard_normal((n_labels, *grid.shape)), (0, 1.5, 1.5, 1.0)) * 8
    probs = np.exp(logits - logits.max(0))
    probs = (probs / probs.sum(0)).astype(np.float32)
    channel_labels = list(range(n_labels))
    every = labels_from_probabilities(probs, channel_labels, grid.affine, ref)
    candidates = labels_from_probabilities(probs, channel_labels, grid.affine, ref, normalized=True, threads=2)
    assert len(np.unique(every)) > 8 and np.array_equal(every, candidates)


def test_channel_argmax_is_argmax_with_first_wins_on_ties():
    import torch

    from spineps_like.models import _channel_argmax

    g = torch.Generator().manual_seed(0)
    p = torch.rand((7, 9, 11, 5), generator=g)
    p[3, 0] = p[1, 0]  # ties between channels 1 and 3 (and with the rest wherever they lose anyway)
    p[1, 0] = p[1, 0] + 1.0
    p[3, 0] = p[1, 0]
    got = _channel_argmax(p)
    assert got.dtype == torch.uint8
    assert torch.equal(got.long(), p.argmax(0))
    assert bool((got[0] == 1).all())
    # a volume large enough for torch's threads, with ties at most voxels: still the first largest channel
    q = torch.randint(0, 4, (16, 30, 64, 50), generator=g).float()
    got = _channel_argmax(q)
    assert got.dtype == torch.uint8 and torch.equal(got.long(), torch.from_numpy(q.numpy().argmax(0)))


def test_labels_from_probabilities_keeps_clean_up_and_merges_aliases():
    """Where the cleaned mask differs from the probabilities' argmax it wins; channels of one label are summed."""
    from spineps_like.semantic import labels_from_probabilities

    grid = Scan(np.zeros((20, 20, 6), np.float32), np.diag([1.2, 1.2, 3.0, 1.0]))
    probs = np.zeros((4, *grid.shape), np.float32)
    probs[0] = 1.0
    probs[:, 5:15, 5:15, 1:5] = [[[[0.3]]], [[[0.25]]], [[[0.25]]], [[[0.2]]]]  # 49 + 49 (alias) beat background
    cleaned = np.zeros(grid.shape, np.uint8)
    cleaned[5:15, 5:15, 1:5] = 49
    cleaned[5:8, 5:8, 1:3] = 0  # clean-up removed this piece
    out = labels_from_probabilities(probs, [0, 49, 49, 100], grid.affine, grid, override=cleaned)
    assert np.array_equal(out, cleaned)  # same grid: exactly the cleaned mask


def test_linear_restore_recovers_sub_voxel_boundaries():
    """A ball predicted on a 2 mm grid, restored onto a 0.5 mm grid: interpolating the probabilities follows the
    true surface much more closely than nearest-neighbour label resampling."""
    from spineps_like.geometry import to_input_grid
    from spineps_like.semantic import labels_from_probabilities

    fine = Scan(np.zeros((64, 64, 64), np.float32), np.diag([0.5, 0.5, 0.5, 1.0]))
    grid = to_model_grid(fine, "RAS", [2.0, 2.0, 2.0], order=0)

    def ball(scan):
        ijk = np.indices(scan.shape).reshape(3, -1)
        xyz = (scan.affine[:3, :3] @ ijk + scan.affine[:3, 3:]).reshape(3, *scan.shape)
        return 7.3 - np.sqrt(((xyz - 15.75) ** 2).sum(0))  # signed distance to a ball of radius 7.3 mm

    fg = 1 / (1 + np.exp(-ball(grid) / 0.8))
    probs = np.stack([1 - fg, fg]).astype(np.float32)
    coarse = np.where(fg > 0.5, 49, 0).astype(np.uint8)
    truth = ball(fine) > 0

    def dice(a):
        return 2 * np.sum(a & truth) / (a.sum() + truth.sum())

    linear = labels_from_probabilities(probs, [0, 49], grid.affine, fine, override=coarse) == 49
    nearest = to_input_grid(Scan(coarse, grid.affine), fine).array == 49
    assert dice(linear) > 0.97 and dice(linear) > dice(nearest) + 0.02, (dice(linear), dice(nearest))


def test_predict_semantic_rejects_bad_input(model):
    bad = _ras_scan()
    bad.array[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        predict_semantic(bad, model)
    with pytest.raises(ValueError, match="model must be"):
        predict_semantic(_ras_scan(), object())
    with pytest.raises(ValueError, match="restore must be"):
        predict_semantic(_ras_scan(), model, restore="cubic")


def test_empty_prediction_warns(tmp_path):
    d = write_random_model(tmp_path / "bg", labels=(49,))
    _constant_output(d, 0)
    with pytest.warns(UserWarning, match="no spine"):
        out = predict_semantic(_ras_scan(), load_semantic_model(d))
    assert not out.array.any()


# ---------------------------------------------------------------- training data
def test_prepare_case_matches_inference_grid_and_raw_dataset(tmp_path, sample_ct):
    image, sem = load_scan(sample_ct["image"]), load_scan(sample_ct["semantic"], kind="mask")
    rr = [[1.2, 1.2, 2.0], [1.2, 1.2, 4.0]]
    img, seg = prepare_case(image, sem, resolution_range=rr, normalize=False)
    ref = to_model_grid(image, "PIR", rr)
    assert img.shape == ref.shape and np.allclose(img.affine, ref.affine) and np.allclose(img.array, ref.array)
    assert 50 not in np.unique(seg.array) and 49 in np.unique(seg.array)  # dense corpus mapped to 49
    ds = write_raw_dataset([("case_0000", img, seg)], tmp_path / "Dataset900_T")
    names = {v: k for k, v in ds["labels"].items()}
    present = sorted(set(np.unique(seg.array).tolist()) - {0})
    assert sorted(ds["labels"].values()) == list(range(len(present) + 1))  # consecutive
    lab = np.asarray(nib.load(str(tmp_path / "Dataset900_T" / "labelsTr" / "case_0000.nii.gz")).dataobj)
    from spineps_like.models import label_value

    back = np.vectorize(lambda i: label_value(names[int(i)]))(lab)
    assert np.array_equal(back, seg.array)  # indices name the scheme labels
    with pytest.raises(ValueError, match="same grid"):
        prepare_case(image, Scan(sem.array[:-1], sem.affine))


@pytest.mark.slow
def test_training_smoke_end_to_end(tmp_path, sample_ct, sample_mri):
    """Two nnU-Net iterations on the real crops: raw dataset -> plans -> preprocess -> train -> model folder."""
    import torch

    from spineps_like.training.semantic import SemanticTrainingRun, run_training

    torch.set_num_threads(1)
    cases = []
    for i, s in enumerate([sample_ct, sample_mri]):
        img, seg = prepare_case(load_scan(s["image"]), load_scan(s["semantic"], kind="mask"))
        cases.append((f"case_{i:04d}", img, seg))
    run = SemanticTrainingRun(out=str(tmp_path / "smoke_model"), n_train=2, seed=0, iterations=2, work=str(tmp_path / "w"),
                              iterations_per_epoch=1, val_iterations=1, patch_size=(32, 32, 16), da_processes=0,
                              threads=1, name="smoke", optimizer="adamw", learning_rate=3e-3,
                              oversample_foreground=1.0)
    out = run_training(run, ["--smoke"], cases=cases)
    assert (out / "MANIFEST.sha256").is_file() and (out / "TRAINING.md").is_file()
    assert "optimizer: adamw, initial lr 0.003" in (out / "TRAINING.md").read_text()
    model = load_semantic_model(out)
    assert model.verified and model.config.orientation == "PIR"
    assert 43 in model.labels.values() and 52 not in model.labels.values()  # the crops have sides, no 52/53
    assert model.mirror_axes == (1, 2)  # no left-right flip at test time (nnU-Net axes R, I, P) ...
    assert model.nnunet.allowed_mirroring_axes == (1, 2)  # ... nor in training
    scan = load_scan(sample_mri["image"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = predict_semantic(scan, model)
    assert pred.shape == scan.shape and set(np.unique(pred.array).tolist()) <= SCHEME


@pytest.mark.parametrize("mirroring", [False, True])
def test_batched_sliding_window_equals_nnunets_tile_by_tile(model, mirroring):
    """Tiles stacked into one forward pass give nnU-Net's sliding-window logits (same tiles, same Gaussian): equal to a
    tile-by-tile float64 reference, and to nnU-Net's own fp16 result wherever fp16 keeps the precision."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    nn = model.nnunet
    ours = nn.predictor(nn.folds[:1], step_size=0.5, mirroring=mirroring, mirror_axes=(0,))
    assert ours.tile_batch > 1
    data = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 20, 40, 48)).astype(np.float32))
    slicers = ours._internal_get_sliding_window_slicers(data.shape[1:])
    default, ours.tile_batch = ours.tile_batch, 5
    try:
        assert len(slicers) % ours.tile_batch != 0  # several batches and a last partial one
        batched = ours._internal_predict_sliding_window_return_logits(data, slicers, do_on_device=False)
    finally:
        ours.tile_batch = default
    # tile by tile, one forward pass each, accumulated in float64
    gauss = compute_gaussian(tuple(nn.configuration_manager.patch_size), sigma_scale=1.0 / 8, value_scaling_factor=10,
                             device=torch.device("cpu")).double()
    acc = torch.zeros((batched.shape[0], *data.shape[1:]), dtype=torch.float64)
    wsum = torch.zeros(data.shape[1:], dtype=torch.float64)
    with torch.inference_mode():
        for sl in slicers:
            acc[sl] += ours._internal_maybe_mirror_and_predict(data[sl][None])[0].double() * gauss
            wsum[sl[1:]] += gauss
    exact = acc / wsum
    assert batched.dtype == torch.float32 and batched.shape == exact.shape
    torch.testing.assert_close(batched.double(), exact, rtol=1e-4, atol=1e-4)
    assert batched.abs().max() > 0
    # nnU-Net's own predictor accumulates in fp16: the same where the Gaussian weights are not tiny
    ref = nnUNetPredictor.__new__(nnUNetPredictor)
    ref.__dict__.update(ours.__dict__)
    single = nnUNetPredictor._internal_predict_sliding_window_return_logits(ref, data, slicers, False)
    trusted = (wsum > 0.5 * wsum.max()).expand_as(exact)
    torch.testing.assert_close(single.double()[trusted], exact[trusted], rtol=1e-2, atol=1e-2)


def test_network_grid_probabilities_are_nnunets_softmax(model, monkeypatch):
    """The softmax written over the sliding window's logits (a cropped view of its padded accumulator, as nnU-Net
    returns it) equals nnU-Net's own ``apply_inference_nonlin`` on a copy, bit for bit; the labels are its argmax."""
    import torch

    rng = np.random.default_rng(3)
    kept = {}

    class FakePredictor:
        @torch.inference_mode()  # as nnU-Net's sliding window: the logits are inference tensors
        def predict_logits_from_preprocessed_data(self, data):
            padded = torch.from_numpy(rng.normal(0, 4, (len(model.lut), *(n + 2 for n in data.shape[1:])))
                                      .astype(np.float32))
            logits = padded[:, 1:-1, 1:-1, 1:-1]  # a strided view, as after nnU-Net's padding is cropped away
            kept["logits"] = logits.clone()
            return logits

    monkeypatch.setattr(model.nnunet, "predictor", lambda *a, **k: FakePredictor())
    grid = to_model_grid(_ras_scan(), "PIR", model.config.resolution_range)
    labels, probs, _ = model.predict_network_grid(grid.array, grid.spacing, grid.affine)
    expected = model.nnunet.label_manager.apply_inference_nonlin(kept["logits"]).numpy()
    # back to nnU-Net's axis order (predict_network_grid returns the model grid's): model axis m is nnU-Net's 2 - m
    tf = list(model.nnunet.plans_manager.transpose_forward)
    axes = [tf.index(2 - m) for m in range(3)]
    np.testing.assert_array_equal(probs, expected.transpose(0, *(1 + t for t in axes)))
    assert np.array_equal(labels, model.lut[np.argmax(probs, axis=0)])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_small_components_go_only_for_the_listed_labels(dtype):
    """Rule 1 alone: a small component goes when its label is listed, stays when it is not (whatever the mask's
    dtype, labels above 255 included); big components stay."""
    m = np.zeros((30, 30, 30), dtype)
    m[2:12, 2:12, 2:12] = 49  # big, listed
    m[20:22, 20:21, 20:21] = 41  # small, listed
    m[25:27, 5:6, 5:6] = 60  # small, not listed
    m[15, 15, 15] = 49  # small, listed, one voxel
    if dtype == np.uint16:
        m[5, 25, 25] = 300  # small, not listed
    out = clean_semantic(m, (1.0, 1.0, 1.0), min_volume_mm3=5, small_labels=(41, 49), canal_gap_mm=None,
                         column_canal_mm=None, arch_canal_mm=None, keep_spine_region=False, fill_labels=(),
                         stats=(st := {}))
    assert st["small_removed"] == 3 and st["holes_filled"] == 0
    assert not out[20:22, 20, 20].any() and out[15, 15, 15] == 0
    assert (out[25:27, 5, 5] == 60).all() and (out[2:12, 2:12, 2:12] == 49).all()
    if dtype == np.uint16:
        assert out[5, 25, 25] == 300
