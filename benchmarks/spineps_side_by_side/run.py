"""Side-by-side benchmark: SPINEPS 2.1.3 vs spineps-like, same weights, same evaluation phantoms, same settings.

One command (after ``bash benchmarks/spineps_side_by_side/setup_spineps_env.sh``)::

    .venv/bin/python benchmarks/spineps_side_by_side/run.py             # trained models, 5 development phantoms
    .venv/bin/python benchmarks/spineps_side_by_side/run.py --set test  # the same 5 cases from the test set
    .venv/bin/python benchmarks/spineps_side_by_side/run.py --smoke     # random tiny models, 1 small phantom

Steps: export our models with :func:`spineps_like.models.export.export_spineps` (SPINEPS loads the exported folders
unchanged; we load the same folders), write the evaluation phantoms of a named set of :mod:`spineps_like.phantom_sets`
(``--set development``, the default: seeds 900000+, on which our clean-up and post-processing rules were tuned;
``--set test``: seeds 2000000+, never used for any decision; training refuses both), then per case
run each pipeline in a fresh subprocess (SPINEPS in its own venv via ``spineps_worker.py``; ours via
``run.py _ours``), recording per-phase seconds, wall seconds and peak RSS (``VmHWM`` of that subprocess), and
score both with :func:`spineps_like.evaluation.evaluate` (vertebra/IVD PQ, RQ, SQ, global Dice). N4 is off on both
sides, test-time mirroring and the torch thread count are the same on both. ``--profile`` adds a cProfile of our
pipeline on the first case (``results/profile_ours.txt``).

Our side tunes glibc's allocator (:func:`spineps_like.runtime.tune_allocator`, as our command line and cohort workers
do); SPINEPS runs with glibc's defaults, as its users run it. ``--spineps-malloc-tuning`` gives SPINEPS the same
thresholds through glibc's environment variables (how much of the gap is the allocator);
``SPINEPS_LIKE_MALLOC_TUNING=0`` turns ours off.

Results: ``results/side_by_side.json`` and ``results/side_by_side.md`` (ratios SPINEPS / spineps-like); options add
suffixes (``_test``, ``_given_semantic``, ...), ``--name STEM`` names the files outright (e.g. ``side_by_side_epyc``).
Both files name the phantom set and the command that wrote them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_SPINEPS_PYTHON = HERE / ".venv-spineps" / "bin" / "python"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from spineps_like.phantom_sets import DEVELOPMENT, SETS, PhantomSet, phantom_set  # noqa: E402

#: The evaluation cases: (index into the phantom set, fov, variant); seed = the set's first seed + index.
CASE_INDICES = (
    (1, "lumbar", None),
    (3, "lumbar", "block"),
    (4, "lumbar", "collapsed"),
    (5, "lumbar", "sacralised_l5"),
    (2, "whole", None),
)


def cases_of(pset: PhantomSet, indices=CASE_INDICES) -> tuple:
    """(seed, fov, variant) of each case in ``pset``."""
    return tuple((pset.seed(i), fov, variant) for i, fov, variant in indices)


#: Development-set cases (seeds 900001-900005), as benchmarks/mask_identity.py, coarse_tail.py and
#: overhead_share.py use them.
CASES = cases_of(DEVELOPMENT)
SMOKE_CASES = cases_of(DEVELOPMENT, CASE_INDICES[:1])
METRICS = ("vertebra.pq", "vertebra.rq", "vertebra.sq", "vertebra.global_dice", "ivd.pq", "ivd.rq", "ivd.sq",
           "ivd.global_dice")


def spineps_python(explicit: str | None = None) -> Path | None:
    """The SPINEPS venv's interpreter: ``explicit``, else ``$SPINEPS_PYTHON``, else ``.venv-spineps`` here."""
    for cand in (explicit, os.environ.get("SPINEPS_PYTHON"), DEFAULT_SPINEPS_PYTHON):
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: ``VmHWM`` (per address space, fresh at exec; Linux's ``ru_maxrss``
    keeps the forking parent's peak across exec, which would charge run.py's phantoms to each run), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------- our side (runs in a fresh subprocess)
