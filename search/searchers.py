"""Optuna multi-objective samplers behind Ray Tune's ``OptunaSearch``.

Three additions to the stock searcher: every intermediate result's objective vector is kept on
its Optuna trial as a fidelity (``kdsearch.search.samplers.report_values``), so the default
sampler (``mf-gp``, :class:`~kdsearch.search.samplers.RungSampler`) learns from trials stopped
at a rung; and two corrections to the stock searcher: a trial that the scheduler stopped early is told to
Optuna as PRUNED (the stock one tells it COMPLETE with under-trained values, which puts
students on Optuna's front that do not belong there); and a sampled configuration that
breaks the space's size constraints is rejected before launch, told to Optuna as FAILED,
and never takes a worker.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any, Callable, Optional

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from kdsearch.search.options import SEARCHERS
from kdsearch.search.samplers import RungSampler, report_values
from kdsearch.spaces import Space

log = logging.getLogger("kdsearch")

#: a feasibility check: None when a configuration is fine, else the reason it is not
Feasibility = Callable[[dict[str, Any]], Optional[str]]


def make_sampler(name: str, seed: int, num_samples: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "mf-gp":
            # multi-fidelity: fits the rung results of stopped trials (benchmarks/peers.py)
            return RungSampler(seed=seed)
        if name == "nsga2":
            # generations small enough that a short search still evolves
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, num_samples // 4)))
        if name == "tpe":
            # Optuna's 10 random trials first, fewer in a short search; not a share of a large
            # trial cap that an epoch budget ends long before
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                              n_startup_trials=max(4, min(10, num_samples // 5)))
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"--searcher {name}: unknown; fix: use one of {', '.join(SEARCHERS)}")


#: proposals in a row that repeat a configuration already run: the space is exhausted
MAX_REPEATS = 100


def config_key(space: Space, params: dict[str, Any]) -> str:
    """A configuration as the trial resolves it (typed knobs, defaults filled): equal keys train the same student."""
    config = space.resolve(params)
    sections = {"family": config.family, "student": config.student,
                **{name: getattr(config, name).model_dump() for name in ("distill", "train", "augment", "compress")}}
    return json.dumps(sections, sort_keys=True, default=str)


class KDSearch(OptunaSearch):
    """``OptunaSearch`` over a space's define-by-run sampler, aware of early stopping and constraints."""

    def __init__(self, space: Space, sampler: optuna.samplers.BaseSampler, is_final: Callable[[dict], bool],
                 feasibility: Optional[Feasibility] = None, max_rejections: int = 1000) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        super().__init__(space=space.sample, metric=list(space.objectives), mode=list(space.objectives.values()),
                         sampler=sampler)
        self._is_final = is_final
        self._feasibility = feasibility
        self._max_rejections = max_rejections
        self._kdsearch_space = space
        self._seen: dict[str, str] = {}  # resolved configuration -> the trial that ran it
        self.rejected: list[tuple[dict[str, Any], str]] = []

    def suggest(self, trial_id: str) -> Optional[dict]:
        repeats = 0
        for _ in range(self._max_rejections):
            with warnings.catch_warnings():
                # a GP fit takes a second or two in the define-by-run call, as intended
                warnings.filterwarnings("ignore", message="Define-by-run function passed")
                config = super().suggest(trial_id)
            if not isinstance(config, dict):
                return config  # None (wait) or Searcher.FINISHED
            key = config_key(self._kdsearch_space, config)
            earlier = self._seen.get(key)
            reason = f"repeats trial {earlier}" if earlier else self._feasibility(config) if self._feasibility else None
            if reason is None:
                self._seen[key] = trial_id
                return config
            repeats = repeats + 1 if earlier else 0
            self.rejected.append((config, reason))
            ot_trial = self._ot_trials.pop(trial_id)
            ot_trial.set_user_attr("rejected", reason)
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)
            if repeats >= MAX_REPEATS:
                log.info(f"the searcher proposed {repeats} configurations this search has run already: the space "
                         f"holds no new one it finds ({len(self._seen)} run); ending the search")
                return Searcher.FINISHED
        raise RuntimeError(f"no configuration within the constraints after {self._max_rejections} samples; "
                           "fix: relax constraints or narrow the space")

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Keep the result's objective vector at its epoch on the Optuna trial (the stock one drops it)."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or "epoch" not in result or any(result.get(m) is None for m in self._metric):
            return
        report_values(ot_trial, float(result["epoch"]), [float(result[m]) for m in self._metric])

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        if result is not None and result.get("diverged"):
            result, error = None, True  # told to Optuna as FAIL
        elif result is not None and not error and not self._is_final(result):
            result = None  # early-stopped: the stock searcher then tells Optuna PRUNED
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("ray.tune.search.optuna.optuna_search").disabled = True
            super().on_trial_complete(trial_id, result, error)
