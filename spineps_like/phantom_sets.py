"""Named phantom sets: the one place that says which phantom seeds are for evaluation, and the training check.

``development``
    Seeds 900000-999999. ``benchmarks/accuracy.py`` (seed 900000 + case index), the side-by-side runner and
    ``benchmarks/mask_identity.py`` draw from it. Clean-up and post-processing rules were tuned and tried on these
    phantoms, so a number measured on them is a development number, not an unbiased estimate.
``test``
    Seeds 2000000-2099999. Never used for any decision (no rule, threshold or model choice is tuned on it): report on
    it, do not tune on it.

Training never uses a phantom of either set: :func:`check_training_seed` raises a ``ValueError`` for such a seed,
``spineps_like.training.instance`` checks every phantom seed of a run before any work, and
``spineps_like.training.semantic`` skips them when it draws its phantoms (its ``HELD_OUT_SEEDS`` is
:data:`EVALUATION_SEEDS`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterable, Iterator


def _as_int(seed: object) -> int | None:
    """An integer seed (Python or numpy), else None."""
    try:
        return operator.index(seed)  # type: ignore[arg-type]
    except TypeError:
        return None


@dataclass(frozen=True)
class PhantomSet:
    """A named, contiguous range of phantom seeds (``make_phantom(seed, ...)``) kept out of training."""

    name: str
    seeds: range
    purpose: str

    def seed(self, index: int) -> int:
        """The ``index``-th seed of the set (``seeds.start + index``)."""
        if not 0 <= index < len(self.seeds):
            raise IndexError(f"{self.name} set holds {len(self.seeds)} seeds; index {index} is outside it")
        return self.seeds[index]

    def __contains__(self, seed: object) -> bool:
        i = _as_int(seed)
        return i is not None and i in self.seeds

    def describe(self) -> str:
        """One line for reports: name, seed range and what the set may be used for."""
        return f"{self.name} set (seeds {self.seeds.start}-{self.seeds.stop - 1}; {self.purpose})"


DEVELOPMENT = PhantomSet("development", range(900_000, 1_000_000),
                         "the phantoms clean-up and post-processing rules were tuned on")
TEST = PhantomSet("test", range(2_000_000, 2_100_000), "never used for any decision")

#: Every evaluation set by name.
SETS: dict[str, PhantomSet] = {s.name: s for s in (DEVELOPMENT, TEST)}


def phantom_set(name: str) -> PhantomSet:
    """The evaluation set called ``name`` (``development`` or ``test``)."""
    try:
        return SETS[name]
    except KeyError:
        raise ValueError(f"unknown phantom set {name!r}; known: {', '.join(SETS)}") from None


def evaluation_set_of(seed: int) -> PhantomSet | None:
    """The evaluation set that holds ``seed``, or None."""
    for s in SETS.values():
        if seed in s:
            return s
    return None


class _EvaluationSeeds:
    """Every seed of every evaluation set, as a container (``seed in EVALUATION_SEEDS``)."""

    def __contains__(self, seed: object) -> bool:
        i = _as_int(seed)
        return i is not None and evaluation_set_of(i) is not None

    def __iter__(self) -> Iterator[int]:
        for s in SETS.values():
            yield from s.seeds

    def __len__(self) -> int:
        return sum(len(s.seeds) for s in SETS.values())

    def __repr__(self) -> str:
        return "EVALUATION_SEEDS(" + ", ".join(f"{s.name}={s.seeds.start}-{s.seeds.stop - 1}"
                                                for s in SETS.values()) + ")"


#: Seeds no training run may use.
EVALUATION_SEEDS = _EvaluationSeeds()


def check_training_seed(seed: int) -> int:
    """``seed`` unchanged, or a ``ValueError`` naming the evaluation set it belongs to."""
    s = evaluation_set_of(int(seed))
    if s is not None:
        raise ValueError(f"phantom seed {seed} belongs to the {s.describe()}; training never uses evaluation "
                         "phantoms")
    return int(seed)


def check_training_seeds(seeds: Iterable[int]) -> list[int]:
    """All ``seeds`` as ints, or a ``ValueError`` naming the first that belongs to an evaluation set (and how many
    do)."""
    seeds = [int(x) for x in seeds]
    bad = [x for x in seeds if evaluation_set_of(x) is not None]
    if bad:
        s = evaluation_set_of(bad[0])
        more = f" (and {len(bad) - 1} more evaluation seeds)" if len(bad) > 1 else ""
        raise ValueError(f"phantom seed {bad[0]}{more} belongs to the {s.describe()}; training never uses "
                         "evaluation phantoms")
    return seeds
