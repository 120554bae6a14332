"""ParetoASHA: the sorting helpers on hand-computed values, rung decisions on synthetic
results, and one short real Ray Tune run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from kdsearch.search.schedulers import ParetoASHA, crowding_distance, nondominated_ranks, rung_milestones

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def make_trial() -> Trial:
    # A stub Trial needs no registered trainable and no running Ray.
    return Trial("__fake", stub=True)


def feed(scheduler: TrialScheduler, iteration: int = 1, **metrics: float) -> str:
    """Add a new trial and report one result for it; return the scheduler's decision."""
    trial = make_trial()
    scheduler.on_trial_add(None, trial)
    return scheduler.on_trial_result(None, trial, {"training_iteration": iteration, **metrics})


def acc_and_size(**overrides) -> ParetoASHA:
    options = dict(grace_period=1, reduction_factor=3, max_t=9)
    options.update(overrides)
    return ParetoASHA(["val_acc", "params"], ["max", "min"], **options)


# --- nondominated_ranks / crowding_distance ---------------------------------------------


def test_nondominated_ranks_two_objectives_with_nan() -> None:
    points = [
        [0.9, 100.0],  # best accuracy
        [0.8, 10.0],  # smaller: trades accuracy for size, so also on the front
        [0.7, 100.0],  # dominated by both above
        [0.6, 1000.0],  # dominated by the row above
        [np.nan, 1.0],  # broken: ranks behind every finite row
    ]
    assert nondominated_ranks(points, [1, -1]).tolist() == [0, 0, 1, 2, 3]


def test_nondominated_ranks_respects_directions() -> None:
    points = [[0.9, 100.0], [0.8, 10.0], [0.7, 100.0]]
    assert nondominated_ranks(points, [1, 1]).tolist() == [0, 1, 1]
    assert nondominated_ranks(points, [-1, -1]).tolist() == [1, 0, 0]


def test_nondominated_ranks_one_objective_and_equal_points() -> None:
    assert nondominated_ranks([[3.0], [1.0], [2.0], [3.0]], [1]).tolist() == [0, 2, 1, 0]
    assert nondominated_ranks([[1.0, 1.0], [1.0, 1.0]], [1, 1]).tolist() == [0, 0]
    assert nondominated_ranks([[np.nan], [np.inf]], [-1]).tolist() == [0, 0]


def test_crowding_distance_hand_computed() -> None:
    # Ranges 5 and 4. Row 1: (4-1)/5 + (5-2)/4 = 1.35; row 2: (6-2)/5 + (3-1)/4 = 1.3.
    distance = crowding_distance([[1.0, 5.0], [2.0, 3.0], [4.0, 2.0], [6.0, 1.0]])
    assert distance[[0, 3]].tolist() == [math.inf, math.inf]
    np.testing.assert_allclose(distance[[1, 2]], [1.35, 1.3])


def test_crowding_distance_small_flat_and_tied_fronts() -> None:
    assert crowding_distance(np.zeros((0, 2))).shape == (0,)
    assert crowding_distance([[1.0, 2.0], [3.0, 4.0]]).tolist() == [math.inf, math.inf]
    # A flat objective adds nothing; both rows at the minimum are boundary points.
    distance = crowding_distance([[0.0, 7.0], [0.0, 7.0], [0.5, 7.0], [1.0, 7.0]])
    assert distance.tolist() == [math.inf, math.inf, 1.0, math.inf]
    assert crowding_distance([[7.0], [7.0], [7.0]]).tolist() == [0.0, 0.0, 0.0]


# --- rung decisions ----------------------------------------------------------------------


def test_rungs_follow_asha_spacing() -> None:
    scheduler = ParetoASHA(["val_acc"], ["max"], grace_period=1, reduction_factor=3, max_t=100)
    assert [rung.milestone for rung in scheduler._brackets[0]] == [1, 3, 9, 27, 81]
    assert "Iter 81" in scheduler.debug_string()


def test_rungs_inside_a_time_unit_judge_fractional_progress() -> None:
    # a third of an epoch with eta 3: rungs at 1/3, 1, 3 and 9 epochs of an 11-epoch trial
    assert rung_milestones(1 / 3, 3, 11) == pytest.approx([1 / 3, 1, 3, 9])
    scheduler = ParetoASHA(["val_acc", "params"], ["max", "min"], time_attr="epoch", grace_period=1 / 3,
                           reduction_factor=3, max_t=11)
    leader, early, late = make_trial(), make_trial(), make_trial()
    for trial in (leader, early, late):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, leader, {"epoch": 1 / 3, "val_acc": 0.9, "params": 10}) == CONTINUE
    # before the first rung nothing is judged, however far behind
    assert scheduler.on_trial_result(None, early, {"epoch": 0.2, "val_acc": 0.1, "params": 50}) == CONTINUE
    # a trial's report lands a little past the rung when steps do not divide evenly (8 of 23 steps)
    assert scheduler.on_trial_result(None, late, {"epoch": 8 / 23, "val_acc": 0.5, "params": 20}) == STOP


