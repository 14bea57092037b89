"""Every results file the READMEs cite exists, and every relative link in them leads somewhere.

Checked: README.md, models/MODELS.md and every README.md under benchmarks/ (git-ignored folders left out). A results
path is anything naming a file or folder under a ``results/`` folder (``benchmarks/results/x.md``, ``results/x.md``,
``../results/x.md``, ``spineps_side_by_side/results/x.md``), resolved from the README's folder, or from the repository
root when it starts with ``benchmarks/``; ``*`` must match a file and ``{a,b}`` is expanded. A path cited as a past
version (``results/x.md at 467a547``, or ``467a547:benchmarks/results/x.md``) is in git history, not on disk.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IGNORED_PARTS = {"work", ".venv-spineps", "sct_testing_data", "totalsegmentator", "__pycache__"}


def cited_docs() -> list[Path]:
    docs = [ROOT / "README.md", ROOT / "models" / "MODELS.md"]
    docs += sorted(p for p in (ROOT / "benchmarks").glob("**/README.md")
                   if not IGNORED_PARTS & set(p.relative_to(ROOT).parts))
    return [p for p in docs if p.is_file()]


RESULTS_PATH = re.compile(r"(?<![\w./:-])((?:\.\./|[\w-]+/)*results/[\w.*{},/-]*[\w*}/])")
HISTORY_AFTER = re.compile(r"`?\s+at\s+[0-9a-f]{7,40}\b")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _expand(path: str) -> list[str]:
    """``a.{json,md}`` -> ``a.json``, ``a.md``."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _exists(doc: Path, path: str) -> bool:
    base = ROOT if path.startswith("benchmarks/") else doc.parent
    for p in _expand(path):
        if "*" in p:
            if not list(base.glob(p)):
                return False
        elif not (base / p).exists():
            return False
    return True


def results_citations(doc: Path) -> list[tuple[int, str]]:
    """(line, path) of every results path ``doc`` cites as a file on disk (bare ``results/`` folders left out)."""
    out = []
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        for m in RESULTS_PATH.finditer(line):
            path = m.group(1).rstrip(".")
            if path.endswith("results/") or HISTORY_AFTER.match(line, m.end()):
                continue
            out.append((n, path))
    return out


def test_the_checked_documents_are_found():
    names = {str(p.relative_to(ROOT)) for p in cited_docs()}
    assert {"README.md", "models/MODELS.md", "benchmarks/README.md",
            "benchmarks/spineps_side_by_side/README.md"} <= names


@pytest.mark.parametrize("doc", cited_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_results_file_exists(doc):
    missing = [f"{doc.relative_to(ROOT)}:{n}: {path}" for n, path in results_citations(doc) if not _exists(doc, path)]
    assert not missing, "results files cited but absent:\n" + "\n".join(missing)


@pytest.mark.parametrize("doc", cited_docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_exists(doc):
    missing = []
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                missing.append(f"{doc.relative_to(ROOT)}:{n}: {target}")
    assert not missing, "links to absent files:\n" + "\n".join(missing)


def test_the_checker_sees_what_it_should():
    doc = ROOT / "benchmarks" / "README.md"
    assert _exists(doc, "results/accuracy.{json,md}") and not _exists(doc, "results/accuracy.{json,txt}")
    assert _exists(doc, "spineps_side_by_side/results/side_by_side*.md")
    assert not _exists(doc, "results/repeat/")
    line = "see `results/repeat/side_by_side.md` at 0755aa1, `git show 0755aa1:benchmarks/results/x.md`, results/a.md."
    found = [m.group(1).rstrip(".") for m in RESULTS_PATH.finditer(line)]
    assert found == ["results/repeat/side_by_side.md", "results/a.md"]  # a git rev:path is no citation
    assert HISTORY_AFTER.match(line, line.index("`", 5))
