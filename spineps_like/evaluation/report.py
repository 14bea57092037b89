"""Reports: per-case CSV, cohort summary (JSON + Markdown, mean +- std per metric and group) and the paired
comparison of two prediction sets against one reference (per-metric differences, Wilcoxon signed-rank test,
as the SPINEPS paper reports).

A *row* is one case: ``{"case": str, "status": str, "<group>.<metric>": float, ...}``. Metric keys are grouped by
the text before the first dot (``vertebra.pq`` -> group ``vertebra``, metric ``pq``).

Cohort statistics per metric are taken over the cases with a finite value: ``n``, ``mean``, ``std`` (sample,
ddof = 1; NaN for n < 2), ``median``; ``n_nan`` and ``n_inf`` count the cases left out (NaN = not applicable, e.g.
a structure absent from both masks; inf = panoptica's ASSD without any TP). In JSON, NaN is written as null and
+-inf as the strings "inf" / "-inf"; the CSV writes nan / inf.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from spineps_like.io import atomic_write_json, atomic_write_text

Row = dict[str, object]
META_KEYS = ("case", "status")


def metric_keys(rows: Iterable[Mapping[str, object]]) -> list[str]:
    """All metric keys of ``rows`` (everything but case/status and file columns), grouped and in first-seen order."""
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k not in META_KEYS and "." in k:
                seen.setdefault(k, None)
    groups: dict[str, list[str]] = {}
    for k in seen:
        groups.setdefault(k.split(".", 1)[0], []).append(k)
    return [k for ks in groups.values() for k in ks]


def _fmt_cell(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return str(v)


def cases_csv(rows: Sequence[Mapping[str, object]]) -> str:
    """CSV text: one line per case; columns case, status, file columns, then the metrics grouped."""
    keys = metric_keys(rows)
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in META_KEYS and k not in keys]
    cols = list(META_KEYS) + extra + keys
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_fmt_cell(r.get(c)) for c in cols])
    return buf.getvalue()


def write_cases_csv(rows: Sequence[Mapping[str, object]], path: str | Path) -> Path:
    """Write :func:`cases_csv` atomically."""
    return atomic_write_text(path, cases_csv(rows))


def read_cases_csv(path: str | Path) -> list[Row]:
    """Read a per-case CSV back: metric columns as floats (empty -> NaN), others as strings."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such per-case CSV file")
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "case" not in reader.fieldnames:
            raise ValueError(f"{p}: not a per-case CSV (no 'case' column)")
        rows = []
        for r in reader:
            row: Row = {}
            for k, v in r.items():
                if k in META_KEYS or "." not in k:
                    row[k] = v
                else:
                    try:
                        row[k] = float(v) if v != "" else math.nan
                    except ValueError:
                        raise ValueError(f"{p}: column {k!r} holds a non-number {v!r}") from None
            rows.append(row)
    return rows


def _values(rows: Sequence[Mapping[str, object]], key: str) -> np.ndarray:
    return np.array([float(r[key]) if r.get(key) is not None else math.nan for r in rows], dtype=float)


def metric_stats(values: Sequence[float]) -> dict[str, float]:
    """n, mean, std (ddof 1), median over the finite values; n_nan, n_inf for the others."""
    v = np.asarray(values, dtype=float)
    fin = v[np.isfinite(v)]
    return {
        "n": int(fin.size),
        "mean": float(fin.mean()) if fin.size else math.nan,
        "std": float(fin.std(ddof=1)) if fin.size > 1 else math.nan,
        "median": float(np.median(fin)) if fin.size else math.nan,
        "n_nan": int(np.isnan(v).sum()),
        "n_inf": int(np.isinf(v).sum()),
    }


def summarize(
    rows: Sequence[Mapping[str, object]],
    protocol: str | None = None,
    cohort: Callable[[Mapping[str, float]], Mapping[str, float]] | None = None,
) -> dict:
    """Cohort summary: ``{"protocol", "n_cases", "status": {status: count}, "metrics": {key: {group, metric, n,
    mean, std, median, n_nan, n_inf}}, "cohort": {...}}``; ``cohort`` maps the metric means to protocol-level
    values (e.g. Endplate3D's F1 of the mean precision and recall)."""
    metrics = {}
    for k in metric_keys(rows):
        group, name = k.split(".", 1)
        metrics[k] = {"group": group, "metric": name, **metric_stats(_values(rows, k))}
    status: dict[str, int] = {}
    for r in rows:
        s = str(r.get("status", "ok"))
        status[s] = status.get(s, 0) + 1
    out = {"protocol": protocol, "n_cases": len(rows), "status": status, "metrics": metrics, "cohort": {}}
    if cohort is not None:
        out["cohort"] = {k: float(v) for k, v in cohort({k: m["mean"] for k, m in metrics.items()}).items()}
    return out


def _num(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, int):
        return str(x)
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.1f}"


