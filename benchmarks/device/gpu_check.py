#!/usr/bin/env python3
"""The GPU path, proven in one call of a lent device machine (issue 31, part 3).

On phantoms (lumbar, whole spine and cervical T2w, lumbar CT) the pipeline (:func:`spineps_like.pipeline.segment`)
runs on the CPU (fp32: the reference) and on CUDA with the ``amp`` switch off and on, and this script reports:

* per-label Dice of every CUDA mask (semantic and instance) against the CPU mask of the same case (target >= 0.999),
  and whether a second CUDA run of the same scan gives the same masks;
* seconds per phase, model loads, and the first CUDA call (cuDNN autotuning) apart;
* peak GPU memory per scan (``torch.cuda.max_memory_allocated``; reserved too);
* the same at SPINEPS' published network widths: random-weight model folders built here with the project's own
  builders (nnU-Net's default PlainConvUNet widths 32..320 with two convolutions per stage on both sides, on the
  bundled semantic model's tile geometry and label set; the instance ``Unet3D(dim=16)``). Random weights give a
  meaningless semantic mask, so at these widths the semantic phase runs alone and the instance phase runs from the
  phantom's true semantic mask;
* one end-to-end CLI run on CUDA (NIfTI in, SPINEPS-named files out) and the project's device tests (pytest).

What ``amp`` switches: on CUDA, nnU-Net autocasts the semantic network to fp16 whatever is asked (and the sliding
window accumulates in fp16, spineps_like/models/nnunet.py); ``amp`` switches the instance network's fp16 autocast.
On the CPU ``amp`` is bfloat16 for both (``--cpu-amp`` adds that run; the reference is always fp32).

Results go to ``--out-dir`` (``gpu_check.json``, ``gpu_check.md``, the CLI run's snapshot PNG) and to ``--out``
(``PATH.json`` + ``PATH.md``; default ``benchmarks/results/gpu_check_<device>``), rewritten after every step so that a
run stopped at its time limit still leaves what it measured. Steps left when ``--budget-s`` is spent are skipped,
each with a line saying so.

    bash benchmarks/device/run_gpu_check.sh                                    # on the device machine (README.md)
    .venv/bin/python benchmarks/device/gpu_check.py --devices cpu --quick      # here: CUDA parts skipped, said so
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:  # runs from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

#: Phantoms: name -> make_phantom arguments (development-set seeds, spineps_like.phantom_sets; random orientation)
CASES: dict[str, dict] = {
    "lumbar-t2w": {"seed": 900_011, "fov": "lumbar", "mode": "t2w"},
    "whole-t2w": {"seed": 900_012, "fov": "whole", "mode": "t2w"},
    "cervical-t2w": {"seed": 900_013, "fov": "cervical", "mode": "t2w"},
    "lumbar-ct": {"seed": 900_014, "fov": "lumbar", "mode": "ct"},
}
QUICK_CASES = ("lumbar-ct",)
DICE_TARGET = 0.999
#: The project's tests that touch devices (grep -l 'cuda\|device' tests/*.py): the device settings' checks and the
#: batched sliding window against nnU-Net's; none of them needs TPTBox, DICOM or SimpleITK
TESTS = ["tests/test_semantic.py", "tests/test_bad_inputs.py"]
TESTS_K = "batched_sliding_window or device or cuda"

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------- environment
def ensure_simpleitk() -> str:
    """The real SimpleITK when it imports, else the stand-in of benchmarks/device/stubs (see its docstring)."""
    try:
        import SimpleITK  # noqa: F401

        return "real" if not getattr(SimpleITK, "STUB", False) else "stand-in (benchmarks/device/stubs)"
    except ImportError:
        sys.path.append(str(HERE / "stubs"))
        import SimpleITK  # noqa: F401

        return "stand-in (benchmarks/device/stubs): the real wheel is not carried"


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (+ local changes)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(sitk: str) -> dict:
    import torch

    env = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "simpleitk": sitk,
        "packages": {d: _version(d) for d in ("numpy", "scipy", "scikit-image", "nnunetv2", "dynamic-network-architectures",
                                              "nibabel", "connected-components-3d", "fastremap", "edt", "fill-voids",
                                              "acvl-utils", "blosc2", "batchgenerators", "matplotlib", "pytest")},
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update({"gpu": torch.cuda.get_device_name(0), "gpu_capability": f"{p.major}.{p.minor}",
                    "gpu_memory_gib": round(p.total_memory / 2**30, 1), "gpu_multiprocessors": p.multi_processor_count,
                    "cudnn": torch.backends.cudnn.version()})
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = f"not run ({type(e).__name__})"
    return env


def device_slug(env: dict) -> str:
    name = env.get("gpu") or "cpu-only"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---------------------------------------------------------------- models
def spineps_width_models(folder: Path) -> dict[str, Path]:
    """Random-weight model folders as wide as SPINEPS' published networks, built with the project's own builders.

    Semantic: the bundled default model's folder (config, labels, normalisation, tile geometry) with its PlainConvUNet
    widened to nnU-Net's default 3d_fullres widths (32, 64, ..., capped at 320) and two convolutions per stage in
    the encoder and the decoder, random weights (``build_network``), manifest rewritten. Instance: the bundled
    instance folder's config with a random ``Unet3D(dim=16)`` (SPINEPS' published instance network) saved as a
    Lightning checkpoint (``lightning_checkpoint``)."""
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from spineps_like.instance.network import Unet3D, lightning_checkpoint
    from spineps_like.models import find_model
    from spineps_like.models.manifest import write_manifest
    from spineps_like.models.nnunet import build_network, checkpoint_path, load_checkpoint
    from spineps_like.pipeline import DEFAULT_INSTANCE_MODEL, DEFAULT_SEMANTIC_MODEL

    src = find_model(DEFAULT_SEMANTIC_MODEL)
    sem = folder / "spineps-width-semantic"
    shutil.copytree(src.path, sem, dirs_exist_ok=False)
    nn_dir = sem / src.nnunet_dir.relative_to(src.path)
    plans = json.loads((nn_dir / "plans.json").read_text())
    dataset = json.loads((nn_dir / "dataset.json").read_text())
    conf_name = next(iter(plans["configurations"]))
    for conf in plans["configurations"].values():
        arch = conf.get("architecture", {}).get("arch_kwargs")
        if arch is None:
            continue
        n = int(arch["n_stages"])
        arch["features_per_stage"] = [min(320, 32 * 2**i) for i in range(n)]
        arch["n_conv_per_stage"] = [2] * n
        arch["n_conv_per_stage_decoder"] = [2] * (n - 1)
    (nn_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    pm = PlansManager(plans)
    torch.manual_seed(0)
    net = build_network(pm, pm.get_configuration(conf_name), dataset)
    for fold_dir in sorted(nn_dir.glob("fold_*")):
        ck_path = checkpoint_path(nn_dir, fold_dir.name[len("fold_"):], None)
        ck = load_checkpoint(ck_path)
        ck["network_weights"] = net.state_dict()
        torch.save(ck, ck_path)
    write_manifest(sem)

    ins_src = find_model(DEFAULT_INSTANCE_MODEL).path
    ins = folder / "spineps-width-instance"
    ins.mkdir()
    shutil.copy(ins_src / "inference_config.json", ins / "inference_config.json")
    torch.manual_seed(1)
    unet = Unet3D(dim=16, dim_mults=(1, 2, 4, 8), channels=10, out_dim=4)
    torch.save(lightning_checkpoint(unet, hyper_parameters={"dim": 16, "num_channels": 10}), ins / "instance_weights.ckpt")
    write_manifest(ins)
    return {"semantic": sem, "instance": ins,
            "semantic_features": plans["configurations"][conf_name]["architecture"]["arch_kwargs"]["features_per_stage"],
            "semantic_parameters": sum(p.numel() for p in net.parameters()),
            "instance_parameters": sum(p.numel() for p in unet.parameters())}


def load_models(widths: str, device: str, paths: dict) -> tuple[object, object, dict]:
    """(semantic model, instance model, load seconds) for a model set on ``device``."""
    import warnings

    from spineps_like.instance.network import load_instance_model
    from spineps_like.models import find_model, load_semantic_model
    from spineps_like.pipeline import DEFAULT_INSTANCE_MODEL, DEFAULT_SEMANTIC_MODEL

    sem_src = DEFAULT_SEMANTIC_MODEL if widths == "bundled" else paths["semantic"]
    ins_src = find_model(DEFAULT_INSTANCE_MODEL).path if widths == "bundled" else paths["instance"]
    t = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tic = time.perf_counter()
        sem = load_semantic_model(sem_src, device=device)
        t["load_semantic_model"] = time.perf_counter() - tic
        tic = time.perf_counter()
        ins = load_instance_model(ins_src, device=device)
        t["load_instance_model"] = time.perf_counter() - tic
    return sem, ins, t


# ---------------------------------------------------------------- runs
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_one(phantom, stage: str, device: str, amp: bool, sem_model, ins_model, step_size) -> tuple[dict, dict]:
    """One segment call; returns (row, masks). ``stage``: 'pipeline' (both phases), 'semantic' (semantic phase alone)
    or 'instance' (instance phase from the phantom's true semantic mask)."""
    import warnings

    import numpy as np
    import torch

    from spineps_like.pipeline import segment

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    kw = dict(device=device, amp=amp, step_size=step_size)
    tic = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if stage == "pipeline":
            r = segment(phantom.image, semantic_model=sem_model, instance_model=ins_model, **kw)
        elif stage == "semantic":
            r = segment(phantom.image, semantic_model=sem_model, semantic_only=True, **kw)
        else:
            sem = type(phantom.image)(np.asarray(phantom.semantic.array).astype(np.uint8), phantom.image.affine)
            r = segment(phantom.image, semantic_mask=sem, instance_model=ins_model, **kw)
    _sync(device)
    total = time.perf_counter() - tic
    row = {"total_s": round(total, 3), "phases_s": {k: round(v, 3) for k, v in r.timings.items()},
           "semantic_steps_s": r.settings.get("semantic_timings_s", {})}
    if cuda:
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        row["peak_gpu_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    masks = {"semantic": np.asarray(r.semantic.array)}
    if r.instance is not None:
        masks["instance"] = np.asarray(r.instance.array)
        row["vertebrae"] = len(getattr(r.labeling, "order", []) or [])
        row["flags"] = list(r.flags)
    return row, masks


def dice_per_label(a, b) -> dict:
    """Per-label Dice of two label arrays on one grid (labels present in either), the lowest, and voxels differing."""
    import numpy as np

    a = np.asarray(a).ravel().astype(np.int64, copy=False)
    b = np.asarray(b).ravel().astype(np.int64, copy=False)
    if a.shape != b.shape:
        return {"error": f"shapes differ: {a.shape} vs {b.shape}"}
    k = int(max(a.max(initial=0), b.max(initial=0))) + 1
    ca, cb = np.bincount(a, minlength=k), np.bincount(b, minlength=k)
    same = a == b
    inter = np.bincount(a[same], minlength=k)
    dice = {}
    for lab in np.flatnonzero((ca + cb) > 0):
        if lab == 0:
            continue
        dice[int(lab)] = round(float(2 * inter[lab] / (ca[lab] + cb[lab])), 6)
    worst = min(dice, key=dice.get) if dice else None
    return {"dice": dice, "min_dice": dice[worst] if worst is not None else 1.0, "min_label": worst,
            "below_target": sorted(lab for lab, d in dice.items() if d < DICE_TARGET),
            "voxels_differing": int((~same).sum()), "fraction_differing": float((~same).mean())}


def config_name(device: str, amp: bool) -> str:
    if device.startswith("cuda"):
        return f"{device} amp {'on' if amp else 'off'}"
    return f"{device} {'bf16 amp' if amp else 'fp32'}"


# ---------------------------------------------------------------- report
class Report:
    def __init__(self, args, env: dict):
        self.args = args
        self.data = {"environment": env, "settings": {k: v for k, v in vars(args).items()}, "dice_target": DICE_TARGET,
                     "models": {}, "phantoms": {}, "loads": [], "runs": [], "agreement": [], "repeatability": [],
                     "cli": None, "tests": None, "skipped": [], "errors": []}
        slug = device_slug(env)
        self.data["device_slug"] = slug
        self.paths = []
        if args.out_dir:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            self.paths.append(Path(args.out_dir) / "gpu_check")
        # default: benchmarks/results/gpu_check_<device> with a GPU; a CPU-only run names --out or --out-dir itself
        out = args.out if args.out is not None else (ROOT / "benchmarks" / "results" / f"gpu_check_{slug}"
                                                     if env.get("gpu") or not args.out_dir else None)
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            self.paths.append(Path(str(out).removesuffix(".json").removesuffix(".md")))

    def skip(self, what: str) -> None:
        say(f"SKIPPED: {what}")
        self.data["skipped"].append(what)

    def error(self, what: str, exc: BaseException) -> None:
        line = f"{what}: {type(exc).__name__}: {exc}"
        say(f"ERROR: {line}")
        traceback.print_exc()
        self.data["errors"].append(line)

    def verdict(self) -> dict:
        v = {}
        for widths in ("bundled", "spineps"):
            rows = [a for a in self.data["agreement"] if a["widths"] == widths and a["config"].startswith("cuda")]
            if not rows:
                v[widths] = "not measured"
                continue
            worst = min(min(a[m]["min_dice"] for m in ("semantic", "instance") if m in a) for a in rows)
            ok = worst >= DICE_TARGET
            rep = [r for r in self.data["repeatability"] if r["widths"] == widths and r["config"].startswith("cuda")]
            v[widths] = (f"{'PASS' if ok else 'FAIL'}: lowest per-label Dice CUDA vs CPU {worst:.6f} over {len(rows)} "
                         f"comparisons; same scan twice on CUDA: {sum(r['identical'] for r in rep)} of {len(rep)} "
                         "identical" + (" (random weights: near-ties make this informative only)"
                                        if widths == "spineps" else ""))
        return v

    def write(self) -> None:
        self.data["verdict"] = self.verdict()
        self.data["elapsed_s"] = round(time.perf_counter() - T0, 1)
        md = self.markdown()
        for p in self.paths:
            p.with_suffix(".json").write_text(json.dumps(self.data, indent=1, default=str))
            p.with_suffix(".md").write_text(md)

    def markdown(self) -> str:
        d, env = self.data, self.data["environment"]
        dev = env.get("gpu") or "no CUDA device (CPU only)"
        L = [f"# GPU check: {dev}", "",
             f"Written by `benchmarks/device/gpu_check.py` (issue 31, part 3) on {env['date_utc']} UTC, commit "
             f"{env['commit']}, in {d['elapsed_s']} s.", "",
             f"- Python {env['python']}, torch {env['torch']} (CUDA build {env['torch_cuda_build']}), "
             f"{env['cpu_count']} CPUs ({env['torch_threads']} torch threads); SimpleITK: {env['simpleitk']}",
             ]
        if env.get("gpu"):
            L.append(f"- GPU: {env['gpu']}, compute capability {env['gpu_capability']}, {env['gpu_memory_gib']} GiB, "
                     f"{env['gpu_multiprocessors']} SMs, cuDNN {env['cudnn']}; nvidia-smi: {env.get('nvidia_smi')}")
        L.append("- packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v))
        L.append(f"- settings: {json.dumps({k: v for k, v in d['settings'].items() if k not in ('out', 'out_dir')})}")
        L += ["", "## Verdict", ""]
        for widths, line in d["verdict"].items():
            L.append(f"- {widths} networks: {line} (target >= {DICE_TARGET} on every label of every mask)")
        L += ["", "On CUDA nnU-Net autocasts the semantic network to fp16 whatever `amp` says (and accumulates the "
              "sliding window in fp16); `amp` switches the instance network's fp16 autocast. The CPU reference is "
              "fp32.", ""]
        if d["models"]:
            m = d["models"]
            L += ["## Networks", "",
                  f"- bundled: semantic `{m.get('bundled_semantic')}` (PlainConvUNet 8..64), instance "
                  f"`{m.get('bundled_instance')}` (Unet3D dim=8)."]
            if m.get("semantic_features"):
                L += [f"- SPINEPS widths (random weights, built by this script): semantic PlainConvUNet features "
                  f"{m.get('semantic_features')}, 2 convolutions per stage both sides, {m.get('semantic_parameters'):,} "
                  f"parameters, on the bundled model's tile geometry and labels; instance Unet3D(dim=16), "
                  f"{m.get('instance_parameters'):,} parameters. At these widths the semantic phase runs alone and "
                  "the instance phase from the phantom's true semantic mask."]
            L.append("")
        if d["phantoms"]:
            L += ["## Phantoms", "", "| case | seed | fov | mode | shape | spacing mm | orientation |", "|---|---|---|---|---|---|---|"]
            for name, p in d["phantoms"].items():
                L.append(f"| {name} | {p['seed']} | {p['fov']} | {p['mode']} | {' x '.join(map(str, p['shape']))} | "
                         f"{', '.join(f'{s:.2f}' for s in p['spacing'])} | {p['orientation']} |")
            L.append("")
        if d["loads"]:
            L += ["## Model loads (s)", "", "| networks | config | semantic | instance |", "|---|---|---|---|"]
            for r in d["loads"]:
                L.append(f"| {r['widths']} | {r['config']} | {r['load_semantic_model']:.2f} | {r['load_instance_model']:.2f} |")
            L.append("")
        if d["runs"]:
            L += ["## Seconds per scan and peak GPU memory", "",
                  "`semantic` is the whole semantic phase, `predict` its nnU-Net part (preprocessing + sliding window), "
                  "`instance net` the instance network over all cutouts; `rest` is everything else (resampling, "
                  "clean-up, fusion, assignment, post-processing, labelling, measurements). `first call` is the first "
                  "scan after the models were loaded on CUDA (cuDNN autotuning), not counted in the rows.", "",
                  "| networks | stage | config | case | total s | semantic s | predict s | instance net s | rest s | "
                  "peak GPU MiB (reserved) | vertebrae |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in d["runs"]:
                ph, st = r["phases_s"], r["semantic_steps_s"]
                sem, net = ph.get("semantic", 0.0), ph.get("network", 0.0)
                rest = r["total_s"] - sem - net - ph.get("load_instance_model", 0) - ph.get("load_semantic_model", 0)
                mem = f"{r['peak_gpu_mib']:.0f} ({r['peak_gpu_reserved_mib']:.0f})" if "peak_gpu_mib" in r else "-"
                L.append(f"| {r['widths']} | {r['stage']} | {r['config']} | {r['case']} | {r['total_s']:.2f} | "
                         f"{sem:.2f} | {st.get('predict', 0.0):.2f} | {net:.2f} | {rest:.2f} | {mem} | "
                         f"{r.get('vertebrae', '-')} |")
            firsts = [r for r in d["runs"] if r.get("first_call_s") is not None]
            if firsts:
                L += ["", "First call after loading: " + "; ".join(
                    f"{r['widths']} {r['stage']} {r['config']} {r['case']} {r['first_call_s']:.2f} s" for r in firsts)]
            L.append("")
        if d["agreement"]:
            L += ["## CUDA (and CPU bf16) masks against the CPU fp32 masks", "",
                  "| networks | stage | config | case | semantic: lowest Dice (label) | semantic labels < target | "
                  "instance: lowest Dice (id) | instance ids < target | voxels differing (sem / inst) |",
                  "|---|---|---|---|---|---|---|---|---|"]
            for a in d["agreement"]:
                s, i = a.get("semantic", {}), a.get("instance")
                cell = (lambda x: f"{x['min_dice']:.6f} ({x['min_label']})" if x and "min_dice" in x else "-")
                L.append(f"| {a['widths']} | {a['stage']} | {a['config']} | {a['case']} | {cell(s)} | "
                         f"{s.get('below_target', '-')} | {cell(i)} | {i.get('below_target', '-') if i else '-'} | "
                         f"{s.get('voxels_differing', '-')} / {i.get('voxels_differing', '-') if i else '-'} |")
            L.append("")
        if d["repeatability"]:
            L += ["## Same scan twice (first call and timed call)", ""]
            for r in d["repeatability"]:
                L.append(f"- {r['widths']} {r['stage']} {r['config']} {r['case']}: "
                         f"{'identical masks' if r['identical'] else 'masks differ: ' + json.dumps(r['differing'])}")
            L.append("")
        if d["cli"]:
            c = d["cli"]
            L += ["## CLI run", "", f"`{c['command']}`: exit {c['rc']} in {c['seconds']:.1f} s; files: "
                  f"{', '.join(c.get('files', [])) or 'none'}", ""]
            if c.get("stderr_tail"):
                L += ["```", c["stderr_tail"], "```", ""]
        if d["tests"]:
            t = d["tests"]
            L += ["## Device tests (pytest)", "", f"`{t['command']}`: exit {t['rc']} in {t['seconds']:.1f} s", "",
                  "```", t["tail"], "```", ""]
        if d["skipped"]:
            L += ["## Skipped", ""] + [f"- {s}" for s in d["skipped"]] + [""]
        if d["errors"]:
            L += ["## Errors", ""] + [f"- {e}" for e in d["errors"]] + [""]
        return "\n".join(L)


# ---------------------------------------------------------------- steps
def crop_si(phantom, fraction: float):
    """The phantom's middle ``fraction`` along its inferior-superior axis (image and both masks; for a quick run)."""
    from types import SimpleNamespace

    import numpy as np

    from spineps_like.io import Scan

    ax = next(i for i, c in enumerate(phantom.image.orientation) if c in "SI")
    n = phantom.image.shape[ax]
    keep = min(n, max(16, int(round(n * fraction))))
    start = (n - keep) // 2
    box = [slice(None)] * 3
    box[ax] = slice(start, start + keep)
    shift = np.eye(4)
    shift[ax, 3] = start
    affine = phantom.image.affine @ shift

    def cut(scan):
        return Scan(np.ascontiguousarray(np.asarray(scan.array)[tuple(box)]), affine)

    return SimpleNamespace(image=cut(phantom.image), semantic=cut(phantom.semantic), instance=cut(phantom.instance))


def make_phantoms(names: list[str], crop: float | None, report: Report) -> dict:
    from spineps_like.phantom import make_phantom

    out = {}
    for name in names:
        tic = time.perf_counter()
        p = make_phantom(**CASES[name])
        if crop is not None and crop < 1:
            p = crop_si(p, crop)
        out[name] = p
        report.data["phantoms"][name] = {**CASES[name], "crop_si": crop, "shape": list(p.image.shape),
                                         "spacing": [float(s) for s in p.image.spacing],
                                         "orientation": "".join(p.image.orientation),
                                         "seconds": round(time.perf_counter() - tic, 2)}
        say(f"phantom {name}: shape {p.image.shape} in {time.perf_counter() - tic:.1f} s")
    return out


def run_set(widths: str, stages: list[str], configs: list[tuple[str, bool]], phantoms: dict, paths: dict,
            report: Report, masks: dict, args, cpu_cases: list[str] | None = None) -> None:
    """All configs of one network set; the CPU fp32 reference is whichever config is ('cpu', False)."""
    for device, amp in configs:
        cfg = config_name(device, amp)
        cases = list(phantoms) if not (device == "cpu" and cpu_cases is not None) else cpu_cases
        if time.perf_counter() - T0 > args.budget_s:
            report.skip(f"{widths} networks, {cfg}: time budget ({args.budget_s} s) spent")
            continue
        try:
            sem, ins, t = load_models(widths, device, paths)
        except Exception as e:  # noqa: BLE001 - reported, the next config still runs
            report.error(f"{widths} {cfg}: loading the models", e)
            continue
        report.data["loads"].append({"widths": widths, "config": cfg, **{k: round(v, 3) for k, v in t.items()}})
        say(f"{widths} {cfg}: models loaded in {sum(t.values()):.1f} s")
        for stage in stages:
            # per stage (each stage's networks autotune on their first call); every compared config, not the reference
            first = device != "cpu"
            for case in cases:
                if time.perf_counter() - T0 > args.budget_s:
                    report.skip(f"{widths} {stage} {cfg} {case}: time budget ({args.budget_s} s) spent")
                    continue
                try:
                    first_s = None
                    if first:  # cuDNN autotuning and lazy CUDA set-up: timed apart, masks kept to test repeatability
                        tic = time.perf_counter()
                        _, m0 = run_one(phantoms[case], stage, device, amp, sem, ins, args.step_size)
                        first_s = round(time.perf_counter() - tic, 3)
                    row, m = run_one(phantoms[case], stage, device, amp, sem, ins, args.step_size)
                except Exception as e:  # noqa: BLE001
                    report.error(f"{widths} {stage} {cfg} {case}", e)
                    report.write()
                    continue
                if first:
                    same = {k: bool((m0[k] == m[k]).all()) for k in m}
                    report.data["repeatability"].append({
                        "widths": widths, "stage": stage, "config": cfg, "case": case, "identical": all(same.values()),
                        "differing": {k: int((m0[k] != m[k]).sum()) for k in m if not same[k]}})
                    first = False
                report.data["runs"].append({"widths": widths, "stage": stage, "config": cfg, "case": case,
                                            "first_call_s": first_s, **row})
                masks[(widths, stage, cfg, case)] = m
                extra = f", peak GPU {row['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in row else ""
                say(f"{widths} {stage} {cfg} {case}: {row['total_s']:.2f} s{extra}")
                report.write()
        del sem, ins
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
    compare(widths, masks, report)
    report.write()


def compare(widths: str, masks: dict, report: Report) -> None:
    """Dice of every non-reference config against the CPU fp32 reference, per stage and case (once each)."""
    ref_cfg = config_name("cpu", False)
    done = {(a["widths"], a["stage"], a["config"], a["case"]) for a in report.data["agreement"]}
    for (w, stage, cfg, case), m in masks.items():
        if w != widths or cfg == ref_cfg or (w, stage, cfg, case) in done:
            continue
        ref = masks.get((w, stage, ref_cfg, case))
        if ref is None:
            continue
        row = {"widths": w, "stage": stage, "config": cfg, "case": case}
        for k in m:
            if k in ref:
                row[k] = dice_per_label(ref[k], m[k])
        report.data["agreement"].append(row)
        s, i = row.get("semantic", {}), row.get("instance")
        say(f"{w} {stage} {cfg} {case} vs CPU fp32: semantic lowest Dice {s.get('min_dice')}"
            + (f", instance lowest Dice {i.get('min_dice')}" if i else ""))


def cli_run(phantom, report: Report, args, device: str, ct: bool = False) -> None:
    """``segment`` as a user runs it: a fresh process, a NIfTI file in, SPINEPS-named files out, on ``device``."""
    from spineps_like.io import save_scan

    work = Path(tempfile.mkdtemp(prefix="gpu_check_cli_"))
    nii = work / f"sub-gpucheck_{'ct' if ct else 'T2w'}.nii.gz"  # the BIDS suffix tells the measurements the modality
    save_scan(phantom.image, nii)
    out = work / "out"
    code = ("import sys; sys.argv[0] = 'spineps-like'; from spineps_like.cli import main; raise SystemExit(main())")
    cmd = [sys.executable, "-c", code, "segment", str(nii), "--out", str(out), "--device", device, "--amp",
           "--allow-implausible"]
    tic = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cli_timeout_s, env=_child_env())
    files = sorted(f.name for f in out.rglob("*") if f.is_file()) if out.exists() else []
    report.data["cli"] = {"command": f"spineps-like segment {nii.name} --out out --device {device} --amp "
                                     "--allow-implausible",
                          "rc": p.returncode, "seconds": round(time.perf_counter() - tic, 2), "files": files,
                          "stderr_tail": "\n".join(p.stderr.strip().splitlines()[-8:])}
    say(f"CLI segment on {device}: exit {p.returncode}, {len(files)} files")
    if args.out_dir:
        for f in out.rglob("*_snp.png"):
            shutil.copy(f, Path(args.out_dir) / "gpu_check_cli_snapshot.png")
    shutil.rmtree(work, ignore_errors=True)


def _child_env() -> dict:
    env = dict(os.environ)
    parts = [str(ROOT)] + ([p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    import SimpleITK

    if getattr(SimpleITK, "STUB", False):
        parts.append(str(HERE / "stubs"))
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_tests(report: Report, args) -> None:
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        report.skip("device tests: pytest is not installed here")
        return
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *TESTS, "-k", TESTS_K]
    tic = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.tests_timeout_s, env=_child_env())
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    tail = "\n".join(out.strip().splitlines()[-15:])
    report.data["tests"] = {"command": f"python -m pytest -q -x {' '.join(TESTS)} -k '{TESTS_K}'", "rc": rc,
                            "seconds": round(time.perf_counter() - tic, 1), "tail": tail}
    say(f"device tests: exit {rc}: {tail.splitlines()[-1] if tail else ''}")


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cpu,cuda",
                    help="comma-separated: cpu (the fp32 reference), cuda or cuda:N; cpu:0 runs the CPU again as a "
                         "compared config (checks the comparison and repeatability steps without a GPU)")
    ap.add_argument("--cases", default=None, help=f"comma-separated of {', '.join(CASES)} (default: all; --quick: "
                                                   f"{', '.join(QUICK_CASES)})")
    ap.add_argument("--widths", default="bundled,spineps", help="network sets: bundled, spineps (SPINEPS' widths)")
    ap.add_argument("--cuda-amp", default="off,on", help="amp settings for CUDA runs")
    ap.add_argument("--cpu-amp", action="store_true",
                    help="also run the CPU with bf16 amp, compared like CUDA (very slow on CPUs without native bf16)")
    ap.add_argument("--spineps-cpu-cases", type=int, default=None,
                    help="CPU reference at SPINEPS' widths for the first N cases only (the costliest runs)")
    ap.add_argument("--step-size", type=float, default=None, help="sliding-window step (default: the model's)")
    ap.add_argument("--quick", action="store_true",
                    help="small dry run: one phantom cut to its middle 40%% (inferior-superior), no CLI run")
    ap.add_argument("--crop", type=float, default=None,
                    help="keep this fraction of every phantom's inferior-superior extent (default: all; --quick 0.4)")
    ap.add_argument("--no-tests", action="store_true", help="skip the pytest step")
    ap.add_argument("--no-cli", action="store_true", help="skip the CLI run")
    ap.add_argument("--cli-device", default=None,
                    help="device of the CLI run (default: the first CUDA device; none without one or with --quick)")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="seconds after which the remaining runs are skipped (each said so); default 300")
    ap.add_argument("--tests-timeout-s", type=float, default=150.0)
    ap.add_argument("--cli-timeout-s", type=float, default=120.0)
    ap.add_argument("--out-dir", default=os.environ.get("OUT") or None,
                    help="folder for gpu_check.json/.md and the CLI snapshot (default: $OUT when set)")
    ap.add_argument("--out", default=None,
                    help="PATH for PATH.json + PATH.md (default with a GPU: benchmarks/results/gpu_check_<device>)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from spineps_like.runtime import tune_allocator

    tune_allocator()  # as the CLI and cohort workers do, before torch is imported (README: "tune_allocator")
    sitk = ensure_simpleitk()
    import torch

    env = environment(sitk)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    report = Report(args, env)
    from spineps_like.pipeline import DEFAULT_INSTANCE_MODEL, DEFAULT_SEMANTIC_MODEL

    report.data["models"] = {"bundled_semantic": DEFAULT_SEMANTIC_MODEL, "bundled_instance": DEFAULT_INSTANCE_MODEL}
    say(f"python {env['python']}, torch {env['torch']}, CUDA available: {env['cuda_available']}"
        + (f", GPU {env['gpu']}" if env.get("gpu") else "") + f"; SimpleITK: {sitk}")
    want_cuda = any(d.startswith("cuda") for d in devices)
    cuda_devices = [d for d in devices if d.startswith("cuda")]
    if want_cuda and not torch.cuda.is_available():
        report.skip(f"CUDA runs ({', '.join(cuda_devices)}): torch.cuda.is_available() is False here "
                    f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")
        cuda_devices = []
    elif not want_cuda:
        report.skip("CUDA runs: not asked for (--devices " + args.devices + ")")
    amps = [a.strip() == "on" for a in args.cuda_amp.split(",") if a.strip()]
    configs = ([("cpu", False)] if "cpu" in devices else []) + ([("cpu", True)] if "cpu" in devices and args.cpu_amp
                                                                 else [])
    configs += [(d, False) for d in devices if d.startswith("cpu:")]
    configs += [(d, a) for d in cuda_devices for a in amps]
    names = args.cases.split(",") if args.cases else (list(QUICK_CASES) if args.quick else list(CASES))
    bad = [n for n in names if n not in CASES]
    if bad:
        raise SystemExit(f"unknown case(s) {bad}; use {', '.join(CASES)}")
    widths = [w.strip() for w in args.widths.split(",") if w.strip()]
    report.write()
    masks: dict = {}
    phantoms = make_phantoms(names, args.crop if args.crop is not None else (0.4 if args.quick else None), report)
    report.write()
    if "bundled" in widths:
        run_set("bundled", ["pipeline"], configs, phantoms, {}, report, masks, args)
    cli_device = args.cli_device or (cuda_devices[0] if cuda_devices and not args.quick else None)
    if cli_device and not args.no_cli and time.perf_counter() - T0 > args.budget_s:
        report.skip(f"CLI run: time budget ({args.budget_s} s) spent")
    elif cli_device and not args.no_cli:
        try:
            cli_run(phantoms[names[0]], report, args, cli_device, ct=CASES[names[0]]["mode"] == "ct")
        except Exception as e:  # noqa: BLE001
            report.error("CLI run", e)
        report.write()
    if not args.no_tests and time.perf_counter() - T0 > args.budget_s:
        report.skip(f"device tests: time budget ({args.budget_s} s) spent")
    elif not args.no_tests:
        run_tests(report, args)
        report.write()
    if "spineps" in widths:
        tmp = Path(tempfile.mkdtemp(prefix="gpu_check_models_"))
        try:
            paths = spineps_width_models(tmp)
            report.data["models"].update({k: v for k, v in paths.items() if k not in ("semantic", "instance")})
            # the CUDA runs first, the CPU reference (the costliest) last, so that the budget cuts the CPU cases
            order = [c for c in configs if c[0] != "cpu"] + [c for c in configs if c[0] == "cpu"]
            cpu_cases = names[:args.spineps_cpu_cases] if args.spineps_cpu_cases is not None else None
            run_set("spineps", ["semantic", "instance"], order, phantoms, paths, report, masks, args, cpu_cases)
        except Exception as e:  # noqa: BLE001
            report.error("SPINEPS-width networks", e)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    report.write()
    say("verdict: " + "; ".join(f"{k}: {v}" for k, v in report.data["verdict"].items()))
    say("written: " + ", ".join(str(p) + ".{json,md}" for p in report.paths))
    return 1 if report.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