def ours_worker(image: str, sem_dir: str, inst_dir: str, out_dir: str, *, mirroring: bool, threads: int,
                profile: str | None, semantic_mask: str | None = None, restore: str = "linear") -> dict:
    """Load both exported folders with our loaders, :func:`spineps_like.pipeline.segment` the image, save masks."""
    from spineps_like.runtime import tune_allocator

    malloc = tune_allocator()  # what our command line and cohort workers do; API users call it once per process
    import torch  # after the tuning, which asks torch for huge pages before it loads (as the command line)
    torch.set_num_threads(threads)
    from spineps_like.instance.network import load_instance_model
    from spineps_like.io import save_mask
    from spineps_like.models import load_semantic_model
    from spineps_like.pipeline import segment

    t = time.perf_counter()
    sem = load_semantic_model(sem_dir) if semantic_mask is None else None
    inst = load_instance_model(inst_dir)
    load_models = time.perf_counter() - t

    def run():
        return segment(image, semantic_model=sem, instance_model=inst, mirroring=mirroring, n4=False,
                       restore=restore, semantic_mask=semantic_mask)

    if profile:
        import cProfile
        import pstats

        Path(profile).parent.mkdir(parents=True, exist_ok=True)
        prof = cProfile.Profile()
        res = prof.runcall(run)
        prof.dump_stats(profile)
        with open(Path(profile).with_suffix(".txt"), "w") as f:
            st = pstats.Stats(prof, stream=f).strip_dirs()
            f.write("# cumulative\n")
            st.sort_stats("cumulative").print_stats(45)
            f.write("\n# tottime\n")
            st.sort_stats("tottime").print_stats(35)
    else:
        res = run()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_mask(res.semantic, out / "seg-spine.nii.gz")
    save_mask(res.instance, out / "seg-vert.nii.gz")
    timings = {"load_models": load_models, **{k: float(v) for k, v in res.timings.items()}}
    return {"timings": timings, "semantic_timings": res.settings.get("semantic_timings_s", {}),
            "notes": res.notes[:10], "threads": torch.get_num_threads(), "malloc_tuning": malloc}


