"""What early stopping alone can buy on the built-in space: schedulers replayed on recorded trials.

``search_quality.py`` runs whole searches, three seeds per method, so it cannot tell whether a
shortfall comes from the scheduler, the sampler or noise. This replays the real scheduler
classes (``ParetoASHA``, Ray Tune's ``ASHAScheduler``) on a pool of trials that a real
random search trained to the end, with their per-epoch ``val_acc`` and their final accuracy,
params, quiet-phase latency and the latency measured during the search (which is what
the scheduler sees): each replayed search draws trials from the pool at random
(random search, as NSGA-II's first generation is), runs two at a time one epoch per step,
and asks the scheduler after every epoch. Hundreds of replays per method take seconds.

It also replays an ORACLE that knows every trial's final result and stops a trial at epoch 1
unless its final point raises the hypervolume by more than ``delta``: no scheduler that sees
only learning curves can beat it, so its compute to reach random search's hypervolume is a
lower bound for early stopping on this space at that budget.

Reported per budget: mean HV at the budget (fraction of the reference box), and the compute the
mean curve needs to reach random search's mean HV at the budget. Last line is one JSON object.

    python benchmarks/scheduler_replay.py                      # the committed pool
    python benchmarks/scheduler_replay.py --record 120         # record a new pool first (~10 min)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from search.pareto import hypervolume  # noqa: E402
from search_quality import at  # noqa: E402  (benchmarks/ is the script's folder)

POOL = ROOT / "benchmarks" / "results" / "replay_pool.json"
OBJECTIVES = {"val_acc": "max", "latency_ms": "min", "params": "min"}


def record(count: int, path: Path, seed: int) -> None:
    """Train ``count`` random trials to the end with a real search and keep their curves."""
    import contextlib
    import io

    from search.driver import SearchOptions, run_search
    from search.tracking import client, trial_runs

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        options = SearchOptions(num_samples=count, tracking_uri=uri, experiment="replay-pool", storage=f"{tmp}/ray",
                                seed=seed, searcher="random", scheduler="none", log_models=False)
        with contextlib.redirect_stdout(io.StringIO()):
            result = run_search(options, lambda msg: print(msg, file=sys.stderr, flush=True))
        mlflow_client = client(uri)
        rows = {row["run_id"]: row for row in result.rows}
        pool = []
        for run in trial_runs(mlflow_client, mlflow_client.get_run(result.parent_run_id)):
            row = rows.get(run.info.run_id)
            if row is None:  # not complete
                continue
            by_epoch: dict[int, float] = {}
            for metric in sorted(mlflow_client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.timestamp):
                by_epoch.setdefault(metric.step, metric.value)
            pool.append({"trial": run.info.run_name, "curve": [by_epoch[e] for e in sorted(by_epoch)],
                         "params": float(row["params"]), "macs": float(row["macs"]),
                         "val_acc": float(row["val_acc"]), "latency_ms": float(row["latency_ms"]),
                         "latency_ms_search": float(row["latency_ms_search"]),
                         "config": {k: v for k, v in run.data.params.items()
                                    if k.split(".")[0] in ("student", "compress")}})
    path.write_text(json.dumps({"reference_point": result.reference, "seed": seed, "trials": pool}))
    print(f"recorded {len(pool)} complete trials into {path}", file=sys.stderr)


class Oracle:
    """Stops a trial at its first epoch unless its FINAL point raises the HV by more than ``delta``."""

    def __init__(self, reference: dict[str, float], box: float, delta: float) -> None:
        self.reference, self.box, self.delta = reference, box, delta
        self.kept: list[dict[str, Any]] = []

    def on_trial_add(self, controller: Any, trial: Any) -> None:
        pass

    def on_trial_result(self, controller: Any, trial: Any, result: dict) -> str:
        if result["epoch"] != 1:
            return "CONTINUE"
        before = hypervolume(self.kept, OBJECTIVES, self.reference) if self.kept else 0.0
        gain = hypervolume(self.kept + [trial.record], OBJECTIVES, self.reference) - before
        if gain / self.box > self.delta:
            self.kept.append(trial.record)
            return "CONTINUE"
        return "STOP"

    def on_trial_complete(self, controller: Any, trial: Any, result: dict) -> None:
        pass


def replay(pool: list[dict[str, Any]], scheduler: Optional[Any], budget: int, seed: int, reference: dict[str, float],
           workers: int = 2) -> list[tuple[int, float]]:
    """One random search over the pool: the HV step curve (epochs spent, HV) as complete trials join."""
    rng = np.random.default_rng(seed)
    running: list[list[Any]] = []  # [trial, epochs done]
    spent, joined, curve, launched = 0, [], [(0, 0.0)], 0
    while spent < budget:
        while len(running) < workers:
            launched += 1
            trial = SimpleNamespace(trial_id=f"trial-{launched}", record=pool[int(rng.integers(len(pool)))])
            if scheduler is not None:
                scheduler.on_trial_add(None, trial)
            running.append([trial, 0])
        item = min(running, key=lambda entry: entry[1])  # round robin: every worker trains at the same pace
        trial, record = item[0], item[0].record
        item[1] += 1
        spent += 1
        epoch = item[1]
        # what a trial reports each epoch; its latency as measured during a search (other trials training)
        result = {"epoch": epoch, "val_acc": record["curve"][epoch - 1], "macs": record["macs"], "params": record["params"],
                  "latency_ms": record["latency_ms_search"]}
        final = epoch >= len(record["curve"])
        action = "CONTINUE" if scheduler is None or final else scheduler.on_trial_result(None, trial, result)
        if final or action == "STOP":
            if scheduler is not None:
                scheduler.on_trial_complete(None, trial, result)
            running.remove(item)
        if final:
            joined.append(record)
            curve.append((spent, hypervolume(joined, OBJECTIVES, reference)))
    return curve


def methods(reference: dict[str, float], box: float, max_t: int) -> dict[str, Callable[[], Any]]:
    from ray.tune.schedulers import ASHAScheduler

    from search.schedulers import ParetoASHA

    def pasha(grace: int, latency: str = "latency_ms") -> Callable[[], Any]:
        return lambda: ParetoASHA(objectives={"val_acc": "max", latency: "min", "params": "min"}, time_attr="epoch",
                                  grace_period=grace, reduction_factor=3, max_t=max_t)

    return {
        "random": lambda: None,
        "asha": lambda: ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", grace_period=1,
                                      reduction_factor=3, max_t=max_t),
        "pareto-asha macs g2": pasha(2, "macs"),
        "pareto-asha macs g1": pasha(1, "macs"),
        "pareto-asha g1": pasha(1),
        "oracle": lambda: Oracle(reference, box, delta=0.002),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default=str(POOL), help="recorded trials (default: the committed pool)")
    parser.add_argument("--record", type=int, help="first record a new pool of this many random trials into --pool")
    parser.add_argument("--budgets", default="120,240,480", help="comma-separated compute budgets (epochs)")
    parser.add_argument("--replays", type=int, default=100, help="replayed searches per method and budget")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    path = Path(args.pool)
    if args.record:
        record(args.record, path, args.seed)
    saved = json.loads(path.read_text())
    pool, reference = saved["trials"], saved["reference_point"]
    box = math.prod(abs(reference[m] - (1.0 if d == "max" else 0.0)) for m, d in OBJECTIVES.items())
    max_t = max(len(trial["curve"]) for trial in pool)
    print(f"{len(pool)} recorded trials, reference point {reference}, {args.replays} replays per method and budget")
    report: dict[str, Any] = {"benchmark": "scheduler_replay", "pool": str(path), "trials": len(pool),
                              "replays": args.replays, "budgets": {}}
    for budget in (int(b) for b in args.budgets.split(",")):
        grid = np.arange(budget + 1)
        curves = {}
        for name, make in methods(reference, box, max_t).items():
            runs = [replay(pool, make(), budget, seed, reference) for seed in range(args.replays)]
            curves[name] = np.array([[at(run, c) for c in grid] for run in runs]) / box
        target = curves["random"].mean(axis=0)[-1]
        print(f"\nbudget {budget} epochs: random search's mean HV {target:.4f}")
        print(f"{'method':<22} {'HV':>7} {'HV at half':>10} {'epochs to random HV':>20}")
        rows = {}
        for name, values in curves.items():
            mean = values.mean(axis=0)
            hit = np.flatnonzero(mean >= target - 1e-12)
            reach = int(grid[hit[0]]) if hit.size else None
            rows[name] = {"hv": round(float(mean[-1]), 4), "hv_half": round(float(mean[budget // 2]), 4),
                          "epochs_to_random_hv": reach}
            shown = "not reached" if reach is None else f"{reach} ({reach / budget:.0%})"
            print(f"{name:<22} {mean[-1]:>7.4f} {mean[budget // 2]:>10.4f} {shown:>20}")
        report["budgets"][budget] = rows
    print(json.dumps(report))


if __name__ == "__main__":
    main()
