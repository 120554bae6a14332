"""An end-to-end search: real Ray Tune, real Optuna, a real MLflow store in a temporary folder."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from kdsearch.search.pareto import hypervolume, pareto_front, pareto_mask, reference_point
from kdsearch.spaces import SpaceError
from kdsearch.search.tracking import (LATENCY_TAG, PARENT_TAG, ROLE_TAG, STATUS_TAG, TRIAL_TAG, client, latest_search_run,
                                      read_artifact_json)

from conftest import ROOT, dominates

OBJECTIVES = {"val_acc": "max", "latency_ms": "min", "params": "min"}


# --------------------------------------------------------------------------- unit: front and hypervolume


def test_front_and_hypervolume_against_known_values():
    rows = [{"acc": 0.9, "size": 100}, {"acc": 0.8, "size": 50}, {"acc": 0.85, "size": 120}, {"acc": 0.7, "size": 200},
            {"acc": 0.8, "size": 50}]
    objectives = {"acc": "max", "size": "min"}
    assert pareto_mask(rows, objectives).tolist() == [True, True, False, False, True]
    assert [r["acc"] for r in pareto_front(rows, objectives)] == [0.9, 0.8, 0.8]
    # boxes: 0.9 x (300-100) + 0.8 x (100-50)
    assert hypervolume(rows, objectives, {"acc": 0.0, "size": 300}) == pytest.approx(220.0)
    assert hypervolume(rows, objectives, {"acc": 0.95, "size": 300}) == 0.0
    assert hypervolume([], objectives, {"acc": 0.0, "size": 300}) == 0.0


def test_front_excludes_missing_and_nan_values():
    rows = [{"acc": 0.9, "size": math.nan}, {"acc": 0.5, "size": 10}, {"acc": 0.99}]
    assert pareto_mask(rows, {"acc": "max", "size": "min"}).tolist() == [False, True, False]


def test_three_objective_hypervolume_matches_inclusion_exclusion():
    rows = [{"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 2.0, "b": 1.0, "c": 3.0}]
    objectives = {"a": "min", "b": "min", "c": "min"}
    # each box 3x2x1 = 6 (ref 4,4,4), overlap 2x2x1 = 4
    assert hypervolume(rows, objectives, {"a": 4, "b": 4, "c": 4}) == pytest.approx(8.0)


def test_reference_point_is_declared_or_derived_from_constraints_and_teacher():
    teacher = {"params": 100_000, "latency_ms": 0.3, "macs": 1e6}
    declared = reference_point(OBJECTIVES, {"val_acc": 0.1, "latency_ms": 3, "params": 1000}, {}, teacher)
    assert declared == {"val_acc": 0.1, "latency_ms": 3.0, "params": 1000.0}
    derived = reference_point(OBJECTIVES, None, {"max_params": 5000}, teacher)
    assert derived == {"val_acc": 0.0, "latency_ms": 0.3, "params": 5000.0}
    with pytest.raises(SpaceError, match="reference_point"):
        reference_point({"size_bytes": "min"}, None, {}, teacher)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def logged(digits_search):
    c = client(digits_search["options"].tracking_uri)
    parent = latest_search_run(c, "e2e")
    runs = c.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    return c, parent, runs


def test_search_logs_one_parent_and_a_nested_run_per_trial(digits_search, logged):
    c, parent, runs = logged
    assert parent.info.run_id == digits_search["result"].parent_run_id
    assert parent.data.tags[ROLE_TAG] == "search" and parent.info.status == "FINISHED"
    assert parent.data.params["searcher"] == "mf-gp" and parent.data.params["scheduler"] == "asha"
    assert len(runs) == 6
    statuses = [r.data.tags[STATUS_TAG] for r in runs]
    assert set(statuses) <= {"complete", "pruned", "failed"} and "complete" in statuses
    assert "failed" not in statuses
    for run in runs:
        assert "student.family" in run.data.params
        history = c.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == sorted(m.step for m in history) and history


def test_every_report_of_every_trial_reached_mlflow_and_latency_was_timed_in_the_trial(digits_search, logged):
    """The driver's MLflow writes are batched off Tune's loop: still one metric step per report,
    as many as Tune saw; 2 trials of 1 CPU share no core, so each timed its own file."""
    from ray.tune import ExperimentAnalysis

    c, parent, runs = logged
    assert parent.data.tags[LATENCY_TAG] == "trial"
    tune = {t.trial_id: t.last_result for t in ExperimentAnalysis(digits_search["result"].tune_path).trials}
    for run in runs:
        steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "epoch"))
        assert steps == list(range(1, tune[run.data.tags[TRIAL_TAG]]["training_iteration"] + 1)), run.info.run_name
        assert run.data.metrics["latency_ms"] > 0 and run.info.end_time and run.info.end_time >= run.info.start_time
        if run.data.tags[STATUS_TAG] == "complete":
            assert {"size_bytes", "val_acc", "params"} <= set(run.data.metrics)
            assert {a.path for a in c.list_artifacts(run.info.run_id, "student")} >= {"student/student.pt"}


def test_front_is_the_brute_force_front_of_complete_trials(logged):
    c, parent, runs = logged
    complete = [{"trial": r.info.run_name, **{m: r.data.metrics[m] for m in OBJECTIVES}}
                for r in runs if r.data.tags[STATUS_TAG] == "complete"]
    expected = {a["trial"] for a in complete if not any(dominates(b, a, OBJECTIVES) for b in complete)}
    payload = read_artifact_json(c, parent.info.run_id, "pareto_front.json")
    assert {row["trial"] for row in payload["front"]} == expected
    pruned = {r.info.run_name for r in runs if r.data.tags[STATUS_TAG] == "pruned"}
    assert not pruned & expected
    front = payload["front"]
    for a in front:
        assert not any(dominates(b, a, OBJECTIVES) for b in front)
        assert "latency_ms_search" in a and a["config"]["student.family"] in a["architecture"]


def test_early_stopped_trials_are_pruned_for_optuna_too(logged):
    _, _, runs = logged
    pruned = [r for r in runs if r.data.tags[STATUS_TAG] == "pruned"]
    assert pruned, "ASHA with grace 1 over six trials stops at least one"
    for run in pruned:
        assert "size_bytes" not in run.data.metrics


def test_parent_artifacts_and_hypervolume(digits_search, logged):
    c, parent, _ = logged
    names = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"pareto_front.json", "pareto.html", "pareto.png", "trials.csv", "space.yaml"} <= names
    history = c.get_metric_history(parent.info.run_id, "hypervolume")
    assert history and all(m.value >= 0 for m in history)
    payload = read_artifact_json(c, parent.info.run_id, "pareto_front.json")
    assert payload["hypervolume"] == pytest.approx(history[-1].value)
    assert payload["hypervolume"] > 0
    for row in payload["front"]:
        models = {a.path for a in c.list_artifacts(row["run_id"])}
        assert {"student"} <= models


def test_progress_and_front_table_are_shown(digits_search):
    text = "\n".join(digits_search["messages"])
    assert "[  6/6]" in text and "hypervolume" in text
    assert "workflowType=machine_learning" in text


def test_pareto_cli_prints_the_logged_front(digits_search, logged):
    c, parent, _ = logged
    uri = digits_search["options"].tracking_uri
    proc = subprocess.run([sys.executable, "-m", "kdsearch.search.cli", "pareto", "--json", "--tracking-uri", uri,
                           "--experiment", "e2e"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == read_artifact_json(c, parent.info.run_id, "pareto_front.json")


@pytest.mark.parametrize("args, needle", [
    (["--experiment", "nope"], "--experiment nope"),
    (["--tracking-uri", "http://127.0.0.1:9"], "--tracking-uri"),
])
def test_pareto_cli_errors_are_one_line_exit_2(digits_search, args, needle):
    base = ["--tracking-uri", digits_search["options"].tracking_uri]
    proc = subprocess.run([sys.executable, "-m", "kdsearch.search.cli", "pareto", *base, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_runs_list_tells_early_stopped_from_complete_trials(logged):
    _, _, runs = logged
    for run in runs:
        status, name = run.data.tags[STATUS_TAG], run.info.run_name
        assert name.endswith(f"({status})") == (status != "complete"), (name, status)
        assert run.data.tags["kdsearch.trial"] == name.split(" ")[0]


def test_hypervolume_is_a_fraction_of_the_box_logged_once_per_step(logged):
    c, parent, _ = logged
    for metric in ("hypervolume", "hypervolume_search"):
        history = c.get_metric_history(parent.info.run_id, metric)
        steps = [m.step for m in history]
        assert history and len(steps) == len(set(steps)), (metric, steps)
        assert all(0.0 <= m.value <= 1.0 for m in history), metric


def test_front_plot_marks_the_teacher_and_labels_units_and_directions(logged, tmp_path):
    from kdsearch.search.report import axis_label

    c, parent, _ = logged
    assert axis_label("latency_ms", "min") == "latency (ms), lower is better"
    assert axis_label("val_acc", "max") == "validation accuracy, higher is better"
    html = open(c.download_artifacts(parent.info.run_id, "pareto.html", str(tmp_path))).read()
    assert '"name":"teacher"' in html.replace(" ", "") and "latency (ms), lower is better" in html
    payload = read_artifact_json(c, parent.info.run_id, "pareto_front.json")
    trial = payload["front"][0]
    assert "distill.temperature: " in html and trial["trial"] in html  # every knob on hover
    assert payload["teacher"]["val_acc"] > 0 and payload["teacher"]["params"] > 0


def test_a_search_that_spends_its_epoch_budget_ends_finished_not_interrupted(tmp_path, teacher_cache):
    # the budget ends the search mid-trial: Tune returns with trials in flight, as it does on Ctrl-C
    from mlflow import MlflowClient

    from kdsearch.search.driver import run_search
    from kdsearch.search.options import SearchOptions
    from kdsearch.search.tracking import PARTIAL_TAG, STATUS_TAG, STOP_REASON_TAG

    options = SearchOptions(num_samples=20, max_concurrent=2, epochs=2, scheduler="none", budget_epochs=3,
                            tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="budget",
                            storage=str(tmp_path / "ray"), seed=0)
    result = run_search(options=options)
    assert result.interrupted is None and not result.partial
    client = MlflowClient(options.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("budget").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trials = [r for r in runs if r is not parent]
    assert parent.info.status == "FINISHED" and parent.data.tags[PARTIAL_TAG] == "false"
    assert all(r.info.status == "FINISHED" and r.data.tags[STATUS_TAG] in ("complete", "pruned") for r in trials)
    stopped = [r for r in trials if STOP_REASON_TAG in r.data.tags]
    assert stopped and all(r.data.tags[STATUS_TAG] == "pruned" and "budget" in r.data.tags[STOP_REASON_TAG] for r in stopped)