# ---------------------------------------------------------------- orchestration
def _subprocess_json(cmd: list[str], env: dict | None = None, timeout: float = 1800) -> tuple[dict, float]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t
    lines = [ln for ln in p.stdout.strip().splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
        return {"error": f"exit {p.returncode}", "stderr_tail": tail}, wall
    return json.loads(lines[-1]), wall


def write_cases(cases, work: Path, spacing) -> list[dict]:
    """Write each evaluation phantom once (image, reference semantic and instance masks)."""
    from spineps_like.io import save_mask, save_scan
    from spineps_like.phantom import make_phantom

    out = []
    for seed, fov, variant in cases:
        name = f"{seed}_{fov}" + (f"_{variant}" if variant else "")
        d = work / "cases" / name
        files = {k: d / f"{k}.nii.gz" for k in ("image", "gt_sem", "gt_inst")}
        if not all(f.is_file() for f in files.values()):
            ph = make_phantom(seed, fov=fov, mode="t2w", variant=variant, spacing=spacing)
            d.mkdir(parents=True, exist_ok=True)
            save_scan(ph.image, files["image"], dtype=np.float32)
            save_mask(ph.semantic, files["gt_sem"])
            save_mask(ph.instance, files["gt_inst"])
        out.append({"case": name, "seed": seed, "fov": fov, "variant": variant, **{k: str(v) for k, v in files.items()}})
    return out


def score(case: dict, pred_dir: Path) -> dict:
    from spineps_like.evaluation import evaluate
    from spineps_like.io import load_scan

    gt = load_scan(case["gt_inst"], kind="mask")
    gs = load_scan(case["gt_sem"], kind="mask")
    pi = load_scan(pred_dir / "seg-vert.nii.gz", kind="mask")
    ps = load_scan(pred_dir / "seg-spine.nii.gz", kind="mask")
    if pi.shape != gt.shape:
        return {"error": f"prediction grid {pi.shape} != reference {gt.shape}"}
    sem_pred = np.where(ps.array == 50, 49, ps.array)
    try:
        m = evaluate(pi.array, gt.array, gt.spacing, semantic_pred=sem_pred, semantic_gt=gs.array)
    except ValueError as e:
        return {"error": str(e).splitlines()[0]}
    out = {k: float(m[k]) for k in METRICS if k in m}
    out["n_vertebrae_pred"] = int(len([i for i in np.unique(pi.array) if 0 < i < 100 and i != 26]))
    out["n_vertebrae_gt"] = int(len([i for i in np.unique(gt.array) if 0 < i < 100 and i != 26]))
    return out


def _without_profile(cmd: list[str]) -> list[str]:
    """The command without its ``--profile PATH`` (only the first run of a case is profiled)."""
    if "--profile" not in cmd:
        return cmd
    i = cmd.index("--profile")
    return cmd[:i] + cmd[i + 2:]


def _median_run(runs: list[dict]) -> dict:
    """One record for a case's repeated runs of one side: the first run's record (scores, notes), with each phase
    group, the total, the wall time and the peak memory replaced by their medians over the runs; the per-run values
    are kept under ``runs``."""
    first = dict(runs[0])
    if len(runs) == 1 or any("groups" not in r or "error" in r for r in runs):
        return first
    first["groups"] = {k: float(np.median([r["groups"][k] for r in runs])) for k in first["groups"]}
    for key in ("total_s", "wall_s", "peak_rss_mb"):
        first[key] = float(np.median([r[key] for r in runs]))
    first["runs"] = [{"groups": r["groups"], "total_s": r["total_s"], "wall_s": r["wall_s"],
                      "peak_rss_mb": r.get("peak_rss_mb")} for r in runs]
    return first


def _mean(rows, key):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
    return float(np.mean(vals)) if vals else float("nan")


def _phase_groups(side: str, timings: dict) -> dict:
    """Map each side's phases onto common groups: load_models, semantic, instance, post (rest)."""
    t = dict(timings)
    if side == "spineps":
        return {"load_models": t.get("load_models", 0.0), "semantic": t.get("load", 0) + t.get("preprocess", 0) + t.get("semantic", 0),
                "instance": t.get("instance", 0.0), "post": t.get("postprocess", 0.0)}
    inst_keys = ("load_instance_model", "instance_resample", "centres", "cutouts", "network", "fusion",
                 "instance_restore", "instance")
    post_keys = ("assign", "postprocess", "labeling", "restore")
    return {"load_models": t.get("load_models", 0.0), "semantic": t.get("load", 0) + t.get("semantic", 0),
            "instance": sum(t.get(k, 0.0) for k in inst_keys), "post": sum(t.get(k, 0.0) for k in post_keys)}


def markdown(result: dict) -> str:
    lines = [f"# SPINEPS {result['spineps_version']} vs spineps-like {result['spineps_like_version']}", "",
             f"Taken {result['date']} on {result['machine']}; torch threads {result['settings']['threads']}, "
             f"N4 off, mirroring {result['settings']['mirroring']}"
             + (f"; {result['settings']['repeats']} runs per case and side, in turn, per-case medians"
                if result["settings"].get("repeats", 1) > 1 else "")
             + ("; semantic phase skipped on both sides (reference semantic mask given)"
                if result["settings"].get("given_semantic") else "")
             + "; glibc malloc: spineps-like " + ("tuned" if result["settings"].get("malloc_tuning_ours") else "defaults")
             + ", SPINEPS " + ("tuned (same thresholds)" if result["settings"].get("malloc_tuning_spineps") else "defaults")
             + f"; load: {result['load_note']}.", "",
             f"Models: semantic `{result['models']['semantic']}`, instance `{result['models']['instance']}` "
             "(same exported folders on both sides).", "",
             f"Phantoms: {result.get('phantom_set_description', 'development set (seeds 900000+)')}. "
             + (f"Written by `{result['command']}`." if result.get("command") else
                "Measured by `benchmarks/spineps_side_by_side/run.py` (the JSON does not record its options)")
             + (f"; this table re-rendered from `{result['rendered_from']}` by `run.py --markdown-from`."
                if result.get("rendered_from") else ""), "",
             "| case | side | load models s | semantic s | instance s | post s | total s (no load) | wall s | "
             "peak RSS MB | vert PQ | vert RQ | vert SQ | vert gDice | IVD PQ | IVD gDice | #vert pred/gt |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["cases"]:
        for side in ("spineps", "ours"):
            r = row[side]
            if "groups" not in r:
                lines.append(f"| {row['case']} | {side} | error: {r['error']} {' '.join(r.get('stderr_tail', [])[-1:])[:120]} |")
                continue
            g, s = r["groups"], r.get("scores", {})
            if "error" in r:
                s = {"n_vertebrae_pred": f"stopped: {r['error']}"}

            def f(k, d=3):
                v = s.get(k)
                return "—" if v is None or not np.isfinite(v) else f"{v:.{d}f}"

            lines.append(
                f"| {row['case']} | {side} | {g['load_models']:.1f} | {g['semantic']:.1f} | {g['instance']:.1f} | "
                f"{g['post']:.1f} | {r['total_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                f"{f('vertebra.pq')} | {f('vertebra.rq')} | {f('vertebra.sq')} | {f('vertebra.global_dice')} | "
                f"{f('ivd.pq')} | {f('ivd.global_dice')} | {s.get('n_vertebrae_pred', '—')}/{s.get('n_vertebrae_gt', '—')} |")
    lines += ["", "## Ratios SPINEPS / spineps-like", "",
              "Means over cases both sides finished; load_models_s and semantic_s also over runs that stopped after "
              "the semantic phase.", "",
              "| measure | SPINEPS | spineps-like | ratio |", "|---|---|---|---|"]
    for k, (a, b) in result["summary"].items():
        ratio = a / b if b and np.isfinite(a) and np.isfinite(b) and b != 0 else float("nan")
        lines.append(f"| {k} | {a:.3f} | {b:.3f} | {ratio:.2f} |")
    if result.get("profile"):
        lines += ["", "## Where spineps-like's non-network time goes (cProfile, first case)", "",
                  "```", *result["profile"], "```"]
    return "\n".join(lines) + "\n"


def profile_summary(path: Path, top: int = 25) -> list[str]:
    """Top functions by own time outside torch / the network code (the non-network hot spots of our pipeline)."""
    import pstats

    st = pstats.Stats(str(path))
    network = ("/torch/", "/dynamic_network_architectures/", "torch._C", "built-in method torch",
               "method 'to' of", "conv3d", "instance_norm", "group_norm", "instance/network.py:")
    imports = ("<frozen importlib", "_imp.", "marshal.loads", "builtins.compile", "zlib.Decompress", "inspect.py")
    rows, net_total, imp_total = [], 0.0, 0.0
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        where = f"{file}:{line}({fn})"
        if any(n in where for n in network) and not where.endswith(("(predict_cutouts)", "(_network_input)")):
            net_total += tt
            continue
        if any(n in where for n in imports):
            imp_total += tt
            continue
        short = f"{Path(file).parent.name}/{Path(file).name}:{line}({fn})" if file != "~" else fn
        rows.append((tt, ct, nc, short))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    out = [f"own time outside torch/network code: {total:.1f} s (torch/network code: {net_total:.1f} s, "
           f"lazy imports: {imp_total:.1f} s)",
           f"{'own s':>8} {'cum s':>8} {'calls':>8}  function"]
    out += [f"{tt:8.2f} {ct:8.2f} {nc:8d}  {name}" for tt, ct, nc, name in rows[:top]]
    # our own functions by cumulative time (what to optimise), the network calls left out
    ours = [(ct, tt, nc, f"{Path(file).parent.name}/{Path(file).name}:{line}({fn})")
            for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items()  # type: ignore[attr-defined]
            if "/spineps_like/" in file and fn not in ("forward", "run", "segment", "instance_phase")]
    ours.sort(reverse=True)
    out += ["", "spineps_like functions by cumulative time (incl. callees):",
            f"{'cum s':>8} {'own s':>8} {'calls':>8}  function"]
    out += [f"{ct:8.2f} {tt:8.2f} {nc:8d}  {name}" for ct, tt, nc, name in ours[:top]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spineps-python", help="interpreter of the SPINEPS venv (default $SPINEPS_PYTHON or "
                                              ".venv-spineps next to this script)")
    ap.add_argument("--semantic-model", default="semantic-phantom")
    ap.add_argument("--instance-model", default="instance-phantom")
    ap.add_argument("--smoke", action="store_true", help="random tiny models and one small phantom (machinery check)")
    ap.add_argument("--cases", type=int, default=None, help="use only the first N cases")
    ap.add_argument("--set", dest="phantom_set", choices=tuple(SETS), default="development",
                    help="phantom set (spineps_like.phantom_sets): development (our rules were tuned on it) or test "
                    "(never used for any decision; results get the suffix _test); default development")
    ap.add_argument("--name", default=None,
                    help="file stem of the results (default side_by_side plus one suffix per option), e.g. "
                    "side_by_side_epyc for a run on another machine")
    ap.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("P", "I", "R"),
                    help="phantom voxel size in mm (default: the phantom's random sagittal spacing)")
    ap.add_argument("--mirroring", action="store_true", help="test-time mirroring on both sides")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    ap.add_argument("--restore", choices=("linear", "nearest"), default="linear",
                    help="our way back from the model grid (SPINEPS always moves labels by nearest neighbour)")
    ap.add_argument("--profile", action="store_true", help="cProfile our pipeline on the first case")
    ap.add_argument("--given-semantic", action="store_true",
                    help="skip the semantic phase on both sides: feed the reference semantic mask to instance + post")
    ap.add_argument("--work", default=str(HERE / "work"), help="exported models, phantoms and predictions")
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per case and side, the sides in turn; per-case medians are reported")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pipeline run before it counts as failed")
    ap.add_argument("--spineps-malloc-tuning", action="store_true",
                    help="run SPINEPS with our glibc malloc thresholds (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_)")
    ap.add_argument("--load-note", default="", help="what else ran on the machine (written into the results)")
    ap.add_argument("--markdown-from", metavar="JSON", default=None,
                    help="run nothing: write the markdown of a results JSON next to it (same stem)")
    a = ap.parse_args(argv)
    if a.markdown_from:
        return write_markdown_from(Path(a.markdown_from))

    py = spineps_python(a.spineps_python)
    if py is None:
        print("SPINEPS venv not found: run benchmarks/spineps_side_by_side/setup_spineps_env.sh or set SPINEPS_PYTHON",
              file=sys.stderr)
        return 2
    work = Path(a.work) / ("smoke" if a.smoke else "full")
    work.mkdir(parents=True, exist_ok=True)
    from spineps_like import __version__
    from spineps_like.models.export import export_spineps

    sem_src, inst_src = a.semantic_model, a.instance_model
    if a.smoke:
        sem_src, inst_src = _smoke_models(work / "src_models")
    sem_dir, inst_dir = export_spineps(work / "models", sem_src, inst_src)
    pset = phantom_set(a.phantom_set)
    print(f"phantoms: {pset.describe()}", flush=True)
    cases = write_cases(cases_of(pset, CASE_INDICES[:1]) if a.smoke else cases_of(pset)[: a.cases],
                        work, a.spacing or ((1.2, 1.2, 3.5) if a.smoke else None))
    ver = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('spineps'))"],
                         capture_output=True, text=True).stdout.strip()
    from spineps_like.runtime import MMAP_THRESHOLD, TRIM_THRESHOLD, tuning_wanted

    env = dict(os.environ, SPINEPS_SEGMENTOR_MODELS=str(work / "models"), PYTHONPATH="")
    if a.spineps_malloc_tuning:
        env.update(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(TRIM_THRESHOLD))
    result = {"spineps_version": ver, "spineps_like_version": __version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
              "load_note": a.load_note or f"loadavg {os.getloadavg()[0]:.1f} at start",
              "phantom_set": pset.name, "phantom_set_description": pset.describe(),
              "command": ".venv/bin/python benchmarks/spineps_side_by_side/run.py"
                         + "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:])),
              "settings": {"threads": a.threads, "mirroring": a.mirroring, "n4": False, "spacing": a.spacing,
                           "restore_ours": a.restore,
                           "given_semantic": a.given_semantic, "repeats": a.repeats,
                           "malloc_tuning_ours": tuning_wanted(),
                           "malloc_tuning_spineps": a.spineps_malloc_tuning},
              "models": {"semantic": str(sem_dir), "instance": str(inst_dir)}, "cases": []}
    for i, case in enumerate(cases):
        row = {"case": case["case"], "seed": case["seed"], "fov": case["fov"], "variant": case["variant"]}
        pred = work / "pred" / case["case"]
        cmd_sp = [str(py), str(HERE / "spineps_worker.py"), "segment", case["image"], str(sem_dir), str(inst_dir),
                  str(pred / "spineps"), "--mirroring", str(int(a.mirroring)), "--threads", str(a.threads)]
        cmd_ours = [sys.executable, str(Path(__file__).resolve()), "_ours", case["image"], str(sem_dir),
                    str(inst_dir), str(pred / "ours"), "--mirroring", str(int(a.mirroring)), "--threads",
                    str(a.threads), "--restore", a.restore]
        if a.given_semantic:
            cmd_sp += ["--semantic-mask", case["gt_sem"]]
            cmd_ours += ["--semantic-mask", case["gt_sem"]]
        if a.profile and i == 0:
            cmd_ours += ["--profile", str(Path(a.results) / f"profile_ours{_suffix(a)}.prof")]
        runs: dict[str, list[dict]] = {"spineps": [], "ours": []}
        for rep in range(a.repeats):  # the two sides in turn, so a slow spell of the machine hits both
            for side, cmd, e in (("spineps", cmd_sp, env), ("ours", cmd_ours, None)):
                print(f"[{case['case']}] {side} ({rep + 1}/{a.repeats}) ...", flush=True)
                try:
                    r, wall = _subprocess_json(cmd if rep == 0 else _without_profile(cmd), env=e, timeout=a.timeout)
                except subprocess.TimeoutExpired:
                    r, wall = {"error": f"timeout after {a.timeout:.0f} s"}, a.timeout
                r["wall_s"] = wall
                if "error" not in r and "timings" in r and "errcode" in r and "OK" not in r["errcode"]:
                    r["error"] = r["errcode"]
                if "timings" in r:  # also for a run that stopped early (e.g. an empty semantic mask): its phases so far
                    r["groups"] = _phase_groups(side, r["timings"])
                    r["total_s"] = sum(v for k, v in r["groups"].items() if k != "load_models")
                if "error" not in r and rep == 0:
                    r["scores"] = score(case, pred / side)  # the same masks every repeat (both sides are deterministic)
                runs[side].append(r)
                print(f"    {json.dumps({k: r.get(k) for k in ('total_s', 'peak_rss_mb', 'error')})}", flush=True)
        for side in ("spineps", "ours"):
            row[side] = _median_run(runs[side])
        result["cases"].append(row)
        _write_results(result, a)
    return _write_results(result, a, final=True)


