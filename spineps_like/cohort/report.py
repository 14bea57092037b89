"""The cohort report: one static HTML file that shows where to look in a cohort (``OUT/cohort_report.html``).

Written by ``spineps-like cohort report OUT`` and at the end of every ``cohort run``. The page needs no server and
no network: CSS and JavaScript are inline, the plots are inline SVG, and each scan's thumbnail is a *relative link*
to its QC picture (``derivatives_seg/.../*_seg-spine_snp.png``, :mod:`spineps_like.snapshot`), loaded lazily. Links
keep the file small (1,000 scans: under 2 MB instead of ~150 MB of embedded PNGs) but tie it to the output folder:
move or copy the report together with ``derivatives_seg/``.

Content: counts by state; one row per scan (thumbnail, state, vertebrae found, anchor, flags, seconds with the
phases in a tooltip, the one-line error of a failed scan), sortable by clicking a column head and filtered by
text, state and "flagged only" in plain JavaScript; per-level volume plots of vertebrae (complete ones only: a
vertebra the field of view cuts is small by nature) and discs, and the same plots of the main measurements
(:data:`MEASURE_PLOTS`: body middle height, disc mean height, canal antero-posterior diameter at bodies and discs, CT
trabecular attenuation where a scan has it; from each scan's ``..._seg-spine_measurements.json``), each with a box
over the quartiles, and outliers outside :data:`OUTLIER_IQR` x the interquartile range (Tukey's fences, levels with
at least :data:`MIN_FOR_OUTLIERS` scans) drawn in red and linked to their scan rows, whose flags name them in turn;
a table of Genant grades per level links the graded fractures (grade >= 1) to their scans.
"""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from spineps_like.cohort.manifest import MANIFEST_NAME, STATES, Manifest
from spineps_like.cohort.table import load_measurements
from spineps_like.labels import ANATOMICAL_ORDER, IVD_OFFSET, VERTEBRA_NAME_TO_ID

REPORT_NAME = "cohort_report.html"
#: Tukey's fences: a volume outside [Q1 - k IQR, Q3 + k IQR] of its level is an outlier.
OUTLIER_IQR = 1.5
#: Levels with fewer scans get no outliers (quartiles of three values say little).
MIN_FOR_OUTLIERS = 5
#: Thumbnails of the first rows load with the page; the others when scrolled near (``loading="lazy"``).
EAGER_THUMBNAILS = 40
#: Measurement plots: (key, title, what an outlier flag calls it, unit, records, field, complete vertebrae only).
MEASURE_PLOTS = (
    ("body_height", "Body middle height", "body middle height", "mm", "vertebrae",
     "body_height_middle_mm", True),
    ("disc_height", "Disc mean height", "disc height", "mm", "discs", "height_mean_mm", False),
    ("canal_body", "Canal AP diameter (bodies)", "canal AP diameter", "mm", "canal:body", "ap_diameter_mm",
     False),
    ("canal_disc", "Canal AP diameter (discs)", "canal AP diameter", "mm", "canal:disc", "ap_diameter_mm",
     False),
    ("trabecular_hu", "CT trabecular attenuation", "trabecular attenuation", "HU", "vertebrae",
     "trabecular_hu_mean", True),
)


@dataclass
class ScanRow:
    """What the report shows of one scan (from its manifest row and, when done, its summary JSON)."""

    index: int
    key: str
    path: str
    state: str
    attempts: int = 0
    seconds: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    snapshot: str | None = None
    vertebrae: list[str] = field(default_factory=list)
    anchor: str | None = None
    flags: list[str] = field(default_factory=list)
    #: level name ('L3', 'IVD L3') -> volume in cm3 (vertebrae the field of view cuts are left out)
    volumes: dict[str, float] = field(default_factory=dict)
    #: :data:`MEASURE_PLOTS` key -> {level name: value} from the scan's measurements
    measures: dict[str, dict[str, float]] = field(default_factory=dict)
    #: graded vertebra -> (Genant grade, shape)
    grades: dict[str, tuple[int, str]] = field(default_factory=dict)


