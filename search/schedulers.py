"""Multi-objective asynchronous successive halving ("pareto-asha") for Ray Tune.

ASHA stops a trial at a rung when its one metric falls outside the top 1/eta
of the results recorded there. Ranked on accuracy alone, that kills the
students a size-aware search exists for: a 5k-parameter student always trails
a 500k one after two epochs, yet it may end on the accuracy/size/latency
Pareto front. ``ParetoASHA`` keeps ASHA's rungs and asynchronous cut but ranks
the results at a rung by non-dominated sorting, breaks ties inside a front by
crowding distance (NSGA-II), and, past the first rung, never stops a trial that
no other trial at its rung dominates.

The module needs only Ray Tune and numpy, so any Ray Tune user can reuse it.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

__all__ = ["ParetoASHA", "crowding_distance", "nondominated_ranks", "rung_milestones"]

_MODE_SIGNS = {"max": 1.0, "min": -1.0}


def nondominated_ranks(points: ArrayLike, signs: ArrayLike) -> np.ndarray:
    """Rank points by non-dominated sorting: 0 is the Pareto front, 1 the next front, ...

    Args:
        points: ``(n, m)`` objective values, one row per point.
        signs: ``(m,)`` direction per objective, ``+1`` to maximise, ``-1`` to minimise.

    Returns:
        ``(n,)`` integer ranks. A point dominates another when it is at least as
        good on every objective and strictly better on one; equal points share a
        rank. Rows holding a non-finite value (NaN, inf) rank worst: they form
        one extra front after every finite row, because a broken measurement
        must neither protect its trial nor push a real result down.

    Deb's fast non-dominated sort, O(n^2 m) time and memory: rungs hold at most
    a few thousand trials.
    """
    values = np.asarray(points, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"points must be 2-D (n, m), got shape {values.shape}")
    oriented = values * np.asarray(signs, dtype=float)  # larger is better everywhere
    finite = np.isfinite(oriented).all(axis=1)
    ranks = np.zeros(len(values), dtype=int)
    good = oriented[finite]

    at_least_as_good = (good[:, None, :] >= good[None, :, :]).all(axis=-1)
    strictly_better = (good[:, None, :] > good[None, :, :]).any(axis=-1)
    dominates = at_least_as_good & strictly_better  # [i, j]: i dominates j
    dominator_count = dominates.sum(axis=0)
    good_ranks = np.full(len(good), -1)
    front = np.flatnonzero(dominator_count == 0)
    rank = 0
    while front.size:
        good_ranks[front] = rank
        # Peeling a front off frees the points it alone dominated.
        dominator_count -= dominates[front].sum(axis=0)
        front = np.flatnonzero((dominator_count == 0) & (good_ranks < 0))
        rank += 1

    ranks[finite] = good_ranks
    ranks[~finite] = good_ranks.max(initial=-1) + 1
    return ranks


def crowding_distance(points: ArrayLike) -> np.ndarray:
    """NSGA-II crowding distance of each point within one front.

    Args:
        points: ``(n, m)`` finite objective values of the points of one front.

    Returns:
        ``(n,)`` distances: per objective, the gap between a point's two
        neighbours divided by that objective's range, summed. Larger means a
        lonelier point, so preferring large distances keeps the spread of the
        front. Every point holding an objective's minimum or maximum is a
        boundary point with infinite distance (ties at the extreme all count,
        so the result does not depend on row order). Fronts of one or two
        points are all boundary. An objective on which the whole front is equal
        adds nothing: there is no spread to keep along it. Directions do not
        matter here, only distances.
    """
    values = np.asarray(points, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"points must be 2-D (n, m), got shape {values.shape}")
    count = len(values)
    if count <= 2:
        return np.full(count, np.inf)
    distance = np.zeros(count)
    for column in values.T:
        low, high = column.min(), column.max()
        if high == low:
            continue
        order = np.argsort(column, kind="stable")
        ordered = column[order]
        distance[order[1:-1]] += (ordered[2:] - ordered[:-2]) / (high - low)
        distance[(column == low) | (column == high)] = np.inf
    return distance


def _continues_at_rung(
    points: np.ndarray, arrival: int, signs: np.ndarray, reduction_factor: float, keep_front: bool
) -> bool:
    """Whether the trial at row ``arrival`` of a rung's results survives the cut.

    The rung's rows (the arrival included) are ordered by front, then by
    crowding distance inside a front, and the top ``ceil(n / eta)`` continue.
    Ties go to the arrival, as ASHA continues a result equal to its cutoff. With
    ``keep_front``, a finite arrival on the first front always continues, even
    past ``1/eta``.
    """
    ranks = nondominated_ranks(points, signs)
    finite = bool(np.isfinite(points[arrival]).all())
    if keep_front and finite and ranks[arrival] == 0:
        return True
    same_front = np.flatnonzero(ranks == ranks[arrival])
    ahead_in_front = 0
    if finite:  # the non-finite front has no distances: all its members tie
        crowding = crowding_distance(points[same_front])
        own = crowding[np.flatnonzero(same_front == arrival)[0]]
        ahead_in_front = int((crowding > own).sum())
    position = int((ranks < ranks[arrival]).sum()) + ahead_in_front
    return position < math.ceil(len(points) / reduction_factor)


def rung_milestones(grace_period: float, reduction_factor: float, max_t: float) -> list[float]:
    """Where successive halving judges a trial: ``grace_period * reduction_factor**k`` below ``max_t``.

    With a grace period below one unit of ``time_attr`` (a third of an epoch, say) the first
    rungs fall between whole units: the trainable must report there too, or the rung waits
    for the next whole unit.
    """
    milestones, milestone = [], grace_period
    while milestone < max_t:
        milestones.append(milestone)
        milestone *= reduction_factor
    return milestones


@dataclass
class _Rung:
    """Results recorded at one milestone of ``time_attr``, one vector per trial."""

    milestone: float
    recorded: dict[str, np.ndarray] = field(default_factory=dict)


class ParetoASHA(FIFOScheduler):
    """Asynchronous successive halving over several objectives at once.

    Like ASHA, a trial is judged once per rung, when it first reports at or past
    the rung's milestone (``grace_period * reduction_factor**k < max_t``), against
    the results recorded at that rung so far, its own included. Unlike ASHA the
    results are vectors of ``metrics``: they are ordered by non-dominated sorting
    and, inside a front, by crowding distance. The trial continues when it is
    within the top ``ceil(n / reduction_factor)`` of the ``n`` recorded results,
    or, at any rung after its bracket's first, when no recorded result dominates
    it, even if that lets more than ``1/eta`` continue.

    Why not at the first rung: there a trial has trained for a sliver of its
    budget, so its accuracy says little, while size and latency are already
    final. Nearly every student with an unusual size or latency is then
    non-dominated, and the guarantee would let most trials through to the next
    rung and, since the survivors of a rung are mostly mutually non-dominated,
    on to the end. The crowding order still keeps a rung's extremes (the
    smallest student, the fastest, the most accurate) in the top slice. On the
    built-in digits space, replayed under the default sampler, this takes the
    compute Pareto-ASHA needs to reach random search's final hypervolume from
    35% to 24% (``benchmarks/peers.py``).

    Small rungs: with fewer than ``reduction_factor`` results the top slice is a
    single trial. The first trial at a rung always continues, as in ASHA; so does
    the second unless the first dominates it (a front of two is all boundary).

    On one metric this is ASHA with the cutoff taken on ranks: decisions agree
    with ``ASHAScheduler`` except when ASHA's interpolated percentile falls
    between two recorded values.

    Missing or ``None`` metrics: the result is not ranked (the trial continues
    and is judged on its next complete result). A result with a non-finite
    objective (NaN, inf: a diverged trial) stops its trial and removes it from
    every rung it reached, as does an error, so a trial that scored well early
    and then diverged can neither stop healthy trials nor be promoted. The
    scheduler leaves Tune's ``metric`` unset, so Tune's strict metric check does
    not reject results that lack one of the objectives.

    Args:
        metrics: Result keys to rank on, e.g. ``["val_acc", "params"]``.
        modes: ``"max"`` or ``"min"`` per metric, in the same order.
        objectives: Alternative to ``metrics``/``modes``: ``{"val_acc": "max", "params": "min"}``.
        time_attr: Monotonic progress key of the result, as in ASHA.
        grace_period: First milestone: no trial is stopped before it.
        reduction_factor: ``eta``; rungs are ``eta`` times apart and ``1/eta`` continue.
        max_t: Budget in ``time_attr`` units: trials reaching it are stopped
            (unless ``stop_last_trials`` is False).
        brackets: Number of ASHA brackets; bracket ``s`` starts at
            ``grace_period * eta**s``, trials are spread over brackets as in ASHA.
        stop_last_trials: Stop trials once they reach ``max_t``.
    """

    def __init__(
        self,
        metrics: Sequence[str] | str | None = None,
        modes: Sequence[str] | str | None = None,
        *,
        objectives: Mapping[str, str] | None = None,
        time_attr: str = "training_iteration",
        grace_period: float = 1,
        reduction_factor: float = 3,
        max_t: float = 100,
        brackets: int = 1,
        stop_last_trials: bool = True,
    ):
        if objectives is not None:
            if metrics is not None or modes is not None:
                raise ValueError("pass `objectives` or `metrics` and `modes`, not both")
            metrics, modes = list(objectives), list(objectives.values())
        if not max_t > 0:
            raise ValueError(f"max_t must be positive, got {max_t}")
        if not 0 < grace_period <= max_t:
            raise ValueError(f"grace_period must be in (0, max_t], got {grace_period}")
        if not reduction_factor > 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}")
        if brackets < 1:
            raise ValueError(f"brackets must be >= 1, got {brackets}")

        super().__init__()
        self._metrics: list[str] = []
        self._signs = np.zeros(0)
        if metrics is not None or modes is not None:
            self._set_objectives(metrics, modes)
        self._time_attr = time_attr
        self._reduction_factor = reduction_factor
        self._max_t = max_t
        self._stop_last_trials = stop_last_trials
        self._brackets = [
            self._make_rungs(grace_period * reduction_factor**offset) for offset in range(brackets)
        ]
        self._bracket_of: dict[str, int] = {}  # trial_id -> bracket index
        self._num_stopped = 0

    def _set_objectives(
        self, metrics: Sequence[str] | str | None, modes: Sequence[str] | str | None
    ) -> None:
        metrics = [metrics] if isinstance(metrics, str) else list(metrics or [])
        modes = [modes] if isinstance(modes, str) else list(modes or [])
        if not metrics or len(metrics) != len(modes):
            raise ValueError(f"need one mode per metric, got metrics={metrics} modes={modes}")
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"metrics must be distinct, got {metrics}")
        unknown = [mode for mode in modes if mode not in _MODE_SIGNS]
        if unknown:
            raise ValueError(f"modes must be 'max' or 'min', got {unknown}")
        self._metrics = metrics
        self._signs = np.array([_MODE_SIGNS[mode] for mode in modes])

    def _make_rungs(self, first_milestone: float) -> list[_Rung]:
        return [_Rung(m) for m in rung_milestones(first_milestone, self._reduction_factor, self._max_t)]

    @property
    def metrics(self) -> list[str]:
        """The ranked result keys."""
        return list(self._metrics)

    @property
    def modes(self) -> list[str]:
        """``"max"``/``"min"`` per ranked key."""
        return ["max" if sign > 0 else "min" for sign in self._signs]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Take Tune's ``metric``/``mode`` only when no objectives were given.

        Objectives given to the constructor win: Tune's single metric is then
        usually just what ``ResultGrid.get_best_result`` should sort by.
        """
        if not self._metrics and metric and mode:
            self._set_objectives([metric], [mode])
        return True

    def on_trial_add(self, tune_controller: TuneController, trial: Trial) -> None:
        if not self._metrics:
            raise ValueError(
                "ParetoASHA has no objectives: pass `metrics` and `modes` (or `objectives`) "
                "to it, or `metric` and `mode` to tune.TuneConfig()"
            )
        # A recovered trial is added again: keep it in the bracket holding its records.
        if trial.trial_id not in self._bracket_of:
            self._bracket_of[trial.trial_id] = self._pick_bracket()

    def _pick_bracket(self) -> int:
        # ASHA's rule: softmax over rung counts favours brackets that can stop early.
        sizes = np.array([len(rungs) for rungs in self._brackets], dtype=float)
        weights = np.exp(sizes - sizes.max())
        return int(np.random.choice(len(self._brackets), p=weights / weights.sum()))

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: dict) -> str:
        if self._diverged(result):  # its earlier records must neither stop others nor be promoted
            self._forget(trial.trial_id)
            self._num_stopped += 1
            return TrialScheduler.STOP
        progress = result.get(self._time_attr)
        if progress is None:
            return TrialScheduler.CONTINUE
        if self._stop_last_trials and progress >= self._max_t:
            self._num_stopped += 1
            return TrialScheduler.STOP
        action = self._judge(trial, progress, result)
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
        return action

    def on_trial_complete(
        self, tune_controller: TuneController, trial: Trial, result: dict
    ) -> None:
        # Record the last result so later arrivals at this rung compete with it.
        progress = result.get(self._time_attr)
        if self._diverged(result):
            self._forget(trial.trial_id)
        elif progress is not None:
            self._judge(trial, progress, result)
        self._bracket_of.pop(trial.trial_id, None)

    def on_trial_error(self, tune_controller: TuneController, trial: Trial) -> None:
        """A failed trial leaves every rung: a good early score must not stop healthy trials."""
        self._forget(trial.trial_id)
        self._bracket_of.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller: TuneController, trial: Trial) -> None:
        self._bracket_of.pop(trial.trial_id, None)

    def _diverged(self, result: dict) -> bool:
        """Whether the result reports an objective as NaN or infinite (a diverged trial)."""
        for metric in self._metrics:
            value = result.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
                return True
        return False

    def _forget(self, trial_id: str) -> None:
        for rungs in self._brackets:
            for rung in rungs:
                rung.recorded.pop(trial_id, None)

    def _judge(self, trial: Trial, progress: float, result: dict) -> str:
        """Record the result at the highest rung it reached, if new there, and decide."""
        vector = self._objective_vector(result)
        if vector is None:
            return TrialScheduler.CONTINUE
        if trial.trial_id not in self._bracket_of:  # e.g. after a restore
            self._bracket_of[trial.trial_id] = self._pick_bracket()
        rungs = self._brackets[self._bracket_of[trial.trial_id]]
        reached = [rung for rung in rungs if progress >= rung.milestone]
        if not reached or trial.trial_id in reached[-1].recorded:
            return TrialScheduler.CONTINUE  # judged at this rung already
        rung = reached[-1]
        rung.recorded[trial.trial_id] = vector
        points = np.stack(list(rung.recorded.values()))
        arrival = len(points) - 1  # dicts keep insertion order
        keep_front = rung is not rungs[0]  # see the class docstring: not at the bracket's first rung
        if _continues_at_rung(points, arrival, self._signs, self._reduction_factor, keep_front):
            return TrialScheduler.CONTINUE
        return TrialScheduler.STOP

    def _objective_vector(self, result: dict) -> np.ndarray | None:
        """The result's objectives as floats, or None when one is missing or not a number."""
        try:
            return np.array([float(result[metric]) for metric in self._metrics])
        except (KeyError, TypeError, ValueError):
            return None

    def debug_string(self) -> str:
        objectives = dict(zip(self.metrics, self.modes))
        lines = [f"Using ParetoASHA over {objectives}: num_stopped={self._num_stopped}"]
        for rungs in self._brackets:
            parts = []
            for rung in rungs:
                front_size = 0
                if rung.recorded:
                    points = np.stack(list(rung.recorded.values()))
                    front_size = int((nondominated_ranks(points, self._signs) == 0).sum())
                recorded = len(rung.recorded)
                parts.append(f"Iter {rung.milestone:g}: {recorded} recorded, {front_size} on front")
            lines.append("Bracket: " + " | ".join(parts))
        return "\n".join(lines)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))
