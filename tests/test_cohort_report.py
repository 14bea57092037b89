"""The cohort report: one static HTML page (rows, flags, errors, sorting, filtering, per-level volume outliers),
checked by parsing it and, where Debian's chromium is installed (``make install`` does), in the real headless
browser over the DevTools protocol (on a pipe: no extra package)."""

from __future__ import annotations

import csv
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from spineps_like.cli import main as cli_main
from spineps_like.cohort import Manifest, ScanEntry
from spineps_like.cohort.report import (REPORT_NAME, level_plots, render_report, scan_rows, tukey_outliers,
                                        write_report)


# ------------------------------------------------------------------------------------------------ helpers
class _Page(HTMLParser):
    """Rows of the scans table (id, state, cell texts), links, image sources and every attribute value."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []
        self.links: list[str] = []
        self.images: list[str] = []
        self.attr_values: list[str] = []
        self.outlier_links: list[str] = []
        self._in_body = False
        self._in_scans = False
        self._cell: list[str] | None = None
        self._a: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.attr_values.extend(v for v in a.values() if v)
        if tag == "table":
            self._in_scans = a.get("id") == "scans"
        elif tag == "tbody" and self._in_scans:
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append({"id": a.get("id"), "state": a.get("data-state"), "cells": []})
        elif tag == "td" and self._in_body:
            self._cell = []
            self.rows[-1]["cells"].append(self._cell)
        elif tag == "a":
            self._a = a.get("href")
            self.links.append(a.get("href") or "")
        elif tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "circle" and self._a:
            self.outlier_links.append(self._a)

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag == "td":
            self._cell = None
        elif tag == "a":
            self._a = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    for r in page.rows:
        r["cells"] = ["".join(c).strip() for c in r["cells"]]
    return page


def _summary(volumes: dict[str, float], *, cut: tuple[str, ...] = (), anchor: str = "sacrum") -> dict:
    from spineps_like.labels import VERTEBRA_NAME_TO_ID

    rows = [{"id": VERTEBRA_NAME_TO_ID[n], "name": n, "volume_mm3": v * 1000, "complete": n not in cut,
             "truncated_by": ["top"] if n in cut else [], "confidence": {"level": "high"}} for n, v in volumes.items()]
    return {"vertebrae": rows, "ivds": [], "labeling": {"anchor": anchor, "ambiguous": False, "notes": []},
            "plausibility": {"plausible": True, "flags": [], "advisories": []}}


def _synthetic_cohort(out: Path, l3_volumes: list[float]) -> list[str]:
    """A manifest: one done scan per L3 volume (summaries written), then a failed and a pending scan."""
    n = len(l3_volumes)
    entries = [ScanEntry(Path(f"/data/s{i}.nii.gz"), out / f"s{i}", f"s{i}") for i in range(n + 2)]
    with Manifest(out / "cohort.sqlite") as m:
        m.add(entries)
        for i, v in enumerate(l3_volumes):
            e = entries[i]
            e.out_dir.mkdir(parents=True)
            (e.out_dir / "summary.json").write_text(json.dumps(_summary(
                {"L2": 40.0, "L3": v, "L4": 45.0}, cut=("L2",) if i == 0 else (), anchor="none" if i == 1 else
                "sacrum")))
            m.mark_running(e.key, "w0")
            m.mark_done(e.key, outputs={"summary": {"path": str(e.out_dir / "summary.json"), "sha256": "", "bytes": 0}},
                        seconds=10.0 + i, timings={"semantic": 1.0 + i})
        m.mark_running(entries[n].key, "w0")
        m.mark_failed(entries[n].key, "ScanError: /data/s.nii.gz: <not> a readable image\nsecond line", seconds=0.5)
    return [e.key for e in entries]


# ------------------------------------------------------------------------------------------------ pure parts
def test_tukey_outliers():
    v = [40, 41, 42, 43, 44, 45, 46, 90]
    assert tukey_outliers(v).tolist() == [False] * 7 + [True]
    assert not tukey_outliers([40, 41, 90]).any()  # too few values to judge
    assert tukey_outliers([10, 40, 41, 42, 43, 44]).tolist() == [True] + [False] * 5


def test_report_rows_flags_errors_and_outliers_linked_to_rows(tmp_path):
    keys = _synthetic_cohort(tmp_path, [40, 41, 42, 43, 44, 45, 46, 90])
    path = write_report(tmp_path)
    assert path == tmp_path / REPORT_NAME
    text = path.read_text()
    page = _parse(text)
    assert [r["cells"][1] for r in page.rows] == keys  # one row per scan of the manifest, in key order
    states = [r["state"] for r in page.rows]
    assert states == ["done"] * 8 + ["failed", "pending"]
    failed = page.rows[8]
    assert failed["cells"][-1] == "ScanError: /data/s.nii.gz: <not> a readable image"  # escaped, first line only
    assert "&lt;not&gt;" in text
    # vertebrae, anchor, flags of the summaries
    assert page.rows[2]["cells"][3] == "3: L2–L4" and page.rows[2]["cells"][4] == "sacrum"
    assert "cut L2" in page.rows[0]["cells"][5] and "no anchor" in page.rows[1]["cells"][5]
    # the L3 of 90 cm3 is the only outlier: a red dot linking to its row, and the row says so
    assert page.outlier_links == ["#scan-7"] and page.rows[7]["id"] == "scan-7"
    assert "outlier: L3 volume 90.0" in page.rows[7]["cells"][5]
    assert not any("outlier" in r["cells"][5] for r in page.rows[:7])
    # counts by state, and nothing from the network
    assert '<b>8</b>done' in text and '<b>1</b>failed' in text and '<b>1</b>pending' in text
    assert "http://" not in text and "https://" not in text and "//" not in "".join(page.images)


def _measurements(l3_height: float, *, grade: int, hu: float | None, l2_cut_height: float | None = None) -> dict:
    """A scan's measurements JSON (the fields the report plots): L2 (cut when ``l2_cut_height``), L3, IVD L3, canal."""
    l2 = {"name": "L2", "complete": l2_cut_height is None, "body_height_middle_mm": l2_cut_height or 25.0,
          "genant_grade": None if l2_cut_height else 0, "shape": None, "trabecular_hu_mean": hu}
    l3 = {"name": "L3", "complete": True, "body_height_middle_mm": l3_height, "genant_grade": grade,
          "shape": "crush" if grade else "normal", "trabecular_hu_mean": hu}
    return {"vertebrae": [l2, l3], "discs": [{"name": "IVD L3", "height_mean_mm": 10.0}],
            "canal": [{"level": "L3", "kind": "body", "ap_diameter_mm": 15.0},
                      {"level": "IVD L3", "kind": "disc", "ap_diameter_mm": 14.0}], "spine": [{}]}


