"""A multi-fidelity Optuna sampler: it learns from the rung results of early-stopped trials.

Optuna's samplers fit only complete trials, and a pruned trial of a multi-objective study is,
to them, a trial without values (``trial.report`` is single-objective). Under successive
halving most trials are stopped early, so at small budgets a stock sampler samples at random.
:class:`RungSampler` does what BOHB and Hyperband-TPE do, inside Optuna's sampler interface:
every trial records its objective vector at each fidelity it reached (:func:`report_values`,
a user attr per fidelity), and for each new trial the sampler takes the highest fidelity that
at least ``min_points`` trials reached (the complete trials' own values count as the highest),
re-values the trials at that fidelity, and lets its base sampler fit them.

The default base (:func:`default_base`) is Optuna's ``GPSampler`` (log EHVI on several
objectives) with TPE for the parameters a define-by-run space asks only some trials for (the
GP models the parameters every trial has). On NAS-Bench-201 it reaches at 50 evaluations more
of the true front than random search at 150 (``benchmarks/peers.py``).

A plain Optuna user: report a vector per step, prune as usual.

>>> import optuna
>>> from kdsearch.search.samplers import RungSampler, report_values
>>> optuna.logging.set_verbosity(optuna.logging.WARNING)
>>> study = optuna.create_study(directions=["maximize", "minimize"], sampler=RungSampler(seed=0, min_points=4))
>>> def objective(trial):
...     x = trial.suggest_float("x", 0.0, 1.0)
...     report_values(trial, 1, [x / 2, 1.0 - x])          # the rung at epoch 1
...     if trial.number % 2:
...         raise optuna.TrialPruned()                       # stopped there
...     return x, 1.0 - x
>>> study.optimize(objective, n_trials=6)
>>> study.sampler.last_fidelity      # 2 complete trials, 5 at epoch 1: the 6th was fitted on epoch 1
1.0
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

#: user attr key prefix of a trial's objective vector at one fidelity (``fidelity:0.1667``)
FIDELITY_PREFIX = "fidelity:"
#: trials a fidelity needs before the sampler fits it (Optuna's own startup count)
MIN_POINTS = 10


def fidelity_key(step: float) -> str:
    """The user attr key of fidelity ``step``: six significant digits, so 1/6 from two sources is one key.

    >>> fidelity_key(1 / 6)
    'fidelity:0.166667'
    """
    return f"{FIDELITY_PREFIX}{step:.6g}"


def report_values(trial: optuna.Trial, step: float, values: Sequence[float]) -> None:
    """Record ``trial``'s objective vector at fidelity ``step`` (e.g. epochs trained), for :class:`RungSampler`."""
    trial.set_user_attr(fidelity_key(step), [float(v) for v in values])


def fidelity_values(trial: FrozenTrial) -> dict[float, list[float]]:
    """A trial's recorded vectors by fidelity, finite ones only."""
    out = {}
    for key, values in trial.user_attrs.items():
        if key.startswith(FIDELITY_PREFIX) and all(math.isfinite(v) for v in values):
            out[float(key[len(FIDELITY_PREFIX):])] = list(values)
    return out


def default_base(seed: Optional[int], n_startup: int = MIN_POINTS) -> BaseSampler:
    """GPSampler (log EHVI) over the parameters all trials share, TPE for conditional ones; random for ``n_startup``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        independent = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup)
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup, independent_sampler=independent,
                                         warn_independent_sampling=False)


@dataclass
class _View:
    """What the base sampler sees for one trial: a study (real or re-valued) and the trial in it."""

    study: Study
    trial: FrozenTrial
    sampler: BaseSampler
    fidelity: Optional[float]  # math.inf: the complete trials themselves; None: too few of any


class RungSampler(BaseSampler):
    """A standard Optuna sampler that fits the highest fidelity with ``min_points`` trials.

    Args:
        base: builds the sampler that does the fitting from a seed (default :func:`default_base`
            with ``min_points`` start-up trials: a base that waits for more would ignore the rungs);
            one instance serves the real study, a fresh one (seeded from the trial number) each
            re-valued view, since Optuna samplers cache per study.
        seed: seed of the base samplers.
        min_points: trials a fidelity needs before it is fitted.

    ``last_fidelity`` says which fidelity the newest trial was sampled from (``math.inf``: the
    complete trials; ``None``: none had enough points, so the base's own start-up sampling).
    """

    def __init__(self, base: Optional[Callable[[Optional[int]], BaseSampler]] = None, *, seed: Optional[int] = None,
                 min_points: int = MIN_POINTS) -> None:
        self._make_base = base or functools.partial(default_base, n_startup=min_points)
        self._seed = seed
        self._min_points = min_points
        self._base = self._make_base(seed)
        self._views: dict[int, _View] = {}
        self.last_fidelity: Optional[float] = None

    def reseed_rng(self) -> None:
        self._base.reseed_rng()

    def __getstate__(self) -> dict[str, Any]:
        # the views are per in-flight trial and rebuilt on demand: a saved searcher does not carry them
        return {**self.__dict__, "_views": {}}

    def choose_fidelity(self, study: Study) -> Optional[float]:
        """The highest fidelity at least ``min_points`` trials reached; ``math.inf`` for the complete trials."""
        trials = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED), use_cache=False)
        if sum(t.state == TrialState.COMPLETE for t in trials) >= self._min_points:
            return math.inf
        counts: dict[float, int] = {}
        for trial in trials:
            for step in fidelity_values(trial):
                counts[step] = counts.get(step, 0) + 1
        enough = [step for step, n in counts.items() if n >= self._min_points]
        return max(enough) if enough else None

    def _view(self, study: Study, trial: FrozenTrial) -> _View:
        view = self._views.get(trial.number)
        if view is not None:
            return view
        fidelity = self.choose_fidelity(study)
        self.last_fidelity = fidelity
        if fidelity is None or fidelity == math.inf:
            view = _View(study, trial, self._base, fidelity)
        else:
            view = self._revalued(study, trial, fidelity)
        self._views[trial.number] = view
        return view

    def _revalued(self, study: Study, trial: FrozenTrial, fidelity: float) -> _View:
        """A throw-away in-memory study of the trials that reached ``fidelity``, valued there."""
        storage = optuna.storages.InMemoryStorage()  # not create_study: that logs a line per call
        name = storage.get_study_name_from_id(storage.create_new_study(list(study.directions)))
        proxy = Study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(0))
        for past in study._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED), use_cache=False):
            values = fidelity_values(past).get(fidelity)
            if values is not None and len(values) == len(study.directions):
                proxy.add_trial(optuna.trial.create_trial(params=past.params, distributions=past.distributions,
                                                          values=values))
        # the trial being sampled, so samplers that write to it (GPSampler's shared params) find it
        proxy.add_trial(optuna.trial.create_trial(state=TrialState.RUNNING))
        running = proxy._get_trials(deepcopy=False, states=(TrialState.RUNNING,))[-1]
        seed = None if self._seed is None else self._seed + 7919 * (trial.number + 1)
        return _View(proxy, running, self._make_base(seed), fidelity)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        view = self._view(study, trial)
        return view.sampler.infer_relative_search_space(view.study, view.trial)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        view = self._view(study, trial)
        return view.sampler.sample_relative(view.study, view.trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        view = self._view(study, trial)
        return view.sampler.sample_independent(view.study, view.trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._base.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Optional[Sequence[float]]) -> None:
        self._views.pop(trial.number, None)
        self._base.after_trial(study, trial, state, values)
