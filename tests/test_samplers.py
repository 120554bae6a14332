"""The default sampler learns from early-stopped trials: it fits their rung results."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from kdsearch.search.recorder import is_final
from kdsearch.search.samplers import RungSampler, fidelity_key, fidelity_values
from kdsearch.search.searchers import KDSearch, make_sampler
from kdsearch.spaces import DEFAULT_SPACE, parse_space

optuna.logging.set_verbosity(optuna.logging.WARNING)
X = FloatDistribution(0.0, 1.0)


def pruned_study(best: float, rung: float, n: int, sampler: optuna.samplers.BaseSampler, seed: int = 0) -> optuna.Study:
    """``n`` trials stopped at ``rung``, none complete: both objectives are best at ``x == best``."""
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for x in np.random.default_rng(seed).uniform(0, 1, n):
        gap = abs(x - best)
        study.add_trial(create_trial(state=TrialState.PRUNED, params={"x": float(x)}, distributions={"x": X},
                                     user_attrs={fidelity_key(rung): [1.0 - gap, gap]}))
    return study


def suggestions(study: optuna.Study, count: int) -> list[float]:
    xs = []
    for _ in range(count):
        trial = study.ask({"x": X})
        xs.append(trial.params["x"])
        study.tell(trial, state=TrialState.PRUNED)  # no values: only the rung results can guide it
    return xs


@pytest.mark.parametrize("best", [0.15, 0.85])
def test_suggestions_move_to_where_the_stopped_trials_did_well(best):
    study = pruned_study(best, 1 / 6, 12, RungSampler(seed=0, min_points=8))
    xs = suggestions(study, 4)
    assert study.sampler.last_fidelity == pytest.approx(1 / 6, rel=1e-5)
    # random would sit 0.35 away on average; the stopped trials' rung values point at `best`
    assert float(np.mean([abs(x - best) for x in xs])) < 0.15, xs


def test_the_highest_fidelity_with_enough_points_is_fitted():
    sampler = RungSampler(seed=0, min_points=5)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for i in range(9):  # every trial reached epoch 1/6; five of them epoch 2/3; two of those 8/3
        rungs = [1 / 6] + ([2 / 3] if i < 5 else []) + ([8 / 3] if i < 2 else [])
        study.add_trial(create_trial(state=TrialState.PRUNED, params={"x": i / 10}, distributions={"x": X},
                                     user_attrs={fidelity_key(r): [i / 10, 1 - i / 10] for r in rungs}))
    assert sampler.choose_fidelity(study) == pytest.approx(2 / 3, rel=1e-5)
    for i in range(5):
        study.add_trial(create_trial(params={"x": 0.5}, distributions={"x": X}, values=[0.5, 0.5]))
    assert sampler.choose_fidelity(study) == math.inf  # five complete trials: the real values win
    assert RungSampler(min_points=20).choose_fidelity(study) is None  # too few anywhere: start-up sampling


def test_kdsearch_keeps_each_result_vector_on_the_optuna_trial():
    space = parse_space(yaml.safe_load(DEFAULT_SPACE.read_text()))
    searcher = KDSearch(space, make_sampler("mf-gp", 0, 20), is_final)
    assert isinstance(searcher._ot_study.sampler, RungSampler)
    searcher.suggest("t1")
    searcher.on_trial_result("t1", {"epoch": 1 / 6, "val_acc": 0.4, "latency_ms": 0.2, "params": 900})
    searcher.on_trial_result("t1", {"epoch": 2 / 3, "val_acc": 0.6, "latency_ms": 0.2, "params": 900})
    searcher.on_trial_complete("t1", {"epoch": 2 / 3, "val_acc": 0.6, "params": 900})  # stopped at 2/3
    trial = searcher._ot_study.get_trials()[0]
    assert trial.state == TrialState.PRUNED
    objectives = list(space.objectives)
    expected = {"val_acc": 0.6, "latency_ms": 0.2, "params": 900.0}
    assert fidelity_values(trial)[float(f"{2 / 3:.6g}")] == [expected[m] for m in objectives]
