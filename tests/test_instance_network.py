"""Instance network, checkpoint loading, cutouts, sparse prediction and the training sample pipeline."""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spineps_like.instance.cutouts import (
    SPINEPS_INPUT_MAPPING, SparseMask, cutout_targets, extract_cutouts, map_input,
)
from spineps_like.instance.network import (
    Unet3D, fft_conv3d, load_checkpoint_state_dict, load_instance_model, predict_cutouts,
)
from spineps_like.io import load_scan
from spineps_like.models.manifest import ModelError, write_manifest

torch.set_num_threads(1)


def _tptbox_crop(name: str) -> tuple[np.ndarray, np.ndarray]:
    import TPTBox

    d = Path(TPTBox.__file__).parent / "tests" / name
    sem = load_scan(glob.glob(str(d / "*seg-subreg*_msk.nii.gz"))[0], kind="mask").array
    inst = load_scan(glob.glob(str(d / "*seg-vert*_msk.nii.gz"))[0], kind="mask").array
    return sem, inst


# ---------------------------------------------------------------- an independent description of SPINEPS' Unet3D
def spineps_state_shapes(dim: int, mults: tuple[int, ...], channels: int, out_dim: int) -> dict[str, tuple]:
    """Parameter names and shapes of spineps' ``Unet3D`` (written from its module tree, not from our code)."""
    shapes: dict[str, tuple] = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def res(name, cin, cout):
        conv(f"{name}.block1.proj", cin, cout, 3)
        shapes[f"{name}.block1.norm.weight"] = shapes[f"{name}.block1.norm.bias"] = (cout,)
        conv(f"{name}.block2.proj", cout, cout, 3)
        shapes[f"{name}.block2.norm.weight"] = shapes[f"{name}.block2.norm.bias"] = (cout,)
        if cin != cout:
            conv(f"{name}.res_conv", cin, cout, 1)

    conv("init_conv", channels, dim, 7)
    dims = [dim] + [dim * m for m in mults]
    pairs = list(zip(dims[:-1], dims[1:]))
    for i, (a, b) in enumerate(pairs):
        res(f"downs.{i}.0", a, b)
        res(f"downs.{i}.1", b, b)
        if i < len(pairs) - 1:
            conv(f"downs.{i}.2", b, b, 4)
    res("mid_block1", dims[-1], dims[-1])
    res("mid_block2", dims[-1], dims[-1])
    for i, (a, b) in enumerate(reversed(pairs)):
        res(f"ups.{i}.0", b, a)
        res(f"ups.{i}.1", a, a)
        if i < len(pairs) - 1:
            shapes[f"ups.{i}.2.weight"] = (a, a, 4, 4, 4)  # ConvTranspose3d: (in, out, k, k, k)
            shapes[f"ups.{i}.2.bias"] = (a,)
    res("final_res_block", 2 * dim, dim)
    conv("final_conv", dim, out_dim, 1)
    return shapes


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, levels: int) -> torch.Tensor:
    """SPINEPS' forward pass written with torch.nn.functional on the raw tensors."""

    def conv(name, h, stride=1, pad=None):
        w = sd[f"{name}.weight"]
        return F.conv3d(h, w, sd[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2 if pad is None else pad)

    def block(name, h):
        h = conv(f"{name}.proj", h)
        h = F.group_norm(h, 8, sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"])
        return F.leaky_relu(h, 0.01)

    def res(name, h):
        out = block(f"{name}.block2", block(f"{name}.block1", h))
        return out + (conv(f"{name}.res_conv", h, pad=0) if f"{name}.res_conv.weight" in sd else h)

    h = conv("init_conv", x)
    stem, skips = h, []
    for i in range(levels):
        h = res(f"downs.{i}.1", res(f"downs.{i}.0", h))
        skips.append(h)
        if i < levels - 1:
            h = conv(f"downs.{i}.2", h, stride=2, pad=1)
    h = res("mid_block2", res("mid_block1", h))
    for i in range(levels):
        h = 0.5 * (h + skips.pop())
        h = res(f"ups.{i}.1", res(f"ups.{i}.0", h))
        if i < levels - 1:
            h = F.conv_transpose3d(h, sd[f"ups.{i}.2.weight"], sd[f"ups.{i}.2.bias"], stride=2, padding=1)
    h = res("final_res_block", torch.cat([h, stem], 1))
    return F.conv3d(h, sd["final_conv.weight"], sd["final_conv.bias"])


class _TrainerOptions:  # stands for the arbitrary objects a real Lightning checkpoint pickles in its hyper-parameters
    def __init__(self):
        self.n_epoch = 3


def _fake_spineps_folder(tmp: Path, dim: int = 8, cutout=(16, 16, 8), seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = spineps_state_shapes(dim, (1, 2, 4, 8), 10, 4)
    sd = {k: torch.randn(s, generator=g) * (0.5 if k.endswith("norm.weight") else 0.1) + (1.0 if k.endswith(
        "norm.weight") else 0.0) for k, s in shapes.items()}
    ckpt = {"epoch": 3, "global_step": 99, "pytorch-lightning_version": "1.8.6",
            "state_dict": {f"network.{k}": v for k, v in sd.items()},
            "hyper_parameters": {"opt": argparse.Namespace(n_epoch=3, channelwise=True), "do2D": False,
                                 "extra": _TrainerOptions()},
            "optimizer_states": [], "lr_schedulers": []}
    torch.save(ckpt, tmp / "sp_weights.ckpt")
    (tmp / "inference_config.json").write_text(json.dumps({
        "log_name": "fake", "modality": "SEG", "acquisition": "sag", "modeltype": "unet",
        "model_expected_orientation": ["P", "I", "R"], "available_folds": 1, "inference_augmentation": False,
        "resolution_range": [0.75, 0.75, 1.65], "default_step_size": 0.5, "labels": {"1": 1},
        "expected_inputs": ["seg"], "cutout_size": list(cutout)}))
    return sd


# ---------------------------------------------------------------- network and checkpoints
def test_network_builds_and_checks_input_size():
    net = Unet3D(dim=8, channels=10, out_dim=4)
    assert net(torch.zeros(1, 10, 16, 24, 8)).shape == (1, 4, 16, 24, 8)
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.zeros(1, 10, 12, 16, 8))
    assert set(net.state_dict()) == set(spineps_state_shapes(8, (1, 2, 4, 8), 10, 4))
    assert {k: tuple(v.shape) for k, v in Unet3D(dim=16).state_dict().items()} == spineps_state_shapes(
        16, (1, 2, 4, 8), 10, 4)


def test_fft_convolution_equals_the_direct_one():
    g = torch.Generator().manual_seed(0)
    for shape, k, bias in (((2, 3, 9, 13, 7), 5, True), ((1, 10, 16, 24, 8), 7, False), ((3, 2, 11, 5, 17), 3, True)):
        x = torch.randn(shape, generator=g)
        w = torch.randn((4, shape[1], k, k, k), generator=g)
        b = torch.randn(4, generator=g) if bias else None
        ref = F.conv3d(x, w, b, padding=k // 2)
        got = fft_conv3d(x, w, b, k // 2)
        # on a grid padded by k // 2 only (fft_grid): whatever wraps around must miss the output region
        assert got.shape == ref.shape and got.is_contiguous()
        assert torch.allclose(got, ref, atol=1e-4 * float(ref.abs().max()), rtol=0), (shape, k)
        # a channels-last input (the one-hot encoding is one) gives a channels-last output, as conv3d does
        cl = fft_conv3d(x.contiguous(memory_format=torch.channels_last_3d), w, b, k // 2)
        assert cl.is_contiguous(memory_format=torch.channels_last_3d)
        assert torch.allclose(cl, got, atol=1e-5 * float(ref.abs().max()), rtol=0)  # the FFT may take another path
    with pytest.raises(ValueError, match="cubic odd kernel"):
        fft_conv3d(x, torch.randn(4, 2, 3, 3, 1), None, 1)
    with pytest.raises(ValueError, match="cubic odd kernel"):
        fft_conv3d(x, torch.randn(4, 2, 3, 3, 3), None, 0)


def test_fft_stem_follows_the_weights_and_leaves_training_direct():
    torch.manual_seed(1)
    net = Unet3D(dim=8).eval()
    x = F.one_hot(torch.randint(0, 10, (2, 16, 24, 8)), 10).permute(0, 4, 1, 2, 3).float()
    outs = {}
    with torch.no_grad():
        for algorithm in ("direct", "fft", "auto"):
            net.stem_algorithm = algorithm
            outs[algorithm] = net(x)
        assert torch.allclose(outs["fft"], outs["direct"], atol=1e-4, rtol=1e-4)
        assert torch.equal(outs["auto"], outs["fft"])  # on the CPU, at inference: the FFT
        # new weights (load_state_dict copies in place): the cached kernel spectrum is not reused
        state = {k: v * 1.5 if k == "init_conv.weight" else v for k, v in net.state_dict().items()}
        net.load_state_dict(state)
        new_fft = net(x)
        net.stem_algorithm = "direct"
        new_direct = net(x)
        assert not torch.allclose(new_fft, outs["fft"], atol=1e-3)
        assert torch.allclose(new_fft, new_direct, atol=1e-4, rtol=1e-4)
    # with gradients (training) 'auto' runs nn.Conv3d, so the stem's weights get gradients
    net.stem_algorithm = "auto"
    net.train()
    net(x).sum().backward()
    assert net.init_conv.weight.grad is not None and net.init_conv.weight.grad.abs().sum() > 0
    net.stem_algorithm = "winograd"
    with pytest.raises(ValueError, match="stem_algorithm"):
        net(x)


def test_spineps_lightning_checkpoint_loads_strict_and_matches_reference(tmp_path):
    sd = _fake_spineps_folder(tmp_path)
    model = load_instance_model(tmp_path)
    assert model.network.architecture()["dim"] == 8 and model.cutout_size == (16, 16, 8)
    assert model.verified is False  # no manifest in a downloaded SPINEPS folder
    labels = torch.randint(0, 10, (2, 16, 16, 8))
    x = F.one_hot(labels, 10).permute(0, 4, 1, 2, 3).float()
    with torch.no_grad():
        ours = model.network(x)
        ref = reference_forward(sd, x, levels=4)
    assert ours.shape == (2, 4, 16, 16, 8)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)
    # the stand-ins never execute code from the file: only tensors come back
    assert set(load_checkpoint_state_dict(tmp_path / "sp_weights.ckpt")) == set(sd)


def test_plain_state_dict_folder_loads(tmp_path):
    _fake_spineps_folder(tmp_path)
    (tmp_path / "sp_weights.ckpt").unlink()
    net = Unet3D(dim=8, dim_mults=(1, 2, 4), channels=10, out_dim=4)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    model = load_instance_model(tmp_path)
    assert model.network.architecture()["dim_mults"] == [1, 2, 4]
    x = torch.rand(1, 10, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.network(x), net.eval()(x))


def test_checkpoint_errors_are_one_line(tmp_path):
    sd = _fake_spineps_folder(tmp_path)
    bad = {f"network.{k}": v for k, v in sd.items() if k != "final_conv.bias"}
    torch.save({"state_dict": bad}, tmp_path / "sp_weights.ckpt")
    with pytest.raises(ModelError, match="1 missing keys") as e:
        load_instance_model(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "sp_weights.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="sp_weights.ckpt"):
        load_instance_model(tmp_path)


def test_manifest_is_checked(tmp_path):
    _fake_spineps_folder(tmp_path)
    write_manifest(tmp_path)
    assert load_instance_model(tmp_path).verified
    cfg = json.loads((tmp_path / "inference_config.json").read_text())
    cfg["cutout_size"] = [32, 32, 8]
    (tmp_path / "inference_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="sha256 mismatch"):
        load_instance_model(tmp_path)


# ---------------------------------------------------------------- cutouts
def test_input_mapping_follows_spineps():
    sem = np.array([0, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 60, 61, 62, 100, 26])
    assert map_input(sem).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0]


def test_cutouts_at_the_border_are_zero_padded_and_placed_right():
    rng = np.random.default_rng(1)
    sem = rng.choice([0, 41, 45, 49, 50, 62, 100], size=(20, 30, 12)).astype(np.int16)
    centres = np.array([[1.7, 2.2, 10.9], [10.0, 15.0, 6.0], [19.0, 29.0, 0.0]])
    size = (8, 16, 8)
    cut = extract_cutouts(sem, centres, size)
    assert cut.labels.shape == (3, 8, 16, 8) and cut.labels.dtype == np.uint8
    assert cut.offsets.tolist() == [[-3, -6, 6], [6, 7, 2], [15, 21, -4]]
    big = np.pad(map_input(sem), 16)  # reference: pad the whole volume, then slice
    for k, off in enumerate(cut.offsets):
        ref = big[tuple(slice(o + 16, o + 16 + s) for o, s in zip(off, size))]
        assert np.array_equal(cut.labels[k], ref)
        assert cut.centre(k) == tuple(int(c) for c in np.floor(centres[k]))
        assert cut.labels[k][tuple(np.array(cut.centre(k)) - off)] == map_input(sem)[cut.centre(k)]
    assert cut.labels[0, :3].max() == 0 and cut.labels[2, :, :, :4].max() == 0  # the parts outside
    assert cut.window(0) == ((0, 0, 6), (5, 10, 12))
    oh = cut.one_hot(10)
    assert oh.shape == (3, 10, 8, 16, 8) and oh.dtype == bool and np.all(oh.sum(1) == 1)
    assert np.array_equal(oh.argmax(1), cut.labels)


def test_cutout_input_errors():
    sem = np.zeros((10, 10, 10), np.int16)
    with pytest.raises(ValueError, match="outside the volume"):
        extract_cutouts(sem, np.array([[5.0, 12.0, 5.0]]), (8, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        extract_cutouts(sem, np.array([[np.nan, 1.0, 5.0]]), (8, 8, 8))
    with pytest.raises(ValueError, match="cutout size"):
        extract_cutouts(sem, np.array([[5.0, 5.0, 5.0]]), (8, 0, 8))


# ---------------------------------------------------------------- sparse prediction
def test_predict_cutouts_matches_a_dense_reference():
    sem, _ = _tptbox_crop("sample_mri")
    torch.manual_seed(3)
    net = Unet3D(dim=8).eval()
    with torch.no_grad():  # a random network whose classes all show up
        net.final_conv.bias.copy_(torch.tensor([0.0, 0.05, 0.1, 0.05]))
    corpus = np.argwhere(sem == 49)
    centres = np.array([corpus.mean(0), corpus.min(0), [67.0, 51.0, 66.0]], dtype=float)
    cut = extract_cutouts(sem, centres, (32, 32, 16))
    preds = predict_cutouts(net, cut, batch_size=2)
    preds1 = predict_cutouts(net, cut, batch_size=3)
    classes_seen = set()
    for k, p in enumerate(preds):
        x = F.one_hot(torch.from_numpy(cut.labels[k:k + 1]).long(), 10).permute(0, 4, 1, 2, 3).float()
        with torch.no_grad():
            prob = net(x).softmax(1)[0]
        top2 = prob.topk(2, dim=0).values
        dense = prob.argmax(0).numpy()
        dense[cut.labels[k] == 0] = 0
        # the dense reference pasted into the volume; voxels whose top two classes tie within float noise are
        # excluded from the comparison (batching may change the last bits)
        ref = np.zeros(sem.shape, np.uint8)
        sure = np.zeros(sem.shape, bool)
        big = np.zeros((2, *(s + 64 for s in sem.shape)), np.uint8)
        big[1] = 1  # outside the cutout: surely background
        inner = tuple(slice(o + 32, o + 32 + s) for o, s in zip(cut.offsets[k], cut.size))
        big[0][inner] = dense
        big[1][inner] = ((top2[0] - top2[1]) > 1e-4).numpy() | (cut.labels[k] == 0)
        ref[:] = big[0, 32:-32, 32:-32, 32:-32]
        sure[:] = big[1, 32:-32, 32:-32, 32:-32].astype(bool)
        assert sure.mean() > 0.99
        got = np.zeros(sem.shape, np.uint8)
        for c, m in p.classes.items():
            assert not got[m.to_dense(sem.shape)].any()  # classes are disjoint
            got[m.to_dense(sem.shape)] = c
            classes_seen.add(c)
            assert m.mask.shape == tuple(b - a for a, b in zip(*m.box))
            assert all(m.mask.any(axis=ax).any() for ax in range(3))  # tight bounding box
        assert np.array_equal(got[sure], ref[sure]), k
        for c in (1, 2, 3):
            assert (c in preds1[k].classes) == (c in p.classes)
        assert p.centre == cut.centre(k) and p.window == cut.window(k)
    assert classes_seen == {1, 2, 3}


def test_sparse_mask_counts_and_overlaps():
    a = np.zeros((10, 10, 10), bool)
    a[2:5, 3:7, 1:4] = True
    b = np.zeros_like(a)
    b[4:8, 5:9, 2:6] = True
    ma, mb = SparseMask.from_dense(a), SparseMask.from_dense(b)
    assert ma.box == ((2, 3, 1), (5, 7, 4)) and ma.count == a.sum()
    assert ma.overlap(mb) == (a & b).sum()
    box = ((3, 0, 0), (10, 6, 10))
    assert ma.count_in(box) == a[3:10, 0:6, 0:10].sum()
    assert np.array_equal(ma.crop(box), a[3:10, 0:6, 0:10])
    assert SparseMask.from_dense(np.zeros((3, 3, 3), bool)) is None


# ---------------------------------------------------------------- training pipeline on real ground truth
def test_training_samples_keep_anatomy_and_targets_consistent():
    from spineps_like.training.instance import sample_cutout, volume_from_masks

    sem, inst = _tptbox_crop("sample_ct")
    vol = volume_from_masks(sem, inst)
    assert vol.ids == [21, 22, 23] and vol.centre_index == [0, 1, 2]
    assert np.allclose(vol.centres[1], np.argwhere(np.isin(sem, (49, 50)) & (inst == 22)).mean(0))
    size = (48, 48, 48)
    lab0, tgt0 = sample_cutout(vol, 1, size, np.random.default_rng(0), augment=False)
    cut = extract_cutouts(sem, vol.centres[1:2], size)
    assert np.array_equal(lab0, cut.labels[0])
    assert np.array_equal(tgt0, cutout_targets(inst, [21, 22, 23], cut, centre_index=[1])[0])
    assert set(np.unique(tgt0)) == {0, 1, 2, 3}
    rng = np.random.default_rng(5)
    n_checked = 0
    for _ in range(12):
        lab, tgt = sample_cutout(vol, int(rng.integers(0, 3)), size, rng)
        assert lab.shape == tgt.shape == size and lab.max() <= 9 and tgt.max() <= 3
        assert not np.any((tgt > 0) & (lab == 0))
        left, right = np.argwhere(lab == 3), np.argwhere(lab == 4)  # costal process left / right
        if len(left) > 20 and len(right) > 20:  # anatomy survives flips: left stays on the left (low R index)
            assert left[:, 2].mean() < right[:, 2].mean()
            n_checked += 1
    assert n_checked >= 6


def test_smoke_training_writes_a_loadable_spineps_folder(tmp_path):
    from spineps_like.training.instance import TrainConfig, train, volume_from_masks

    sem, inst = _tptbox_crop("sample_ct")
    vol = volume_from_masks(sem, inst)
    cfg = TrainConfig(out=str(tmp_path / "model"), steps=2, batch_size=1, phantoms=1, val_phantoms=1,
                      cutout_size=(24, 32, 24), spacing=(1.5, 1.5, 1.5), checkpoint_every=1, val_every=2, threads=1)
    out = train(cfg, make_volume=lambda seed, fov, variant: vol, log=lambda m: None, command="pytest smoke")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["MANIFEST.sha256", "TRAINING.md", "inference_config.json", "instance_weights.ckpt"]
    assert all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir())
    model = load_instance_model(out)
    assert model.verified and model.cutout_size == (24, 32, 24) and model.config["modeltype"] == "unet"
    assert model.mapping == SPINEPS_INPUT_MAPPING
    raw = torch.load(out / "instance_weights.ckpt", weights_only=True)
    assert all(k.startswith("network.") for k in raw["state_dict"]) and raw["global_step"] == 2
    assert (tmp_path / "model.train" / "state.pt").is_file()
    assert "pytest smoke" in (out / "TRAINING.md").read_text()
    # resuming a finished run trains no further step and rewrites the same folder
    out2 = train(cfg, make_volume=lambda seed, fov, variant: vol, log=lambda m: None, command="pytest smoke")
    assert torch.load(out2 / "instance_weights.ckpt", weights_only=True)["global_step"] == 2


def test_network_input_is_one_hot_in_its_layout():
    """The one-hot input equals F.one_hot(...).permute(...).float() in values and in memory layout (the network's
    results depend on the layout), labels past the channel count going to channel 0."""
    from spineps_like.instance.network import _network_input

    labels = torch.randint(0, 13, (3, 6, 7, 5))  # 10 channels: 10-12 are out of range
    got = _network_input(labels, 10)
    want = F.one_hot(torch.where(labels < 10, labels, 0), 10).permute(0, 4, 1, 2, 3).float()
    assert got.dtype == torch.float32 and got.shape == want.shape and got.stride() == want.stride()
    assert torch.equal(got, want)
    assert torch.equal(got[:, 0], ((labels == 0) | (labels >= 10)).float())