def test_dominated_trial_is_stopped() -> None:
    scheduler = acc_and_size()
    assert feed(scheduler, val_acc=0.9, params=10_000) == CONTINUE
    assert feed(scheduler, val_acc=0.8, params=100_000) == STOP


def test_small_student_on_the_front_survives() -> None:
    scheduler = acc_and_size()
    asha = ASHAScheduler(metric="val_acc", mode="max", grace_period=1, reduction_factor=3, max_t=9)
    for index in range(8):
        big = {"val_acc": 0.80 + 0.02 * index, "params": 100_000 * (index + 1)}
        feed(scheduler, **big)
        feed(asha, **big)
    tiny = {"val_acc": 0.3, "params": 5_000}
    assert feed(asha, **tiny) == STOP  # accuracy alone kills it
    assert feed(scheduler, **tiny) == CONTINUE


def test_past_the_first_rung_every_nondominated_trial_continues_beyond_one_over_eta() -> None:
    scheduler = acc_and_size()
    # the second rung (3 iterations): each arrival is the front's new extreme
    decisions = [feed(scheduler, iteration=3, val_acc=k, params=k) for k in range(1, 10)]
    assert decisions == [CONTINUE] * 9
    # Squeezed between 5 and 6 it has the smallest crowding distance of the ten, so it
    # ranks last of the front, yet nothing dominates it.
    assert feed(scheduler, iteration=3, val_acc=5.05, params=5.05) == CONTINUE


def test_at_the_first_rung_a_nondominated_trial_still_needs_the_top_slice() -> None:
    scheduler = acc_and_size()
    assert [feed(scheduler, val_acc=k, params=k) for k in range(1, 10)] == [CONTINUE] * 9  # extremes
    # after a sliver of training the same squeezed student is cut: 10th of 10, top 4 go on
    assert feed(scheduler, val_acc=5.05, params=5.05) == STOP
    # the rung's extremes stay in the slice: the smallest student goes on, however inaccurate
    assert feed(scheduler, val_acc=0.5, params=0.5) == CONTINUE


@pytest.mark.parametrize(
    ("modes", "expected"),
    [
        (["max", "min"], STOP),  # less accurate and larger: dominated
        (["max", "max"], CONTINUE),  # larger is now better: a trade-off
        (["min", "min"], CONTINUE),  # less accurate is now better: a trade-off
        (["min", "max"], CONTINUE),  # better on both: it dominates
    ],
)
def test_directions_are_respected(modes: list[str], expected: str) -> None:
    scheduler = ParetoASHA(["val_acc", "params"], modes, max_t=9)
    feed(scheduler, val_acc=0.9, params=1_000)
    assert feed(scheduler, val_acc=0.5, params=100_000) == expected


@pytest.mark.parametrize("ninth", np.arange(0.5, 9.0, 1.0))
def test_one_objective_keeps_one_over_eta_like_asha(ninth: float) -> None:
    # Eight results 1..8 at the first rung, then a ninth: the top ceil(9/3) = 3 of 9 go on.
    pareto = ParetoASHA(["val_acc"], ["max"], grace_period=1, reduction_factor=3, max_t=9)
    asha = ASHAScheduler(metric="val_acc", mode="max", grace_period=1, reduction_factor=3, max_t=9)
    for value in range(1, 9):
        feed(pareto, val_acc=value)
        feed(asha, val_acc=value)
    expected = CONTINUE if ninth > 6 else STOP  # 6.5, 7.5, 8.5 are the top three
    assert feed(pareto, val_acc=ninth) == expected
    assert feed(asha, val_acc=ninth) == expected


def test_one_objective_sequence_matches_asha() -> None:
    order = [5.0, 3.0, 8.0, 1.0, 7.0, 2.0, 9.0, 4.0, 6.0]
    pareto = ParetoASHA(["loss"], ["min"], max_t=9)
    asha = ASHAScheduler(metric="loss", mode="min", max_t=9, reduction_factor=3)
    ours = [feed(pareto, loss=value) for value in order]
    assert ours == [feed(asha, loss=value) for value in order]
    # 2.0 arrives sixth, behind only 1.0: second of six is within ceil(6/3).
    assert ours == [CONTINUE, CONTINUE, STOP, CONTINUE, STOP, CONTINUE, STOP, STOP, STOP]


