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
