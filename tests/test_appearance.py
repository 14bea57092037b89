"""Label map -> image: the phantoms' tissue maps, SynthSeg-style appearance, and training on painted patches."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from spineps_like.phantom import TISSUE_ID, TISSUES, make_phantom
from spineps_like.phantom.appearance import FAMILIES, ORDERINGS, synthesize, tissue_means

FAST = (1.3, 1.3, 3.9)


@pytest.fixture(scope="module")
def lumbar():
    return make_phantom(11, fov="lumbar", spacing=FAST, orientation="PIR")


def test_tissue_map_refines_the_semantic_mask(lumbar):
    t, s = lumbar.tissue.array, lumbar.semantic.array
    assert t.shape == s.shape and t.dtype == np.uint8 and t.min() >= 1 and t.max() <= len(TISSUES)
    assert np.allclose(lumbar.tissue.affine, lumbar.semantic.affine)
    allowed = {
        49: {"marrow", "cortex"}, 100: {"nucleus", "nucleus_deg", "annulus"}, 60: {"cord"}, 61: {"csf", "roots"},
        26: {"sacrum_marrow", "sacrum_cortex", "endplate", "remnant"},
    }
    for lab, names in allowed.items():
        got = {TISSUES[i - 1] for i in np.unique(t[s == lab])}
        assert got and got <= names, (lab, got)
    # the body around the spine is there, and no spine tissue lies outside the semantic mask's structures
    outside = {TISSUES[i - 1] for i in np.unique(t[s == 0])}
    assert {"fat", "muscle", "air"} <= outside
    assert not outside & {"marrow", "nucleus", "cord", "csf", "post_marrow"}


def test_tissue_map_follows_the_orientation():
    a = make_phantom(4, fov="cervical", spacing=FAST, orientation="PIR")
    b = make_phantom(4, fov="cervical", spacing=FAST, orientation="LAS")
    from spineps_like.geometry import reorient

    back = reorient(b.tissue, "PIR")
    assert np.array_equal(back.array, a.tissue.array) and np.allclose(back.affine, a.tissue.affine)


def test_synthesis_is_deterministic_by_seed_and_leaves_the_map_untouched(lumbar):
    t = lumbar.tissue.array.copy()
    a, ia = synthesize(t, np.random.default_rng(3))
    b, ib = synthesize(t, np.random.default_rng(3))
    c, _ = synthesize(t, np.random.default_rng(4))
    assert np.array_equal(t, lumbar.tissue.array)
    assert np.array_equal(a, b) and ia == ib
    assert a.shape == t.shape and a.dtype == np.float32 and not np.array_equal(a, c)
    assert abs(float(a.mean())) < 1e-3 and abs(float(a.std()) - 1.0) < 1e-3  # z-scored as nnU-Net would


def test_padding_stays_zero_and_bad_maps_are_refused(lumbar):
    t = lumbar.tissue.array.copy()
    t[:, :5] = 0
    img, _ = synthesize(t, np.random.default_rng(0), family="t2w")
    assert np.all(img[:, :5] == 0) and img[:, 5:].std() > 0.5
    with pytest.raises(ValueError, match="tissue ids"):
        synthesize(np.full((4, 4, 4), 200, np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="contrast family"):
        synthesize(t, np.random.default_rng(0), family="flair")


@pytest.mark.parametrize("family", sorted(ORDERINGS))
def test_each_family_keeps_its_tissue_ordering(lumbar, family):
    """The documented ordering holds for the drawn means in every draw, and survives blur, bias, noise and gamma in
    the painted image: the median intensities of the tissues (thin cortex left out: partial volume) are in order in at
    least 9 of 12 draws, and never show more than two inverted pairs (a coil fall-off or partial volume may swap
    tissues that lie far apart or are thin, as in real scans)."""
    t = lumbar.tissue.array
    order = ORDERINGS[family]
    thick = [n for n in order if n != "cortex"]
    clean = 0
    for seed in range(12):
        mean, _ = tissue_means(family, np.random.default_rng(seed))
        drawn = [mean[TISSUE_ID[n]] for n in order]
        assert all(x > y for x, y in zip(drawn, drawn[1:])), (seed, dict(zip(order, drawn)))
        img, _ = synthesize(t, np.random.default_rng(seed), family=family)
        med = [float(np.median(img[t == TISSUE_ID[n]])) for n in thick]
        inverted = sum(med[i] <= med[j] for i in range(len(med)) for j in range(i + 1, len(med)))
        assert inverted <= 2, (seed, dict(zip(thick, med)))
        clean += inverted == 0
    assert clean >= 9, clean


def test_random_family_draws_every_tissue_independently():
    means = np.stack([tissue_means("random", np.random.default_rng(s))[0] for s in range(50)])
    # the brightest tissue changes from draw to draw (no fixed contrast)
    assert len(set(np.argmax(means[:, 1:], 1).tolist())) > 10
    assert set(FAMILIES) >= set(ORDERINGS) | {"random"}


def test_synthesis_transform_changes_the_image_only(lumbar):
    import torch

    from spineps_like.training.synthetic import synthesis_transform_class

    tissue = np.ascontiguousarray(lumbar.tissue.array.transpose(2, 1, 0))[None].astype(np.float32)  # (1, R, I, P)
    seg = torch.from_numpy(np.ascontiguousarray(lumbar.semantic.array.transpose(2, 1, 0))[None].astype(np.int16))
    tr = synthesis_transform_class()(seed=0, spacing=(3.9, 1.3, 1.3))
    out = tr(image=torch.from_numpy(tissue), segmentation=seg.clone())
    assert torch.equal(out["segmentation"], seg)
    img = out["image"]
    assert img.shape == tissue.shape and img.dtype == torch.float32
    assert not np.allclose(img.numpy(), tissue) and float(img.std()) > 0.5
    again = synthesis_transform_class()(seed=0, spacing=(3.9, 1.3, 1.3))(image=torch.from_numpy(tissue),
                                                                         segmentation=seg.clone())
    assert torch.equal(again["image"], img)  # deterministic by seed


@pytest.mark.slow
def test_training_on_painted_tissue_maps_gives_a_loadable_image_model(tmp_path, sample_mri):
    """Two iterations on two phantoms' tissue maps: the exported folder normalises an image (ZScore), names the
    channel as an image, and segments a real scan through the normal loader."""
    import torch

    from spineps_like.io import load_scan
    from spineps_like.models import load_semantic_model
    from spineps_like.semantic import predict_semantic
    from spineps_like.training.semantic import TRAINING_LABELS, SemanticTrainingRun, run_training

    torch.set_num_threads(1)
    run = SemanticTrainingRun(out=str(tmp_path / "synth_model"), n_train=2, seed=0, iterations=2,
                              work=str(tmp_path / "w"), iterations_per_epoch=1, val_iterations=1,
                              patch_size=(32, 32, 16), da_processes=0, threads=1, name="synth_smoke",
                              optimizer="adamw", learning_rate=1e-3, oversample_foreground=1.0, fovs=("cervical",),
                              appearance="synth")
    out = run_training(run, ["--smoke"])
    nn_dir = next(p for p in out.iterdir() if p.is_dir())
    plans = json.loads((nn_dir / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"]
    assert json.loads((nn_dir / "dataset.json").read_text())["channel_names"] == {"0": "MRI or CT"}
    md = (out / "TRAINING.md").read_text()
    assert "appearance: synth" in md and "phantom generator: 1.1" in md
    again = run_training(SemanticTrainingRun(**{**run.__dict__, "out": str(tmp_path / "again")}), ["--smoke"],
                         export_only=True)  # the finished run's final checkpoint, no training
    assert "Exported with `--export-only` after epoch 2 of 2" in (again / "TRAINING.md").read_text()
    assert load_semantic_model(again).verified
    model = load_semantic_model(out)
    assert model.verified and sorted(set(model.labels.values()) - {0}) == sorted(TRAINING_LABELS)
    assert "CT" in model.config.modalities
    scan = load_scan(sample_mri["image"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = predict_semantic(scan, model)
    assert pred.shape == scan.shape
    # a second run starts from this model's weights; a model with other labels is refused
    from spineps_like.models.manifest import ModelError
    from spineps_like.training.semantic import initial_checkpoint

    assert initial_checkpoint(out).is_file()
    run2 = SemanticTrainingRun(**{**run.__dict__, "out": str(tmp_path / "m2"), "work": str(tmp_path / "w2"),
                                  "init_from": str(out)})
    assert load_semantic_model(run_training(run2, ["--smoke"])).verified
    run3 = SemanticTrainingRun(**{**run.__dict__, "out": str(tmp_path / "m3"), "work": str(tmp_path / "w3"),
                                  "init_from": "semantic-phantom"})  # features 8..64, patch 80x80x24: other shapes
    with pytest.raises(ModelError, match="do not fit"):
        run_training(run3, ["--smoke"])


def test_negative_samples_hold_no_spine(lumbar):
    """A negative sample removes every spine tissue from the map (and the transform every label), keeps padding, and
    is painted like any other map."""
    from spineps_like.phantom.appearance import without_spine

    t = lumbar.tissue.array.copy()
    t[:, :3] = 0
    spine = (t > 0) & (t < TISSUE_ID["air"])
    kinds = set()
    for seed in range(8):
        neg = without_spine(t, np.random.default_rng(seed))
        assert np.array_equal(neg == 0, t == 0)  # padding kept
        assert not ((neg > 0) & (neg < TISSUE_ID["air"])).any()  # no spine tissue left
        kinds.add("body kept" if np.array_equal(neg[~spine], t[~spine]) else "one tissue")
        img, _ = synthesize(neg, np.random.default_rng(seed))
        assert np.isfinite(img).all()
    assert kinds == {"body kept", "one tissue"}


def test_synthesis_transform_negatives_clear_the_labels(lumbar):
    import torch

    from spineps_like.training.synthetic import synthesis_transform_class

    tissue = torch.from_numpy(np.ascontiguousarray(lumbar.tissue.array.transpose(2, 1, 0))[None].astype(np.float32))
    seg = torch.from_numpy(np.ascontiguousarray(lumbar.semantic.array.transpose(2, 1, 0))[None].astype(np.int16))
    seg[:, :, :2] = -1  # padding
    cls = synthesis_transform_class()
    always = cls(seed=0, spacing=(3.9, 1.3, 1.3), negatives=0.999999)
    out = always(image=tissue.clone(), segmentation=seg.clone())
    assert not (out["segmentation"] > 0).any() and torch.equal(out["segmentation"] == -1, seg == -1)
    never = cls(seed=0, spacing=(3.9, 1.3, 1.3))
    assert torch.equal(never(image=tissue.clone(), segmentation=seg.clone())["segmentation"], seg)
    some = cls(seed=1, spacing=(3.9, 1.3, 1.3), negatives=0.5)
    cleared = [not (some(image=tissue.clone(), segmentation=seg.clone())["segmentation"] > 0).any()
               for _ in range(12)]
    assert 0 < sum(cleared) < 12


@pytest.mark.slow
def test_a_saved_checkpoint_continues_in_a_fresh_work_folder(tmp_path):
    """--resume-from: the data is regenerated, the run goes on from the checkpoint's epoch (not from scratch)."""
    import shutil

    import torch

    from spineps_like.training.semantic import SemanticTrainingRun, run_training

    torch.set_num_threads(1)
    base = dict(n_train=2, seed=0, iterations_per_epoch=1, val_iterations=1, patch_size=(32, 32, 16),
                da_processes=0, threads=1, name="leg", optimizer="adamw", learning_rate=1e-3,
                oversample_foreground=1.0, fovs=("cervical",), appearance="synth")
    first = SemanticTrainingRun(out=str(tmp_path / "m1"), iterations=2, work=str(tmp_path / "w1"), **base)
    run_training(first, ["--smoke"])
    saved = tmp_path / "saved.pth"
    shutil.copy(next((tmp_path / "w1").rglob("checkpoint_final.pth")), saved)
    second = SemanticTrainingRun(out=str(tmp_path / "m2"), iterations=3, work=str(tmp_path / "w2"), **base)
    out = run_training(second, ["--smoke"], resume_from=saved)
    log = "".join(p.read_text() for p in (tmp_path / "w2").rglob("training_log_*.txt"))
    assert "Epoch 2" in log and "Epoch 0" not in log  # continued, not restarted
    assert "3 (3 epochs x 1)" in (out / "TRAINING.md").read_text()



def test_noise_max_default_keeps_the_draw_and_a_higher_bound_adds_low_snr_draws(lumbar):
    """``noise_max`` at its default paints exactly the image of a call without it; a higher bound puts about half
    of the drawn noise levels between the default and the bound (STIR x1.5), never above it."""
    from spineps_like.phantom.appearance import NOISE_MAX, _noise_share

    tissue = lumbar.tissue.array
    a, _ = synthesize(tissue, np.random.default_rng(5), family="t2w")
    b, _ = synthesize(tissue, np.random.default_rng(5), family="t2w", noise_max=NOISE_MAX)
    np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(0)
    default = np.array([_noise_share(rng, NOISE_MAX, 1.0) for _ in range(400)])
    assert default.max() <= NOISE_MAX and default.mean() == pytest.approx(NOISE_MAX / 2, rel=0.15)
    high = np.array([_noise_share(rng, 0.2, 1.0) for _ in range(400)])
    assert high.max() <= 0.2 and 0.4 < float(np.mean(high > NOISE_MAX)) < 0.6
    stir = np.array([_noise_share(rng, 0.2, 1.5) for _ in range(400)])
    assert stir.max() <= 0.3 and stir.max() > 0.2
