"""Where a cohort's scans are segmented: in this process, a pool of local worker processes, or Ray actors.

Every worker is a :class:`CohortWorker`: it loads the models once, then segments scans one at a time while a
background thread loads the next scan (I/O overlaps compute). Workers write the outputs (atomically, to shared
storage for Ray) and return a small result dict with the outputs' sha256 checksums; only the driver writes the
manifest. An executor's :meth:`run` yields events::

    ("start", key, worker_id)            the scan was handed to / taken by a worker
    ("result", key, result_dict)         {"ok": bool, "error", "traceback", "outputs", "timings", ...}

Scheduling (pool and Ray alike): each worker has one scan outstanding; each call also names the scan the worker
will get next (reserved for it), so the worker loads it while it segments the current one. An idle worker takes
another worker's reserved scan, so the tail of a cohort stays balanced.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger("spineps_like.cohort")

#: Keyword arguments of :func:`spineps_like.pipeline.segment` a cohort passes through.
SEGMENT_SETTINGS = ("semantic_model", "instance_model", "instance_method", "semantic_only", "device", "amp",
                    "mirroring", "step_size", "n4", "restore", "batch_size", "lumbar_count")
#: Settings of how a scan is read (:func:`spineps_like.io.load_scan`), passed through like the segment settings.
LOAD_SETTINGS = ("assume_orientation", "series")
EXECUTORS = ("local", "ray")
_IN_FLIGHT = 1  # scans outstanding per worker; each call also names the worker's next scan, which it prefetches


class CohortError(RuntimeError):
    """The cohort cannot run at all (workers fail to start, the output folder is locked, ...); one line."""


def one_line(exc: BaseException) -> str:
    """'ScanError: /x.nii.gz: not a readable image (...)' from an exception."""
    msg = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def load_inputs(task: dict[str, Any], assume_orientation: str | None = None,
                series: str | int | None = None) -> tuple[Any, Any, list[str]]:
    """(image, semantic mask or None, what was assumed) of a task, read from disk (``assume_orientation``: see
    :func:`spineps_like.io.load_scan`; its warnings become the scan's notes). ``series`` picks the series of every
    DICOM folder that holds several (number, description or UID); NIfTI and MetaImage scans ignore it."""
    import warnings

    from spineps_like.io import ScanWarning, is_dicom_input, load_scan

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ScanWarning)
        image = load_scan(task["path"], assume_orientation=assume_orientation,
                          series=series if is_dicom_input(task["path"]) else None)
        mask = (load_scan(task["semantic_mask"], kind="mask", assume_orientation=assume_orientation)
                if task.get("semantic_mask") else None)
    notes = [str(w.message) for w in caught if issubclass(w.category, ScanWarning)]
    for w in caught:
        if not issubclass(w.category, ScanWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return image, mask, notes


class CohortWorker:
    """One worker: holds the loaded models and segments scans, prefetching the next one in a thread.

    Parameters
    ----------
    settings : keyword arguments for :func:`~spineps_like.pipeline.segment` (model names/paths or loaded models).
    snapshot : write the PNG snapshot beside the masks.
    threads : torch CPU threads for this worker (None: leave as is).
    segment_fn : the per-scan function, ``segment_fn(scan, **settings) -> SegmentResult``; default
        :func:`spineps_like.pipeline.segment`. Must be importable (picklable) for pool and Ray workers.
    """

    def __init__(self, settings: dict[str, Any], *, snapshot: bool = True, threads: int | None = None,
                 segment_fn: Callable | None = None):
        from spineps_like.runtime import tune_allocator

        tune_allocator()  # once per worker process (see spineps_like.runtime)
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self.settings = dict(settings)
        self.snapshot = snapshot
        self.segment_fn = segment_fn
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="cohort-prefetch")
        self._prefetched: dict[str, Future] = {}
        self._models: dict[str, Any] = {}

    # models are loaded on first use (a cohort of semantic masks never loads the semantic model), then kept
    def _semantic_model(self) -> Any:
        m = self.settings.get("semantic_model")
        if m is not None and not isinstance(m, (str, os.PathLike)):
            return m
        if "semantic" not in self._models:
            from spineps_like.models import load_semantic_model
            from spineps_like.pipeline import DEFAULT_SEMANTIC_MODEL

            self._models["semantic"] = load_semantic_model(m or DEFAULT_SEMANTIC_MODEL,
                                                           device=self.settings.get("device") or "cpu")
        return self._models["semantic"]

    def _instance_model(self) -> Any:
        m = self.settings.get("instance_model")
        if m is not None and not isinstance(m, (str, os.PathLike)):
            return m
        if "instance" not in self._models:
            from spineps_like.instance.network import load_instance_model
            from spineps_like.models import find_model
            from spineps_like.pipeline import DEFAULT_INSTANCE_MODEL

            self._models["instance"] = load_instance_model(find_model(m or DEFAULT_INSTANCE_MODEL).path,
                                                           device=self.settings.get("device") or "cpu")
        return self._models["instance"]

    def load_models(self, need_semantic: bool = True) -> str:
        """Load the models the settings need now (so that a bad model fails the run before any scan); returns
        the worker id."""
        if need_semantic:
            self._semantic_model()
        if self.settings.get("instance_method", "network") == "network" and not self.settings.get("semantic_only"):
            self._instance_model()
        return self.worker_id

    def _load_settings(self) -> dict[str, Any]:
        return {k: self.settings.get(k) for k in LOAD_SETTINGS}

    def prefetch(self, task: dict[str, Any] | None) -> None:
        """Start loading ``task``'s scan in the background."""
        if task is not None and task["key"] not in self._prefetched:
            self._prefetched[task["key"]] = self._loader.submit(load_inputs, task, **self._load_settings())

    def process(self, task: dict[str, Any], next_task: dict[str, Any] | None = None) -> dict[str, Any]:
        """Segment one scan and write its outputs; never raises for a bad scan (the result says why)."""
        from spineps_like.cohort.manifest import describe_outputs

        started = time.time()
        t0 = time.perf_counter()
        out: dict[str, Any] = {"key": task["key"], "worker": self.worker_id, "started_at": started}
        fut = self._prefetched.pop(task["key"], None)
        keep = next_task["key"] if next_task is not None else None
        for k in [k for k in self._prefetched if k != keep]:  # scans announced here but given to another worker
            self._prefetched.pop(k).cancel()
        self.prefetch(next_task)
        try:
            wait0 = time.perf_counter()
            image, mask, assumed = fut.result() if fut is not None else load_inputs(task, **self._load_settings())
            load_wait = time.perf_counter() - wait0
            kwargs = {k: v for k, v in self.settings.items() if k in SEGMENT_SETTINGS and v is not None}
            if mask is not None:
                kwargs["semantic_mask"] = mask
            else:
                kwargs["semantic_model"] = self._semantic_model()
            if kwargs.get("instance_method", "network") == "network" and not kwargs.get("semantic_only"):
                kwargs["instance_model"] = self._instance_model()
            if self.segment_fn is None:
                from spineps_like.pipeline import segment as segment_fn
            else:
                segment_fn = self.segment_fn
            result = segment_fn(image, **kwargs)
            result.notes.extend(assumed)
            paths = result.save(task["out_dir"], name_from=task["path"], snapshot=self.snapshot)
            timings = {k: round(v, 4) for k, v in result.timings.items()}
            timings["load_wait"] = round(load_wait, 4)
            out.update(ok=True, outputs=describe_outputs(paths), timings=timings)
        except Exception as e:  # a bad scan never stops the cohort
            out.update(ok=False, error=one_line(e), traceback=traceback.format_exc())
        out["finished_at"] = time.time()
        out["seconds"] = round(time.perf_counter() - t0, 4)
        return out

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------------ scheduling
class _Dispatcher:
    """Hands tasks to workers, at most ``_IN_FLIGHT`` each, telling every call which task comes next to it."""

    def __init__(self, tasks: Sequence[dict[str, Any]]):
        self.pending: deque[dict[str, Any]] = deque(tasks)
        self.reserved: dict[Any, dict[str, Any] | None] = {}

    def next_for(self, worker: Any) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        task = self.reserved.pop(worker, None)
        if task is None:
            if not self.pending:
                if not self.reserved:
                    return None
                task = self.reserved.pop(next(iter(self.reserved)))  # idle: take another worker's next scan
            else:
                task = self.pending.popleft()
        hint = self.pending.popleft() if self.pending else None
        if hint is not None:
            self.reserved[worker] = hint
        return task, hint

    def release(self, worker: Any) -> None:
        """A worker is gone: its reserved task goes back to the front of the queue."""
        task = self.reserved.pop(worker, None)
        if task is not None:
            self.pending.appendleft(task)


class InProcessExecutor:
    """One worker in this process (models loaded once; the next scan loads in a thread while one runs)."""

    name = "local"

    def __init__(self, settings: dict[str, Any], *, snapshot: bool = True, threads: int | None = None,
                 segment_fn: Callable | None = None):
        self.kwargs = dict(settings=settings, snapshot=snapshot, threads=threads, segment_fn=segment_fn)
        self.workers = 1

    def run(self, tasks: Sequence[dict[str, Any]], *, need_semantic: bool = True) -> Iterator[tuple]:
        worker = CohortWorker(**self.kwargs)
        try:
            try:
                worker.load_models(need_semantic)
            except Exception as e:
                raise CohortError(f"worker could not load its models: {one_line(e)}") from None
            tasks = list(tasks)
            for i, task in enumerate(tasks):
                yield ("start", task["key"], worker.worker_id)
                yield ("result", task["key"], worker.process(task, tasks[i + 1] if i + 1 < len(tasks) else None))
        finally:
            worker.close()


def _pool_main(wid: int, kwargs: dict[str, Any], need_semantic: bool, tasks, events) -> None:
    """Body of one local pool worker process: tasks and events are one-way pipes to and from the driver.

    Events are sent synchronously (``Connection.send`` returns once the bytes are in the pipe), so a result sent
    before the process is killed still reaches the driver.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the driver, which stops the workers
    parent = os.getppid()
    try:
        worker = CohortWorker(**kwargs)
        events.send(("ready", worker.load_models(need_semantic)))
    except BaseException as e:
        events.send(("init_failed", one_line(e)))
        return
    while True:
        if not tasks.poll(1.0):
            if os.getppid() != parent:  # the driver died: do not linger
                return
            continue
        try:
            msg = tasks.recv()
        except EOFError:
            return
        if msg is None:
            break
        task, hint = msg
        events.send(("start", task["key"]))
        events.send(("result", worker.process(task, hint)))
    worker.close()


class LocalPoolExecutor:
    """N worker processes (multiprocessing 'spawn'), each holding the models once.

    A worker process that dies (killed, out of memory, segfault) is replaced at once; the scan it was running is
    retried up to ``max_task_retries`` times, then marked failed with the exit code; the scan it had been told
    about is requeued.
    """

    name = "local"

    def __init__(self, settings: dict[str, Any], *, workers: int = 2, snapshot: bool = True,
                 threads: int | None = None, segment_fn: Callable | None = None, max_task_retries: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        _check_picklable_models(settings)
        self.workers = int(workers)
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.workers)
        self.kwargs = dict(settings=settings, snapshot=snapshot, threads=self.threads, segment_fn=segment_fn)
        self.max_task_retries = int(max_task_retries)

    def run(self, tasks: Sequence[dict[str, Any]], *, need_semantic: bool = True) -> Iterator[tuple]:
        import multiprocessing as mp
        from multiprocessing.connection import wait

        ctx = mp.get_context("spawn")
        procs: dict[int, Any] = {}
        task_pipes: dict[int, Any] = {}
        event_pipes: dict[int, Any] = {}
        inflight: dict[int, deque] = {}
        started: dict[int, str | None] = {}
        ids: dict[int, str] = {}
        tries: dict[str, int] = {}
        disp = _Dispatcher(list(tasks))
        by_key = {t["key"]: t for t in tasks}
        counter = {"next": 0, "deaths": 0, "remaining": len(disp.pending)}

        def spawn() -> None:
            wid = counter["next"]
            counter["next"] += 1
            t_recv, t_send = ctx.Pipe(duplex=False)
            e_recv, e_send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_pool_main, args=(wid, self.kwargs, need_semantic, t_recv, e_send),
                            name=f"spineps-like-cohort-{wid}", daemon=True)
            p.start()
            t_recv.close()
            e_send.close()  # the worker holds the only write end: EOF when it dies
            procs[wid], task_pipes[wid], event_pipes[wid] = p, t_send, e_recv
            inflight[wid], started[wid] = deque(), None

        def feed(wid: int) -> None:
            while len(inflight[wid]) < _IN_FLIGHT:
                nxt = disp.next_for(wid)
                if nxt is None:
                    break
                inflight[wid].append(nxt[0]["key"])
                try:
                    task_pipes[wid].send(nxt)
                except OSError:  # the worker just died: bury() requeues what it was given
                    break

        def handle(wid: int, ev: tuple) -> Iterator[tuple]:
            kind = ev[0]
            if kind == "ready":
                ids[wid] = ev[1]
                feed(wid)
            elif kind == "init_failed":
                raise CohortError(f"worker could not load its models: {ev[1]}")
            elif kind == "start":
                started[wid] = ev[1]
                yield ("start", ev[1], ids.get(wid, str(wid)))
            elif kind == "result":
                res = ev[1]
                if res["key"] in inflight[wid]:
                    inflight[wid].remove(res["key"])
                started[wid] = None
                counter["remaining"] -= 1
                yield ("result", res["key"], res)
                feed(wid)

        def drain(wid: int) -> Iterator[tuple]:
            conn = event_pipes[wid]
            try:
                while conn.poll():
                    yield from handle(wid, conn.recv())
            except (EOFError, OSError):
                pass

        def bury(wid: int) -> Iterator[tuple]:
            """A worker ended: if it had work, requeue what it was told about, retry or fail what it was running."""
            p = procs.pop(wid)
            p.join(timeout=5)
            event_pipes.pop(wid).close()
            task_pipes.pop(wid).close()
            running, pending = started.pop(wid), inflight.pop(wid)
            disp.release(wid)
            if not pending and p.exitcode == 0:
                return  # finished cleanly
            counter["deaths"] += 1
            log.warning("cohort worker %s (pid %s) died with exit code %s", ids.get(wid, wid), p.pid, p.exitcode)
            for key in reversed(list(pending)):
                if key != running:
                    disp.pending.appendleft(by_key[key])
            if running is not None:
                tries[running] = tries.get(running, 0) + 1
                if tries[running] > self.max_task_retries:
                    counter["remaining"] -= 1
                    yield ("result", running, {
                        "key": running, "ok": False, "worker": ids.get(wid, str(wid)), "traceback": None,
                        "error": f"WorkerDied: the worker process died (exit code {p.exitcode}) while segmenting "
                                 f"this scan, {tries[running]} time(s)", "finished_at": time.time()})
                else:
                    disp.pending.appendleft(by_key[running])
            if counter["deaths"] > 10 * self.workers + 10:
                raise CohortError(f"worker processes keep dying ({counter['deaths']} deaths, last exit code "
                                  f"{p.exitcode})")

        try:
            for _ in range(min(self.workers, max(1, counter["remaining"]))):
                spawn()
            while counter["remaining"] > 0:
                if not procs:
                    raise CohortError("all worker processes exited with scans outstanding")
                conns = {event_pipes[w]: w for w in procs}
                sentinels = {procs[w].sentinel: w for w in procs}
                for obj in wait(list(conns) + list(sentinels), timeout=5.0):
                    if obj in conns and conns[obj] in procs:
                        yield from drain(conns[obj])
                for obj, wid in sentinels.items():
                    if wid in procs and not procs[wid].is_alive():
                        yield from drain(wid)  # what it sent before it ended comes first
                        yield from bury(wid)
                for wid in list(procs):  # requeued scans go to idle workers first
                    if wid in ids and not inflight[wid]:
                        feed(wid)
                while counter["remaining"] > 0 and disp.pending and len(procs) < self.workers:
                    spawn()
        finally:
            if counter["remaining"] == 0:  # finished: let the workers exit on their own
                for wid in list(procs):
                    try:
                        task_pipes[wid].send(None)
                    except OSError:
                        pass
                deadline = time.time() + 10
                for p in procs.values():
                    p.join(timeout=max(0.1, deadline - time.time()))
            for p in procs.values():  # interrupted or stuck: stop now (outputs are written atomically)
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)


def _check_picklable_models(settings: dict[str, Any]) -> None:
    for k in ("semantic_model", "instance_model"):
        v = settings.get(k)
        if v is not None and not isinstance(v, (str, os.PathLike)):
            raise ValueError(f"{k}: worker processes load their own models; give a model name or folder, "
                             "not a loaded model")


class RayExecutor:
    """One Ray actor per worker, each holding the models; GPU-aware, restarted on death, tasks retried.

    Parameters
    ----------
    workers : number of actors.
    address : Ray cluster address (``auto``, ``ray://host:10001``); None starts a local Ray instance unless Ray is
        already initialised in this process.
    threads : CPUs per actor (``num_cpus``; torch threads).
    gpus_per_worker : GPUs per actor (fractions share a GPU); default 1 when ``device`` is cuda, else 0.
    max_task_retries : how often a scan is retried when its actor dies (the actor itself restarts without limit).

    Outputs are written by the actors, so ``out_dir`` must be on storage every node sees under the same path.
    """

    name = "ray"

    def __init__(self, settings: dict[str, Any], *, workers: int = 1, address: str | None = None,
                 snapshot: bool = True, threads: int | None = None, gpus_per_worker: float | None = None,
                 segment_fn: Callable | None = None, max_task_retries: int = 2):
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise CohortError("the Ray executor needs Ray: pip install 'spineps-like[ray]'")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        _check_picklable_models(settings)
        self.workers = int(workers)
        self.address = address
        self.threads = int(threads or 1)
        device = str(settings.get("device") or "cpu")
        self.gpus = float(gpus_per_worker if gpus_per_worker is not None else (1 if device.startswith("cuda") else 0))
        self.kwargs = dict(settings=settings, snapshot=snapshot, threads=self.threads, segment_fn=segment_fn)
        self.max_task_retries = int(max_task_retries)

    def run(self, tasks: Sequence[dict[str, Any]], *, need_semantic: bool = True) -> Iterator[tuple]:
        import ray

        own = not ray.is_initialized()
        if own:
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                         **({} if self.address else {"num_cpus": os.cpu_count()}))
            except Exception as e:
                raise CohortError(f"could not start or reach Ray (address {self.address or 'local'}): "
                                  f"{one_line(e)}") from None
        actor_cls = ray.remote(CohortWorker).options(
            num_cpus=self.threads, num_gpus=self.gpus, max_restarts=-1, max_task_retries=self.max_task_retries)
        actors = [actor_cls.remote(**self.kwargs) for _ in range(min(self.workers, max(1, len(tasks))))]
        try:
            try:
                ids = ray.get([a.load_models.remote(need_semantic) for a in actors])
            except Exception as e:
                raise CohortError(f"Ray workers could not load their models: {one_line(_ray_cause(e))}") from None
            disp = _Dispatcher(list(tasks))
            refs: dict[Any, tuple[int, str]] = {}
            outstanding = {i: 0 for i in range(len(actors))}

            def feed(i: int):
                while outstanding[i] < _IN_FLIGHT:
                    nxt = disp.next_for(i)
                    if nxt is None:
                        return
                    refs[actors[i].process.remote(*nxt)] = (i, nxt[0]["key"])
                    outstanding[i] += 1
                    yield ("start", nxt[0]["key"], ids[i])

            for i in range(len(actors)):
                yield from feed(i)
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
                for ref in done:
                    i, key = refs.pop(ref)
                    outstanding[i] -= 1
                    try:
                        res = ray.get(ref)
                    except Exception as e:  # the actor died more often than max_task_retries allows
                        res = {"key": key, "ok": False, "worker": ids[i], "error": one_line(_ray_cause(e)),
                               "traceback": traceback.format_exc(), "finished_at": time.time()}
                    yield ("result", key, res)
                    yield from feed(i)
                for j in range(len(actors)):  # idle actors take scans reserved for busy ones
                    if outstanding[j] == 0:
                        yield from feed(j)
        finally:
            for a in actors:
                try:
                    ray.kill(a)
                except Exception:
                    pass
            if own:
                ray.shutdown()


def _ray_cause(e: BaseException) -> BaseException:
    """The user's exception inside a RayTaskError, else the Ray error itself."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def make_executor(kind: str, settings: dict[str, Any], *, workers: int = 1, address: str | None = None,
                  snapshot: bool = True, threads: int | None = None, gpus_per_worker: float | None = None,
                  segment_fn: Callable | None = None, max_task_retries: int = 1):
    """The executor for ``kind`` ('local' or 'ray'); 'local' with one worker runs in this process."""
    if kind not in EXECUTORS:
        raise ValueError(f"unknown executor {kind!r}: use one of {', '.join(EXECUTORS)}")
    if kind == "ray":
        return RayExecutor(settings, workers=workers, address=address, snapshot=snapshot, threads=threads,
                           gpus_per_worker=gpus_per_worker, segment_fn=segment_fn, max_task_retries=max_task_retries)
    if address:
        raise ValueError("--address is for the Ray executor; add --executor ray")
    if workers == 1:
        return InProcessExecutor(settings, snapshot=snapshot, threads=threads, segment_fn=segment_fn)
    return LocalPoolExecutor(settings, workers=workers, snapshot=snapshot, threads=threads, segment_fn=segment_fn,
                             max_task_retries=max_task_retries)