def test_report_plots_measurements_with_outliers_and_genant_grades_linked(tmp_path):
    heights = [24.0, 24.5, 25.0, 25.5, 26.0, 26.5, 27.0, 12.0]  # scan 7: a crushed L3
    hus = [150.0, 140.0, 130.0, 160.0, 155.0, -20.0, None, None]  # six CT scans, one far below the others
    keys = _synthetic_cohort(tmp_path, [40.0] * 8)
    with Manifest(tmp_path / "cohort.sqlite") as m:
        for i, (h, hu) in enumerate(zip(heights, hus)):
            path = tmp_path / f"s{i}" / "measurements.json"
            path.write_text(json.dumps(_measurements(h, grade=3 if i == 7 else 0, hu=hu,
                                                     l2_cut_height=5.0 if i == 0 else None)))
            outputs = json.loads(m.get(keys[i])["outputs"])
            m.mark_done(keys[i], outputs={**outputs, "measurements": {"path": str(path), "sha256": "", "bytes": 0}})
    with Manifest(tmp_path / "cohort.sqlite", readonly=True) as m:
        rows = scan_rows(m.rows())
    plots = {p.title: p for p in level_plots(rows)}
    assert set(plots) == {"Vertebra volume", "Body middle height", "Disc mean height", "Canal AP diameter (bodies)",
                          "Canal AP diameter (discs)", "CT trabecular attenuation"}
    body = plots["Body middle height"]
    assert [v for _, v in body.values["L3"]] == heights and body.outliers == {"L3": [(7, 12.0)]}
    assert [i for i, _ in body.values["L2"]] == list(range(1, 8))  # scan 0's L2 is cut: not plotted
    assert plots["CT trabecular attenuation"].outliers == {"L2": [(5, -20.0)], "L3": [(5, -20.0)]}
    assert not plots["Disc mean height"].outliers and list(plots["Canal AP diameter (discs)"].values) == ["IVD L3"]
    text = write_report(tmp_path).read_text()
    page = _parse(text)
    assert sorted(set(page.outlier_links)) == ["#scan-5", "#scan-7"]
    flags7, flags5 = page.rows[7]["cells"][5], page.rows[5]["cells"][5]
    assert "outlier: L3 body middle height 12.0 mm" in flags7 and "Genant 3 L3 (crush)" in flags7
    assert "outlier: L3 trabecular attenuation -20.0 HU" in flags5 and "Genant" not in flags5
    # the Genant table: L3 graded in 8 scans, one grade 3 linked to its row; L2 graded in the 7 uncut scans
    genant = text[text.index('<table class="genant">'):]
    genant = genant[:genant.index("</table>")]
    assert ('<td>L3</td><td class="num">8</td><td class="num">7</td><td class="num">0</td><td class="num">0</td>'
            '<td class="num">1</td>') in genant and f'<a href="#scan-7">{keys[7]}</a> (3, crush)' in genant
    assert '<td>L2</td><td class="num">7</td><td class="num">7</td>' in genant
    # a negative value stays inside the plot (the axis reaches below zero)
    for svg in text.split("<svg")[1:]:
        height = float(svg.split('height="')[1].split('"')[0])
        assert all(0 <= float(c.split('"')[0]) <= height for c in svg.split(' cy="')[1:])


