"""The Pareto front over the declared objectives, and its hypervolume (via moocore).

Only complete, full-budget trials enter the front: an early-stopped trial's accuracy is an
under-trained figure and would put students on the front that do not deserve it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import moocore
import numpy as np

from kdsearch.spaces import SpaceError

Objectives = Mapping[str, str]  # metric -> "max" | "min"


def objective_matrix(rows: Sequence[Mapping[str, Any]], objectives: Objectives) -> np.ndarray:
    """Rows of objective values in the declared order (NaN where a metric is missing)."""
    return np.array([[float(row.get(m, math.nan)) for m in objectives] for row in rows], dtype=float).reshape(len(rows), len(objectives))


def _maximise(objectives: Objectives) -> list[bool]:
    return [direction == "max" for direction in objectives.values()]


def pareto_mask(rows: Sequence[Mapping[str, Any]], objectives: Objectives) -> np.ndarray:
    """Which rows are non-dominated; rows with a missing or NaN objective never are."""
    points = objective_matrix(rows, objectives)
    mask = np.zeros(len(rows), dtype=bool)
    finite = np.isfinite(points).all(axis=1)
    if finite.any():
        mask[finite] = moocore.is_nondominated(points[finite], maximise=_maximise(objectives), keep_weakly=True)
    return mask


def pareto_front(rows: Sequence[Mapping[str, Any]], objectives: Objectives) -> list[Mapping[str, Any]]:
    """The non-dominated rows, most accurate (first objective best) first."""
    mask = pareto_mask(rows, objectives)
    front = [row for row, keep in zip(rows, mask) if keep]
    first, direction = next(iter(objectives.items()))
    return sorted(front, key=lambda r: -r[first] if direction == "max" else r[first])


def hypervolume(rows: Sequence[Mapping[str, Any]], objectives: Objectives, reference: Mapping[str, float]) -> float:
    """Volume dominated by the rows and bounded by ``reference`` (larger is better).

    Points that do not strictly beat the reference in every objective add nothing.
    """
    points = objective_matrix(rows, objectives)
    if not len(points):
        return 0.0
    ref = np.array([reference[m] for m in objectives], dtype=float)
    better = np.where(np.array(_maximise(objectives)), points > ref, points < ref).all(axis=1)
    points = points[better & np.isfinite(points).all(axis=1)]
    if not len(points):
        return 0.0
    return float(moocore.hypervolume(points, ref=ref, maximise=_maximise(objectives)))


def box_volume(reference: Mapping[str, float], objectives: Objectives) -> float:
    """The reference box's volume: the hypervolume of a perfect point (accuracy 1, zero cost)."""
    return math.prod(abs(reference[m] - (1.0 if d == "max" else 0.0)) for m, d in objectives.items())


def hypervolume_fraction(rows: Sequence[Mapping[str, Any]], objectives: Objectives, reference: Mapping[str, float]) -> float:
    """:func:`hypervolume` as a share of the reference box, 0..1: comparable across spaces and units.

    >>> objectives = {"acc": "max", "ms": "min"}
    >>> hypervolume_fraction([{"acc": 0.5, "ms": 1.0}], objectives, {"acc": 0.0, "ms": 2.0})
    0.25
    """
    box = box_volume(reference, objectives)
    return hypervolume(rows, objectives, reference) / box if box > 0 else 0.0


def reference_point(objectives: Objectives, declared: Optional[Mapping[str, float]], constraints: Mapping[str, float],
                    teacher: Mapping[str, float]) -> dict[str, float]:
    """The hypervolume reference: declared, else derived before the search so it never moves.

    Derived: 0 for a maximised metric (accuracy cannot be worse), the constraint bound for a
    constrained minimised one, else the teacher's own figure: a student that costs more than
    its teacher is worth nothing.
    """
    if declared:
        return {m: float(declared[m]) for m in objectives}
    reference = {}
    for metric, direction in objectives.items():
        if direction == "max":
            reference[metric] = 0.0
        elif f"max_{metric}" in constraints:
            reference[metric] = float(constraints[f"max_{metric}"])
        elif teacher.get(metric):
            reference[metric] = float(teacher[metric])
        else:
            raise SpaceError("reference_point", f"no bound for {metric}", "declare reference_point in the space file")
    return reference
