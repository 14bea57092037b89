"""Runs inside the SPINEPS 2.1.3 venv (never imports spineps_like). Called by run.py and tests/test_spineps_compat.py.

Sub-commands (each prints one JSON object on the last stdout line):

* ``load SEM_DIR INST_DIR`` — load both exported folders with SPINEPS' own loader (``get_actual_model`` + ``load``).
* ``forward INST_DIR IN_NPY OUT_NPY`` — SPINEPS' loaded instance network on given label cutouts; logits to a .npy.
* ``instance SEMANTIC_MASK INST_DIR OUT_MASK`` — SPINEPS' instance phase (``predict_instance_mask``) on a given
  semantic mask; reports the vertebra instance ids found.
* ``segment IMAGE SEM_DIR INST_DIR OUT_DIR [--mirroring 0|1] [--step-size S] [--threads N] [--semantic-mask M]`` — the phases of
  ``seg_run.segment_image`` in order (pre-processing with N4 off, semantic, instance, post-processing), each timed,
  without the labelling model, centroids or snapshot; writes ``seg-spine.nii.gz`` / ``seg-vert.nii.gz`` on the input grid.

Offline shims (benchmark only): SPINEPS downloads weights by name from GitHub; we only pass folder paths, so nothing
is fetched. ``torchvision`` is removed from the venv (it does not import beside the CPU torch 2.13 wheel); the few
optional imports that reach for it are answered by :func:`_block_torchvision`.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def _block_torchvision() -> None:
    """Make ``torchvision``/``timm`` look absent (``import`` raises ImportError, ``find_spec`` returns None), so the
    optional imports of Lightning/MONAI skip them instead of crashing on a stray binary wheel."""
    for name in ("torchvision", "timm"):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: ``VmHWM`` (per address space, so it starts fresh at exec; Linux's
    ``ru_maxrss`` keeps the forking parent's peak across exec), else ``ru_maxrss``."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _emit(obj: dict) -> None:
    obj["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    print(json.dumps(obj), flush=True)


def _models(sem_dir: str | None, inst_dir: str | None):
    from spineps.get_models import get_actual_model

    out = []
    for d in (sem_dir, inst_dir):
        if d is None:
            out.append(None)
            continue
        m = get_actual_model(d, use_cpu=True)
        m.load()
        out.append(m)
    return out


def cmd_load(sem_dir: str, inst_dir: str) -> dict:
    t0 = time.perf_counter()
    sem, inst = _models(sem_dir, inst_dir)
    net = inst.predictor.network
    discovered = {}
    if os.environ.get("SPINEPS_SEGMENTOR_MODELS"):  # SPINEPS' own discovery by name
        from spineps.get_models import check_available_models

        found = check_available_models(os.environ["SPINEPS_SEGMENTOR_MODELS"], verbose=False)
        discovered = {"semantic": sorted(k for k, v in found[0].items() if not str(v).startswith("http")),
                      "instance": sorted(k for k, v in found[1].items() if not str(v).startswith("http"))}
    return {
        "discovered": discovered,
        "seconds": time.perf_counter() - t0,
        "semantic": {"class": type(sem).__name__, "labels": sem.inference_config.segmentation_labels,
                     "folds": len(sem.predictor.list_of_parameters),
                     "modalities": [m.name for m in sem.inference_config.modalities]},
        "instance": {"class": type(inst).__name__, "plnet": type(inst.predictor).__module__,
                     "channels": int(net.channels), "cutout_size": list(inst.inference_config.cutout_size),
                     "n_parameters": int(sum(p.numel() for p in net.parameters())),
                     "modalities": [m.name for m in inst.inference_config.modalities]},
    }


def cmd_forward(inst_dir: str, in_npy: str, out_npy: str) -> dict:
    """SPINEPS' loaded instance network on given cutouts of mapped labels (B, P, I, R): logits saved to ``out_npy``."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    (inst,) = _models(None, inst_dir)[1:]
    net = inst.predictor.network
    labels = torch.from_numpy(np.load(in_npy).astype(np.int64))
    labels[labels >= net.channels] = 0
    x = F.one_hot(labels, net.channels).permute(0, 4, 1, 2, 3).float()
    with torch.inference_mode():
        logits = inst.predictor.forward(x).float().numpy()
    np.save(out_npy, logits)
    return {"shape": list(logits.shape), "plnet": type(inst.predictor).__module__}


def cmd_instance(mask_path: str, inst_dir: str, out_mask: str) -> dict:
    import numpy as np
    from TPTBox import NII

    from spineps.phase_instance import predict_instance_mask

    (inst,) = _models(None, inst_dir)[1:]
    seg = NII.load(mask_path, seg=True)
    t0 = time.perf_counter()
    vert, err = predict_instance_mask(seg.copy(), inst, debug_data={}, verbose=False)
    seconds = time.perf_counter() - t0
    ids = [] if vert is None else [int(i) for i in np.unique(vert.get_seg_array()) if i != 0]
    if vert is not None:
        vert.save(out_mask, verbose=False)
    return {"errcode": str(err), "vertebra_ids": ids, "n_vertebrae": len(ids), "seconds": seconds}


