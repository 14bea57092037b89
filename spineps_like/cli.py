"""Command line: parses arguments, calls the public API, prints errors as one line (exit code 1)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from spineps_like import __version__


class CLIError(Exception):
    """An error to print as one line."""


ASSUME_HELP = ("for a NIfTI whose header has no orientation (qform and sform codes 0, refused otherwise): the "
               "directions its array axes point to, e.g. RAS (x to the right, y to the front, z up) or LAS; the "
               "header's voxel sizes are kept and a warning says what was assumed")
SERIES_HELP = ("for a folder holding several DICOM series: the one to read, by SeriesNumber, SeriesDescription or "
               "SeriesInstanceUID (without it such a folder is refused with a list of its series)")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    print(f"spineps-like: warning: {text}", file=sys.stderr if file is None else file)


class PhaseLog:
    """Progress of one scan on a terminal: one stderr line per phase as it starts, with the seconds since the
    start; silent when stderr is not a TTY (a log file, a pipe, a cohort worker) or with ``--quiet``."""

    def __init__(self, name: str, *, quiet: bool = False, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.name = name
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = not quiet and bool(isatty and isatty())
        self._t0 = time.perf_counter()

    def __call__(self, phase: str) -> None:
        if self.enabled:
            print(f"spineps-like: {self.name}: {phase} ({time.perf_counter() - self._t0:.1f} s)", file=self.stream,
                  flush=True)


def _cmd_phantom(args: argparse.Namespace) -> int:
    from spineps_like.phantom import write_phantoms

    paths = write_phantoms(
        args.out, n=args.n, seed=args.seed, fov=args.fov, mode=args.mode, variant=args.variant,
        spacing=tuple(args.spacing) if args.spacing else None, orientation=args.orientation,
        snapshot=not args.no_snapshot,
    )
    for p in paths:
        print(p)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from spineps_like.io import load_scan

    scan = load_scan(args.scan, kind="mask" if args.mask else "image", assume_orientation=args.assume_orientation,
                     series=args.series)
    a = scan.array
    print(f"{scan.path}: shape {a.shape}, spacing {tuple(round(s, 4) for s in scan.spacing)} mm, "
          f"orientation {scan.orientation}, dtype {a.dtype}, range [{a.min()}, {a.max()}]")
    if scan.source is not None:
        print(f"{scan.path}: DICOM {scan.source.series.describe()}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from spineps_like.evaluation import run_evaluate_cli

    return run_evaluate_cli(args.pred, args.gt, args.protocol, args.out, semantic_pred=args.semantic_pred,
                            semantic_gt=args.semantic_gt, paired=args.paired, workers=args.workers,
                            pred_scheme=args.pred_scheme, gt_scheme=args.gt_scheme)


def _cmd_segment(args: argparse.Namespace) -> int:
    from spineps_like.checks import check_image, preflight
    from spineps_like.io import derivatives_dir, load_scan
    from spineps_like.pipeline import segment

    progress = PhaseLog(Path(args.scan).name, quiet=args.quiet)
    progress("loading")
    # bad input, an output folder that cannot be written, a model folder that does not load and a missing device
    # all fail here, in about a second, before any phase runs or any file is written
    scan = load_scan(args.scan, assume_orientation=args.assume_orientation, series=args.series)
    if args.dicom_seg:  # a DICOM-SEG needs DICOM source images: refused here, before any work
        from spineps_like.dicom_seg import check_dicom_seg

        check_dicom_seg(scan)
    if args.semantic_mask is None:
        check_image(scan)
    preflight(out_dir=args.out if args.out is not None else derivatives_dir(args.scan),
              semantic_model=args.semantic_model, instance_model=args.instance_model,
              need_semantic=args.semantic_mask is None,
              need_instance=not args.semantic_only and args.instance_method == "network", device=args.device)
    def phases(phase: str) -> None:  # the scan is loaded above: segment's own "loading" is instant
        if phase != "loading":
            progress(phase)

    result = segment(scan, semantic_model=args.semantic_model, instance_model=args.instance_model,
                     instance_method=args.instance_method, semantic_mask=args.semantic_mask,
                     semantic_only=args.semantic_only, device=args.device, amp=args.amp, mirroring=args.mirroring,
                     step_size=args.step_size, n4=args.n4, restore=args.restore, batch_size=args.batch_size,
                     lumbar_count=args.lumbar_count, modality=args.modality, progress=phases)
    name_from = None
    if scan.source is not None:  # a DICOM series: outputs named after its folder (and the series, if it has several)
        from spineps_like.dicom import output_name

        name_from = output_name(scan)
        result.notes.append(f"input: DICOM {scan.source.series.describe()}")
    progress("writing")
    if args.dicom_seg:
        from spineps_like.dicom_seg import save_with_dicom_seg

        paths = save_with_dicom_seg(result, args.out, name_from=name_from, snapshot=not args.no_snapshot)
        if not any(k.startswith("dicom_seg") for k in paths):
            print(f"{args.scan}: warning: the masks are empty; no DICOM-SEG written", file=sys.stderr)
    else:
        paths = result.save(args.out, name_from=name_from, snapshot=not args.no_snapshot)
    if not args.quiet:
        for kind, path in paths.items():
            print(f"{kind}: {path}")
        if result.labeling is not None:
            from spineps_like.labels import instance_name

            ids = result.vertebra_ids
            print(f"vertebrae ({result.labeling.anchor}): " + " ".join(instance_name(i) for i in ids))
        print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    for note in result.advisories:
        print(f"{args.scan}: warning: {note}", file=sys.stderr)
    for flag in result.flags:
        print(f"{args.scan}: implausible result: {flag}", file=sys.stderr)
    return 3 if result.flags and not args.allow_implausible else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from spineps_like.demo import run_demo

    return run_demo(args.out, seed=args.seed, instance_method=args.instance_method)


def _cmd_train(args: argparse.Namespace) -> int:
    if args.what == "semantic":
        from spineps_like.training.semantic import main as train_main
    else:
        from spineps_like.training.instance import main as train_main
    return int(train_main(args.extra) or 0)


def _cmd_models(args: argparse.Namespace) -> int:
    from spineps_like.models import discover_models, find_model
    from spineps_like.models.folders import open_model_folder
    from spineps_like.models.manifest import read_manifest, verify_manifest

    if args.action == "list":
        models = discover_models()
        if not models:
            print("no models found (bundled models/ or $SPINEPS_LIKE_MODELS)")
        for m in models.values():
            m = open_model_folder(m.path)
            kind = "nnU-Net (semantic)" if m.nnunet_dir is not None else "Unet3D (instance)"
            manifest = "sha256 manifest" if read_manifest(m.path) is not None else "no manifest"
            print(f"{m.name}\t{kind}\t{m.layout}\t{manifest}\t{m.path}")
        return 0
    if args.action == "verify":
        folder = find_model(args.name)
        if not verify_manifest(folder.path):
            raise CLIError(f"{folder.path}: has no MANIFEST.sha256 to verify")
        print(f"{folder.path}: every file matches MANIFEST.sha256")
        return 0
    from spineps_like.models.export import export_spineps

    for path in export_spineps(args.out, semantic_model=args.semantic_model, instance_model=args.instance_model):
        print(path)
    return 0


def _cmd_labels(args: argparse.Namespace) -> int:
    from spineps_like.labels import export_colour_table

    print(export_colour_table(args.out, kind=args.kind, fmt=args.format))
    return 0


def _cmd_measure(args: argparse.Namespace) -> int:
    from spineps_like.geometry import same_grid
    from spineps_like.io import atomic_write_json, atomic_write_text, load_scan
    from spineps_like.measure import measure
    from spineps_like.measure.spine import measurements_table, table_csv

    sem = load_scan(args.semantic, kind="mask")
    inst = load_scan(args.instance, kind="mask")
    if not same_grid(sem.shape, sem.affine, inst.shape, inst.affine, atol=1e-3):
        raise CLIError(f"{args.instance}: grid differs from the semantic mask's ({inst.shape} vs {sem.shape})")
    image = None
    if args.image is not None:
        image = load_scan(args.image)
        if not same_grid(sem.shape, sem.affine, image.shape, image.affine, atol=1e-3):
            what = "shape" if tuple(image.shape) != tuple(sem.shape) else "affine"
            raise CLIError(f"{args.image}: {what} differs from the masks' ({image.shape} vs {sem.shape}); resample the "
                           "image onto the masks' grid")
    m = measure(sem.array, inst.array, sem.affine, image=None if image is None else image.array,
                modality=args.modality)
    m = {"semantic": str(args.semantic), "instance": str(args.instance),
         **({"image": str(args.image)} if args.image is not None else {}), **m}
    atomic_write_json(args.out, m)
    if args.csv is not None:
        atomic_write_text(args.csv, table_csv(measurements_table(m)))
    if not args.quiet:
        graded = [f"{r['name']} grade {r['genant_grade']}" for r in m["vertebrae"] if r["genant_grade"]]
        slips = [f"{r['name']} Meyerding {r['meyerding_grade']}" for r in m["vertebrae"] if r["meyerding_grade"]]
        print(f"{args.out}: {len(m['vertebrae'])} vertebrae, {len(m['discs'])} discs, {len(m['canal'])} canal levels"
              + (f"; height loss: {', '.join(graded)}" if graded else "")
              + (f"; listhesis: {', '.join(slips)}" if slips else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spineps-like", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"spineps-like {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    ph = sub.add_parser("phantom", help="write synthetic spine phantoms with exact ground truth")
    ph.add_argument("--out", required=True, type=Path, help="output folder")
    ph.add_argument("-n", type=int, default=1, help="number of phantoms (seeds seed..seed+n-1)")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--fov", default="lumbar", choices=["cervical", "thoracic", "lumbar", "whole"])
    ph.add_argument("--mode", default="t2w", choices=["t2w", "ct", "random"])
    ph.add_argument("--variant", default=None,
                    choices=["block", "collapsed", "l6", "t13", "sacralised_l5", "narrow_discs"])
    ph.add_argument("--spacing", type=float, nargs=3, metavar=("P", "I", "R"),
                    help="output voxel size in mm along P, I, R (default: in-plane 0.6-1.0, left-right 3.0-4.0, "
                         "random by seed)")
    ph.add_argument("--orientation", default="random", help="axis codes like PIR or RAS, or 'random'")
    ph.add_argument("--no-snapshot", action="store_true", help="do not write the PNG snapshot")
    ph.set_defaults(func=_cmd_phantom)

    inf = sub.add_parser("info", help="check that a scan loads and print its geometry")
    inf.add_argument("scan", type=Path)
    inf.add_argument("--mask", action="store_true", help="load as an integer mask")
    inf.add_argument("--assume-orientation", metavar="CODES", default=None, help=ASSUME_HELP)
    inf.add_argument("--series", default=None, metavar="SERIES", help=SERIES_HELP)
    inf.set_defaults(func=_cmd_info)

    lb = sub.add_parser("labels", help="export the label colour table for ITK-SNAP (.txt) or 3D Slicer (.ctbl)")
    lb.add_argument("--out", required=True, type=Path)
    lb.add_argument("--kind", default="semantic", choices=["semantic", "instance"])
    lb.add_argument("--format", default=None, choices=["itksnap", "slicer"])
    lb.set_defaults(func=_cmd_labels)

    ev = sub.add_parser("evaluate", help="evaluate predictions against ground truth (two files or two folders)")
    ev.add_argument("pred", type=Path, help="prediction mask file or folder")
    ev.add_argument("gt", type=Path, help="reference mask file or folder")
    ev.add_argument("--protocol", default="spineps", choices=["spineps", "spider", "endplate3d"])
    ev.add_argument("--out", type=Path, default=None, help="report folder (folders: default PRED/evaluation-<protocol>)")
    ev.add_argument("--semantic-pred", type=Path, default=None, help="semantic mask of the prediction (single files)")
    ev.add_argument("--semantic-gt", type=Path, default=None, help="semantic mask of the reference (single files)")
    ev.add_argument("--paired", type=Path, default=None, help="second prediction set B: paired Wilcoxon comparison")
    ev.add_argument("--pred-scheme", default="spineps", choices=["spineps", "spider"])
    ev.add_argument("--gt-scheme", default="spineps", choices=["spineps", "spider"])
    ev.add_argument("--workers", type=int, default=1)
    ev.set_defaults(func=_cmd_evaluate)

    sg = sub.add_parser("segment", help="segment a scan: semantic + instance masks, centroids, snapshot, summary")
    sg.add_argument("scan", type=Path, help="NIfTI (.nii/.nii.gz) or MetaImage (.mha) scan, or a folder of DICOM files")
    sg.add_argument("--out", type=Path, default=None, help="output folder (default: SPINEPS' derivatives_seg)")
    sg.add_argument("--assume-orientation", metavar="CODES", default=None, help=ASSUME_HELP)
    sg.add_argument("--series", default=None, metavar="SERIES", help=SERIES_HELP)
    sg.add_argument("--dicom-seg", action="store_true",
                    help="DICOM input only: also write the semantic and instance masks as DICOM-SEG files "
                         "(..._seg-spine_msk.dcm, ..._seg-vert_msk.dcm) referencing the source series")
    sg.add_argument("--semantic-only", action="store_true", help="stop after the semantic phase")
    sg.add_argument("--allow-implausible", action="store_true", help="exit 0 even when the result looks implausible "
                    "(vertebrae without bodies, bodies of impossible size or spacing; flagged in the summary either "
                    "way)")
    sg.add_argument("--semantic-model", default=None, help="model name or folder (default: bundled semantic model)")
    sg.add_argument("--instance-model", default=None, help="model name or folder (default: bundled instance model)")
    sg.add_argument("--instance-method", default="network", choices=["network", "geometric"],
                    help="network: cutouts + 3D UNet + fusion; geometric: weights-free baseline")
    sg.add_argument("--semantic-mask", type=Path, default=None, help="use this semantic mask, skip the semantic phase")
    sg.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    sg.add_argument("--amp", action="store_true", help="mixed precision")
    mirror = sg.add_mutually_exclusive_group()
    mirror.add_argument("--mirror", dest="mirroring", action="store_true", default=None,
                        help="test-time mirroring (default: the model config's)")
    mirror.add_argument("--no-mirror", dest="mirroring", action="store_false")
    sg.add_argument("--step-size", type=float, default=None, help="sliding-window step as a fraction of the patch")
    sg.add_argument("--n4", action="store_true", help="N4 bias-field correction before the semantic phase (MRI)")
    sg.add_argument("--restore", choices=("linear", "nearest"), default="linear",
                    help="back from the model grid: interpolate class probabilities (default, nnU-Net's way) or move "
                         "the label mask by nearest neighbour (SPINEPS' way)")
    sg.add_argument("--batch-size", type=int, default=4, help="instance cutouts per forward pass")
    sg.add_argument("--lumbar-count", type=int, default=None, choices=[4, 5, 6],
                    help="expected lumbar vertebrae when known (transitional anatomy)")
    sg.add_argument("--modality", choices=["ct", "mr"], default=None,
                    help="the image's modality for the measurements (default: a DICOM series' Modality tag, the "
                         "model's training modality, the BIDS suffix, else decided from the image)")
    sg.add_argument("--no-snapshot", action="store_true")
    sg.add_argument("-q", "--quiet", action="store_true",
                    help="print nothing but warnings and errors: no output list, no progress lines (progress goes "
                         "to stderr, one line per phase, only when stderr is a terminal)")
    sg.set_defaults(func=_cmd_segment)

    dm = sub.add_parser("demo", help="make a phantom, segment it with the bundled models, score it")
    dm.add_argument("--out", type=Path, default=Path("demo_output"))
    dm.add_argument("--seed", type=int, default=900001)
    dm.add_argument("--instance-method", default="network", choices=["network", "geometric"])
    dm.set_defaults(func=_cmd_demo)

    tr = sub.add_parser("train", help="train the bundled models on phantoms (semantic | instance; --help for each)",
                        add_help=False)
    tr.add_argument("what", choices=["semantic", "instance"])
    tr.set_defaults(func=_cmd_train)

    md = sub.add_parser("models", help="list, verify or export models")
    msub = md.add_subparsers(dest="action", metavar="ACTION", required=True)
    msub.add_parser("list", help="models found in models/ and $SPINEPS_LIKE_MODELS")
    mv = msub.add_parser("verify", help="check a model folder against its MANIFEST.sha256")
    mv.add_argument("name", help="model name or folder")
    me = msub.add_parser("export-spineps", help="write the bundled models as SPINEPS 2.1.3 model folders")
    me.add_argument("out", type=Path)
    me.add_argument("--semantic-model", default="semantic-phantom")
    me.add_argument("--instance-model", default="instance-phantom")
    md.set_defaults(func=_cmd_models)

    ms = sub.add_parser("measure", help="measure vertebrae, discs, listhesis and the canal in masks you already have")
    ms.add_argument("semantic", type=Path, help="semantic mask (seg-spine: labels 41-49, 52/53, 60, 61, 100, 26)")
    ms.add_argument("instance", type=Path, help="instance mask on the same grid (seg-vert: v, 100+v, 200+v)")
    ms.add_argument("--out", required=True, type=Path, help="measurements JSON to write")
    ms.add_argument("--csv", type=Path, default=None, help="also a CSV table, one row per structure")
    ms.add_argument("--image", type=Path, default=None,
                    help="the scan on the masks' grid: CT trabecular/endplate HU, MRI disc/CSF signal ratio")
    ms.add_argument("--modality", choices=["ct", "mr"], default=None,
                    help="the image's modality (default: CT when its 1st percentile is at most -500)")
    ms.add_argument("--quiet", action="store_true")
    ms.set_defaults(func=_cmd_measure)

    from spineps_like.cohort.run import add_cohort_parser

    add_cohort_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.extra = extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from spineps_like.runtime import tune_allocator

    tune_allocator()  # networks' activations reuse heap memory instead of fresh mmaps per forward call
    import os
    import warnings

    show = warnings.showwarning
    warnings.showwarning = _one_line_warning  # warnings (what was assumed) as one line each, no source lines
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("spineps-like: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileNotFoundError, OSError) as e:
        print(f"spineps-like: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except MemoryError:
        print("spineps-like: error: out of memory", file=sys.stderr)
        return 1
    except Exception as e:  # never a traceback: one line, the traceback only on request
        if os.environ.get("SPINEPS_LIKE_DEBUG"):
            raise
        msg = " ".join(str(e).split())[:300]
        print(f"spineps-like: error: unexpected {type(e).__name__}: {msg} (set SPINEPS_LIKE_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