def summary_flags(summary: dict[str, Any]) -> list[str]:
    """Short flags of a scan's summary: implausible, no anchor, ambiguous labelling, missing / transitional / cut
    levels, low confidence, advisories (the same flags the QC picture draws)."""
    from spineps_like.snapshot import TRANSITIONAL_IDS, missing_levels

    rows = summary.get("vertebrae") or []
    plaus = summary.get("plausibility") or {}
    labeling = summary.get("labeling") or {}
    out = [f"implausible: {f}" for f in plaus.get("flags", [])]
    if rows and labeling.get("anchor") == "none":
        out.append("no anchor")
    if labeling.get("ambiguous"):
        out.append("ambiguous labelling")
    missing = missing_levels([int(r["id"]) for r in rows])
    if missing:
        from spineps_like.labels import instance_name

        out.append("missing " + ",".join(instance_name(v) for v, _, _ in missing))
    trans = [r["name"] for r in rows if int(r["id"]) in TRANSITIONAL_IDS]
    if trans:
        out.append("transitional " + ",".join(trans))
    cut = [r["name"] for r in rows if r.get("complete") is False]
    if cut:
        out.append("cut " + ",".join(cut))
    low = [r["name"] for r in rows if (r.get("confidence") or {}).get("level") == "low"]
    if low:
        out.append("low confidence " + ",".join(low))
    out.extend(f"advisory: {a}" for a in plaus.get("advisories", []))
    return out


def summary_volumes(summary: dict[str, Any]) -> dict[str, float]:
    """Level name -> volume (cm3) of the summary's vertebrae the field of view does not cut, and of its discs."""
    out = {r["name"]: r["volume_mm3"] / 1000.0 for r in summary.get("vertebrae") or []
           if r.get("complete") is not False and "volume_mm3" in r}
    out.update({r["name"]: r["volume_mm3"] / 1000.0 for r in summary.get("ivds") or [] if "volume_mm3" in r})
    return out


def level_measures(m: dict[str, Any]) -> tuple[dict[str, dict[str, float]], dict[str, tuple[int, str]]]:
    """The :data:`MEASURE_PLOTS` values of one scan's measurements ({key: {level: value}}; None values and, where
    the plot says so, vertebrae the field of view cuts are left out) and its Genant grades {vertebra: (grade,
    shape)}."""
    out: dict[str, dict[str, float]] = {}
    for key, _, _, _, where, name, complete_only in MEASURE_PLOTS:
        records, _, kind = where.partition(":")
        vals = {}
        for r in m.get(records) or []:
            level = r.get("name") or r.get("level")
            skip = (kind and r.get("kind") != kind) or (complete_only and r.get("complete") is False)
            if r.get(name) is None or skip:
                continue
            vals[level] = float(r[name])
        if vals:
            out[key] = vals
    grades = {r["name"]: (int(r["genant_grade"]), str(r.get("shape") or "")) for r in m.get("vertebrae") or []
              if r.get("genant_grade") is not None}
    return out, grades


def tukey_outliers(values: Sequence[float], k: float = OUTLIER_IQR, min_n: int = MIN_FOR_OUTLIERS) -> np.ndarray:
    """Boolean mask of the values outside [Q1 - k IQR, Q3 + k IQR] (none with fewer than ``min_n`` values)."""
    v = np.asarray(values, dtype=float)
    if v.size < min_n:
        return np.zeros(v.shape, bool)
    q1, q3 = np.percentile(v, [25, 75])
    iqr = q3 - q1
    return (v < q1 - k * iqr) | (v > q3 + k * iqr)


def _level_rank(name: str) -> tuple[int, int]:
    """Sort key of a level name: vertebrae in anatomical order, each disc after its vertebra."""
    disc = name.startswith("IVD ")
    vid = VERTEBRA_NAME_TO_ID.get(name[4:] if disc else name)
    pos = ANATOMICAL_ORDER.index(vid) if vid in ANATOMICAL_ORDER else len(ANATOMICAL_ORDER)
    return (pos, int(disc))


