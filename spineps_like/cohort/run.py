"""Run a cohort: discover scans, resume from the manifest, segment on an executor, record every outcome.

>>> from spineps_like.cohort import Cohort
>>> cohort = Cohort("/data/study", "/data/study-out", workers=4, instance_method="network")   # doctest: +SKIP
>>> summary = cohort.run()                                                                    # doctest: +SKIP
>>> summary["counts"]                                                                          # doctest: +SKIP
{'pending': 0, 'running': 0, 'done': 998, 'failed': 2}

A run resumes what an earlier one left: done scans are skipped when their outputs are still there with the
recorded sha256 (else redone), scans left ``running`` by a killed run are redone, failed scans are retried only
with ``retry_failed=True``. Temporary files of a killed run (``.*.part*``) are removed at start. Only one run may
use an output folder at a time (a lock file guards it).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import re
import sqlite3
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from spineps_like.cohort.discover import ScanEntry, discover_scans
from spineps_like.cohort.executors import EXECUTORS, LOAD_SETTINGS, SEGMENT_SETTINGS, CohortError, make_executor
from spineps_like.cohort.manifest import MANIFEST_NAME, VERIFY_MODES, Manifest, format_summary
from spineps_like.io import atomic_write_text

log = logging.getLogger("spineps_like.cohort")
LOCK_NAME = ".cohort.lock"
LOGS = "logs"


@contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Exclusive lock on an output folder for the length of a run (released by the OS if the run dies)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise CohortError(f"{out_dir}: another cohort run is using this folder ({holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def clean_partial_files(folder: Path) -> list[Path]:
    """Remove temporary files of interrupted atomic writes (``.<name>.<random>.part<suffix>``) below ``folder``."""
    removed = []
    if not folder.is_dir():
        return removed
    for dirpath, _, filenames in os.walk(folder):
        for f in filenames:
            if f.startswith(".") and ".part" in f:
                p = Path(dirpath) / f
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _traceback_path(out_dir: Path, key: str) -> Path:
    return out_dir / LOGS / (re.sub(r"[^A-Za-z0-9_.-]+", "__", key) + ".traceback.txt")


class Cohort:
    """A cohort of scans segmented into one output folder, with a resumable SQLite manifest.

    Parameters
    ----------
    inputs : folder, BIDS dataset, glob, CSV/TSV list (column ``path``, optional ``semantic_mask``), scan file, or a
        list of these (see :func:`~spineps_like.cohort.discover.discover_scans`).
    out_dir : output folder: masks in ``out_dir/derivatives_seg/...``, manifest ``out_dir/cohort.sqlite``,
        tracebacks of failures in ``out_dir/logs``.
    workers : number of workers (each loads the models once).
    executor : 'local' (this process for one worker, else spawned processes) or 'ray'.
    address : Ray cluster address (executor 'ray').
    threads : torch threads (local) / CPUs (Ray) per worker; default: cores / workers (local), 1 (Ray).
    gpus_per_worker : GPUs per Ray actor (default 1 when ``device`` is cuda).
    max_task_retries : retries of a scan whose worker process died.
    modalities : keep only scans with these BIDS suffixes (e.g. ``['T2w']``).
    verify : how done scans are checked on resume: 'checksum' (sha256), 'size' or 'none'.
    snapshot : write PNG snapshots (the per-scan QC pictures).
    report : write the cohort's HTML report (``out_dir/cohort_report.html``) and measurement table
        (``out_dir/cohort_measurements.csv``, :mod:`spineps_like.cohort.table`) at the end of each run.
    segment_fn : per-scan function instead of :func:`spineps_like.pipeline.segment` (same signature).
    **segment_settings : keyword arguments of :func:`~spineps_like.pipeline.segment` (semantic_model,
        instance_model, instance_method, semantic_only, device, amp, mirroring, step_size, n4, restore, batch_size,
        lumbar_count) and how scans are read (``assume_orientation``, see :func:`spineps_like.io.load_scan`).
    """

    def __init__(self, inputs: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                 workers: int = 1, executor: str = "local", address: str | None = None, threads: int | None = None,
                 gpus_per_worker: float | None = None, max_task_retries: int = 1,
                 modalities: Sequence[str] | None = None, verify: str = "checksum", snapshot: bool = True,
                 segment_fn: Callable | None = None, report: bool = True, **segment_settings: Any):
        known = SEGMENT_SETTINGS + LOAD_SETTINGS
        unknown = sorted(set(segment_settings) - set(known))
        if unknown:
            raise ValueError(f"unknown segment setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        if executor not in EXECUTORS:
            raise ValueError(f"unknown executor {executor!r}: use one of {', '.join(EXECUTORS)}")
        if verify not in VERIFY_MODES:
            raise ValueError(f"unknown verify mode {verify!r}: use one of {', '.join(VERIFY_MODES)}")
        if int(workers) < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.inputs = inputs
        self.out_dir = Path(out_dir).expanduser().resolve()
        self.workers = int(workers)
        self.executor = executor
        self.address = address
        self.threads = threads
        self.gpus_per_worker = gpus_per_worker
        self.max_task_retries = int(max_task_retries)
        self.modalities = modalities
        self.verify = verify
        self.snapshot = snapshot
        self.report = report
        self.segment_fn = segment_fn
        self.settings = dict(segment_settings)

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    def discover(self) -> list[ScanEntry]:
        """The cohort's scans with their output folders (see :func:`discover_scans`)."""
        return discover_scans(self.inputs, self.out_dir, modalities=self.modalities)

    def status(self) -> dict[str, Any]:
        """Manifest summary: counts per state, failures, throughput of the last run."""
        return cohort_status(self.out_dir)

    def run(self, *, retry_failed: bool = False, progress: bool = True) -> dict[str, Any]:
        """Segment every scan not done yet; returns the manifest summary plus this run's counts.

        A failing scan is recorded (one-line error, traceback file) and the run goes on; check
        ``summary['counts']['failed']``. Raises :class:`CohortError` when the run cannot start (locked folder,
        models that do not load).
        """
        entries = self.discover()
        if not entries:
            raise ValueError(f"no scans found in {self.inputs} (.nii.gz, .nii, .mha; masks, *_seg-* files and "
                             "derivatives* folders are skipped)")
        self.preflight(entries)
        with run_lock(self.out_dir), Manifest(self.manifest_path) as manifest:
            removed = clean_partial_files(self.out_dir)
            if removed:
                log.info("removed %d temporary file(s) of an interrupted run", len(removed))
            manifest.add(entries)
            keys = [e.key for e in entries]
            interrupted = manifest.recover_interrupted()
            changed = manifest.check_done(keys, mode=self.verify)
            retried = manifest.reset_failed(keys) if retry_failed else 0
            state = {r["key"]: r["state"] for r in manifest.rows(keys=keys)}
            todo = [e for e in entries if state[e.key] == "pending"]
            executor = make_executor(self.executor, self.settings, workers=self.workers, address=self.address,
                                     snapshot=self.snapshot, threads=self.threads,
                                     gpus_per_worker=self.gpus_per_worker, segment_fn=self.segment_fn,
                                     max_task_retries=self.max_task_retries)
            run_settings = {**{k: v for k, v in self.settings.items()}, "snapshot": self.snapshot}
            last = manifest.last_run()
            if last and last["settings"] and any(v == "done" for v in state.values()):
                before = json.loads(last["settings"])
                now = json.loads(json.dumps(run_settings, default=str))
                if before != now:
                    diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
                    log.warning("%s: the last run used other settings (%s); scans done then are kept as they "
                                "are (use another --out to redo them)", self.out_dir, ", ".join(diff))
            run_id = manifest.start_run(executor=self.executor, workers=self.workers, settings=run_settings,
                                        todo=len(todo))
            stats = {"run_id": run_id, "todo": len(todo), "done": 0, "failed": 0, "interrupted_redone": len(interrupted),
                     "changed_redone": len(changed), "failed_retried": retried,
                     "skipped_done": sum(v == "done" for v in state.values()),
                     "skipped_failed": sum(v == "failed" for v in state.values())}
            status = "finished"
            try:
                if todo:
                    self._execute(executor, manifest, todo, run_id, stats, progress)
            except BaseException:
                status = "interrupted"
                raise
            finally:
                running = [r["key"] for r in manifest.rows(state="running")]
                for key in running:  # handed to a worker, never finished: the next run redoes them
                    manifest.mark_pending(key)
                manifest.finish_run(run_id, done=stats["done"], failed=stats["failed"], status=status)
            summary = manifest.summary()
        summary["run"] = stats
        if self.report:
            summary["report"] = self._write_report()
            summary["measurements"] = self._write_table()
        return summary

    def _write_table(self) -> str | None:
        """The cohort's measurement table (:mod:`spineps_like.cohort.table`); like the report, a table that cannot
        be written is a warning."""
        from spineps_like.cohort.table import write_table

        try:
            return str(write_table(self.out_dir)[1][0])
        except Exception as e:  # noqa: BLE001 - the scans are done and recorded whatever happens here
            log.warning("%s: the measurement table could not be written: %s", self.out_dir, " ".join(str(e).split()))
            return None

    def _write_report(self) -> str | None:
        """The cohort's HTML report (:mod:`spineps_like.cohort.report`); a report that cannot be written is a
        warning, never a failed run."""
        from spineps_like.cohort.report import write_report

        try:
            return str(write_report(self.out_dir))
        except Exception as e:  # noqa: BLE001 - the scans are done and recorded whatever happens here
            log.warning("%s: the cohort report could not be written: %s", self.out_dir, " ".join(str(e).split()))
            return None

    def preflight(self, entries: Sequence[ScanEntry] = ()) -> None:
        """Before any worker starts: the output folder can be written, an existing manifest is one, the device is
        there and the model folders named load (config and manifest; the weights load in the workers)."""
        from spineps_like.checks import check_device, check_instance_model, check_output_dir, check_semantic_model
        from spineps_like.pipeline import DEFAULT_INSTANCE_MODEL, DEFAULT_SEMANTIC_MODEL

        check_output_dir(self.out_dir)
        if self.manifest_path.exists():
            open_manifest_summary(self.manifest_path)
        check_device(str(self.settings.get("device") or "cpu"))
        if self.segment_fn is not None:
            return
        sem, ins = self.settings.get("semantic_model"), self.settings.get("instance_model")
        if any(e.semantic_mask is None for e in entries) and (sem is None or isinstance(sem, (str, os.PathLike))):
            check_semantic_model(sem or DEFAULT_SEMANTIC_MODEL)
        if (not self.settings.get("semantic_only") and self.settings.get("instance_method", "network") == "network"
                and (ins is None or isinstance(ins, (str, os.PathLike)))):
            check_instance_model(ins or DEFAULT_INSTANCE_MODEL)

    def _execute(self, executor, manifest: Manifest, todo: list[ScanEntry], run_id: int, stats: dict,
                 progress: bool) -> None:
        from tqdm import tqdm

        need_semantic = any(e.semantic_mask is None for e in todo)
        t0 = time.perf_counter()
        bar = tqdm(total=len(todo), unit="scan", disable=not progress, dynamic_ncols=True, smoothing=0.1,
                   desc="cohort")
        try:
            for event in executor.run([e.to_task() for e in todo], need_semantic=need_semantic):
                if event[0] == "start":
                    manifest.mark_running(event[1], event[2], run_id)
                    continue
                key, res = event[1], event[2]
                common = dict(worker=res.get("worker"), started_at=res.get("started_at"),
                              finished_at=res.get("finished_at"), seconds=res.get("seconds"))
                if res.get("ok"):
                    manifest.mark_done(key, outputs=res["outputs"], timings=res.get("timings"), **common)
                    stats["done"] += 1
                else:
                    tb = None
                    if res.get("traceback"):
                        tb = str(atomic_write_text(_traceback_path(self.out_dir, key), res["traceback"]))
                    manifest.mark_failed(key, res.get("error") or "unknown error", traceback_path=tb, **common)
                    stats["failed"] += 1
                    msg = f"FAILED {key}: {res.get('error')}"
                    bar.write(msg, file=sys.stderr) if progress else log.warning(msg)
                finished = stats["done"] + stats["failed"]
                rate = 60.0 * finished / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{rate:.1f} scans/min, {stats['failed']} failed", refresh=False)
                bar.update(1)
                if not progress:
                    log.info("%d/%d %s %s (%.1f scans/min)", finished, len(todo), "done" if res.get("ok")
                             else "failed", key, rate)
        finally:
            bar.close()
            stats["wall_seconds"] = round(time.perf_counter() - t0, 3)
            n = stats["done"] + stats["failed"]
            stats["scans_per_min"] = round(60.0 * n / max(stats["wall_seconds"], 1e-9), 3)