def _write_results(result: dict, a: argparse.Namespace, final: bool = False) -> int:
    """Summarise and write json + md (after every case, so an interrupted run keeps what it measured)."""
    both = [c for c in result["cases"] if "error" not in c["spineps"] and "error" not in c["ours"]]
    summ = {}
    for key in ("total_s", "wall_s", "peak_rss_mb"):
        summ[key] = (_mean([c["spineps"] for c in both], key), _mean([c["ours"] for c in both], key))
    timed = [c for c in result["cases"] if "groups" in c["spineps"] and "groups" in c["ours"]]
    for g in ("load_models", "semantic", "instance", "post"):  # phases both sides ran, also in runs stopped later
        pairs = [(c["spineps"]["groups"][g], c["ours"]["groups"][g]) for c in (both if g in ("instance", "post")
                                                                            else timed)]
        summ[f"{g}_s"] = (float(np.mean([p[0] for p in pairs])) if pairs else float("nan"),
                          float(np.mean([p[1] for p in pairs])) if pairs else float("nan"))
    for k in METRICS:
        summ[k] = (_mean([c["spineps"]["scores"] for c in both], k), _mean([c["ours"]["scores"] for c in both], k))
    result["summary"] = summ
    prof = Path(a.results) / f"profile_ours{_suffix(a)}.prof"
    if a.profile and prof.is_file():
        result["profile"] = profile_summary(prof)
    res_dir = Path(a.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    stem = a.name or f"side_by_side{_suffix(a)}"
    (res_dir / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    (res_dir / f"{stem}.md").write_text(markdown(result))
    if final:
        print(f"wrote {res_dir / (stem + '.md')}")
    return 0 if both else 1


def write_markdown_from(json_path: Path) -> int:
    """Write ``<stem>.md`` beside a results JSON from the JSON alone (the table a run would have written)."""
    result = json.loads(json_path.read_text())
    try:
        rel = json_path.resolve().relative_to(REPO)
    except ValueError:
        rel = json_path
    result["rendered_from"] = str(rel)
    out = json_path.with_suffix(".md")
    out.write_text(markdown(result))
    print(f"wrote {out}")
    return 0


def _suffix(a: argparse.Namespace) -> str:
    """What the options add to ``side_by_side`` and ``profile_ours`` in the result file names; with ``--name STEM``
    the results are ``STEM.{json,md}`` and the profile ``profile_ours_STEM``."""
    if getattr(a, "name", None):
        return "_" + a.name
    return (("_smoke" if a.smoke else "") + ("_test" if getattr(a, "phantom_set", "development") != "development"
                                              else "")
            + ("_given_semantic" if a.given_semantic else "")
            + ("_spineps_malloc_tuned" if a.spineps_malloc_tuning else ""))


def _smoke_models(root: Path) -> tuple[Path, Path]:
    """Random-weight tiny models (same recipes as the tests): for checking the machinery, not for accuracy."""
    import torch

    from spineps_like.instance.cutouts import SPINEPS_INPUT_MAPPING
    from spineps_like.instance.network import Unet3D, lightning_checkpoint
    from spineps_like.io import atomic_write_json
    from spineps_like.models.manifest import write_manifest
    from spineps_like.training.semantic import write_random_model

    sem = write_random_model(root / "semantic-phantom", labels=(41, 42, 49, 60, 61, 100), seed=0,
                             spacing_pir=(3.0, 3.0, 4.0), resolution_range=((3.0, 3.0, 4.0), (3.0, 3.0, 6.0)))
    inst = root / "instance-phantom"
    inst.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = Unet3D(dim=8)
    atomic_write_json(inst / "inference_config.json", {
        "log_name": "instance-phantom", "modality": "SEG", "acquisition": "sag", "modeltype": "unet",
        "model_expected_orientation": ["P", "I", "R"], "available_folds": 1, "inference_augmentation": False,
        "resolution_range": [3.0, 3.0, 3.0], "default_step_size": 0.5, "labels": {"1": 1, "2": 2, "3": 3},
        "expected_inputs": ["seg"], "cutout_size": [48, 56, 32],
        "mapping": {str(k): v for k, v in SPINEPS_INPUT_MAPPING.items()}})
    torch.save(lightning_checkpoint(net), inst / "instance_weights.ckpt")
    write_manifest(inst)
    return sem, inst


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_ours":
        p = argparse.ArgumentParser(prog="run.py _ours")
        for n in ("image", "sem_dir", "inst_dir", "out_dir"):
            p.add_argument(n)
        p.add_argument("--mirroring", type=int, default=0)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--profile", default=None)
        p.add_argument("--semantic-mask", default=None)
        p.add_argument("--restore", default="linear")
        x = p.parse_args(sys.argv[2:])
        res = ours_worker(x.image, x.sem_dir, x.inst_dir, x.out_dir, mirroring=bool(x.mirroring), threads=x.threads,
                          profile=x.profile, semantic_mask=x.semantic_mask, restore=x.restore)
        res["peak_rss_mb"] = round(peak_rss_mb(), 1)
        print(json.dumps(res), flush=True)
        sys.exit(0)
    sys.exit(main())