def test_crowding_keeps_the_ends_of_a_front() -> None:
    # (10, 0) dominates the line (k, k); of 6 results the top 2 go on: (10, 0) and one
    # line point. The ends of the line have infinite crowding distance, its middle does not.
    def rung_with(arrival: tuple[float, float]) -> str:
        scheduler = acc_and_size()
        feed(scheduler, val_acc=10, params=0)
        for k in (1, 2, 3, 4, 5):
            if (k, k) != arrival:
                feed(scheduler, val_acc=k, params=k)
        return feed(scheduler, val_acc=arrival[0], params=arrival[1])

    assert rung_with((3, 3)) == STOP
    assert rung_with((5, 5)) == CONTINUE
    assert rung_with((1, 1)) == CONTINUE


def test_non_finite_result_stops_its_trial_and_is_not_recorded() -> None:
    scheduler = acc_and_size()
    assert feed(scheduler, val_acc=math.nan, params=10) == STOP  # diverged: stopped, never ranked
    assert feed(scheduler, val_acc=0.5, params=10_000) == CONTINUE  # the first recorded result, as ASHA
    assert feed(scheduler, val_acc=0.9, params=math.inf) == STOP
    assert len(scheduler._brackets[0][0].recorded) == 1


def test_a_trial_that_diverges_after_a_rung_leaves_every_rung() -> None:
    scheduler = acc_and_size()
    bad = make_trial()
    scheduler.on_trial_add(None, bad)
    assert scheduler.on_trial_result(None, bad, {"training_iteration": 1, "val_acc": 0.99, "params": 10}) == CONTINUE
    assert scheduler.on_trial_result(None, bad, {"training_iteration": 2, "val_acc": math.nan, "params": 10}) == STOP
    scheduler.on_trial_complete(None, bad, {"training_iteration": 2, "val_acc": math.nan, "params": 10})
    # every healthy trial below would be dominated by the diverged one's first-rung record
    for accuracy, params in ((0.6, 100), (0.7, 1_000), (0.8, 10_000)):
        assert feed(scheduler, val_acc=accuracy, params=params) == CONTINUE
    errored = make_trial()
    scheduler.on_trial_add(None, errored)
    scheduler.on_trial_result(None, errored, {"training_iteration": 1, "val_acc": 0.999, "params": 1})
    scheduler.on_trial_error(None, errored)
    assert errored.trial_id not in scheduler._brackets[0][0].recorded
    assert feed(scheduler, val_acc=0.9, params=20_000) == CONTINUE


def test_missing_metric_is_ignored_until_reported() -> None:
    scheduler = acc_and_size()
    feed(scheduler, val_acc=0.9, params=10_000)
    trial = make_trial()
    scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, trial, {"training_iteration": 1, "val_acc": 0.1}) == CONTINUE
    assert scheduler.on_trial_result(None, trial, {"val_acc": 0.1, "params": 1e6}) == CONTINUE
    # The next complete result is judged at the same rung, and it is dominated.
    result = {"training_iteration": 2, "val_acc": 0.1, "params": 1e6}
    assert scheduler.on_trial_result(None, trial, result) == STOP


def test_each_rung_judges_once_and_max_t_stops() -> None:
    scheduler = acc_and_size()
    feed(scheduler, val_acc=0.9, params=10_000)
    trial = make_trial()
    scheduler.on_trial_add(None, trial)
    weak = {"val_acc": 0.1, "params": 1e6}
    assert scheduler.on_trial_result(None, trial, {"training_iteration": 1, **weak}) == STOP
    # Already judged at rung 1 and not yet at rung 3: no new decision.
    assert scheduler.on_trial_result(None, trial, {"training_iteration": 2, **weak}) == CONTINUE
    assert feed(scheduler, iteration=9, val_acc=1.0, params=1) == STOP


def test_search_properties_keep_given_objectives() -> None:
    scheduler = ParetoASHA(objectives={"val_acc": "max", "params": "min"})
    assert scheduler.set_search_properties("loss", "min") is True
    assert (scheduler.metrics, scheduler.modes) == (["val_acc", "params"], ["max", "min"])
    assert scheduler.metric is None  # keeps Tune's strict metric check off our objectives

    adopting = ParetoASHA()
    with pytest.raises(ValueError, match="no objectives"):
        adopting.on_trial_add(None, make_trial())
    assert adopting.set_search_properties("loss", "min") is True
    assert (adopting.metrics, adopting.modes) == (["loss"], ["min"])


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        ParetoASHA(["val_acc", "params"], ["max"])
    with pytest.raises(ValueError):
        ParetoASHA(["val_acc"], ["maximize"])
    with pytest.raises(ValueError):
        ParetoASHA(["val_acc"], ["max"], objectives={"val_acc": "max"})


