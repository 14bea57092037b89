"""Cohort processing: discovery of scans, a resumable SQLite manifest, local and Ray executors.

>>> from spineps_like.cohort import segment_cohort
>>> summary = segment_cohort("/data/bids", "/data/out", workers=4, instance_method="network")   # doctest: +SKIP
"""

from spineps_like.cohort.discover import ScanEntry, discover_scans, is_scan_file
from spineps_like.cohort.executors import CohortError, CohortWorker
from spineps_like.cohort.manifest import MANIFEST_NAME, Manifest, format_summary
from spineps_like.cohort.run import Cohort, add_cohort_parser, cohort_main, cohort_status, segment_cohort

__all__ = [
    "MANIFEST_NAME", "Cohort", "CohortError", "CohortWorker", "Manifest", "ScanEntry", "add_cohort_parser",
    "cohort_main", "cohort_status", "discover_scans", "format_summary", "is_scan_file", "segment_cohort",
]
