"""How fast `spineps-like segment` refuses bad settings: the checks that run before the first phase (issue 28).

Each case runs the command line as a user would (a fresh process, imports included) on a small phantom scan with one
bad setting; the wall time from start to exit, the exit code and the error line are recorded. The tests assert that
these refusals happen before any phase runs (tests/test_bad_inputs.py); this file measures how long that takes.

    python benchmarks/check_before_work.py [--repeats 3] [--out benchmarks/results/check_before_work]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _instance_model_copy(tmp: Path, damage: str) -> Path:
    from spineps_like.models import find_model

    dst = tmp / f"instance-{damage}"
    shutil.copytree(find_model("instance-phantom").path, dst)
    if damage == "config":
        (dst / "inference_config.json").write_text("{not json")
    elif damage == "weights":
        w = next(iter(dst.glob("**/*.ckpt")))
        w.write_bytes(w.read_bytes()[:-1000])
    return dst


def cases(tmp: Path) -> dict[str, list[str]]:
    """Bad settings -> extra command-line arguments (built under ``tmp``)."""
    (tmp / "a_file").write_text("x")
    return {
        "--out is a file": ["--out", str(tmp / "a_file")],
        "--out not writable": ["--out", "/proc/spineps-like-out"],
        "--instance-model folder missing": ["--instance-model", str(tmp / "nowhere")],
        "--instance-model config not JSON": ["--instance-model", str(_instance_model_copy(tmp, "config"))],
        "--instance-model weights corrupt": ["--instance-model", str(_instance_model_copy(tmp, "weights"))],
        "--semantic-model unknown": ["--semantic-model", "no-such-model"],
        "--device cuda without CUDA": ["--device", "cuda"],
    }


def _scan(tmp: Path) -> Path:
    from spineps_like.io import save_scan
    from spineps_like.phantom import make_phantom

    path = tmp / "sub-01_T2w.nii.gz"
    save_scan(make_phantom(900000, fov="lumbar").image, path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "check_before_work")
    args = ap.parse_args(argv)
    exe = str(Path(sys.executable).with_name("spineps-like"))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        scan = _scan(tmp)
        for name, extra in cases(tmp).items():
            times, cpu, rc, err = [], [], None, ""
            for _ in range(args.repeats):
                t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
                p = subprocess.run([exe, "segment", str(scan), *extra], capture_output=True, text=True)
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                times.append(time.perf_counter() - t0)
                cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
                rc, err = p.returncode, p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
            rows.append({"case": name, "exit": rc, "seconds": times, "cpu_seconds": cpu, "error": err})
            print(f"{name:35s} exit {rc}  {min(times):.2f}-{max(times):.2f} s wall, {min(cpu):.2f}-{max(cpu):.2f} s CPU"
                  f"  {err[:90]}", flush=True)
    load = os.getloadavg()
    meta = {"command": "python benchmarks/check_before_work.py " + " ".join(argv or sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in load], "repeats": args.repeats}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# Checks before work: bad settings refused by `spineps-like segment` ({meta['date']})", "",
             f"- command: `{meta['command']}`",
             f"- {meta['cpus']} CPUs, load average {meta['load_average_1_5_15']} at the end; each case a fresh process "
             f"(Python and torch imports included), {args.repeats} repeats", "",
             "Wall time grows with the machine's load; CPU time (user + system of the process) does not.", "",
             "| bad setting | exit | wall s (min-max) | CPU s (min-max) | error line |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['exit']} | {min(r['seconds']):.2f}-{max(r['seconds']):.2f} | "
              f"{min(r['cpu_seconds']):.2f}-{max(r['cpu_seconds']):.2f} | {r['error'][:120]} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0 if all(r["exit"] not in (0, None) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
