"""Command line: parses arguments, calls the public API, prints errors as one line (exit code 1)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spineps_like import __version__


class CLIError(Exception):
    """An error to print as one line."""


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

    scan = load_scan(args.scan, kind="mask" if args.mask else "image")
    a = scan.array
    print(f"{scan.path}: shape {a.shape}, spacing {tuple(round(s, 4) for s in scan.spacing)} mm, "
          f"orientation {scan.orientation}, dtype {a.dtype}, range [{a.min()}, {a.max()}]")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from spineps_like.evaluation import run_evaluate_cli

    return run_evaluate_cli(args.pred, args.gt, args.protocol, args.out, semantic_pred=args.semantic_pred,
                            semantic_gt=args.semantic_gt, paired=args.paired, workers=args.workers,
                            pred_scheme=args.pred_scheme, gt_scheme=args.gt_scheme)


def _cmd_labels(args: argparse.Namespace) -> int:
    from spineps_like.labels import export_colour_table

    print(export_colour_table(args.out, kind=args.kind, fmt=args.format))
    return 0


def _not_yet(name: str, issue: int):
    def run(args: argparse.Namespace) -> int:
        raise CLIError(f"'{name}' is not implemented yet (issue {issue})")

    return run


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

    for name, issue, hlp in [
        ("segment", 4, "segment a scan (semantic + instance)"),
        ("cohort", 6, "process a cohort with a resumable manifest"),
        ("models", 7, "list / export models"),
        ("train", 3, "train the bundled models"),
        ("demo", 2, "run the pipeline on a bundled phantom"),
    ]:
        sp = sub.add_parser(name, help=hlp)
        sp.set_defaults(func=_not_yet(name, issue))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if extra and args.command in ("phantom", "labels", "info", "evaluate"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("spineps-like: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileNotFoundError, OSError) as e:
        print(f"spineps-like: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