def segment_cohort(inputs: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                   retry_failed: bool = False, progress: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Segment a cohort in one call: ``Cohort(inputs, out_dir, **kwargs).run(...)``; returns the summary."""
    return Cohort(inputs, out_dir, **kwargs).run(retry_failed=retry_failed, progress=progress)


def open_manifest_summary(path: Path, max_failures: int = 20) -> dict[str, Any]:
    """The summary of the manifest at ``path``; a :class:`CohortError` in one line when it is not one."""
    if path.is_dir():
        raise CohortError(f"{path}: is a folder, not a cohort manifest")
    try:
        with Manifest(path, readonly=True) as m:
            return m.summary(max_failures=max_failures)
    except sqlite3.DatabaseError as e:
        what = "not an SQLite database" if "not a database" in str(e) else f"unreadable ({e})"
        raise CohortError(f"{path}: not a cohort manifest ({what}); move it away or use another output "
                          "folder") from None


def cohort_status(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Summary of a cohort output folder's manifest (readable while a run is going on)."""
    path = Path(out_dir).expanduser() / MANIFEST_NAME
    if not path.exists():
        raise ValueError(f"{out_dir}: no cohort manifest ({MANIFEST_NAME}) here")
    return open_manifest_summary(path)


# ------------------------------------------------------------------------------------------------ command line
def add_segment_options(p: argparse.ArgumentParser) -> None:
    """The per-scan options of ``spineps-like segment`` that a cohort passes through."""
    p.add_argument("--semantic-only", action="store_true", help="stop after the semantic phase")
    p.add_argument("--semantic-model", default=None, help="model name or folder (default: bundled semantic model)")
    p.add_argument("--instance-model", default=None, help="model name or folder (default: bundled instance model)")
    p.add_argument("--instance-method", default="network", choices=["network", "geometric"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--amp", action="store_true", help="mixed precision")
    mirror = p.add_mutually_exclusive_group()
    mirror.add_argument("--mirror", dest="mirroring", action="store_true", default=None)
    mirror.add_argument("--no-mirror", dest="mirroring", action="store_false")
    p.add_argument("--step-size", type=float, default=None, help="sliding-window step as a fraction of the patch")
    p.add_argument("--n4", action="store_true", help="N4 bias-field correction (MRI)")
    p.add_argument("--restore", choices=("linear", "nearest"), default=None,
                   help="back from the model grid: class probabilities (default) or labels by nearest neighbour")
    p.add_argument("--batch-size", type=int, default=4, help="instance cutouts per forward pass")
    p.add_argument("--lumbar-count", type=int, default=None, choices=[4, 5, 6])
    p.add_argument("--no-snapshot", action="store_true", help="do not write PNG snapshots")
    p.add_argument("--assume-orientation", metavar="CODES", default=None,
                   help="axis codes (e.g. RAS) for NIfTIs whose header has no orientation (no qform, no sform); the "
                   "header's voxel sizes are kept and each such scan's summary notes what was assumed")
    p.add_argument("--series", default=None, help="in each DICOM folder that holds several series, the one to segment "
                   "(SeriesNumber, SeriesDescription or SeriesInstanceUID, e.g. 'T2 TSE SAG'); a folder without it "
                   "fails with the list of its series")


def add_cohort_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``cohort run``, ``cohort status``, ``cohort report`` and ``cohort measurements`` on the CLI's
    subparsers."""
    co = sub.add_parser("cohort", help="process a cohort with a resumable manifest (run | status | report | "
                        "measurements)")
    csub = co.add_subparsers(dest="cohort_command", metavar="run|status|report|measurements", required=True)
    r = csub.add_parser("run", help="segment every scan of a folder, BIDS dataset, glob or CSV list")
    r.add_argument("inputs", nargs="+", help="folder, BIDS dataset, glob ('data/**/*_T2w.nii.gz'), CSV/TSV list "
                                             "(column path, optional semantic_mask) or scan files")
    r.add_argument("--out", required=True, type=Path, help="output folder (derivatives_seg/, cohort.sqlite, logs/)")
    r.add_argument("--workers", type=int, default=1, help="workers, each holding the models once (default 1)")
    r.add_argument("--executor", default="local", choices=list(EXECUTORS))
    r.add_argument("--address", default=None, help="Ray cluster address (auto, ray://host:10001)")
    r.add_argument("--threads", type=int, default=None, help="torch threads / Ray CPUs per worker")
    r.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per Ray actor (default 1 with cuda)")
    r.add_argument("--max-task-retries", type=int, default=1, help="retries of a scan whose worker died")
    r.add_argument("--modality", action="append", default=None, help="BIDS suffix to keep (T2w, ct); repeatable")
    r.add_argument("--retry-failed", action="store_true", help="retry scans that failed in earlier runs")
    r.add_argument("--verify", default="checksum", choices=list(VERIFY_MODES),
                   help="how done scans are checked before being skipped (default: sha256 checksum)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar: one log line per scan")
    add_segment_options(r)
    r.set_defaults(func=cohort_main)
    s = csub.add_parser("status", help="counts per state, failures and throughput of a cohort output folder")
    s.add_argument("out", type=Path)
    s.add_argument("--max-failures", type=int, default=20, help="failures to list")
    s.set_defaults(func=cohort_main)
    rp = csub.add_parser("report", help="write the cohort's static HTML report (counts, one row per scan with its "
                         "QC picture, flags and errors, per-level volume and measurement plots with outliers, "
                         "Genant grades); works offline")
    rp.add_argument("out", type=Path, help="cohort output folder (holding cohort.sqlite)")
    rp.add_argument("--output", type=Path, default=None,
                    help="HTML file to write (default OUT/cohort_report.html; thumbnails link relative to it)")
    rp.set_defaults(func=cohort_main)
    mt = csub.add_parser("measurements", help="gather every scan's measurements into one table (one row per scan "
                         "and structure; scans without measurements listed with the reason)")
    mt.add_argument("out", type=Path, help="cohort output folder (holding cohort.sqlite)")
    mt.add_argument("--csv", type=Path, default=None, help="CSV file to write (default OUT/cohort_measurements.csv)")
    mt.add_argument("--parquet", type=Path, default=None, help="also write the table as Parquet (needs pyarrow)")
    mt.set_defaults(func=cohort_main)
    co.set_defaults(func=cohort_main)
    return co


def cohort_main(args: argparse.Namespace) -> int:
    """``spineps-like cohort run|status|report``: exit code 0 when no scan failed (report: when written), 1
    otherwise."""
    try:
        return _cohort_main(args)
    except CohortError as e:
        print(f"spineps-like: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


def _cohort_main(args: argparse.Namespace) -> int:
    if args.cohort_command == "status":
        path = Path(args.out).expanduser() / MANIFEST_NAME
        if not path.exists():
            raise ValueError(f"{args.out}: no cohort manifest ({MANIFEST_NAME}) here")
        summary = open_manifest_summary(path, max_failures=args.max_failures)
        print(format_summary(summary))
        return 1 if summary["counts"]["failed"] else 0
    if args.cohort_command == "report":
        from spineps_like.cohort.report import write_report

        print(write_report(args.out, args.output))
        return 0
    if args.cohort_command == "measurements":
        return _measurements_main(args)
    if args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    settings = {k: getattr(args, k) for k in SEGMENT_SETTINGS + LOAD_SETTINGS if getattr(args, k, None) is not None}
    for flag in ("semantic_only", "amp", "n4"):
        if not settings.get(flag):
            settings.pop(flag, None)
    cohort = Cohort(args.inputs, args.out, workers=args.workers, executor=args.executor, address=args.address,
                    threads=args.threads, gpus_per_worker=args.gpus_per_worker,
                    max_task_retries=args.max_task_retries, modalities=args.modality, verify=args.verify,
                    snapshot=not args.no_snapshot, **settings)
    summary = cohort.run(retry_failed=args.retry_failed, progress=not args.quiet)
    run = summary["run"]
    print(f"this run: {run['done']} done, {run['failed']} failed, {run['skipped_done']} already done"
          + (f", {run['skipped_failed']} failed before (not retried; --retry-failed)" if run["skipped_failed"] else "")
          + (f", {run.get('scans_per_min', 0):.2f} scans/min" if run["todo"] else ""))
    print(format_summary(summary))
    if summary.get("report"):
        print(f"report: {summary['report']}")
    if summary.get("measurements"):
        print(f"measurements: {summary['measurements']}")
    return 1 if summary["counts"]["failed"] else 0


def _measurements_main(args: argparse.Namespace, max_listed: int = 20) -> int:
    """``cohort measurements``: write the table, print its path(s) and a count; each scan without measurements is
    a warning line on stderr (the first ``max_listed``; the table lists all). Exit 0 when written."""
    from spineps_like.cohort.table import write_table

    table, paths = write_table(args.out, args.csv, args.parquet)
    for p in paths:
        print(p)
    print(f"{table.scans} scans, {table.scans - len(table.missing)} measured, {len(table.rows)} rows; "
          f"{len(table.missing)} without measurements")
    for key, why in table.missing[:max_listed]:
        print(f"spineps-like: warning: {key}: no measurements ({why})", file=sys.stderr)
    if len(table.missing) > max_listed:
        print(f"spineps-like: warning: ... and {len(table.missing) - max_listed} more scans without measurements "
              "(column 'problem' of the table)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m spineps_like.cohort.run run|status ...`` (same as ``spineps-like cohort ...``)."""
    parser = argparse.ArgumentParser(prog="spineps-like")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cohort_parser(sub)
    args = parser.parse_args(["cohort", *(sys.argv[1:] if argv is None else argv)])
    try:
        return cohort_main(args)
    except KeyboardInterrupt:
        print("spineps-like: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"spineps-like: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
