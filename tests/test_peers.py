"""Syne Tune's MOASHA as benchmarks/peers.py drives it: the decisions it makes on hand-made curves."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("syne_tune")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from peers import SyneTuneMOASHA  # noqa: E402

from kdsearch.search.schedulers import ParetoASHA  # noqa: E402

OBJECTIVES = {"val_acc": "max", "latency_ms": "min"}
#: trial -> (val_acc, latency_ms) at the first rung, in arrival order
AT_RUNG = {"first": (0.9, 0.5), "dominated": (0.5, 1.0), "dominates_all": (0.95, 0.4)}


def decisions(scheduler) -> dict[str, str]:
    out = {}
    for name, (acc, ms) in AT_RUNG.items():
        trial = SimpleNamespace(trial_id=name)
        scheduler.on_trial_add(None, trial)
        out[name] = scheduler.on_trial_result(None, trial, {"epoch": 1.0, "val_acc": acc, "latency_ms": ms})
    return out


def test_moasha_continues_the_first_and_stops_a_dominated_trial():
    made = decisions(SyneTuneMOASHA(OBJECTIVES, "epoch", grace_period=1, reduction_factor=4, max_t=16))
    assert made["first"] == "CONTINUE"
    assert made["dominated"] == "STOP"  # so the adapter hands it accuracy with the right sign


def test_moasha_as_shipped_stops_a_newcomer_that_dominates_every_earlier_trial():
    # MOASHA ranks the order its sort returns, not the newcomer's place in it: the peer's known flaw,
    # which Pareto-ASHA does not share
    moasha = decisions(SyneTuneMOASHA(OBJECTIVES, "epoch", grace_period=1, reduction_factor=4, max_t=16))
    pareto = decisions(ParetoASHA(objectives=OBJECTIVES, time_attr="epoch", grace_period=1, reduction_factor=4, max_t=16))
    assert moasha["dominates_all"] == "STOP"
    assert pareto == {"first": "CONTINUE", "dominated": "STOP", "dominates_all": "CONTINUE"}


def test_moasha_stops_a_trial_at_max_t():
    scheduler = SyneTuneMOASHA(OBJECTIVES, "epoch", grace_period=1, reduction_factor=4, max_t=16)
    trial = SimpleNamespace(trial_id="t")
    scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, trial, {"epoch": 16.0, "val_acc": 0.9, "latency_ms": 0.1}) == "STOP"


def test_sampler_draw_runs_each_pool_trial_once_and_tells_the_sampler_what_ran():
    import optuna
    from optuna.trial import TrialState
    from peers import SamplerDraw
    from scheduler_replay import RandomDraw, replay

    from kdsearch.search.samplers import fidelity_values

    # six recorded trials of the built-in space: two families, curves over 2 epochs at 2 reports an epoch
    def record(family: str, knobs: dict, curve: list[float], params: float) -> dict:
        return {"config": {"student.family": family, **knobs, "compress.quantize": "none"}, "curve": curve,
                "val_acc": curve[-1], "latency_ms": 0.1 + params / 1e5, "params": params, "macs": params}

    pool = [record("mlp", {"student.mlp.width": w}, [0.5, 0.6, 0.7, 0.7 + w / 1000], 1000.0 * w) for w in (32, 64, 128)]
    pool += [record("cnn", {"student.cnn.channels": c}, [0.6, 0.7, 0.8, 0.8 + c / 1000], 500.0 * c) for c in (8, 16, 32)]
    draw = SamplerDraw(pool, optuna.samplers.RandomSampler(seed=0), report_at=lambda epoch: epoch == 1.0)
    ran = replay(pool, 2, None, budget=100, seed=0, reference={"val_acc": 0.0, "latency_ms": 1.0, "params": 1e5},
                 draw=draw)
    assert len(ran) - 1 == len(pool)  # every trial once, then the search has no new one and ends
    told = [t for t in draw.study.trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["student.family"] for t in told) == ["cnn"] * 3 + ["mlp"] * 3
    for trial in told:
        family = trial.params["student.family"]
        knob = next(k for k in trial.params if k.startswith(f"student.{family}."))
        ran_record = next(r for r in pool if r["config"].get(knob) == trial.params[knob])
        # at epoch 1 (the second report) its accuracy then; at the end its final vector
        assert fidelity_values(trial) == {1.0: [ran_record["curve"][1], ran_record["latency_ms"], ran_record["params"]]}
        assert trial.values == [ran_record["val_acc"], ran_record["latency_ms"], ran_record["params"]]
    # with replacement (the scheduler studies' draw) a search runs to its budget
    assert len(replay(pool, 2, None, 100, 0, {"val_acc": 0.0, "latency_ms": 1.0, "params": 1e5}, draw=RandomDraw(pool))) > 7