def _rel(path: str | None, start: Path) -> str | None:
    if not path:
        return None
    try:
        return Path(os.path.relpath(path, start)).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(path).as_uri()


def scan_rows(rows: Iterable[Any]) -> list[ScanRow]:
    """ScanRows from manifest rows (sqlite3.Row or dicts); a done scan's summary JSON gives vertebrae, anchor,
    flags and volumes (an unreadable summary is itself a flag)."""
    out = []
    for i, r in enumerate(rows):
        r = dict(r)
        outputs = json.loads(r.get("outputs") or "{}")
        row = ScanRow(index=i, key=r["key"], path=r["path"], state=r["state"], attempts=int(r.get("attempts") or 0),
                      seconds=r.get("seconds"), timings=json.loads(r.get("timings") or "{}") or {},
                      error=r.get("error") if r["state"] == "failed" else None,
                      snapshot=(outputs.get("snapshot") or {}).get("path"))
        summary_path = (outputs.get("summary") or {}).get("path")
        if r["state"] == "done" and summary_path:
            try:
                summary = json.loads(Path(summary_path).read_text())
            except (OSError, ValueError) as e:
                row.flags.append(f"summary unreadable: {type(e).__name__}")
            else:
                row.vertebrae = [v["name"] for v in summary.get("vertebrae") or [] if int(v["id"]) < IVD_OFFSET]
                row.anchor = (summary.get("labeling") or {}).get("anchor")
                row.flags = summary_flags(summary)
                row.volumes = summary_volumes(summary)
            m, _ = load_measurements(r)  # none: the measurement table says why
            if m is not None:
                row.measures, row.grades = level_measures(m)
        out.append(row)
    return out


@dataclass
class LevelPlot:
    """Per-level values of one quantity over the cohort: {level: [(row index, value)]} and the outliers."""

    title: str
    unit: str
    values: dict[str, list[tuple[int, float]]]
    outliers: dict[str, list[tuple[int, float]]]
    #: what an outlier's flag calls the quantity ("outlier: L3 volume 90.0 cm³")
    label: str = "volume"
    #: which section of the page: "volumes" or "measurements"
    group: str = "volumes"


def _level_plot(rows: Sequence[ScanRow], get: Callable[[ScanRow], dict[str, float]], title: str, unit: str,
                label: str, group: str) -> LevelPlot | None:
    """One plot: each row's {level: value} from ``get``, levels in anatomical order, outliers per level."""
    values: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for name, v in get(row).items():
            values.setdefault(name, []).append((row.index, float(v)))
    if not values:
        return None
    values = dict(sorted(values.items(), key=lambda kv: _level_rank(kv[0])))
    outliers = {}
    for name, pts in values.items():
        mask = tukey_outliers([v for _, v in pts])
        if mask.any():
            outliers[name] = [p for p, m in zip(pts, mask) if m]
    return LevelPlot(title, unit, values, outliers, label, group)


def level_plots(rows: Sequence[ScanRow]) -> list[LevelPlot]:
    """Vertebra and disc volume plots, then the :data:`MEASURE_PLOTS`, over the done scans (a plot without any
    value is left out); outliers (:func:`tukey_outliers`) per level."""
    specs: list[tuple[Callable[[ScanRow], dict[str, float]], str, str, str, str]] = [
        (lambda r, disc=disc: {n: v for n, v in r.volumes.items() if n.startswith("IVD ") == disc}, title, "cm³",
         "volume", "volumes") for title, disc in (("Vertebra volume", False), ("Disc volume", True))]
    specs += [(lambda r, key=key: r.measures.get(key, {}), title, unit, label, "measurements")
              for key, title, label, unit, *_ in MEASURE_PLOTS]
    return [p for p in (_level_plot(rows, *spec) for spec in specs) if p is not None]


