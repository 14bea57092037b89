"""Train an instance model (SPINEPS ``Unet3D``) on phantom ground truth and write a SPINEPS-layout model folder.

The model sees only the semantic mask (one-hot of the mapped labels, as at inference) in a cutout around a corpus
centre and learns, per voxel, background / vertebra above / centre vertebra / vertebra below. Targets come from the
phantom's ground-truth instance mask; cutouts are centred on ground-truth corpus centres (jittered).

Why this grid and cutout: 3.0 mm isotropic and a (48, 56, 32) cutout (144 x 168 x 96 mm in P, I, R) hold the centre
vertebra with both neighbours (lumbar pitch ~40 mm, so +-84 mm in I), the posterior elements up to 72 mm behind the
corpus centre and the costal processes, in 86k voxels. Measured on this 2-core machine (1 thread, other jobs
running, batch 2): a training step takes ~1.7 s at 3 mm, ~5.8 s at 2 mm with (64, 80, 40) and ~24 s at 1.5 mm with
(96, 128, 48); after the same 100 steps the 3 mm model was already the better one on held-out phantoms (found 55 %
vs 23 % of vertebrae), so in an hour 3 mm trains ~2000 steps where 2 mm trains ~600. The instance phase only has to
tell vertebrae apart: fine boundaries come back in post-processing on the input grid from the semantic mask. The
``dim=8`` network (1.36 M parameters, 5.2 MB) keeps the checkpoint far below 16 MB (``dim=16``, the published
SPINEPS width, would be 20.5 MB). Inference costs ~0.2 s per cutout on one core.

Augmentations (each chosen because the instance phase meets it at inference): shifted/jittered centres (the centres
phase is imperfect), random scaling and sagittal tilt (anatomy size, curvature), left/right flips with the L/R labels
swapped, subregion label drop and label confusion (the semantic model misses or mislabels processes), one-voxel
erosion/dilation (over/under-segmentation) and a vertical crop (the field of view ends inside a vertebra).

Run (long training, ~60 min on 2 free cores; interrupted runs resume from ``<out>.train/state.pt``)::

    python -m spineps_like.training.instance --out models/instance-phantom-v1 --steps 2000 --seed 0

A short smoke run: ``--steps 4 --phantoms 2 --val-phantoms 1``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from spineps_like.instance.cutouts import (
    LR_SWAP_INPUT, SPINEPS_INPUT_MAPPING, cutout_targets, extract_cutouts, input_lut,
)
from spineps_like.instance.fusion import fuse_predictions
from spineps_like.instance.network import Unet3D, lightning_checkpoint, predict_cutouts
from spineps_like.io import atomic_path, atomic_write_json, atomic_write_text
from spineps_like.phantom_sets import check_training_seeds

WEIGHTS_NAME = "instance_weights.ckpt"
MAX_FILE_BYTES = 16 * 2**20


@dataclass
class TrainConfig:
    """Everything a training run depends on (written into the checkpoint and TRAINING.md)."""

    out: str
    steps: int = 2000
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    cutout_size: tuple[int, int, int] = (48, 56, 32)
    dim: int = 8
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    phantoms: int = 24
    val_phantoms: int = 4
    seed: int = 0
    fovs: tuple[str, ...] = ("cervical", "thoracic", "lumbar", "whole")
    variants: tuple[str | None, ...] = (None, None, None, "block", "collapsed", "l6", "t13", "sacralised_l5",
                                        "narrow_discs")
    checkpoint_every: int = 100
    val_every: int = 250
    threads: int = 2
    work: str | None = None  # training state (resumable); default <out>.train


# ---------------------------------------------------------------- ground-truth samples
@dataclass
class Volume:
    """One phantom reduced to what training needs: mapped input labels, instance ids, vertebrae and corpus centres."""

    labels: np.ndarray  # uint8 mapped input labels (0..9)
    instance: np.ndarray  # vertebra ids only (0 elsewhere)
    ids: list[int]  # all vertebrae top to bottom
    centre_index: list[int]  # indices into ids of vertebrae with a usable corpus (cutout centres)
    centres: np.ndarray  # (len(centre_index), 3) corpus centres
    name: str = ""


def volume_from_masks(semantic: np.ndarray, instance: np.ndarray, *, name: str = "",
                      mapping: dict[int, int] | None = None, min_corpus_fraction: float = 0.3) -> Volume:
    """Reduce a ground-truth (semantic, instance) pair in PIR to a training :class:`Volume`.

    Vertebrae are ordered top to bottom by the mean axis-1 coordinate of their bone; a vertebra is a cutout centre
    when its corpus (label 49/50/51) holds at least 20 voxels and ``min_corpus_fraction`` of its larger neighbour's
    (a corpus cut by the field of view is skipped as a centre but still appears as a neighbour in the targets).
    """
    if semantic.shape != instance.shape:
        raise ValueError(f"semantic {semantic.shape} and instance {instance.shape} masks differ in shape")
    lut = input_lut(mapping, int(max(semantic.max(initial=0), 0)))
    labels = lut[np.clip(semantic, 0, None)]
    vert = np.where((labels > 0) & (instance >= 1) & (instance <= 28), instance, 0).astype(np.int16)
    ids = [int(i) for i in np.unique(vert) if i > 0]
    if not ids:
        return Volume(labels, vert, [], [], np.zeros((0, 3)), name)
    heights = [c[1] for c in ndimage.center_of_mass(vert > 0, vert, ids)]
    ids = [i for _, i in sorted(zip(heights, ids))]
    corpus = np.isin(semantic, (49, 50, 51))
    sizes = np.asarray(ndimage.sum_labels(corpus, vert, ids))
    keep = []
    for k, sz in enumerate(sizes):
        neighbours = [sizes[j] for j in (k - 1, k + 1) if 0 <= j < len(sizes)]
        if sz >= 20 and sz >= min_corpus_fraction * max(neighbours, default=0):
            keep.append(k)
    centres = np.asarray(ndimage.center_of_mass(corpus, vert, [ids[k] for k in keep])).reshape(-1, 3)
    return Volume(labels, vert, ids, keep, centres, name)


def phantom_volume(seed: int, fov: str, variant: str | None, spacing: Sequence[float],
                   mapping: dict[int, int] | None = None) -> Volume:
    """Generate a phantom (``spineps_like.phantom.make_phantom``) and reduce it to a :class:`Volume`."""
    from spineps_like.phantom import make_phantom

    ph = make_phantom(seed, fov=fov, variant=variant, spacing=tuple(spacing), orientation="PIR")
    if ph.semantic.orientation != "PIR":
        raise ValueError(f"phantom {seed} came back in {ph.semantic.orientation}, not PIR")
    return volume_from_masks(np.asarray(ph.semantic.array), np.asarray(ph.instance.array),
                             name=f"seed={seed} fov={fov} variant={variant}", mapping=mapping)


# ---------------------------------------------------------------- augmentation
def _rotation_pi(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def sample_cutout(vol: Volume, k: int, size: Sequence[int], rng: np.random.Generator, *,
                  augment: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One training pair (input labels, target classes) for cutout centre ``k`` of ``vol``.

    Returns two uint8 arrays of ``size``: mapped input labels (0..9) and targets (0 bg, 1 above, 2 centre, 3 below).
    """
    size_a = np.asarray(size, dtype=int)
    j = vol.centre_index[k]
    centre = vol.centres[k].astype(float)
    if not augment:
        cut = extract_cutouts(vol.labels, centre[None], size, mapping={i: i for i in range(1, 10)})
        tgt = cutout_targets(vol.instance, vol.ids, cut, centre_index=[j])
        return cut.labels[0], tgt[0]
    # shifted centres: mostly small jitter, sometimes a centre off the corpus middle
    sigma = np.array([2.0, 3.0, 1.5]) if rng.random() < 0.8 else np.array([5.0, 7.0, 3.0])
    centre = np.clip(centre + rng.normal(0, sigma), 0, np.asarray(vol.labels.shape) - 1)
    # scaling and sagittal tilt: output voxel x maps to source centre + A (x - size/2)
    scale = rng.uniform(0.85, 1.15, 3) if rng.random() < 0.7 else np.ones(3)
    theta = math.radians(rng.uniform(-15, 15)) if rng.random() < 0.5 else 0.0
    A = _rotation_pi(theta) @ np.diag(1.0 / scale)
    reach = np.ceil(np.abs(A) @ (size_a / 2.0)).astype(int) + 2
    lo = np.floor(centre).astype(int) - reach
    hi = np.floor(centre).astype(int) + reach + 1
    src_shape = tuple(hi - lo)
    lab_src = np.zeros(src_shape, np.uint8)
    ins_src = np.zeros(src_shape, np.int16)
    vlo, vhi = np.maximum(lo, 0), np.minimum(hi, vol.labels.shape)
    if np.all(vhi > vlo):
        s_vol = tuple(slice(a, b) for a, b in zip(vlo, vhi))
        s_src = tuple(slice(a - o, b - o) for a, b, o in zip(vlo, vhi, lo))
        lab_src[s_src] = vol.labels[s_vol]
        ins_src[s_src] = vol.instance[s_vol]
    offset = (centre - lo) - A @ (size_a / 2.0)
    lab = ndimage.affine_transform(lab_src, A, offset=offset, output_shape=tuple(size_a), order=0, mode="constant")
    ins = ndimage.affine_transform(ins_src, A, offset=offset, output_shape=tuple(size_a), order=0, mode="constant")
    tgt = np.zeros(lab.shape, np.uint8)
    for cls, jj in ((1, j - 1), (2, j), (3, j + 1)):
        if 0 <= jj < len(vol.ids):
            tgt[ins == vol.ids[jj]] = cls
    # left/right flip: the mirror image swaps left and right processes
    if rng.random() < 0.5:
        lab = lab[:, :, ::-1].copy()
        tgt = tgt[:, :, ::-1].copy()
        ins = ins[:, :, ::-1].copy()
        swap = np.arange(256, dtype=np.uint8)
        for a, b in LR_SWAP_INPUT.items():
            swap[a] = b
        lab = swap[lab]
    # subregion label drop: a posterior label disappears from one vertebra or the whole cutout
    if rng.random() < 0.3:
        drop = int(rng.integers(1, 9))
        present = [v for v in np.unique(ins) if v]
        where = lab == drop
        if present and rng.random() < 0.6:
            where &= ins == rng.choice(present)
        lab[where] = 0
    # label confusion: arcus/spinous or superior/inferior articular swapped within one vertebra
    if rng.random() < 0.2:
        a, b = [(1, 2), (5, 7), (6, 8), (3, 1)][int(rng.integers(0, 4))]
        present = [v for v in np.unique(ins) if v]
        if present:
            inside = ins == rng.choice(present)
            la, lb = (lab == a) & inside, (lab == b) & inside
            lab[la], lab[lb] = b, a
    # over/under-segmentation by one voxel
    r = rng.random()
    if r < 0.15:
        fg = lab > 0
        gone = fg & ~ndimage.binary_erosion(fg)
        lab[gone] = 0
    elif r < 0.3:
        fg = lab > 0
        if fg.any():
            grow = ndimage.binary_dilation(fg) & ~fg
            _, idx = ndimage.distance_transform_edt(~fg, return_indices=True)
            lab[grow] = lab[tuple(i[grow] for i in idx)]
            tgt[grow] = tgt[tuple(i[grow] for i in idx)]
    # vertical crop: the field of view ends above or below the centre vertebra's corpus
    if rng.random() < 0.15:
        c1 = size_a[1] // 2
        cut = int(rng.integers(max(1, c1 // 3), c1 - 4)) if c1 > 8 else 1
        if rng.random() < 0.5:
            lab[:, : c1 - cut] = 0
        else:
            lab[:, c1 + cut:] = 0
    tgt[lab == 0] = 0
    return lab, tgt


# ---------------------------------------------------------------- loss and metrics
def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice over the three vertebra classes (nnU-Net's default pairing)."""
    ce = F.cross_entropy(logits, target)
    prob = logits.softmax(1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].float()
    dims = (0, 2, 3, 4)
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    present = onehot.sum(dims) > 0
    dice = (2 * inter + 1e-5) / (denom + 1e-5)
    return ce + (1 - dice[present]).mean() if present.any() else ce


def class_dice(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Dice per class (above/centre/below) over a batch; NaN where a class is absent in both."""
    out = {}
    for c, n in ((1, "above"), (2, "centre"), (3, "below")):
        p, t = pred == c, target == c
        s = int(p.sum() + t.sum())
        out[n] = 2.0 * int((p & t).sum()) / s if s else float("nan")
    return out


# ---------------------------------------------------------------- the run
def _work_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.work) if cfg.work else Path(str(cfg.out).rstrip("/") + ".train")


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def phantom_seeds(cfg: TrainConfig) -> list[int]:
    """The phantom seeds of a run (training, then validation): ``seed * 100000 + i``; a ``ValueError`` when any falls
    in an evaluation set (:mod:`spineps_like.phantom_sets`: ``--seed 9`` would draw 900000-900027, the development
    set; ``--seed 20`` the test set)."""
    n = cfg.phantoms + cfg.val_phantoms
    if cfg.seed < 0 or n > 100_000:
        raise ValueError(f"seed {cfg.seed} and {n} phantoms: the seed must be >= 0 and at most 100000 phantoms "
                         "(phantom seeds are seed * 100000 + index)")
    try:
        return check_training_seeds(cfg.seed * 100_000 + i for i in range(n))
    except ValueError as e:
        raise ValueError(f"--seed {cfg.seed}: {e}; choose another --seed") from None


def _datasets(cfg: TrainConfig, log: Callable[[str], None],
              make: Callable[[int, str, str | None], Volume]) -> tuple[list[Volume], list[Volume]]:
    rng = np.random.default_rng(cfg.seed)
    vols: list[Volume] = []
    for i, seed in enumerate(phantom_seeds(cfg)):
        fov = str(cfg.fovs[i % len(cfg.fovs)])
        variant = cfg.variants[int(rng.integers(0, len(cfg.variants)))]
        t = time.time()
        try:
            v = make(seed, fov, variant)
        except ValueError as e:  # a variant that does not fit the field of view
            log(f"phantom seed={seed} fov={fov} variant={variant}: {e}; retrying without variant")
            v = make(seed, fov, None)
        log(f"phantom {v.name}: {len(v.ids)} vertebrae, {len(v.centre_index)} centres ({time.time() - t:.1f}s)")
        if v.centre_index:
            vols.append(v)
    n_val = min(cfg.val_phantoms, max(0, len(vols) - 1))
    return vols[: len(vols) - n_val], vols[len(vols) - n_val:]


def evaluate_fusion(network: Unet3D, vols: Sequence[Volume], size: Sequence[int],
                    spacing: Sequence[float] | None = None) -> dict[str, float]:
    """Run the whole learned instance phase (cutouts on GT centres -> network -> fusion) on held-out volumes.

    Returns, over ground-truth vertebrae that own a cutout centre: the mean Dice of their best-matching instance and
    the share found (Dice > 0.5); over all instances: ``extra`` (an instance that is not the best match of the
    vertebra it mostly covers) and ``merged`` (an instance holding > 30 % of two vertebrae).
    """
    dices, extra, merged, n_inst = [], 0, 0, 0
    for v in vols:
        cut = extract_cutouts(v.labels, v.centres, size, mapping={i: i for i in range(1, 10)})
        res = fuse_predictions(predict_cutouts(network, cut, batch_size=2), v.labels.shape, spacing=spacing)
        gt, pr = v.instance.astype(np.int64), res.instance.astype(np.int64)
        both = (gt > 0) | (pr > 0)
        pairs, counts = np.unique(gt[both] * 65536 + pr[both], return_counts=True)
        g_of, p_of = pairs // 65536, pairs % 65536
        g_size = dict(zip(*np.unique(gt[gt > 0], return_counts=True)))
        p_size = dict(zip(*np.unique(pr[pr > 0], return_counts=True)))
        best_of_gt: dict[int, tuple[float, int]] = {}
        for g, p, c in zip(g_of, p_of, counts):
            if g and p:
                d = 2.0 * c / (g_size[g] + p_size[p])
                if d > best_of_gt.get(int(g), (0.0, 0))[0]:
                    best_of_gt[int(g)] = (d, int(p))
        dices += [best_of_gt.get(v.ids[j], (0.0, 0))[0] for j in v.centre_index]
        for p in p_size:
            sel = (p_of == p) & (g_of > 0)
            share = np.sort(counts[sel] / np.array([g_size[g] for g in g_of[sel]]))[::-1] if sel.any() else []
            g_main = int(g_of[sel][np.argmax(counts[sel])]) if sel.any() else 0
            extra += int(g_main == 0 or best_of_gt.get(g_main, (0.0, 0))[1] != p)
            merged += int(len(share) > 1 and share[1] > 0.3)
            n_inst += 1
    return {"vertebra_dice": float(np.mean(dices)) if dices else float("nan"),
            "found": float(np.mean(np.asarray(dices) > 0.5)) if dices else float("nan"),
            "extra_instances": extra, "merged_instances": merged, "instances": n_inst}


def write_model_folder(out: Path, network: Unet3D, cfg: TrainConfig, *, step: int, metrics: dict[str, Any],
                       command: str, seconds: float) -> Path:
    """Write the SPINEPS-layout folder: inference_config.json, the Lightning-style .ckpt, TRAINING.md, MANIFEST."""
    from spineps_like.models.manifest import write_manifest

    out.mkdir(parents=True, exist_ok=True)
    config = {
        "log_name": out.name,
        "modality": "SEG",
        "acquisition": "sag",
        "modeltype": "unet",
        "model_expected_orientation": ["P", "I", "R"],
        "available_folds": 1,
        "inference_augmentation": False,
        "resolution_range": list(cfg.spacing),
        "default_step_size": 0.5,
        "labels": {"1": 1, "2": 2, "3": 3},
        "label_meaning": {"0": "background", "1": "vertebra above", "2": "centre vertebra", "3": "vertebra below"},
        "expected_inputs": ["seg"],
        "cutout_size": list(cfg.cutout_size),
        "corpus_size_cleaning": 100,
        "vert_size_threshold": 250,
        "mapping": {str(k): v for k, v in SPINEPS_INPUT_MAPPING.items()},
        "architecture": network.architecture(),
        "trained_on": "spineps_like.phantom ground truth (synthetic)",
    }
    try:
        from spineps_like.phantom import GENERATOR_VERSION as phantom_version
    except ImportError:
        phantom_version = "unknown"
    config["trained_on"] += f", phantom generator {phantom_version}"
    atomic_write_json(out / "inference_config.json", config)
    ckpt = lightning_checkpoint(network, epoch=0, global_step=step,
                                hyper_parameters={"train_config": json.loads(json.dumps(asdict(cfg), default=str))})
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        torch.save(ckpt, tmp)
    lines = [
        f"# {out.name}: instance model trained on phantoms",
        "",
        "SPINEPS `Unet3D` (same parameter names; Lightning-style `state_dict` with the `network.` prefix) trained by",
        "`spineps_like.training.instance` on synthetic ground truth from `spineps_like.phantom`.",
        "",
        "## Exact command",
        "",
        f"    {command}",
        "",
        f"Seed {cfg.seed}; {step} steps of batch {cfg.batch_size}; {seconds / 60:.1f} min on "
        f"{torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()}); torch {torch.__version__}.",
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(asdict(cfg), indent=2, default=str),
        "```",
        "",
        "## Held-out phantoms (fusion on ground-truth corpus centres)",
        "",
        "```json",
        json.dumps(metrics, indent=2, default=str),
        "```",
        "",
    ]
    atomic_write_text(out / "TRAINING.md", "\n".join(lines))
    for f in out.iterdir():
        if f.is_file() and f.stat().st_size > MAX_FILE_BYTES:
            raise RuntimeError(f"{f}: {f.stat().st_size / 2**20:.1f} MB exceeds the 16 MB limit per file")
    write_manifest(out)
    return out


def train(cfg: TrainConfig, *, resume: bool = True, log: Callable[[str], None] = print,
          make_volume: Callable[[int, str, str | None], Volume] | None = None, command: str | None = None) -> Path:
    """Train the instance network on phantoms and write the model folder ``cfg.out``.

    Training state (network, optimiser, step, RNG) is saved atomically to ``<out>.train/state.pt`` every
    ``checkpoint_every`` steps; with ``resume`` a run continues from there.
    """
    phantom_seeds(cfg)  # refuses evaluation phantoms before any work
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if any(s % 2 ** (len(cfg.dim_mults) - 1) for s in cfg.cutout_size):
        raise ValueError(f"cutout_size {cfg.cutout_size} must be divisible by {2 ** (len(cfg.dim_mults) - 1)}")
    make = make_volume or (lambda seed, fov, variant: phantom_volume(seed, fov, variant, cfg.spacing))
    work = _work_dir(cfg)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.pt"
    network = Unet3D(dim=cfg.dim, dim_mults=cfg.dim_mults, channels=10, out_dim=4)
    opt = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed, history = 0, 0.0, []
    if resume and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        network.load_state_dict(st["network"])
        opt.load_state_dict(st["optimizer"])
        step, elapsed, history = int(st["step"]), float(st["elapsed"]), list(st["history"])
        log(f"resumed from {state_path} at step {step}")
    train_vols, val_vols = _datasets(cfg, log, make)
    if not train_vols:
        raise ValueError("no training phantom has a usable corpus centre")
    rng = np.random.default_rng([cfg.seed, step])
    samples = [(i, k) for i, v in enumerate(train_vols) for k in range(len(v.centre_index))]
    val_pairs = [sample_cutout(v, k, cfg.cutout_size, rng, augment=False)
                 for v in val_vols for k in range(len(v.centre_index))][:16]
    network.train()
    t0 = time.time() - elapsed
    while step < cfg.steps:
        batch = [samples[int(i)] for i in rng.integers(0, len(samples), cfg.batch_size)]
        pairs = [sample_cutout(train_vols[i], k, cfg.cutout_size, rng) for i, k in batch]
        x = torch.from_numpy(np.stack([p[0] for p in pairs])).long()
        y = torch.from_numpy(np.stack([p[1] for p in pairs])).long()
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        loss = dice_ce_loss(network(F.one_hot(x, 10).permute(0, 4, 1, 2, 3).float()), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        history.append(float(loss.detach()))
        if step % 10 == 0 or step == cfg.steps:
            log(f"step {step}/{cfg.steps} loss {np.mean(history[-10:]):.4f} lr {_lr(cfg, step - 1):.2e} "
                f"{(time.time() - t0) / 60:.1f} min")
        if val_pairs and (step % cfg.val_every == 0 or step == cfg.steps):
            network.eval()
            with torch.inference_mode():
                xv = torch.from_numpy(np.stack([p[0] for p in val_pairs])).long()
                preds = np.concatenate([network(F.one_hot(xv[i:i + 2], 10).permute(0, 4, 1, 2, 3).float())
                                        .argmax(1).numpy() for i in range(0, len(xv), 2)])
                preds[xv.numpy() == 0] = 0
            d = class_dice(preds, np.stack([p[1] for p in val_pairs]))
            log(f"step {step}: validation Dice " + ", ".join(f"{k} {v:.3f}" for k, v in d.items()))
            network.train()
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            with atomic_path(state_path) as tmp:
                torch.save({"network": network.state_dict(), "optimizer": opt.state_dict(), "step": step,
                            "elapsed": time.time() - t0, "history": history, "config": asdict(cfg)}, tmp)
    network.eval()
    metrics: dict[str, Any] = {"final_loss_mean_last_50": float(np.mean(history[-50:])) if history else None}
    if val_vols:
        metrics.update(evaluate_fusion(network, val_vols, cfg.cutout_size, cfg.spacing))
        metrics["validation_phantoms"] = [v.name for v in val_vols]
    log(f"held-out fusion: {metrics}")
    cmd = command or "python -m spineps_like.training.instance " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return write_model_folder(Path(cfg.out), network, cfg, step=step, metrics=metrics, command=cmd,
                              seconds=time.time() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m spineps_like.training.instance --out FOLDER [--steps N] [--seed S] ...``."""
    d = TrainConfig(out="")
    p = argparse.ArgumentParser(prog="python -m spineps_like.training.instance", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--phantoms", type=int, default=d.phantoms, help="training phantoms")
    p.add_argument("--val-phantoms", type=int, default=d.val_phantoms, help="held-out phantoms")
    p.add_argument("--spacing", type=float, nargs=3, default=d.spacing, metavar=("P", "I", "R"))
    p.add_argument("--cutout-size", type=int, nargs=3, default=d.cutout_size, metavar=("P", "I", "R"))
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--work", default=None, help="training-state folder (default <out>.train)")
    p.add_argument("--no-resume", action="store_true", help="start over even if <out>.train/state.pt exists")
    a = p.parse_args(argv)
    cfg = TrainConfig(out=a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, phantoms=a.phantoms,
                      val_phantoms=a.val_phantoms, spacing=tuple(a.spacing), cutout_size=tuple(a.cutout_size),
                      dim=a.dim, seed=a.seed, threads=a.threads, checkpoint_every=a.checkpoint_every,
                      val_every=a.val_every, work=a.work)
    try:
        train(cfg, resume=not a.no_resume, log=lambda m: print(m, flush=True))
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
