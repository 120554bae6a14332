"""What early stopping alone can buy on the built-in space: schedulers replayed on recorded trials.

``search_quality.py`` runs whole searches, three seeds per method, so it cannot tell whether a
shortfall comes from the scheduler, the sampler or noise. This replays the real scheduler
classes (``ParetoASHA``, Ray Tune's ``ASHAScheduler``) on a pool of random trials that were
trained to the end, with their accuracy recorded ``reports_per_epoch`` times an epoch, their
final accuracy, params and latency: each replayed search draws trials from the pool at random
(random search, as NSGA-II's first generation is), runs two at a time one report interval per
step, and asks the scheduler after every report. Hundreds of replays per method take seconds.

It also replays an ORACLE that knows every trial's final result and stops a trial at its first
rung unless its final point raises the hypervolume by more than ``delta``: no scheduler that sees
only learning curves can beat it, so its compute to reach random search's hypervolume is a
lower bound for early stopping with that first rung on this space at that budget.

Reported per budget: mean HV at the budget (fraction of the reference box), and the compute the
mean curve needs to reach random search's mean HV at the budget. Last line is one JSON object.

    python benchmarks/scheduler_replay.py                      # the committed pool
    python benchmarks/scheduler_replay.py --record 150         # record a new pool first (~15 min), into --out

The committed pool, ``benchmarks/results/replay_pool.json``, keeps each accuracy as a count of
correct validation samples (``curve_correct``, ``val_correct``; accuracy = count / ``val_size``,
the same floats as recorded); ``load_pool`` reads it, and a recorded pool is written that way too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kdsearch.search.pareto import box_volume, hypervolume  # noqa: E402
from search_quality import HelpFormatter, at  # noqa: E402  (benchmarks/ is the script's folder)

POOL = ROOT / "benchmarks" / "results" / "replay_pool.json"
#: where --record writes its pool unless --out says otherwise: ignored by git, never the committed pool
DEFAULT_OUT = ROOT / "benchmarks" / "out"
OBJECTIVES = {"val_acc": "max", "latency_ms": "min", "params": "min"}


def record(count: int, path: Path, seed: int, reports_per_epoch: int) -> None:
    """Train ``count`` random trials of the built-in space to the end, one after another, and keep their curves.

    One at a time, so each trial's latency (measured before it trains, as in a search) is a quiet
    figure: the replayed scheduler sees less timing noise than it would during a real search.
    """
    from kdsearch.search.driver import ConstraintCheck, max_epochs
    from kdsearch.search.pareto import reference_point
    from kdsearch.spaces import load_space
    from kdsearch.trainers.trial import TrialDiverged, prepare, run_trial

    import torch

    torch.set_num_threads(1)  # as a trial in a search with one CPU each
    space = load_space()
    context = prepare(space)
    data = context.data
    check = ConstraintCheck(space, data.input_shape, data.num_classes)
    points = [epoch + j / reports_per_epoch for epoch in range(max_epochs(space, None)) for j in range(1, reports_per_epoch)]
    reference = reference_point(space.objectives, space.reference_point, space.constraints, context.targets.footprint)
    rng = np.random.default_rng(seed)
    pool: list[dict[str, Any]] = []
    while len(pool) < count:
        config = space.sample_random(int(rng.integers(2**31)))
        if check(config) is not None:
            continue
        curve: list[float] = []
        try:
            final = run_trial(space, config, lambda metrics, state=None: curve.append(metrics["val_acc"]), context=context,
                              seed=seed, report_at=points)
        except TrialDiverged:
            continue
        pool.append({"trial": f"trial-{len(pool) + 1:03d}", "curve": curve, "params": float(final["params"]),
                     "macs": float(final["macs"]), "val_acc": float(final["val_acc"]), "latency_ms": float(final["latency_ms"]),
                     "config": {k: v for k, v in config.items() if k.split(".")[0] in ("student", "compress")}})
        print(f"[{len(pool)}/{count}] {config['student.family']:<9} val_acc {final['val_acc']:.3f}", file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {"reference_point": reference, "seed": seed, "reports_per_epoch": reports_per_epoch, "trials": pool}
    path.write_text(json.dumps(pack_pool(saved, len(data.val))))
    print(f"recorded {len(pool)} complete trials into {path}", file=sys.stderr)


def pack_pool(saved: dict[str, Any], val_size: int) -> dict[str, Any]:
    """The pool with each accuracy as a count of correct samples out of ``val_size``, when that is exact.

    Accuracies are count / val_size floats; a count is a third of the characters and gives back
    the very same float. A pool whose accuracies are not such fractions is left as it is.
    """
    def count(acc: float) -> int | None:
        k = round(acc * val_size)
        return k if k / val_size == acc else None

    trials = []
    for trial in saved["trials"]:
        counts = [count(a) for a in trial["curve"]]
        final = count(trial["val_acc"])
        if final is None or None in counts:
            return saved
        packed = {k: v for k, v in trial.items() if k not in ("curve", "val_acc")}
        trials.append({**packed, "curve_correct": counts, "val_correct": final})
    return {**{k: v for k, v in saved.items() if k != "trials"}, "val_size": val_size, "trials": trials}


def load_pool(path: Path) -> dict[str, Any]:
    """A pool file, packed (``pack_pool``) or not, with every trial's ``curve`` and ``val_acc`` as floats."""
    saved = json.loads(path.read_text())
    n = saved.get("val_size")
    if n:
        saved["trials"] = [{**{k: v for k, v in t.items() if k not in ("curve_correct", "val_correct")},
                            "curve": [k / n for k in t["curve_correct"]], "val_acc": t["val_correct"] / n}
                           for t in saved["trials"]]
    return saved


