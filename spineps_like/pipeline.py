"""The whole road, in order: scan -> semantic -> cutouts -> instance -> fusion -> assignment -> postprocess -> outputs.

Each step is a pure function of another module; this module only chains them, carries geometry between them
(:class:`~spineps_like.io.Scan`) and records seconds per phase.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from spineps_like.geometry import bbox, clamp_spacing, oriented_view, reorient, rescale, resample_to
from spineps_like.io import Scan, atomic_write_json, derivative_name, derivatives_dir, load_scan
from spineps_like.labels import VERTEBRA_LABELS, label_mask

#: Bundled model names (folders in models/) used when the caller names none.
DEFAULT_SEMANTIC_MODEL = "semantic-synth-3"
DEFAULT_INSTANCE_MODEL = "instance-phantom"
INSTANCE_METHODS = ("network", "geometric")
#: Phases a ``progress`` callback of :func:`segment` is told about, in order (those that run); the command line adds
#: "writing" before :meth:`SegmentResult.save`.
PROGRESS_PHASES = ("loading", "semantic", "instance", "post-processing", "labelling", "measuring", "writing")
#: Bone labels an instance (vertebra) may cover before assignment: the vertebra labels plus CT aliases.
_BONE_LABELS = tuple(sorted(set(VERTEBRA_LABELS) | {50, 51}))


class Timings(dict):
    """Seconds per phase, in the order the phases ran."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class SegmentResult:
    """What :func:`segment` found: masks on the input grid, ids, per-vertebra flags and timings."""

    image: Scan
    semantic: Scan
    instance: Scan | None = None
    labeling: Any = None  # spineps_like.labeling.LabelingResult
    timings: Timings = field(default_factory=Timings)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    #: what looks implausible in the result (:func:`spineps_like.plausibility.result_flags`); empty when nothing does
    flags: list[str] = field(default_factory=list)
    #: what deserves a look without being implausible (:func:`spineps_like.plausibility.advisories`)
    advisories: list[str] = field(default_factory=list)
    #: per-vertebra, per-disc and per-level measurements (:func:`spineps_like.measure.measure`); None without instances
    measurements: dict[str, Any] | None = None
    #: per-vertebra confidence in the id and the body (:func:`spineps_like.plausibility.vertebra_confidence`)
    confidence: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def vertebra_ids(self) -> list[int]:
        """Vertebra ids present in the instance mask, top to bottom (sacrum last)."""
        if self.labeling is not None:
            return list(self.labeling.order) + ([26] if self.instance is not None and (self.instance.array == 26).any() else [])
        return []

    def summary(self) -> dict[str, Any]:
        """The JSON summary written beside the masks."""
        from spineps_like import __version__

        out: dict[str, Any] = {"spineps_like_version": __version__, "input": str(self.image.path or ""),
                               "shape": list(self.image.shape), "spacing": list(self.image.spacing),
                               "orientation": self.image.orientation, "settings": self.settings}
        src = getattr(self.image, "source", None)
        if src is not None:  # read from DICOM: which series of the folder
            info = src.series
            out["dicom_series"] = {"number": info.number, "description": info.description, "uid": info.uid,
                                   "modality": info.modality, "images": info.images,
                                   "series_in_folder": len(src.all_series) or 1}
        if self.instance is not None:
            from spineps_like.labeling import summary_json

            out.update(summary_json(self.instance.array, self.instance.affine, self.labeling))
            for row in out["vertebrae"]:
                if row["id"] in self.confidence:
                    row["confidence"] = self.confidence[row["id"]]
            from spineps_like.plausibility import summary_entry

            out["plausibility"] = summary_entry(self.flags, self.advisories)
        out["notes"] = list(self.notes)
        out["timings_s"] = {k: round(v, 4) for k, v in self.timings.items()}
        return out

    def save(self, out_dir: str | os.PathLike | None = None, *, name_from: str | os.PathLike | None = None,
             snapshot: bool = True) -> dict[str, Path]:
        """Write SPINEPS-compatible outputs; returns {kind: path}.

        ``out_dir`` defaults to SPINEPS' ``derivatives_seg`` folder for the scan; file names follow
        :func:`~spineps_like.io.derivative_name` (``..._seg-spine_msk.nii.gz``, ``..._seg-vert_msk.nii.gz``,
        ``..._seg-spine_ctd.json``, ``..._seg-spine_snp.png``, ``..._seg-spine_summary.json``). Every file is written
        atomically.
        """
        from contextlib import ExitStack

        from spineps_like.io import atomic_path, save_scan

        src = Path(name_from or self.image.path or "scan.nii.gz")
        folder = Path(out_dir) if out_dir is not None else derivatives_dir(src)
        paths: dict[str, Path] = {"semantic": folder / derivative_name(src, "spine", "msk", ".nii.gz")}
        if self.instance is not None:
            paths["instance"] = folder / derivative_name(src, "vert", "msk", ".nii.gz")
            paths["centroids"] = folder / derivative_name(src, "spine", "ctd", ".json")
        if snapshot:
            paths["snapshot"] = folder / derivative_name(src, "spine", "snp", ".png")
        paths["summary"] = folder / derivative_name(src, "spine", "summary", ".json")
        if self.measurements is not None:
            paths["measurements"] = folder / derivative_name(src, "spine", "measurements", ".json")
            paths["measurements_csv"] = folder / derivative_name(src, "spine", "measurements", ".csv")
        # all files go to temporary names first and are renamed together at the end: an error (or a kill) on the
        # way leaves none of them under its final name
        with self.timings.phase("write"), ExitStack() as stack:
            tmp = {k: stack.enter_context(atomic_path(p)) for k, p in paths.items()}
            save_scan(self.semantic, tmp["semantic"], dtype=np.uint8)
            if self.instance is not None:
                from spineps_like.labeling import write_centroids_json

                save_scan(self.instance, tmp["instance"], dtype=np.uint16 if self.instance.array.max() > 255
                          else np.uint8)
                write_centroids_json(tmp["centroids"], self.instance.array, self.instance.affine)
            summary = self.summary()
            if snapshot:  # the QC picture: names and the summary's flags drawn on the sagittal and coronal planes
                from spineps_like.snapshot import save_snapshot

                save_snapshot(tmp["snapshot"], self.image, self.semantic, self.instance, title=src.name,
                              summary=summary)
            atomic_write_json(tmp["summary"], summary)
            if self.measurements is not None:
                from spineps_like.measure.spine import measurements_table, table_csv

                atomic_write_json(tmp["measurements"], self.measurements)
                tmp["measurements_csv"].write_text(table_csv(measurements_table(self.measurements)))
        return paths