def cmd_segment(image: str, sem_dir: str, inst_dir: str, out_dir: str, *, mirroring: bool, step_size: float | None,
                threads: int, semantic_mask: str | None = None) -> dict:
    import torch
    from TPTBox import NII, Location

    from spineps.phase_instance import predict_instance_mask
    from spineps.phase_post import phase_postprocess_combined
    from spineps.phase_pre import preprocess_input
    from spineps.phase_semantic import predict_semantic_mask
    from spineps.seg_enums import ErrCode, Modality

    timings: dict[str, float] = {}
    t = time.perf_counter()
    sem, inst = _models(None if semantic_mask else sem_dir, inst_dir)
    if sem is not None:
        sem.set_test_time_augmentation(mirroring)
    torch.set_num_threads(threads)  # TPTBox' load_inf_model set it to all cores; both sides get the same
    timings["load_models"] = time.perf_counter() - t
    t = time.perf_counter()
    input_nii = NII.load(image, seg=False)
    input_orig = input_nii.copy()
    timings["load"] = time.perf_counter() - t
    from spineps.utils.seg_modelconfig import DEFAULT_METAL, DEFAULT_SACRUM_IDS

    is_ct = sem is not None and Modality.CT in sem.modalities()
    has_c1 = bool(sem.inference_config.has_c1) if sem is not None else False
    sacrum_ids = sem.inference_config.sacrum_ids if sem is not None else DEFAULT_SACRUM_IDS
    metal_ids = sem.inference_config.metal_ids if sem is not None else DEFAULT_METAL
    if semantic_mask is not None:  # given semantic mask (on the image grid): instance + post-processing only
        seg_nii = NII.load(semantic_mask, seg=True)
    else:
        t = time.perf_counter()
        pre, err = preprocess_input(input_nii, pad_size=4, debug_data={}, proc_crop_input=True,
                                    proc_normalize_input=not is_ct, proc_do_n4_bias_correction=False)
        timings["preprocess"] = time.perf_counter() - t
        if err != ErrCode.OK:
            return {"errcode": str(err), "timings": timings}
        t = time.perf_counter()
        seg_nii, _, err = predict_semantic_mask(pre, sem, debug_data={}, step_size=step_size)
        timings["semantic"] = time.perf_counter() - t
        if err != ErrCode.OK:
            return {"errcode": str(err), "timings": timings}
    t = time.perf_counter()
    vert_nii, err = predict_instance_mask(seg_nii.copy(), inst, debug_data={})
    timings["instance"] = time.perf_counter() - t
    if err != ErrCode.OK or vert_nii is None:
        return {"errcode": str(err), "timings": timings}
    t = time.perf_counter()
    seg_nii[seg_nii == Location.Vertebra_Corpus.value] = Location.Vertebra_Corpus_border.value
    seg_back = seg_nii.resample_from_to(input_orig)
    vert_back = vert_nii.resample_from_to(input_orig)
    seg_clean, vert_clean = phase_postprocess_combined(
        img_nii=input_orig, seg_nii=seg_back, vert_nii=vert_back, model_labeling=None, debug_data={},
        labeling_offset=1, verbose=False, disable_c1=not has_c1,
        sacrum_ids=sacrum_ids, metal_ids=metal_ids)
    timings["postprocess"] = time.perf_counter() - t
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seg_clean.save(out / "seg-spine.nii.gz", verbose=False)
    vert_clean.save(out / "seg-vert.nii.gz", verbose=False)
    return {"errcode": str(err), "timings": timings, "threads": torch.get_num_threads()}


def main(argv: list[str]) -> int:
    _block_torchvision()
    os.environ.setdefault("SPINEPS_NO_CITATION_REMINDER", "1")
    cmd, *args = argv
    if cmd == "load":
        res = cmd_load(*args)
    elif cmd == "forward":
        res = cmd_forward(*args)
    elif cmd == "instance":
        res = cmd_instance(*args)
    elif cmd == "segment":
        import argparse

        p = argparse.ArgumentParser(prog="spineps_worker.py segment")
        p.add_argument("image")
        p.add_argument("sem_dir")
        p.add_argument("inst_dir")
        p.add_argument("out_dir")
        p.add_argument("--mirroring", type=int, default=0)
        p.add_argument("--step-size", type=float, default=None)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--semantic-mask", default=None, help="skip the semantic phase, use this mask")
        a = p.parse_args(args)
        res = cmd_segment(a.image, a.sem_dir, a.inst_dir, a.out_dir, mirroring=bool(a.mirroring),
                          step_size=a.step_size, threads=a.threads, semantic_mask=a.semantic_mask)
    else:
        raise SystemExit(f"unknown sub-command {cmd!r} (load, forward, instance, segment)")
    _emit(res)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