def summary_markdown(summary: Mapping, title: str | None = None) -> str:
    """Markdown tables of a :func:`summarize` result, one table per group: metric | mean +- std | median | n."""
    lines = [f"# {title or 'Evaluation summary'}", ""]
    lines.append(f"Protocol: {summary.get('protocol')}; cases: {summary.get('n_cases')}"
                 + "".join(f"; {k}: {v}" for k, v in summary.get("status", {}).items() if k != "ok"))
    lines.append("")
    by_group: dict[str, list[tuple[str, Mapping]]] = {}
    for k, m in summary.get("metrics", {}).items():
        by_group.setdefault(m["group"], []).append((m["metric"], m))
    for group, items in by_group.items():
        lines += [f"## {group}", "", "| metric | mean ± std | median | n | n/a |", "|---|---|---|---|---|"]
        for name, m in items:
            na = f"{m['n_nan']} nan" + (f", {m['n_inf']} inf" if m["n_inf"] else "")
            lines.append(f"| {name} | {_num(m['mean'])} ± {_num(m['std'])} | {_num(m['median'])} | {m['n']} | {na} |")
        lines.append("")
    if summary.get("cohort"):
        lines += ["## cohort", "", "| value | |", "|---|---|"]
        lines += [f"| {k} | {_num(v)} |" for k, v in summary["cohort"].items()]
        lines.append("")
    lines.append("Statistics over cases with a finite value; std is the sample std (ddof 1).")
    return "\n".join(lines) + "\n"


def write_json(obj: object, path: str | Path) -> Path:
    """Write JSON atomically with NaN -> null and +-inf -> "inf"/"-inf" (strict JSON)."""
    return atomic_write_json(path, obj)


# ---------------------------------------------------------------- paired comparison
def wilcoxon_p(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank test of paired samples (``scipy.stats.wilcoxon``, zero_method 'wilcox').

    Returns (statistic, p). All differences zero: (0, 1.0); no pair: (NaN, NaN).
    """
    from scipy.stats import wilcoxon

    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size == 0:
        return math.nan, math.nan
    if not np.any(a - b):
        return 0.0, 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = wilcoxon(a, b)
    return float(res.statistic), float(res.pvalue)


def paired_comparison(
    rows_a: Sequence[Mapping[str, object]],
    rows_b: Sequence[Mapping[str, object]],
    metrics: Sequence[str] | None = None,
) -> list[dict]:
    """Compare two prediction sets (A, B) scored against the same reference, case by case.

    Cases are paired by ``case``; per metric only the cases with a finite value in both sets count. Returns one
    dict per metric: ``metric, group, n, mean_a, mean_b, mean_diff (B - A), median_diff, statistic, p_value``.
    """
    a_by = {str(r["case"]): r for r in rows_a}
    b_by = {str(r["case"]): r for r in rows_b}
    common = [c for c in a_by if c in b_by]
    if not common:
        raise ValueError("paired comparison: the two result sets share no case")
    keys = list(metrics) if metrics is not None else [k for k in metric_keys(rows_a) if k in set(metric_keys(rows_b))]
    out = []
    for k in keys:
        va = _values([a_by[c] for c in common], k)
        vb = _values([b_by[c] for c in common], k)
        ok = np.isfinite(va) & np.isfinite(vb)
        va, vb = va[ok], vb[ok]
        stat, p = wilcoxon_p(va, vb)
        d = vb - va
        out.append({
            "metric": k, "group": k.split(".", 1)[0], "n": int(ok.sum()),
            "mean_a": float(va.mean()) if va.size else math.nan,
            "mean_b": float(vb.mean()) if vb.size else math.nan,
            "mean_diff": float(d.mean()) if d.size else math.nan,
            "median_diff": float(np.median(d)) if d.size else math.nan,
            "statistic": stat, "p_value": p,
        })
    return out


def paired_markdown(comparison: Sequence[Mapping], name_a: str = "A", name_b: str = "B") -> str:
    """Markdown table of :func:`paired_comparison`."""
    lines = [f"# Paired comparison: {name_a} (A) vs {name_b} (B)", "",
             "| metric | n | A mean | B mean | B − A (mean) | B − A (median) | Wilcoxon p |",
             "|---|---|---|---|---|---|---|"]
    for c in comparison:
        p = c["p_value"]
        ps = "–" if p is None or math.isnan(p) else ("<0.001" if p < 1e-3 else f"{p:.3f}")
        lines.append(f"| {c['metric']} | {c['n']} | {_num(c['mean_a'])} | {_num(c['mean_b'])} | "
                     f"{_num(c['mean_diff'])} | {_num(c['median_diff'])} | {ps} |")
    lines += ["", "Two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon) over cases finite in both sets."]
    return "\n".join(lines) + "\n"


def write_report(
    rows: Sequence[Mapping[str, object]],
    out_dir: str | Path,
    protocol: str | None = None,
    cohort: Callable[[Mapping[str, float]], Mapping[str, float]] | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, Path]:
    """Write ``cases.csv``, ``summary.json`` and ``summary.md`` into ``out_dir`` (atomically). Returns their paths."""
    out = Path(out_dir)
    summary = summarize(rows, protocol, cohort)
    if extra:
        summary.update(extra)
    return {
        "csv": write_cases_csv(rows, out / "cases.csv"),
        "json": write_json(summary, out / "summary.json"),
        "markdown": atomic_write_text(out / "summary.md", summary_markdown(summary, f"Evaluation ({protocol})")),
    }