def genant_counts(rows: Sequence[ScanRow]) -> dict[str, dict[str, Any]]:
    """{vertebra: {"graded": n, "counts": [n of grade 0, 1, 2, 3], "fractures": [(row index, grade, shape)]}}
    over the done scans, vertebrae in anatomical order."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        for level, (grade, shape) in row.grades.items():
            entry = out.setdefault(level, {"graded": 0, "counts": [0, 0, 0, 0], "fractures": []})
            entry["graded"] += 1
            entry["counts"][min(max(grade, 0), 3)] += 1
            if grade >= 1:
                entry["fractures"].append((row.index, grade, shape))
    return dict(sorted(out.items(), key=lambda kv: _level_rank(kv[0])))


# ------------------------------------------------------------------------------------------------ HTML
_CSS = """
body{font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:20px 0 6px}.meta{color:#666;font-size:12px}
.counts{display:flex;gap:8px;margin:10px 0}.count{border:0;border-radius:6px;padding:6px 12px;color:#fff;cursor:pointer;
font:inherit}.count b{font-size:18px;margin-right:6px}.st-done{background:#2e7d32}.st-failed{background:#c62828}
.st-pending{background:#757575}.st-running{background:#1565c0}.st-all{background:#455a64}
.controls{display:flex;gap:12px;align-items:center;margin:8px 0;flex-wrap:wrap}
table{border-collapse:collapse;background:#fff;width:100%}th,td{border-bottom:1px solid #e0e0e0;padding:4px 6px;
text-align:left;vertical-align:top}th{background:#eceff1;position:sticky;top:0;user-select:none}
th[data-sort]{cursor:pointer}th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}
td.thumb img{width:180px;height:84px;object-fit:contain;background:#eceff1;display:block}
.state{font-weight:600}.state-failed{color:#c62828}.state-done{color:#2e7d32}.state-pending{color:#757575}
.state-running{color:#1565c0}.flag{display:inline-block;background:#fff3e0;color:#8d4b00;border-radius:4px;
padding:0 4px;margin:1px 2px 1px 0;font-size:12px}.flag.bad{background:#ffebee;color:#b71c1c}
.flag.out{background:#f3e5f5;color:#6a1b9a}.error{color:#b71c1c;font-family:ui-monospace,monospace;font-size:12px;
max-width:40em;word-break:break-word}.key{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
tr:target td{background:#fff8e1}tr:target{outline:2px solid #ef6c00}.num{text-align:right;white-space:nowrap}
svg{background:#fff;border:1px solid #e0e0e0;margin:4px 8px 4px 0}svg .in{stroke:#37474f;stroke-width:4;
stroke-linecap:round;opacity:.6}svg .box{fill:#e3f2fd;stroke:#1e88e5}svg .med{stroke:#0d47a1;stroke-width:2}
svg .out{fill:#d50000;stroke:#fff}svg a:hover .out{r:6}svg text{font-size:11px;fill:#444}svg .axis{stroke:#999}
.plots{display:flex;flex-wrap:wrap;gap:8px 24px}table.genant{width:auto;margin:4px 0}
.outliers{font-size:12px;color:#555;max-width:40em}.outliers a{color:#b71c1c}
"""

_JS = r"""
(function(){
  var table=document.getElementById('scans'),tbody=table.tBodies[0];
  var rows=Array.prototype.slice.call(tbody.rows);
  var text=rows.map(function(r){return r.textContent.toLowerCase();});
  rows.forEach(function(r,i){r.dataset.i=i;});
  var q=document.getElementById('q'),st=document.getElementById('state'),fl=document.getElementById('flagged');
  var shown=document.getElementById('shown');
  function apply(){
    var t=q.value.trim().toLowerCase(),s=st.value,f=fl.checked,n=0;
    rows.forEach(function(r,i){
      var ok=(!s||r.dataset.state===s)&&(!f||r.dataset.flags!=='0')&&(!t||text[i].indexOf(t)>=0);
      r.hidden=!ok;if(ok)n++;
    });
    shown.textContent=n+' of '+rows.length+' scans shown';
  }
  q.addEventListener('input',apply);st.addEventListener('change',apply);fl.addEventListener('change',apply);
  Array.prototype.forEach.call(document.querySelectorAll('button.count'),function(b){
    b.addEventListener('click',function(){st.value=b.dataset.state;apply();});
  });
  var heads=Array.prototype.slice.call(table.tHead.rows[0].cells),current=null,dir=1;
  heads.forEach(function(th,col){
    if(!th.dataset.sort)return;
    th.addEventListener('click',function(){
      dir=(current===col)?-dir:1;current=col;
      var num=th.dataset.sort==='num';
      var keyed=rows.map(function(r){var v=r.cells[col].dataset.v;
        return [num?(v===''||v===undefined?NaN:parseFloat(v)):(v||'').toLowerCase(),r];});
      keyed.sort(function(a,b){
        var x=a[0],y=b[0];
        if(num){var xn=isNaN(x),yn=isNaN(y);if(xn||yn)return xn-yn||(a[1].dataset.i-b[1].dataset.i);}
        return (x<y?-1:x>y?1:(a[1].dataset.i-b[1].dataset.i))*dir;
      });
      var frag=document.createDocumentFragment();
      rows=keyed.map(function(k){frag.appendChild(k[1]);return k[1];});
      text=rows.map(function(r){return r.textContent.toLowerCase();});
      tbody.appendChild(frag);
      heads.forEach(function(h){h.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',dir>0?'ascending':'descending');
    });
  });
  function reveal(){
    var id=decodeURIComponent(location.hash.slice(1)),r=id&&document.getElementById(id);
    if(r&&r.hidden){q.value='';st.value='';fl.checked=false;apply();r.scrollIntoView();}
  }
  window.addEventListener('hashchange',reveal);
  apply();reveal();
})();
"""


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _flag_html(flag: str) -> str:
    cls = "flag bad" if flag.startswith(("implausible", "summary unreadable")) else (
        "flag out" if flag.startswith("outlier") else "flag")
    return f'<span class="{cls}">{_e(flag)}</span>'


def _row_html(row: ScanRow, base: Path, extra_flags: Sequence[str] = ()) -> str:
    thumb = _rel(row.snapshot, base)
    lazy = ' loading="lazy"' if row.index >= EAGER_THUMBNAILS else ""
    thumb_html = (f'<a href="{_e(thumb)}"><img{lazy} src="{_e(thumb)}" alt="QC picture"></a>'
                  if thumb else "")
    n = len(row.vertebrae)
    verts = (f"{n}: {_e(row.vertebrae[0])}–{_e(row.vertebrae[-1])}" if n > 1 else _e(" ".join(row.vertebrae))
             ) if n else ""
    secs = "" if row.seconds is None else f"{row.seconds:.1f}"
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in row.timings.items() if isinstance(v, (int, float)))
    err = f'<div class="error">{_e(row.error)}</div>' if row.error else ""
    flags = [*row.flags, *extra_flags]
    return (f'<tr id="scan-{row.index}" data-state="{_e(row.state)}" data-flags="{len(flags)}">'
            f'<td class="thumb">{thumb_html}</td>'
            f'<td class="key" data-v="{_e(row.key)}" title="{_e(row.path)}">{_e(row.key)}</td>'
            f'<td class="state state-{_e(row.state)}" data-v="{STATES.index(row.state) if row.state in STATES else 9}">'
            f'{_e(row.state)}{f" ({row.attempts} attempts)" if row.attempts > 1 else ""}</td>'
            f'<td data-v="{n if row.state == "done" else ""}" title="{_e(" ".join(row.vertebrae))}">{verts}</td>'
            f'<td data-v="{_e(row.anchor or "")}">{_e(row.anchor or "")}</td>'
            f'<td data-v="{len(flags)}">{"".join(_flag_html(f) for f in flags)}</td>'
            f'<td class="num" data-v="{secs}" title="{_e(phases)}">{secs}</td>'
            f'<td>{err}</td></tr>')


def _svg_plot(plot: LevelPlot, rows: Sequence[ScanRow]) -> str:
    """An inline SVG strip plot per level: inliers as one path of dots per level, quartile box and median, outliers
    as red dots linking to their scan rows."""
    levels = list(plot.values)
    step, left, top, h = 56, 48, 14, 200
    width = left + step * len(levels) + 12
    height = top + h + 34
    every = [v for pts in plot.values.values() for _, v in pts]
    lo, hi = min(0.0, min(every)), max(0.0, max(every))  # zero on the axis; HU may be negative
    hi = hi + 0.05 * (hi - lo) if hi > lo else lo + 1.0

    def y(v: float) -> float:
        return top + h - h * (v - lo) / (hi - lo)

    parts = [f'<svg width="{width}" height="{height}" role="img" '
             f'aria-label="{_e(plot.title)} per level">',
             f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + h}"/>',
             f'<line class="axis" x1="{left}" y1="{top + h}" x2="{width - 6}" y2="{top + h}"/>']
    for t in np.linspace(lo, max(every) if max(every) > lo else hi, 5):
        parts.append(f'<text x="{left - 4}" y="{y(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    parts.append(f'<text x="4" y="{top - 3}">{_e(plot.unit)}</text>')
    for j, level in enumerate(levels):
        cx = left + step * (j + 0.5)
        pts = plot.values[level]
        vals = np.array([v for _, v in pts])
        q1, med, q3 = np.percentile(vals, [25, 50, 75])
        parts.append(f'<rect class="box" x="{cx - 14:.1f}" y="{y(q3):.1f}" width="28" '
                     f'height="{max(y(q1) - y(q3), 0.5):.1f}"/>')
        parts.append(f'<line class="med" x1="{cx - 14:.1f}" x2="{cx + 14:.1f}" y1="{y(med):.1f}" y2="{y(med):.1f}"/>')
        out_idx = {i for i, _ in plot.outliers.get(level, [])}
        d = "".join(f"M{cx + ((i * 0.6180339887) % 1 - 0.5) * 30:.1f} {y(v):.1f}h0" for i, v in pts
                    if i not in out_idx)
        if d:
            parts.append(f'<path class="in" d="{d}"/>')
        for i, v in plot.outliers.get(level, []):
            parts.append(f'<a href="#scan-{i}"><circle class="out" data-scan="{i}" cx="{cx:.1f}" cy="{y(v):.1f}" '
                         f'r="4"><title>{_e(rows[i].key)}: {_e(level)} {v:.1f} {_e(plot.unit)}</title></circle></a>')
        parts.append(f'<text x="{cx:.1f}" y="{top + h + 14}" text-anchor="middle">{_e(level.replace("IVD ", ""))}'
                     f'</text><text x="{cx:.1f}" y="{top + h + 27}" text-anchor="middle">n={len(pts)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _genant_html(grades: dict[str, dict[str, Any]], rows: Sequence[ScanRow]) -> str:
    """The Genant grade counts per level, each graded fracture linked to its scan row."""
    body = []
    for level, entry in grades.items():
        links = ", ".join(f'<a href="#scan-{i}">{_e(rows[i].key)}</a> ({g}, {_e(shape)})'
                          for i, g, shape in entry["fractures"])
        counts = "".join(f'<td class="num">{n}</td>' for n in entry["counts"])
        body.append(f'<tr><td>{_e(level)}</td><td class="num">{entry["graded"]}</td>{counts}'
                    f'<td class="outliers">{links}</td></tr>')
    return ('<div><h3>Genant grade per level (graded vertebrae)</h3><table class="genant"><thead><tr><th>level</th>'
            '<th>graded</th><th>0</th><th>1</th><th>2</th><th>3</th><th>grade ≥ 1</th></tr></thead><tbody>'
            + "".join(body) + "</tbody></table></div>")


def render_report(rows: Sequence[ScanRow], counts: dict[str, int], *, base: Path, title: str = "Cohort report",
                  manifest: str = "") -> str:
    """The report's HTML for ``rows``; thumbnails are linked relative to ``base`` (the report's folder)."""
    plots = level_plots(rows)
    grades = genant_counts(rows)
    extra: dict[int, list[str]] = {}  # outliers and graded fractures named in their rows' flags too
    for plot in plots:
        for level, pts in plot.outliers.items():
            for i, v in pts:
                extra.setdefault(i, []).append(f"outlier: {level} {plot.label} {v:.1f} {plot.unit}")
    for level, entry in grades.items():
        for i, grade, shape in entry["fractures"]:
            extra.setdefault(i, []).append(f"Genant {grade} {level} ({shape})")
    total = sum(counts.values())
    state_buttons = "".join(
        f'<button class="count st-{s}" data-state="{s}"><b>{counts.get(s, 0)}</b>{s}</button>' for s in STATES)
    options = "".join(f'<option value="{s}">{s}</option>' for s in STATES)
    plot_html: dict[str, list[str]] = {"volumes": [], "measurements": []}
    for plot in plots:
        n_out = sum(len(v) for v in plot.outliers.values())
        links = ", ".join(f'<a href="#scan-{i}">{_e(rows[i].key)}</a> ({_e(level)} {v:.1f})'
                          for level, pts in plot.outliers.items() for i, v in pts)
        plot_html[plot.group].append(
            f'<div><h3>{_e(plot.title)} per level ({_e(plot.unit)})</h3>{_svg_plot(plot, rows)}'
            f'<p class="outliers">{n_out} outlier(s) outside {OUTLIER_IQR:g} × IQR'
            f'{": " + links if links else ""}</p></div>')
    if grades:
        plot_html["measurements"].append(_genant_html(grades, rows))
    volumes_html, measures_html = ("".join(plot_html[g]) for g in ("volumes", "measurements"))
    body_rows = "".join(_row_html(r, base, extra.get(r.index, ())) for r in rows)
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self' data: file:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{_e(title)}</title><style>{_CSS}</style></head><body>
<h1>{_e(title)}</h1><div class="meta">{total} scans · manifest {_e(manifest)} · written {generated}</div>
<div class="counts"><button class="count st-all" data-state=""><b>{total}</b>all</button>{state_buttons}</div>
<h2>Per-level volumes</h2><div class="plots">{volumes_html}</div>{"" if volumes_html else '<p class="meta">no done scan with vertebrae yet</p>'}
<h2>Per-level measurements</h2><div class="plots">{measures_html}</div>{"" if measures_html else '<p class="meta">no done scan with measurements yet</p>'}
<h2>Scans</h2>
<div class="controls"><input id="q" type="search" placeholder="filter: key, flag, error…" size="32">
<select id="state"><option value="">every state</option>{options}</select>
<label><input id="flagged" type="checkbox"> flagged only</label><span id="shown" class="meta"></span></div>
<table id="scans"><thead><tr><th>QC picture</th><th data-sort="text">scan</th><th data-sort="num">state</th>
<th data-sort="num">vertebrae</th><th data-sort="text">anchor</th><th data-sort="num">flags</th>
<th data-sort="num">seconds</th><th>error</th></tr></thead>
<tbody>{body_rows}</tbody></table>
<script>{_JS}</script></body></html>
"""


def write_report(out_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write the report of the cohort output folder ``out_dir`` (its ``cohort.sqlite``) to ``output`` (default
    ``out_dir/cohort_report.html``, atomically); returns its path. A folder without a manifest is a ValueError."""
    from spineps_like.io import atomic_write_text

    out_dir = Path(out_dir).expanduser()
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{out_dir}: no cohort manifest ({MANIFEST_NAME}) here")
    from spineps_like.cohort.run import open_manifest_summary

    open_manifest_summary(path)  # a file that is not a manifest: a one-line CohortError
    with Manifest(path, readonly=True) as m:
        counts = m.counts()
        rows = scan_rows(m.rows())
    target = Path(output) if output is not None else out_dir / REPORT_NAME
    text = render_report(rows, counts, base=target.resolve().parent, title=f"Cohort report: {out_dir.resolve().name}",
                         manifest=str(path.resolve()))
    atomic_write_text(target, text)
    return target
