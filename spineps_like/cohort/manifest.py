"""The run manifest of a cohort: one SQLite file (``OUT/cohort.sqlite``) holding every scan's state.

States: ``pending`` -> ``running`` -> ``done`` | ``failed``. A row records the scan's worker, attempts, start and end
times, seconds, the error (one line) and traceback file of a failure, and the outputs with their sha256 checksums.
The database runs in WAL mode so ``cohort status`` can read while a run writes; writes are short ``BEGIN IMMEDIATE``
transactions with a busy timeout, so several processes may write safely (the cohort driver is the only writer in
practice: Ray workers on other machines never touch it).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from spineps_like.cohort.discover import ScanEntry

MANIFEST_NAME = "cohort.sqlite"
STATES = ("pending", "running", "done", "failed")
VERIFY_MODES = ("checksum", "size", "none")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS scans (
    key TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    out_dir TEXT NOT NULL,
    semantic_mask TEXT,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    run_id INTEGER,
    started_at REAL,
    finished_at REAL,
    seconds REAL,
    error TEXT,
    traceback_path TEXT,
    outputs TEXT,
    timings TEXT,
    updated_at REAL
);
CREATE INDEX IF NOT EXISTS scans_state ON scans (state);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at REAL NOT NULL,
    finished_at REAL,
    host TEXT,
    pid INTEGER,
    executor TEXT,
    workers INTEGER,
    settings TEXT,
    todo INTEGER,
    done INTEGER DEFAULT 0,
    failed INTEGER DEFAULT 0,
    status TEXT
);
"""


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_outputs(paths: dict[str, str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """{kind: {path, sha256, bytes}} for written output files (what workers return and the manifest stores)."""
    return {k: {"path": str(p), "sha256": sha256_of(p), "bytes": os.path.getsize(p)} for k, p in paths.items()}


def outputs_intact(outputs: dict[str, dict[str, Any]], mode: str = "checksum") -> bool:
    """Whether recorded outputs are still on disk as written: ``checksum`` (sha256), ``size`` or ``none``."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"unknown verify mode {mode!r}: use one of {', '.join(VERIFY_MODES)}")
    if not outputs:
        return False
    for rec in outputs.values():
        p = Path(rec["path"])
        if mode == "none":
            continue
        try:
            if os.path.getsize(p) != rec["bytes"]:
                return False
        except OSError:
            return False
        if mode == "checksum" and sha256_of(p) != rec["sha256"]:
            return False
    return True


class Manifest:
    """The SQLite run manifest of a cohort output folder.

    >>> with Manifest("/data/out/cohort.sqlite") as m:          # doctest: +SKIP
    ...     m.counts()
    {'pending': 0, 'running': 0, 'done': 120, 'failed': 2}
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise ValueError(f"{self.path}: no cohort manifest")
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout,
                                       isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        with self.transaction():
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(stmt)

    # -------------------------------------------------------------- plumbing
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: takes the write lock at once (``BEGIN IMMEDIATE``), commits or rolls back."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- cohort
    def add(self, entries: Sequence[ScanEntry]) -> int:
        """Register scans (new ones as pending; known ones keep their state, their paths are updated)."""
        now = time.time()
        with self.transaction() as db:
            before = db.execute("SELECT COUNT(*) FROM scans").fetchone()[0]
            db.executemany(
                "INSERT INTO scans (key, path, out_dir, semantic_mask, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET path = excluded.path, out_dir = excluded.out_dir, "
                "semantic_mask = excluded.semantic_mask",
                [(e.key, str(e.path), str(e.out_dir), str(e.semantic_mask) if e.semantic_mask else None, now)
                 for e in entries])
            return db.execute("SELECT COUNT(*) FROM scans").fetchone()[0] - before

    def recover_interrupted(self) -> list[str]:
        """Scans left ``running`` by a run that died: back to pending. Call only while holding the run lock."""
        with self.transaction() as db:
            keys = [r[0] for r in db.execute("SELECT key FROM scans WHERE state = 'running'")]
            db.execute("UPDATE scans SET state = 'pending', worker = NULL, updated_at = ? WHERE state = 'running'",
                       (time.time(),))
        return keys

    def check_done(self, keys: Iterable[str] | None = None, mode: str = "checksum", threads: int = 4) -> list[str]:
        """Done scans whose outputs are missing or changed go back to pending; returns their keys."""
        rows = self.rows(state="done", keys=keys)
        if mode == "none" or not rows:
            return []
        with ThreadPoolExecutor(max(1, threads)) as pool:  # hashlib releases the GIL
            ok = list(pool.map(lambda r: outputs_intact(json.loads(r["outputs"] or "{}"), mode), rows))
        bad = [r["key"] for r, good in zip(rows, ok) if not good]
        if bad:
            with self.transaction() as db:
                db.executemany("UPDATE scans SET state = 'pending', updated_at = ? WHERE key = ?",
                               [(time.time(), k) for k in bad])
        return bad

    def reset_failed(self, keys: Iterable[str] | None = None) -> int:
        """Failed scans back to pending (``--retry-failed``)."""
        with self.transaction() as db:
            if keys is None:
                return db.execute("UPDATE scans SET state = 'pending' WHERE state = 'failed'").rowcount
            return sum(db.execute("UPDATE scans SET state = 'pending' WHERE state = 'failed' AND key = ?",
                                  (k,)).rowcount for k in keys)

    # -------------------------------------------------------------- per scan
    def mark_running(self, key: str, worker: str, run_id: int | None = None) -> None:
        """A worker took the scan: state running, attempts + 1."""
        now = time.time()
        with self.transaction() as db:
            db.execute("UPDATE scans SET state = 'running', attempts = attempts + 1, worker = ?, run_id = ?, "
                       "started_at = ?, finished_at = NULL, error = NULL, updated_at = ? WHERE key = ?",
                       (worker, run_id, now, now, key))

    def mark_pending(self, key: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE scans SET state = 'pending', worker = NULL, updated_at = ? WHERE key = ?",
                       (time.time(), key))

    def mark_done(self, key: str, *, outputs: dict, worker: str | None = None, started_at: float | None = None,
                  finished_at: float | None = None, seconds: float | None = None, timings: dict | None = None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE scans SET state = 'done', worker = COALESCE(?, worker), "
                       "started_at = COALESCE(?, started_at), finished_at = ?, seconds = ?, error = NULL, "
                       "traceback_path = NULL, outputs = ?, timings = ?, updated_at = ? WHERE key = ?",
                       (worker, started_at, finished_at or time.time(), seconds, json.dumps(outputs),
                        json.dumps(timings or {}), time.time(), key))

    def mark_failed(self, key: str, error: str, *, traceback_path: str | None = None, worker: str | None = None,
                    started_at: float | None = None, finished_at: float | None = None,
                    seconds: float | None = None) -> None:
        error = (error.strip().splitlines() or ["unknown error"])[0][:1000]
        with self.transaction() as db:
            db.execute("UPDATE scans SET state = 'failed', worker = COALESCE(?, worker), "
                       "started_at = COALESCE(?, started_at), finished_at = ?, seconds = ?, error = ?, "
                       "traceback_path = ?, updated_at = ? WHERE key = ?",
                       (worker, started_at, finished_at or time.time(), seconds, error, traceback_path,
                        time.time(), key))

    # -------------------------------------------------------------- runs
    def start_run(self, *, executor: str, workers: int, settings: dict, todo: int) -> int:
        with self.transaction() as db:
            cur = db.execute("INSERT INTO runs (started_at, host, pid, executor, workers, settings, todo, status) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, 'running')",
                             (time.time(), socket.gethostname(), os.getpid(), executor, workers,
                              json.dumps(settings, default=str, sort_keys=True), todo))
            return int(cur.lastrowid)

    def finish_run(self, run_id: int, *, done: int, failed: int, status: str = "finished") -> None:
        with self.transaction() as db:
            db.execute("UPDATE runs SET finished_at = ?, done = ?, failed = ?, status = ? WHERE run_id = ?",
                       (time.time(), done, failed, status, run_id))

    def last_run(self) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM runs ORDER BY run_id DESC LIMIT 1").fetchone()
        return dict(row) if row else None

    # -------------------------------------------------------------- reading
    def rows(self, *, state: str | None = None, keys: Iterable[str] | None = None) -> list[sqlite3.Row]:
        sql, args = "SELECT * FROM scans", []
        if state is not None:
            if state not in STATES:
                raise ValueError(f"unknown state {state!r}: use one of {', '.join(STATES)}")
            sql += " WHERE state = ?"
            args.append(state)
        rows = self._db.execute(sql + " ORDER BY key", args).fetchall()
        if keys is not None:
            want = set(keys)
            rows = [r for r in rows if r["key"] in want]
        return rows

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM scans WHERE key = ?", (key,)).fetchone()
        return dict(row) if row else None

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATES, 0)
        for state, n in self._db.execute("SELECT state, COUNT(*) FROM scans GROUP BY state"):
            out[state] = n
        return out

    def summary(self, max_failures: int = 20) -> dict[str, Any]:
        """Counts per state, failures with their one-line errors, and throughput of the last run."""
        counts = self.counts()
        failures = [{"key": r["key"], "path": r["path"], "error": r["error"], "traceback": r["traceback_path"],
                     "attempts": r["attempts"]}
                    for r in self._db.execute("SELECT * FROM scans WHERE state = 'failed' ORDER BY key LIMIT ?",
                                              (max_failures,))]
        out: dict[str, Any] = {"manifest": str(self.path), "total": sum(counts.values()), "counts": counts,
                               "failures": failures}
        secs = self._db.execute("SELECT AVG(seconds), SUM(seconds) FROM scans WHERE state = 'done'").fetchone()
        out["mean_seconds_per_scan"] = round(secs[0], 3) if secs[0] is not None else None
        run = self.last_run()
        if run is not None:
            end = run["finished_at"] or time.time()
            n = self._db.execute("SELECT COUNT(*), MIN(started_at), MAX(finished_at) FROM scans "
                                 "WHERE state = 'done' AND run_id = ?", (run["run_id"],)).fetchone()
            wall = max(end - run["started_at"], 1e-9)
            out["last_run"] = {"run_id": run["run_id"], "status": run["status"], "executor": run["executor"],
                               "workers": run["workers"], "host": run["host"], "started_at": run["started_at"],
                               "wall_seconds": round(wall, 2), "done": n[0],
                               "scans_per_min": round(60.0 * n[0] / wall, 2)}
        return out


def format_summary(summary: dict[str, Any]) -> str:
    """``cohort status`` text: counts, throughput, failures with their one-line errors."""
    c = summary["counts"]
    lines = [f"{summary['total']} scans: {c['done']} done, {c['failed']} failed, {c['pending']} pending, "
             f"{c['running']} running  ({summary['manifest']})"]
    run = summary.get("last_run")
    if run:
        lines.append(f"last run #{run['run_id']} ({run['status']}, {run['executor']} x{run['workers']} on "
                     f"{run['host']}): {run['done']} done in {run['wall_seconds']:.1f} s, "
                     f"{run['scans_per_min']:.2f} scans/min")
    if summary.get("mean_seconds_per_scan") is not None:
        lines.append(f"mean {summary['mean_seconds_per_scan']:.2f} s per scan (worker time)")
    for f in summary["failures"]:
        lines.append(f"FAILED {f['key']}: {f['error']}" + (f"  [traceback: {f['traceback']}]" if f["traceback"] else ""))
    if c["failed"] > len(summary["failures"]):
        lines.append(f"... and {c['failed'] - len(summary['failures'])} more failures")
    return "\n".join(lines)
