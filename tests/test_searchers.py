"""The searcher: constraints rejected before launch, early-stopped trials told to Optuna as pruned."""

from __future__ import annotations

import pytest
import yaml
from optuna.trial import TrialState
from ray.tune.stopper import Stopper

from kdsearch.search.driver import ConstraintCheck, EpochBudget, report_points, scheduler_objectives
from kdsearch.search.recorder import is_final
from kdsearch.search.searchers import KDSearch, make_sampler
from kdsearch.spaces import DEFAULT_SPACE, parse_space
from kdsearch.trainers.trial import expected_footprint


def tight_space(max_params: int):
    raw = yaml.safe_load(DEFAULT_SPACE.read_text())
    raw["constraints"] = {"max_params": max_params}
    return parse_space(raw)


def test_configurations_over_the_limit_never_reach_a_worker():
    space = tight_space(5000)
    check = ConstraintCheck(space, (1, 8, 8), 10)
    searcher = KDSearch(space, make_sampler("random", 0, 20), is_final, check)
    for i in range(8):
        config = searcher.suggest(f"t{i}")
        footprint = expected_footprint(space, space.resolve(config), (1, 8, 8), 10)
        assert footprint["params"] <= 5000
    assert searcher.rejected, "the digits space has students above 5000 params"
    assert all("max_params" in reason for _, reason in searcher.rejected)
    failed = [t for t in searcher._ot_study.get_trials() if t.state == TrialState.FAIL]
    assert len(failed) == len(searcher.rejected) and all("rejected" in t.user_attrs for t in failed)


def test_early_stopped_trial_is_pruned_in_optuna_and_full_one_complete():
    space = tight_space(60000)
    searcher = KDSearch(space, make_sampler("nsga2", 0, 20), is_final)
    searcher.suggest("stopped")
    searcher.suggest("full")
    searcher.on_trial_complete("stopped", {"val_acc": 0.5, "params": 100, "epoch": 2})
    searcher.on_trial_complete("full", {"val_acc": 0.9, "params": 100, "latency_ms": 0.1, "size_bytes": 4000})
    states = {t.number: t.state for t in searcher._ot_study.get_trials()}
    assert states == {0: TrialState.PRUNED, 1: TrialState.COMPLETE}
    assert [t.values for t in searcher._ot_study.best_trials] == [[0.9, 0.1, 100.0]]


def test_pareto_asha_ranks_on_per_epoch_proxies():
    space = tight_space(60000)
    assert scheduler_objectives(space) == (["val_acc", "latency_ms", "params"], ["max", "min", "min"])


def test_epoch_budget_counts_each_trial_epoch_once():
    budget = EpochBudget(3)
    assert isinstance(budget, Stopper)
    budget("a", {"epoch": 1})
    budget("a", {"epoch": 1})  # Tune repeats a finished trial's last result
    budget("b", {"epoch": 1})
    assert budget.spent == 2 and not budget.stop_all()
    budget("a", {"epoch": 2})
    assert budget.stop_all()


def test_epoch_budget_counts_fractions_of_an_epoch():
    budget = EpochBudget(1)
    budget("a", {"epoch": 1 / 3})  # stopped at a rung inside its first epoch
    budget("b", {"epoch": 1 / 3})
    assert budget.spent == pytest.approx(2 / 3) and not budget.stop_all()
    budget("b", {"epoch": 1})
    assert budget.spent == pytest.approx(4 / 3) and budget.stop_all()


def test_trials_report_at_the_rungs_inside_an_epoch():
    # eta 3 from a third of an epoch: rungs 1/3, 1, 3, 9; only 1/3 needs a report of its own
    assert report_points("pareto-asha", 11, 1 / 3, 3) == pytest.approx([1 / 3])
    assert report_points("asha", 11, 0.25, 3) == pytest.approx([0.25, 0.75, 2.25, 6.75])
    assert report_points("pareto-asha", 11, 1, 3) == []
    assert report_points("none", 11, 1 / 3, 3) == []  # nothing judges them


def test_a_search_never_runs_the_same_configuration_twice_and_ends_when_the_space_is_exhausted():
    from ray.tune.search import Searcher

    from kdsearch.search.searchers import config_key

    space = parse_space({"teacher": {"family": "mlp"}, "students": {"mlp": {"width": {"choice": [8, 16, 32]}}},
                         "train": {"lr": {"choice": [0.01, 0.1]}}})  # six configurations in all
    searcher = KDSearch(space, make_sampler("random", 0, 20), is_final)
    configs = [searcher.suggest(f"t{i}") for i in range(7)]
    ran, last = configs[:-1], configs[-1]
    assert len({config_key(space, c) for c in ran if isinstance(c, dict)}) == len(ran) == 6
    assert last == Searcher.FINISHED  # a seventh would repeat one
    assert all(reason.startswith("repeats trial t") for _, reason in searcher.rejected)


def test_a_search_repeating_an_earlier_space_and_seed_says_so(tmp_path, caplog):
    from mlflow.entities import Param

    from kdsearch.search.driver import warn_repeated_seed
    from kdsearch.search.tracking import ROLE_TAG, SPACE_TAG, client, experiment_id

    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    exp = experiment_id(c, "seeds", create=True)
    earlier = c.create_run(exp, run_name="digits-earlier", tags={ROLE_TAG: "search", SPACE_TAG: "abc"})
    c.log_batch(earlier.info.run_id, params=[Param("seed", "0"), Param("searcher", "mf-gp")])
    with caplog.at_level("WARNING", logger="kdsearch"):
        warn_repeated_seed(c, exp, "abc", 1, "mf-gp")  # another seed: new configurations
        warn_repeated_seed(c, exp, "other", 0, "mf-gp")  # another space
        warn_repeated_seed(c, exp, "abc", 0, "random")  # another sampler
        assert not caplog.records
        warn_repeated_seed(c, exp, "abc", 0, "mf-gp")
    assert "digits-earlier ran this space with seed 0 and searcher mf-gp already" in caplog.text and "--seed" in caplog.text
