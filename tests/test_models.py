"""Model folders: discovery, SPINEPS/nnU-Net layouts, manifests, config validation, network loading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spineps_like.models import (
    MANIFEST_NAME,
    MODELS_ENV,
    InferenceConfig,
    ModelError,
    find_model,
    load_semantic_model,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from spineps_like.training.semantic import write_random_model

LABELS = (41, 49, 60, 61, 100)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("models") / "tiny_semantic", labels=LABELS)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_discovery_by_name_both_layouts_and_error_lists_names(tmp_path, monkeypatch):
    r1, r2 = tmp_path / "root1", tmp_path / "root2"
    write_random_model(r1 / "Alpha_Model", labels=(49, 100))
    write_random_model(r2 / "Dataset001_Beta" / "nnUNetTrainer__nnUNetPlans__3d_fullres", labels=(49,), layout="nnunet")
    # a SPINEPS release zip: the config sits inside the nnU-Net folder, the model is named after its parent
    zipped = write_random_model(r2 / "gamma" / "x", labels=(61,), layout="nnunet")
    shutil.move(str(zipped), str(r2 / "gamma" / "nnUNetTrainer__nnUNetPlans__3d_fullres"))
    cfg = json.loads((r1 / "Alpha_Model" / "inference_config.json").read_text())
    cfg["labels"] = {"1": "Spinal_Canal"}
    (r2 / "gamma" / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "inference_config.json").write_text(json.dumps(cfg))
    shutil.rmtree(r2 / "gamma" / "x", ignore_errors=True)
    monkeypatch.setenv(MODELS_ENV, os.pathsep.join([str(r1), str(r2)]))

    a = find_model("alpha_model")  # case-insensitive
    assert a.layout == "spineps" and a.path == r1 / "Alpha_Model"
    assert a.nnunet_dir == r1 / "Alpha_Model" / "nnUNetTrainer__SmallCPUPlans__3d_fullres"
    b = find_model("Dataset001_Beta")
    assert b.layout == "nnunet" and b.nnunet_dir == b.path
    g = find_model("gamma")
    assert g.layout == "spineps" and g.nnunet_dir == g.path
    with pytest.warns(UserWarning, match="no MANIFEST"):
        assert load_semantic_model(g).labels == {0: 0, 1: 61}

    with pytest.raises(ModelError) as e:
        find_model("does_not_exist")
    msg = str(e.value)
    assert "\n" not in msg and "does_not_exist" in msg
    for name in ("Alpha_Model", "Dataset001_Beta", "gamma"):
        assert name in msg


def test_find_model_by_path_and_missing_path(model_dir, tmp_path):
    m = find_model(str(model_dir))
    assert m.name == "tiny_semantic" and m.config_path is not None
    with pytest.raises(ModelError, match="no such model folder"):
        find_model(str(tmp_path / "nowhere" / "x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no inference_config.json"):
        find_model(str(tmp_path / "empty"))


def test_manifest_is_sha256sum_format_and_verifies(model_dir):
    entries = read_manifest(model_dir)
    assert "inference_config.json" in entries
    assert any(k.endswith("fold_0/checkpoint_final.pth") for k in entries)
    assert verify_manifest(model_dir) is True
    if shutil.which("sha256sum"):
        r = subprocess.run(["sha256sum", "--quiet", "-c", MANIFEST_NAME], cwd=model_dir, capture_output=True)
        assert r.returncode == 0, r.stderr


def test_tampered_missing_or_unlisted_file_is_refused(model_dir, tmp_path):
    m = _copy(model_dir, tmp_path / "tampered")
    ck = next(m.rglob("checkpoint_final.pth"))
    data = bytearray(ck.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ck.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256 mismatch") as e:
        load_semantic_model(m)
    assert "checkpoint_final.pth" in str(e.value) and "\n" not in str(e.value)

    m2 = _copy(model_dir, tmp_path / "missing")
    next(m2.rglob("plans.json")).unlink()
    with pytest.raises(ModelError, match=r"plans.json: listed in MANIFEST.sha256 but missing"):
        load_semantic_model(m2)

    m3 = _copy(model_dir, tmp_path / "unlisted")
    fold0 = next(m3.rglob("fold_0"))
    shutil.copytree(fold0, fold0.parent / "fold_1")
    with pytest.raises(ModelError, match="fold_1/checkpoint_final.pth: not listed"):
        load_semantic_model(m3)
    write_manifest(m3)  # re-signed by its owner: accepted again
    assert load_semantic_model(m3).verified


def test_folder_without_manifest_loads_with_warning(model_dir, tmp_path):
    m = _copy(model_dir, tmp_path / "user_model")
    (m / MANIFEST_NAME).unlink()
    with pytest.warns(UserWarning, match="no MANIFEST.sha256"):
        model = load_semantic_model(m)
    assert not model.verified


def test_plain_nnunet_folder_labels_from_dataset_json(tmp_path):
    p = write_random_model(tmp_path / "Dataset002_Plain" / "nnUNetTrainer__nnUNetPlans__3d_fullres",
                           labels=(26, 49, 100), layout="nnunet")
    with pytest.warns(UserWarning):
        model = load_semantic_model(p)
    assert model.labels == {0: 0, 1: 26, 2: 49, 3: 100}
    assert model.config.orientation == "PIR" and model.config.resolution_range is None
    ds = json.loads((p / "dataset.json").read_text())
    ds["labels"]["Ribs"] = 4  # a label outside the scheme must be refused by name
    (p / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(ModelError, match="outside the semantic scheme|Ribs"):
        load_semantic_model(p, verify=False)


def test_loaded_network_equals_checkpoint_and_mismatch_is_refused(model_dir, tmp_path):
    import torch

    model = load_semantic_model(model_dir)
    ck = torch.load(next(model_dir.rglob("checkpoint_final.pth")), weights_only=True)
    sd = model.nnunet.weights("0")
    assert set(sd) == set(ck["network_weights"])
    assert all(torch.equal(sd[k], ck["network_weights"][k]) for k in sd)
    assert model.nnunet.allowed_mirroring_axes == (0, 1, 2)

    other = write_random_model(tmp_path / "bigger", labels=LABELS, features=(6, 12))
    m = _copy(model_dir, tmp_path / "mismatch")
    shutil.copy(next(other.rglob("checkpoint_final.pth")), next(m.rglob("checkpoint_final.pth")))
    write_manifest(m)
    with pytest.raises(ModelError, match="does not fit the network"):
        load_semantic_model(m)


def test_threaded_nnunet_resampling_is_nnunets(model_dir):
    """The preprocessing resampling to the plans' spacing gives nnU-Net's own result: one-step 3D (cubic, clipped;
    one axis at a time) to float rounding in both directions, and the per-slice ("separate z") path (slices on
    threads, the nearest slice gathered) bit for bit, with the thick axis first, in the middle or last, up- and
    downsampled across slices."""
    import numpy as np
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    from spineps_like.models.nnunet import resample_image_threaded

    rng = np.random.default_rng(4)
    cases = [((2, 21, 46, 33), (25, 40, 37), (3.6, 1.2, 1.3), (3.0, 1.38, 1.16), None),  # one 3D step
             ((1, 9, 40, 30), (12, 35, 33), (4.0, 0.9, 0.9), (3.0, 1.03, 0.82), None),  # anisotropic: per slice
             ((2, 40, 9, 30), (35, 12, 33), (0.9, 4.0, 0.9), (1.03, 3.0, 0.82), None),
             ((1, 40, 30, 9), (45, 25, 13), (0.9, 0.9, 4.2), (0.8, 1.1, 3.0), None),
             ((1, 31, 30, 33), (12, 30, 33), (2.0, 0.5, 0.5), (5.0, 0.5, 0.5), None)]  # fewer slices, same plane
    for k, (shape, new, spacing, new_spacing, force) in enumerate(cases):
        data = (rng.random(shape) * 900 - 100).astype(np.float32)
        ref = resample_data_or_seg_to_shape(data, new, spacing, new_spacing, False, 3, 0, force)
        for threads in (2, 3):
            got = resample_image_threaded(data, new, spacing, new_spacing, False, 3, 0, force, threads=threads)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            if k == 0:
                np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-4)
            else:
                np.testing.assert_array_equal(got, ref)
    # a loaded model's preprocessing uses it, with the plans' own arguments
    fn = load_semantic_model(model_dir).nnunet.configuration_manager.resampling_fn_data
    assert fn.func is resample_image_threaded and "order" in fn.keywords


def test_image_preprocessing_skips_only_the_discarded_mask_resampling():
    """Our preprocessing of an image alone gives nnU-Net's data and properties without resampling crop_to_nonzero's
    mask (which nnU-Net's inference discards); the configuration that networks and nnU-Net's own predictor use still
    resamples segmentations (a cascade's previous stage needs it)."""
    import numpy as np

    model = load_semantic_model("semantic-phantom").nnunet
    rng = np.random.default_rng(3)
    img = np.zeros((1, 30, 70, 60), np.float32)
    img[:, 2:28, 5:66, 4:50] = rng.random((1, 26, 61, 46)) * 300 + 1  # a zero border: crop_to_nonzero crops
    props = {"spacing": [1.2, 1.2, 2.6]}  # one 3D resampling step to the plans' (3.0, 1.2, 1.2)
    runs = []
    for cm in (model.configuration_manager, model.image_configuration_manager):
        pre = cm.preprocessor_class(verbose=False)
        runs.append(pre.run_case_npy(img, None, dict(props), model.plans_manager, cm, model.dataset_json))
    (data_all, seg_all, props_all), (data, seg, props_image) = runs
    np.testing.assert_array_equal(data, data_all)
    assert props_image.keys() == props_all.keys() and props_image["bbox_used_for_cropping"] == [[2, 28], [5, 66], [4, 50]]
    assert seg.size == 1 and seg_all.shape[1:] == data.shape[1:]


def test_image_preprocessing_finds_nnunets_crop_without_filling_holes(model_dir, tmp_path, monkeypatch):
    """``preprocess_image`` gives nnU-Net's data and properties bit for bit: zero borders and an enclosed zero hole,
    no zeros, an empty image. nnU-Net's hole filling runs only where normalisation reads the mask: with
    ``use_mask_for_norm`` the result is still nnU-Net's (normalised inside the filled mask, not the whole box)."""
    import warnings

    import numpy as np
    import scipy.ndimage

    def images(shape):
        rng = np.random.default_rng(5)
        holed = np.zeros((1, *shape), np.float32)
        holed[:, 2:-3, 4:-2, 1:-4] = rng.random((1, shape[0] - 5, shape[1] - 6, shape[2] - 5)) * 300 + 1
        holed[:, 6:9, 10:14, 5:8] = 0  # an enclosed hole: nnU-Net fills it before taking the box
        full = rng.random((1, *shape)).astype(np.float32) + 0.5
        return {"holed": holed, "full": full, "empty": np.zeros((1, *shape), np.float32)}

    fills = []
    original_fill = scipy.ndimage.binary_fill_holes
    import nnunetv2.preprocessing.cropping.cropping as cropping

    monkeypatch.setattr(cropping, "binary_fill_holes", lambda m: (fills.append(1), original_fill(m))[1])
    masked = _copy(model_dir, tmp_path / "masked_norm")
    plans_file = next(masked.rglob("plans.json"))
    plans = json.loads(plans_file.read_text())
    for c in plans["configurations"].values():
        if "use_mask_for_norm" in c:
            c["use_mask_for_norm"] = [True] * len(c["use_mask_for_norm"])
    plans_file.write_text(json.dumps(plans))
    write_manifest(masked)
    for folder, fills_expected in ((model_dir, False), (masked, True)):
        model = load_semantic_model(folder).nnunet
        patch = model.configuration_manager.patch_size
        for name, img in images(tuple(p + 7 for p in patch)).items():
            props = {"spacing": [float(s) for s in model.configuration_manager.spacing[::-1]]}
            pre = model.image_configuration_manager.preprocessor_class(verbose=False)
            with warnings.catch_warnings():  # an empty image normalised inside its empty mask: nnU-Net's NaNs
                warnings.simplefilter("ignore", RuntimeWarning)
                ref, _, ref_props = pre.run_case_npy(img, None, dict(props), model.plans_manager,
                                                     model.image_configuration_manager, model.dataset_json)
                fills.clear()
                data, got_props = model.preprocess_image(img, dict(props))
            assert bool(fills) == fills_expected, (folder.name, name)
            assert data.dtype == ref.dtype and data.shape == ref.shape, name
            np.testing.assert_array_equal(data, ref, err_msg=name)
            assert got_props == ref_props, name
    assert any(model.configuration_manager.use_mask_for_norm)


def test_label_safe_mirror_axes():
    from spineps_like.models.nnunet import label_safe_mirror_axes

    # PIR arrays reach nnU-Net as (R, I, P)
    assert label_safe_mirror_axes("PIR", [0, 1, 2], [41, 49, 61]) == (0, 1, 2)
    assert label_safe_mirror_axes("PIR", [0, 1, 2], [43, 49]) == (1, 2)  # no left-right flip
    assert label_safe_mirror_axes("PIR", [0, 1, 2], [43, 52]) == (2,)  # nor a head-feet flip
    assert label_safe_mirror_axes("PIR", [2, 0, 1], [52]) == (0, 1)  # network axes follow transpose_forward: P, R, I
    assert label_safe_mirror_axes("RAS", [0, 1, 2], [44], allowed=(0, 1)) == (0, 1)  # S, A stay; R (axis 2) banned


def test_inference_config_validation(model_dir):
    good = json.loads((model_dir / "inference_config.json").read_text())
    cfg = InferenceConfig.from_dict(good)
    assert cfg.orientation == "PIR" and cfg.available_folds == ("0",)
    assert cfg.labels == {1: 41, 2: 49, 3: 60, 4: 61, 5: 100}
    assert InferenceConfig.from_dict({**good, "available_folds": 3}).available_folds == ("0", "1", "2")
    assert InferenceConfig.from_dict({**good, "labels": {"1": "S1", "2": 50, "3": "Dens_axis"}}).labels == {
        1: 26, 2: 50, 3: 51}
    bad = [
        ({"model_expected_orientation": ["P", "I", "X"]}, "model_expected_orientation"),
        ({"model_expected_orientation": ["P", "A", "R"]}, "model_expected_orientation"),
        ({"labels": {"1": "Not_A_Label"}}, "labels"),
        ({"resolution_range": [[2, 2, 2], [1, 1, 1]]}, "resolution_range"),
        ({"default_step_size": 1.5}, "default_step_size"),
        ({"modality": "XRay"}, "modality"),
    ]
    for change, key in bad:
        with pytest.raises(ModelError, match=key) as e:
            InferenceConfig.from_dict({**good, **change}, "cfg.json")
        assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="missing keys"):
        InferenceConfig.from_dict({k: v for k, v in good.items() if k != "labels"})


def test_no_timm_or_torchvision_is_imported(model_dir):
    code = (
        "import sys, warnings; warnings.simplefilter('ignore');"
        "from spineps_like.models import load_semantic_model;"
        f"m = load_semantic_model({str(model_dir)!r});"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('timm', 'torchvision')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_one_fold_is_loaded_once_and_fold_switches_reload(model_dir, tmp_path):
    """Scan after scan with one fold, the network keeps the weights it holds (nnU-Net would copy them in again every
    time); another fold, or an ensemble, loads what it needs, and the logits are those of the fold asked for."""
    import numpy as np
    import torch

    other = write_random_model(tmp_path / "other", labels=LABELS, seed=1)  # same architecture, other weights
    m = _copy(model_dir, tmp_path / "two_folds")
    fold0 = next(m.rglob("fold_0"))
    shutil.copytree(fold0, fold0.parent / "fold_1")
    shutil.copy(next(other.rglob("checkpoint_final.pth")), fold0.parent / "fold_1" / "checkpoint_final.pth")
    write_manifest(m)
    model = load_semantic_model(m)
    rng = np.random.default_rng(0)
    patch = tuple(model.nnunet.configuration_manager.patch_size)
    data = torch.from_numpy(rng.normal(size=(1, *(p + 3 for p in patch))).astype(np.float32))
    loads = []

    def predict(folds):
        p = model.nnunet.predictor(folds, step_size=0.5, mirroring=False)
        if not loads:
            original = p.network.load_state_dict
            p.network.load_state_dict = lambda sd, *a, **k: (loads.append(sd), original(sd, *a, **k))[1]
        return p.predict_logits_from_preprocessed_data(data).clone()

    a = predict(("0",))
    b = predict(("0",))
    assert len(loads) == 1 and torch.equal(a, b)
    c = predict(("1",))
    assert len(loads) == 2 and not torch.allclose(a, c)
    assert torch.equal(predict(("0",)), a) and len(loads) == 3  # back to fold 0: loaded again
    both = predict(("0", "1"))
    assert len(loads) == 5 and torch.allclose(both, (a + c) / 2, atol=1e-5)
    assert torch.equal(predict(("1",)), c) and len(loads) == 5  # the ensemble left fold 1 in the network