def test_report_links_thumbnails_relative_to_the_report(tmp_path):
    from spineps_like.cohort.report import ScanRow

    png = tmp_path / "derivatives_seg" / "a" / "x_snp.png"
    rows = [ScanRow(0, "a", "/data/a.nii.gz", "done", snapshot=str(png))]
    page = _parse(render_report(rows, {"done": 1}, base=tmp_path))
    assert page.images == ["derivatives_seg/a/x_snp.png"]
    page = _parse(render_report(rows, {"done": 1}, base=tmp_path / "reports"))
    assert page.images == ["../derivatives_seg/a/x_snp.png"]


def test_cohort_report_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["cohort", "report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no cohort manifest" in err and str(tmp_path) in err
    (tmp_path / "cohort.sqlite").write_bytes(b"not a database at all, not at all" * 10)
    assert cli_main(["cohort", "report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a cohort manifest" in err
    assert not (tmp_path / REPORT_NAME).exists()


# ------------------------------------------------------------------------------------------------ real cohort

def cohort_list(root: Path, images: list[Path], corrupt: Path) -> Path:
    """``root/list.csv`` for `cohort run`: each phantom image with its ground-truth semantic mask (written by
    ``write_phantoms`` under ``root/ds/derivatives_gt``), then ``corrupt`` without one."""
    lst = root / "list.csv"
    with open(lst, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "semantic_mask"])
        for p in images:
            w.writerow([p, next((root / "ds" / "derivatives_gt" / p.parent.parent.name).glob("*_seg-spine_msk*"))])
        w.writerow([corrupt, ""])
    return lst

@pytest.fixture(scope="module")
def cohort_out(tmp_path_factory) -> dict:
    """`cohort run` on three phantoms (ground-truth semantic masks, geometric instances, QC pictures) and a corrupt
    file: the report is written at the end of the run."""
    from spineps_like.phantom import write_phantoms

    root = tmp_path_factory.mktemp("cohort-report")
    images = write_phantoms(root / "ds", 3, seed=40, fov="lumbar", spacing=(2.0, 2.0, 4.0), orientation="RAS",
                            snapshot=False)
    corrupt = root / "broken_T2w.nii.gz"
    corrupt.write_bytes(b"this is not a NIfTI file")
    lst = cohort_list(root, images, corrupt)
    out = root / "out"
    rc = cli_main(["cohort", "run", str(lst), "--out", str(out), "--instance-method", "geometric", "-q"])
    assert rc == 1  # the corrupt scan failed
    with Manifest(out / "cohort.sqlite", readonly=True) as m:
        rows = [dict(r) for r in m.rows()]
    return {"out": out, "rows": rows, "report": out / REPORT_NAME}


def test_cohort_run_writes_the_report_and_report_rewrites_it(cohort_out, capsys):
    report = cohort_out["report"]
    page = _parse(report.read_text())
    assert len(page.rows) == len(cohort_out["rows"]) == 4
    failed = [r for r in page.rows if r["state"] == "failed"]
    assert len(failed) == 1 and "not a readable image" in failed[0]["cells"][-1]
    # thumbnails: the QC pictures the run wrote, linked relative to the report
    assert len(page.images) == 3
    assert all(not src.startswith("/") and (report.parent / src).is_file() for src in page.images)
    done = [r for r in page.rows if r["state"] == "done"]
    assert all(r["cells"][4] == "sacrum" and r["cells"][3].endswith("S1") for r in done)
    # the measurement plots hold each done scan's own measurements (complete vertebrae only)
    rows = scan_rows(cohort_out["rows"])
    plots = {p.title: p for p in level_plots(rows)}
    assert {"Body middle height", "Disc mean height", "Canal AP diameter (discs)"} <= set(plots)
    assert "CT trabecular attenuation" not in plots  # T2w phantoms only
    for i, r in enumerate(cohort_out["rows"]):
        if r["state"] != "done":
            continue
        m = json.loads(Path(json.loads(r["outputs"])["measurements"]["path"]).read_text())
        want = {v["name"]: v["body_height_middle_mm"] for v in m["vertebrae"]
                if v["complete"] and v["body_height_middle_mm"] is not None}
        got = {lv: v for lv, pts in plots["Body middle height"].values.items() for j, v in pts if j == i}
        assert got == want and len(want) >= 4
    report.unlink()
    assert cli_main(["cohort", "report", str(cohort_out["out"])]) == 0
    assert capsys.readouterr().out.strip() == str(report) and report.is_file()


# ------------------------------------------------------------------------------------------------ browser
class Chromium:
    """Headless chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``)."""

    def __init__(self, exe: str):
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()
        to_r, from_w = (self._high(fd) for fd in (to_r, from_w))  # not 3 or 4, which the shell below overwrites

        # the browser reads commands on fd 3 and writes answers on fd 4: bash puts the pipes there
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_r} 4>&{from_w} {to_r}<&- {from_w}>&-', exe, "--headless",
             "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             f"--user-data-dir={self.profile}", "--window-size=1300,900", "about:blank"],
            pass_fds=(to_r, from_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.call(f"{domain}.enable", session=True)

    @staticmethod
    def _high(fd: int) -> int:
        import fcntl

        high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return high

    def _read(self, timeout: float) -> dict | None:
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._from], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._from, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: bool = False, timeout: float = 60.0, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = self._read(end - time.monotonic())
            if m is None:
                break
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)
        raise TimeoutError(method)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict:
        end = time.monotonic() + timeout
        seen = [e for e in self.events if e.get("method") == method]
        while not seen and time.monotonic() < end:
            m = self._read(end - time.monotonic())
            if m is not None:
                self.events.append(m)
                seen = [m] if m.get("method") == method else []
        if not seen:
            raise TimeoutError(method)
        return seen[0]

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to, self._from):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: `make install` installs it (apt-get install chromium)")
        pytest.skip("no chromium here: `make install` installs it (apt-get install chromium)")
    b = Chromium(exe)
    yield b
    b.close()