def test_save_and_restore_keep_the_rungs(tmp_path: Path) -> None:
    scheduler = acc_and_size()
    feed(scheduler, val_acc=0.9, params=10_000)
    scheduler.save(str(tmp_path / "scheduler.pkl"))
    restored = acc_and_size()
    restored.restore(str(tmp_path / "scheduler.pkl"))
    assert feed(restored, val_acc=0.8, params=100_000) == STOP


# --- a real Ray Tune run -------------------------------------------------------------------

# (final accuracy, parameters): the first four trade accuracy for size, the last four are
# each dominated by one of them, at every iteration since accuracy grows the same way.
STUDENTS = [
    (0.95, 500_000),
    (0.90, 50_000),
    (0.80, 5_000),
    (0.60, 500),
    (0.85, 500_000),
    (0.70, 50_000),
    (0.50, 5_000),
    (0.40, 500_000),
]
PARETO_OPTIMAL = set(range(4))
MAX_T = 9


def test_real_tune_run_stops_dominated_and_keeps_the_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray
    from ray import tune

    def synthetic_student(config: dict) -> None:
        # Defined here so Ray pickles it by value: workers cannot import this test module.
        final_accuracy, params = STUDENTS[config["student"]]
        for epoch in range(1, MAX_T + 1):
            tune.report({"val_acc": final_accuracy * (1 - 0.5**epoch), "params": params})

    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "0")
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        scheduler = ParetoASHA(
            objectives={"val_acc": "max", "params": "min"},
            grace_period=1,
            reduction_factor=3,
            max_t=MAX_T,
        )
        tuner = tune.Tuner(
            synthetic_student,
            param_space={"student": tune.grid_search(list(range(len(STUDENTS))))},
            # one at a time, in grid order: the first rung keeps only its top slice, so the
            # front's middle members must not arrive after both its ends (that is timing, not the rule)
            tune_config=tune.TuneConfig(scheduler=scheduler, num_samples=1, max_concurrent_trials=1),
            run_config=tune.RunConfig(
                name="pareto-asha", storage_path=str(tmp_path), verbose=0
            ),
        )
        results = tuner.fit()
    finally:
        ray.shutdown()

    assert not results.errors
    iterations = {r.config["student"]: r.metrics["training_iteration"] for r in results}
    assert sorted(iterations) == list(range(len(STUDENTS)))
    assert all(iterations[student] == MAX_T for student in PARETO_OPTIMAL)
    # In grid order a dominated student starts after its dominator has been recorded at the
    # first rung, so every one of them stops early.
    stopped_early = {student for student, done in iterations.items() if done < MAX_T}
    assert stopped_early == set(range(len(STUDENTS))) - PARETO_OPTIMAL, iterations


def test_a_diverging_trial_never_empties_the_front_in_a_real_tune_run(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial that scores best at the first rung and then diverges (NaN), 10 runs out of 10:
    the healthy trials all finish."""
    import ray
    from ray import tune

    healthy = [(0.6, 100), (0.8, 10_000)]  # a trade-off: both go on unless the diverged record stays

    def trainable(config: dict) -> None:
        import time

        if config["student"] < 0:  # scores best at rung 1, then diverges
            tune.report({"val_acc": 0.99, "params": 10})
            tune.report({"val_acc": float("nan"), "params": 10, "diverged": 1})
            return
        time.sleep(1.0)  # the healthy ones arrive at the rung after the divergence
        accuracy, params = healthy[config["student"]]
        for step in range(1, 4):
            tune.report({"val_acc": accuracy * step / 3, "params": params})

    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "0")
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        for run in range(10):
            scheduler = ParetoASHA(objectives={"val_acc": "max", "params": "min"}, grace_period=1,
                                   reduction_factor=3, max_t=3)
            results = tune.Tuner(
                trainable, param_space={"student": tune.grid_search([-1, 0, 1])},
                tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=3),
                run_config=tune.RunConfig(name=f"diverge-{run}", storage_path=str(tmp_path), verbose=0),
            ).fit()
            finished = {r.config["student"]: r.metrics["training_iteration"] for r in results}
            assert all(finished[student] == 3 for student in range(len(healthy))), (run, finished)
    finally:
        ray.shutdown()