class Oracle:
    """Stops a trial at ``first_rung`` unless its FINAL point raises the HV by more than ``delta``."""

    def __init__(self, reference: dict[str, float], box: float, delta: float, first_rung: float) -> None:
        self.reference, self.box, self.delta, self.first_rung = reference, box, delta, first_rung
        self.kept: list[dict[str, Any]] = []

    def on_trial_add(self, controller: Any, trial: Any) -> None:
        pass

    def on_trial_result(self, controller: Any, trial: Any, result: dict) -> str:
        if not math.isclose(result["epoch"], self.first_rung):
            return "CONTINUE"
        before = hypervolume(self.kept, OBJECTIVES, self.reference) if self.kept else 0.0
        gain = hypervolume(self.kept + [trial.record], OBJECTIVES, self.reference) - before
        if gain / self.box > self.delta:
            self.kept.append(trial.record)
            return "CONTINUE"
        return "STOP"

    def on_trial_complete(self, controller: Any, trial: Any, result: dict) -> None:
        pass


class RandomDraw:
    """Random search over the pool: uniform draws, with replacement or (``replace=False``) each
    trial once, as a search that never runs a configuration twice; that one runs out."""

    def __init__(self, pool: list[dict[str, Any]], replace: bool = True) -> None:
        self.pool, self.replace = pool, replace
        self.unused = list(range(len(pool)))

    def next(self, rng: np.random.Generator) -> dict[str, Any]:
        if self.replace:
            return self.pool[int(rng.integers(len(self.pool)))]
        if not self.unused:
            raise StopIteration
        return self.pool[self.unused.pop(int(rng.integers(len(self.unused))))]

    def reported(self, trial: Any, epoch: float, values: list[float]) -> None:
        pass

    def ended(self, trial: Any, values: Optional[list[float]]) -> None:
        pass


def replay(pool: list[dict[str, Any]], per_epoch: int, scheduler: Optional[Any], budget: int, seed: int,
           reference: dict[str, float], workers: int = 2, draw: Optional[Any] = None) -> list[tuple[float, float]]:
    """One search over the pool: the HV step curve (epochs spent, HV) as complete trials join.

    ``draw`` picks each new trial (``next(rng)``: a pool record, or ``StopIteration`` once it has
    no new one) and hears each trial's objective vector at every
    result (``reported``) and its end (``ended``: the final vector, or None when stopped early).
    The default is :class:`RandomDraw` with replacement. A search whose draw runs out ends when its last trial does.
    """
    rng = np.random.default_rng(seed)
    draw = draw or RandomDraw(pool)
    running: list[list[Any]] = []  # [trial, reports done]
    spent, joined, curve, launched, exhausted = 0, [], [(0.0, 0.0)], 0, False
    while spent < budget * per_epoch:
        while len(running) < workers and not exhausted:
            try:
                record = draw.next(rng)
            except StopIteration:
                exhausted = True
                break
            launched += 1
            trial = SimpleNamespace(trial_id=f"trial-{launched}", record=record)
            if scheduler is not None:
                scheduler.on_trial_add(None, trial)
            running.append([trial, 0])
        if not running:
            break
        item = min(running, key=lambda entry: entry[1])  # round robin: every worker trains at the same pace
        trial, record = item[0], item[0].record
        item[1] += 1
        spent += 1
        reports = item[1]
        result = {"epoch": reports / per_epoch, "val_acc": record["curve"][reports - 1], "macs": record["macs"],
                  "params": record["params"], "latency_ms": record.get("latency_ms_search", record["latency_ms"])}
        draw.reported(trial, result["epoch"], [result[m] for m in OBJECTIVES])
        final = reports >= len(record["curve"])
        action = "CONTINUE" if scheduler is None or final else scheduler.on_trial_result(None, trial, result)
        if final or action == "STOP":
            if scheduler is not None:
                scheduler.on_trial_complete(None, trial, result)
            running.remove(item)
            draw.ended(trial, [{**result, "val_acc": record["val_acc"]}[m] for m in OBJECTIVES] if final else None)
        if final:
            joined.append(record)
            curve.append((spent / per_epoch, hypervolume(joined, OBJECTIVES, reference)))
    return curve