# ---------------------------------------------------------------- phases
def instance_phase(semantic: Scan, *, method: str = "network", model: Any = None, device: str = "cpu",
                   amp: bool = False, batch_size: int = 4, lumbar_count: int | None = None,
                   timings: Timings | None = None, notes: list[str] | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[Scan, Scan, Any]:
    """Semantic mask -> (semantic, instance, labeling) on the semantic mask's grid.

    ``method='network'``: the mask goes to PIR at the instance model's resolution; corpus centres give cutouts,
    the network predicts vertebra above/centre/below per cutout, fusion commits vertebrae, which come back to the
    input grid. ``method='geometric'``: vertebrae from corpus components separated by IVDs, no weights.
    Then, on the input grid in PIR, cropped to the spine's bounding box: IVD/endplate assignment, post-processing,
    the sacrum on evidence (:func:`spineps_like.sacrum.confirm_sacrum`), anatomical labelling. ``progress`` is told
    each phase as it starts ("instance", "post-processing", "labelling").
    """
    from spineps_like.assign import assign_ivds_endplates
    from spineps_like.labeling import label_vertebrae
    from spineps_like.postprocess import postprocess
    from spineps_like.sacrum import confirm_sacrum

    timings = timings if timings is not None else Timings()
    notes = notes if notes is not None else []
    tell = progress or (lambda phase: None)
    if method not in INSTANCE_METHODS:
        raise ValueError(f"unknown instance method {method!r}: use one of {', '.join(INSTANCE_METHODS)}")
    sem_pir = reorient(semantic, "PIR")
    spacing = sem_pir.spacing
    # everything after the instance network works on the spine's bounding box (+1 voxel, so a structure touches the
    # box's edge exactly where it touches the volume's: the field-of-view rules see the same edges); outside it both
    # masks are background
    box = bbox(sem_pir.array > 0, margin=1) or tuple(slice(0, n) for n in sem_pir.shape)
    sem_box = np.ascontiguousarray(sem_pir.array[box])
    tell("instance")
    if method == "network":
        vertebrae = _network_vertebrae(sem_pir, model, box, device=device, amp=amp, batch_size=batch_size,
                                       timings=timings, notes=notes)
    else:
        from spineps_like.instance.geometric import geometric_instances

        with timings.phase("instance"):
            vertebrae = np.ascontiguousarray(geometric_instances(sem_pir.array, spacing)[box])
    tell("post-processing")
    with timings.phase("assign"):
        instance, sem_arr = assign_ivds_endplates(sem_box, vertebrae, spacing)
    with timings.phase("postprocess"):
        sem_arr, instance, report = postprocess(sem_arr, instance, spacing)
        notes.extend(getattr(report, "notes", []) or [])
    with timings.phase("sacrum"):
        sem_arr, instance, sacrum = confirm_sacrum(sem_arr, instance, spacing)
        notes.extend(f"sacrum: {n}" for n in sacrum.notes if n != "no sacrum label in the mask")
    tell("labelling")
    with timings.phase("labeling"):
        labelled, labeling = label_vertebrae(instance, sem_arr, spacing, lumbar_count=lumbar_count)
        dropped = (labelled == 0) & (instance > 0)  # e.g. disc voxels above C1: no instance, so no semantic label
        if dropped.any():
            sem_arr = np.where(dropped, 0, sem_arr)
            notes.append(f"labelling: {int(dropped.sum())} voxels without an anatomical instance (a disc above C1) "
                         "removed from both masks")
        instance = labelled
    with timings.phase("restore"):  # the box goes straight into the input's orientation: no whole-volume copy
        sem_full = np.zeros(semantic.shape, sem_arr.dtype)
        oriented_view(sem_full, semantic.affine, "PIR")[box] = sem_arr
        ins_full = np.zeros(semantic.shape, instance.dtype)
        oriented_view(ins_full, semantic.affine, "PIR")[box] = instance
    return Scan(sem_full, semantic.affine, semantic.path), Scan(ins_full, semantic.affine, semantic.path), labeling


def _network_vertebrae(sem_pir: Scan, model: Any, box: tuple[slice, ...], *, device: str, amp: bool,
                       batch_size: int, timings: Timings, notes: list[str]) -> np.ndarray:
    """Vertebra ids 1..K top to bottom on ``sem_pir[box]`` (bone voxels only), by cutouts + network + fusion on the
    instance model's grid over the whole of ``sem_pir``."""
    from spineps_like.instance.centres import corpus_centres
    from spineps_like.instance.cutouts import extract_cutouts
    from spineps_like.instance.fusion import fuse_predictions
    from spineps_like.instance.network import load_instance_model, predict_cutouts

    if model is None or isinstance(model, (str, os.PathLike)):
        with timings.phase("load_instance_model"):
            from spineps_like.models import find_model

            model = load_instance_model(find_model(model or DEFAULT_INSTANCE_MODEL).path, device=device)
    with timings.phase("instance_resample"):
        target = clamp_spacing(sem_pir.spacing, model.resolution_range)
        grid = rescale(sem_pir, target, order=0)
    with timings.phase("centres"):
        centres = corpus_centres(grid.array, grid.spacing)
        notes.extend(centres.repairs)
    if len(centres) == 0:
        notes.append("no vertebral corpus found in the semantic mask: no vertebra instances")
        return np.zeros(tuple(b.stop - b.start for b in box), np.uint16)
    with timings.phase("cutouts"):
        batch = extract_cutouts(grid.array, centres.centres, model.cutout_size, mapping=model.mapping)
    with timings.phase("network"):
        predictions = predict_cutouts(model, batch, batch_size=batch_size, device=device, amp=amp)
    with timings.phase("fusion"):
        fused = fuse_predictions(predictions, grid.shape, spacing=grid.spacing)
        notes.extend(fused.warnings)
    with timings.phase("instance_restore"):
        sem_box = sem_pir.array[box]
        back = resample_to(Scan(fused.instance.astype(np.uint16, copy=False), grid.affine), sem_pir.shape,
                           sem_pir.affine, order=0, box=box).array
        # vertebra ids only on bone (41-51 is one run of labels: one comparison for an 8-bit mask), in place
        np.multiply(back, label_mask(sem_box, _BONE_LABELS), out=back)
    return back


def _modality(semantic_model: Any, image: Scan, requested: str | None = None) -> str | None:
    """'ct' or 'mr' for the measurements: ``requested`` (the user's) first, then a DICOM series' Modality tag (CT or
    MR; a conflict with ``requested`` is a one-line warning), a loaded semantic model trained on one kind only, the
    scan's BIDS suffix (``_ct``; ``_T1w``, ``_T2w``, ...); None otherwise (the density step then decides from the
    image)."""
    series = getattr(getattr(image, "source", None), "series", None)
    tag = {"CT": "ct", "MR": "mr"}.get(str(getattr(series, "modality", "") or "").strip().upper())
    if requested is not None:
        if tag is not None and tag != requested.lower():
            import warnings

            warnings.warn(f"{image.path}: modality {requested} asked for, but the DICOM series says "
                          f"{series.modality}; measuring as {requested}", stacklevel=2)
        return requested.lower()
    if tag is not None:
        return tag
    mods = getattr(getattr(semantic_model, "config", None), "modalities", None)
    if mods:
        kinds = {"ct" if str(m).upper() == "CT" else "mr" for m in mods}
        if len(kinds) == 1:
            return kinds.pop()
    name = os.path.basename(str(image.path or "")).split(".")[0].lower()
    suffix = name.rsplit("_", 1)[-1] if "_" in name else ""
    if suffix == "ct":
        return "ct"
    return "mr" if suffix in ("t1w", "t2w", "t1c", "flair", "stir", "pd", "pdw", "t2starw", "mr") else None


def segment(scan: str | os.PathLike | Scan | np.ndarray, *, affine: np.ndarray | None = None,
            semantic_model: Any = None, instance_model: Any = None, instance_method: str = "network",
            semantic_mask: Scan | str | os.PathLike | None = None, semantic_only: bool = False,
            device: str = "cpu", amp: bool = False, mirroring: bool | None = None, step_size: float | None = None,
            n4: bool = False, restore: str = "linear", batch_size: int = 4,
            lumbar_count: int | None = None, progress: Callable[[str], None] | None = None,
            series: str | int | None = None, modality: str | None = None) -> SegmentResult:
    """Segment the spine in one scan.

    Parameters
    ----------
    scan : a file path (NIfTI / MHA), a DICOM folder or file, a :class:`Scan`, or a 3D array with ``affine``.
    series : of a DICOM folder that holds several series, the one to segment (SeriesNumber, SeriesDescription or
        SeriesInstanceUID; :func:`spineps_like.io.load_scan`).
    modality : 'ct' or 'mr' for the measurements (HU density on CT, signal ratios on MRI); default: a DICOM series'
        Modality tag, the semantic model's single training modality, the BIDS suffix, else decided from the image.
    semantic_model, instance_model : model name (bundled or in ``$SPINEPS_LIKE_MODELS``), folder path, or a loaded
        model; default: the bundled phantom-trained models.
    instance_method : 'network' (cutouts + 3D UNet + fusion) or 'geometric' (weights-free baseline).
    semantic_mask : skip the semantic phase and use this mask (same grid as the scan).
    semantic_only : stop after the semantic phase.
    device, amp, mirroring, step_size, n4, restore : semantic/instance inference settings (see
        :func:`spineps_like.semantic.predict_semantic`).
    lumbar_count : expected number of lumbar vertebrae (4, 5 or 6) when the anatomy says otherwise.
    progress : called with each phase's name as it starts (:data:`PROGRESS_PHASES`: "loading", "semantic",
        "instance", "post-processing", "labelling", "measuring"); None: silent.

    Returns
    -------
    SegmentResult with ``semantic`` and ``instance`` Scans on the input grid, ``labeling`` and ``timings``.
    """
    timings = Timings()
    notes: list[str] = []
    tell = progress or (lambda phase: None)
    tell("loading")
    with timings.phase("load"):
        if series is not None and isinstance(scan, (Scan, np.ndarray)):
            raise ValueError("series= picks a series of a DICOM folder; the scan given is already an image")
        if isinstance(scan, Scan):
            image = scan
        elif isinstance(scan, np.ndarray):
            if affine is None:
                raise ValueError("an array scan needs its affine (voxel-to-world, RAS)")
            if scan.ndim != 3 or 0 in scan.shape:
                raise ValueError(f"expected a non-empty 3D array, got shape {scan.shape}")
            aff = np.asarray(affine, dtype=float)
            if aff.shape != (4, 4):
                raise ValueError(f"the affine must be a 4 x 4 voxel-to-world matrix, got shape {aff.shape}")
            if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
                raise ValueError("the affine is singular or holds NaN/inf")
            if np.iscomplexobj(scan) or scan.dtype.fields is not None:
                raise ValueError(f"expected a real-valued array, got {scan.dtype}")
            image = Scan(np.asarray(scan, dtype=np.float32), aff)
            if not np.all(np.isfinite(image.array)):
                raise ValueError("the array holds NaN/inf values")
        else:
            image = load_scan(scan, series=series)
    # checks before the expensive work: a 2D image, an image without signal (when the semantic phase is to look at
    # it), a device that is not there, and a model that does not load all fail before the first phase
    from spineps_like.checks import check_device, check_shape, check_signal

    if instance_method not in INSTANCE_METHODS:
        raise ValueError(f"unknown instance method {instance_method!r}: use one of {', '.join(INSTANCE_METHODS)}")
    if modality is not None and str(modality).lower() not in ("ct", "mr"):
        raise ValueError(f"unknown modality {modality!r}: use 'ct' or 'mr'")
    check_shape(image)
    if semantic_mask is None:
        check_signal(image)
    check_device(device, what="device")
    instance_setting = str(getattr(instance_model, "folder", None) or instance_model or DEFAULT_INSTANCE_MODEL)
    if not semantic_only and instance_method == "network" and (
            instance_model is None or isinstance(instance_model, (str, os.PathLike))):
        from spineps_like.instance.network import load_instance_model
        from spineps_like.models import find_model

        with timings.phase("load_instance_model"):
            instance_name = instance_model or DEFAULT_INSTANCE_MODEL
            instance_model = load_instance_model(find_model(instance_name).path, device=device)
    if semantic_mask is None and (semantic_model is None or isinstance(semantic_model, (str, os.PathLike))):
        from spineps_like.models import load_semantic_model

        with timings.phase("load_semantic_model"):  # a corrupt weights file fails here, before any phase
            semantic_model = load_semantic_model(semantic_model or DEFAULT_SEMANTIC_MODEL, device=device)
    settings = {"instance_method": instance_method, "device": device, "amp": amp, "mirroring": mirroring,
                "step_size": step_size, "n4": n4, "restore": restore}
    if semantic_mask is not None:
        with timings.phase("load"):
            sem = semantic_mask if isinstance(semantic_mask, Scan) else load_scan(semantic_mask, kind="mask")
            if sem.shape != image.shape or not np.allclose(sem.affine, image.affine, atol=1e-3):
                raise ValueError(f"{sem.path or 'semantic mask'}: grid differs from the scan's "
                                 f"({sem.shape} vs {image.shape})")
        settings["semantic"] = "given"
    else:
        from spineps_like.semantic import predict_semantic

        sem_timings: dict[str, float] = {}
        tell("semantic")
        with timings.phase("semantic"):
            sem = predict_semantic(image, semantic_model, step_size=step_size,
                                   mirroring=mirroring, n4=n4, device=device, amp=amp, restore=restore,
                                   timings=sem_timings)
        settings["semantic"] = str(getattr(getattr(semantic_model, "folder", None), "path", semantic_model
                                           or DEFAULT_SEMANTIC_MODEL))
        settings["semantic_timings_s"] = {k: round(v, 4) for k, v in sem_timings.items()}
    result = SegmentResult(image=image, semantic=sem, timings=timings, notes=notes, settings=settings)
    if semantic_only:
        return result
    if instance_method == "network":
        settings["instance_model"] = instance_setting
    result.semantic, result.instance, result.labeling = instance_phase(
        sem, method=instance_method, model=instance_model, device=device, amp=amp, batch_size=batch_size,
        lumbar_count=lumbar_count, timings=timings, notes=notes, progress=progress)
    from spineps_like.measure import measure

    tell("measuring")
    with timings.phase("measure"):
        on_grid = image.shape == result.instance.shape and np.allclose(image.affine, result.instance.affine, atol=1e-3)
        result.measurements = measure(result.semantic.array, result.instance.array, result.instance.affine,
                                      complete=getattr(result.labeling, "complete", None),
                                      image=image.array if on_grid else None,
                                      modality=_modality(semantic_model, image, modality) if on_grid else None)
    from spineps_like.plausibility import advisories, result_flags, vertebra_confidence

    with timings.phase("plausibility"):
        result.flags = result_flags(result.semantic.array, result.instance.array, result.instance.spacing,
                                    complete=getattr(result.labeling, "complete", None),
                                    measurements=result.measurements, affine=result.instance.affine)
        result.advisories = advisories(result.semantic.array, result.instance.array)
        result.confidence = vertebra_confidence(result.labeling, result.measurements)
    return result