def test_report_in_headless_chromium(browser, cohort_out):
    b = browser
    b.events.clear()
    b.call("Page.navigate", session=True, url=cohort_out["report"].resolve().as_uri())
    b.wait_event("Page.loadEventFired")
    n = len(cohort_out["rows"])
    assert b.js("document.querySelectorAll('#scans tbody tr').length") == n
    assert b.js("document.getElementById('shown').textContent") == f"{n} of {n} scans shown"  # the script ran
    err = b.js("document.querySelector('tr[data-state=failed] .error').textContent")
    assert "not a readable image" in err
    # sorting by seconds: ascending, then descending on a second click; failed scans' seconds are there too
    secs = sorted(r["seconds"] for r in cohort_out["rows"])
    col = "Array.from(document.querySelectorAll('#scans thead th')).findIndex(t => t.textContent === 'seconds')"
    order = ("Array.from(document.querySelectorAll('#scans tbody tr')).map(r => parseFloat(r.cells[COL].dataset.v))"
             .replace("COL", str(b.js(col))))
    b.js("document.querySelectorAll('#scans thead th')[%d].click()" % b.js(col))
    assert b.js(order) == pytest.approx([round(s, 1) for s in secs], abs=0.051)
    b.js("document.querySelectorAll('#scans thead th')[%d].click()" % b.js(col))
    assert b.js(order) == pytest.approx([round(s, 1) for s in secs[::-1]], abs=0.051)
    assert b.js("document.querySelectorAll('#scans thead th')[%d].getAttribute('aria-sort')" % b.js(col)) == \
        "descending"
    # filter by state: the failed scan alone
    b.js("var s = document.getElementById('state'); s.value = 'failed'; s.dispatchEvent(new Event('change'))")
    assert b.js("Array.from(document.querySelectorAll('#scans tbody tr')).filter(r => !r.hidden).length") == 1
    # every QC picture loads from its relative path
    b.js("Promise.all(Array.from(document.images).map(i => { i.loading = 'eager'; return i.decode(); }))")
    assert b.js("Array.from(document.images).every(i => i.naturalWidth > 0)")
    # no console error, no exception, no request but the file and its pictures
    errors = [e for e in b.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert errors == []
    urls = [e["params"]["request"]["url"] for e in b.events if e.get("method") == "Network.requestWillBeSent"]
    assert urls and all(u.startswith("file://") for u in urls)
    assert len([u for u in urls if u.endswith("_snp.png")]) == 3