def methods(reference: dict[str, float], box: float, max_t: float, graces: list[float],
            reduction_factor: int) -> dict[str, Callable[[], Any]]:
    from ray.tune.schedulers import ASHAScheduler

    from kdsearch.search.schedulers import ParetoASHA

    chosen: dict[str, Callable[[], Any]] = {"random": lambda: None}
    for grace in graces:
        label = f"g{grace:.3g}"
        chosen[f"asha {label}"] = lambda g=grace: ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max",
                                                                grace_period=g, reduction_factor=reduction_factor, max_t=max_t)
        chosen[f"pareto-asha {label}"] = lambda g=grace: ParetoASHA(objectives=OBJECTIVES, time_attr="epoch", grace_period=g,
                                                                    reduction_factor=reduction_factor, max_t=max_t)
        chosen[f"oracle {label}"] = lambda g=grace: Oracle(reference, box, delta=0.002, first_rung=g)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("--pool", help="recorded trials to replay (default: the committed pool, "
                        "benchmarks/results/replay_pool.json; with --record: the new one)")
    parser.add_argument("--record", type=int, help="first record a new pool of this many random trials into "
                        "OUT/replay_pool.json, then replay it")
    parser.add_argument("--out", help="folder --record writes into (default: benchmarks/out/, ignored by git)")
    parser.add_argument("--reports-per-epoch", type=int, default=12, help="with --record: accuracy this often an epoch")
    parser.add_argument("--budgets", default="120,240,480", help="comma-separated compute budgets (epochs)")
    parser.add_argument("--graces", default="1,0.3333333333333333,0.25",
                        help="comma-separated first rungs (epochs), each a multiple of 1/reports-per-epoch")
    parser.add_argument("--reduction-factor", type=int, default=3, help="eta of both schedulers")
    parser.add_argument("--replays", type=int, default=100, help="replayed searches per method and budget")
    parser.add_argument("--seed", type=int, default=7, help="seed of the recorded trials (with --record)")
    args = parser.parse_args()
    if args.record:
        if args.pool:
            parser.error("--pool with --record: the new pool goes to OUT/replay_pool.json; fix: give --out instead")
        path = Path(args.out or DEFAULT_OUT) / "replay_pool.json"
        record(args.record, path, args.seed, args.reports_per_epoch)
    else:
        path = Path(args.pool or POOL)
    saved = load_pool(path)
    pool, reference = saved["trials"], saved["reference_point"]
    per_epoch = int(saved.get("reports_per_epoch", 1))
    graces = [float(g) for g in args.graces.split(",")]
    off_grid = [g for g in graces if not math.isclose(g * per_epoch, round(g * per_epoch))]
    if off_grid:
        parser.error(f"--graces {off_grid}: the pool has {per_epoch} reports an epoch; fix: use multiples of 1/{per_epoch}")
    box = box_volume(reference, OBJECTIVES)
    max_t = max(len(trial["curve"]) for trial in pool) / per_epoch
    print(f"{len(pool)} recorded trials ({per_epoch} reports an epoch), reference point {reference}, "
          f"eta {args.reduction_factor}, {args.replays} replays per method and budget")
    report: dict[str, Any] = {"benchmark": "scheduler_replay", "pool": str(path), "trials": len(pool),
                              "reports_per_epoch": per_epoch, "reduction_factor": args.reduction_factor,
                              "replays": args.replays, "budgets": {}}
    for budget in (int(b) for b in args.budgets.split(",")):
        grid = np.arange(budget + 1)
        curves = {}
        for name, make in methods(reference, box, max_t, graces, args.reduction_factor).items():
            runs = [replay(pool, per_epoch, make(), budget, seed, reference) for seed in range(args.replays)]
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
            print(f"{name:<22} {mean[-1]:>7.4f} {mean[budget // 2]:>10.4f} {shown:>20}", flush=True)
        report["budgets"][budget] = rows
    print(json.dumps(report))


if __name__ == "__main__":
    main()
