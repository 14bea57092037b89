"""SPINEPS ``inference_config.json``: parsing, validation and label resolution.

The keys are those of spineps 2.1.3 (``Segmentation_Inference_Config``): log_name, modality, acquisition, modeltype,
model_expected_orientation, available_folds, inference_augmentation, resolution_range, default_step_size, labels,
plus optional ones (expected_inputs, has_c1, cutout_size, ...) that are kept in :attr:`InferenceConfig.raw`.
``labels`` maps the network's output index to a label given as a TPTBox ``Location`` name
("Vertebra_Corpus_border"), a vertebra name ("S1") or a number.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from spineps_like.labels import SEMANTIC_NAMES, VERTEBRA_NAME_TO_ID
from spineps_like.models.manifest import ModelError

CONFIG_NAME = "inference_config.json"
REQUIRED_KEYS = (
    "log_name", "modality", "acquisition", "modeltype", "model_expected_orientation", "available_folds",
    "inference_augmentation", "resolution_range", "default_step_size", "labels",
)
MODALITIES = ("T2w", "T1w", "Vibe", "CT", "SEG", "MPR", "PD", "FLAIR")
ACQUISITIONS = ("sag", "cor", "ax", "iso")
MODELTYPES = ("nnunet", "unet", "classifier")
#: Location names outside the semantic scheme that models emit and :data:`~spineps_like.labels.SEMANTIC_ALIASES` maps.
_EXTRA_LOCATION_NAMES = {"Vertebra_Corpus": 50, "Dens_axis": 51}
_AXES = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


def label_value(name: Any) -> int:
    """Resolve one label of a config or dataset.json to its id: a number, a Location name or a vertebra name.

    >>> label_value("Vertebra_Disc"), label_value("S1"), label_value("49")
    (100, 26, 49)
    """
    if isinstance(name, bool):
        raise ValueError(f"label {name!r} is neither a number nor a known label name")
    if isinstance(name, (int, np.integer)):
        return int(name)
    s = str(name).strip()
    if s.lstrip("-").isdigit():
        return int(s)
    by_name = {v: int(k) for k, v in SEMANTIC_NAMES.items()} | _EXTRA_LOCATION_NAMES
    if s in by_name:
        return by_name[s]
    if s in VERTEBRA_NAME_TO_ID:
        return VERTEBRA_NAME_TO_ID[s]
    if s.lower() == "background":
        return 0
    try:  # the full TPTBox Location table (ribs, full vertebra, ...), imported only when needed
        from TPTBox import Location

        return int(Location[s].value)
    except (ImportError, KeyError):
        raise ValueError(f"label {s!r} is neither a number nor a known label name") from None


def check_orientation(codes: Any, where: str) -> str:
    """Validate axis codes like 'PIR' or ['P', 'I', 'R'] and return them as a string."""
    s = "".join(codes) if isinstance(codes, (list, tuple)) else str(codes)
    s = s.upper()
    if len(s) != 3 or any(c not in _AXES for c in s) or len({_AXES[c] for c in s}) != 3:
        raise ModelError(f"{where}: model_expected_orientation {codes!r} is not three axis codes like 'PIR'")
    return s


def _check_resolution_range(rr: Any, where: str) -> list:
    """Validate a resolution range ([x, y, z] or [[lo...], [hi...]] in mm) and return it as nested lists."""
    try:
        arr = np.asarray(rr, dtype=float)
    except (TypeError, ValueError):
        raise ModelError(f"{where}: resolution_range {rr!r} is not numeric") from None
    if arr.shape == (1, 3):  # SPINEPS' unit tests use [(x, y, z)]: one fixed spacing
        arr = arr[0]
    if arr.shape not in ((3,), (2, 3)) or not np.all(arr > 0) or not np.all(np.isfinite(arr)):
        raise ModelError(f"{where}: resolution_range must be [x, y, z] or [[lo x, y, z], [hi x, y, z]] in mm, got {rr!r}")
    if arr.ndim == 2 and np.any(arr[0] > arr[1]):
        raise ModelError(f"{where}: resolution_range lower bound {arr[0].tolist()} exceeds upper {arr[1].tolist()}")
    return arr.tolist()


def _folds(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, bool):
        raise ModelError(f"{where}: available_folds {value!r} is not a fold count or list")
    if isinstance(value, int):
        if value < 1:
            raise ModelError(f"{where}: available_folds must be >= 1, got {value}")
        return tuple(str(i) for i in range(value))
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and value:
        return tuple(str(v) for v in value)
    raise ModelError(f"{where}: available_folds {value!r} is not a fold count or list")


@dataclass(frozen=True)
class InferenceConfig:
    """A parsed ``inference_config.json`` (SPINEPS keys, validated)."""

    log_name: str
    modalities: tuple[str, ...]
    acquisition: str
    modeltype: str
    orientation: str
    available_folds: tuple[str, ...]
    inference_augmentation: bool
    resolution_range: list | None
    default_step_size: float
    labels: dict[int, int]
    raw: dict = field(default_factory=dict, repr=False, compare=False)
    path: Path | None = field(default=None, compare=False)

    @property
    def is_ct(self) -> bool:
        return "CT" in self.modalities

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = CONFIG_NAME) -> "InferenceConfig":
        """Validate a config dict; raise :class:`ModelError` naming ``where`` and the offending key."""
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise ModelError(f"{where}: missing keys {missing}")
        mods = d["modality"] if isinstance(d["modality"], (list, tuple)) else [d["modality"]]
        bad = [m for m in mods if m not in MODALITIES]
        if bad:
            raise ModelError(f"{where}: unknown modality {bad} (one of {list(MODALITIES)})")
        if d["acquisition"] not in ACQUISITIONS:
            raise ModelError(f"{where}: unknown acquisition {d['acquisition']!r} (one of {list(ACQUISITIONS)})")
        if d["modeltype"] not in MODELTYPES:
            raise ModelError(f"{where}: unknown modeltype {d['modeltype']!r} (one of {list(MODELTYPES)})")
        step = d["default_step_size"]
        if not isinstance(step, (int, float)) or not 0 < float(step) <= 1:
            raise ModelError(f"{where}: default_step_size must be in (0, 1], got {step!r}")
        if not isinstance(d["labels"], Mapping) or not d["labels"]:
            raise ModelError(f"{where}: labels must be a non-empty mapping of output index to label")
        labels: dict[int, int] = {}
        for k, v in d["labels"].items():
            try:
                labels[label_value(k)] = label_value(v)
            except ValueError as e:
                raise ModelError(f"{where}: labels[{k!r}]: {e}") from None
        return cls(
            log_name=str(d["log_name"]),
            modalities=tuple(mods),
            acquisition=d["acquisition"],
            modeltype=d["modeltype"],
            orientation=check_orientation(d["model_expected_orientation"], where),
            available_folds=_folds(d["available_folds"], where),
            inference_augmentation=bool(d["inference_augmentation"]),
            resolution_range=_check_resolution_range(d["resolution_range"], where),
            default_step_size=float(step),
            labels=labels,
            raw=dict(d),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "InferenceConfig":
        """Read and validate an ``inference_config.json``."""
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise ModelError(f"{p}: no such file") from None
        except json.JSONDecodeError as e:
            raise ModelError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict):
            raise ModelError(f"{p}: expected a JSON object")
        cfg = cls.from_dict(d, str(p))
        object.__setattr__(cfg, "path", p)
        return cfg
