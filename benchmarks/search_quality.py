"""How much Pareto front each search method buys for the same training compute.

Four methods search the built-in digits space at an EQUAL compute budget, counted in training
epochs summed over all trials (``SearchOptions.budget_epochs``; ``num_samples`` is set high
enough that the budget, not the trial count, ends every search), over several seeds each:

    random      searcher random, no early stopping (scheduler none)
    nsga2       NSGA-II, no early stopping
    nsga2+asha  NSGA-II + ASHA on val_acc
    nsga2+pasha NSGA-II + pareto-asha (ranked on val_acc, latency_ms, params)

and, beyond those four: ``tpe+pasha``; ``mf-gp+pasha``, the driver's defaults (the GP sampler
fitted on rung results too, ``kdsearch.search.samplers``); and ``mf-gp+moasha``, the same with
Syne Tune's MOASHA as shipped in place of Pareto-ASHA (same rungs and objectives, through
``benchmarks/peers.py``'s adapter; a benchmark-only swap, since MOASHA is not a Ray Tune scheduler).

Every run is a real ``run_search`` (Ray Tune, Optuna, MLflow in a temporary sqlite store,
Tune storage in a temporary folder; front models are not logged). All runs share one
declared hypervolume reference point, written into a temporary copy of ``spaces/digits.yaml``:
val_acc 0, latency_ms ``--ref-latency-ms`` (a fixed 1.0 ms, 2-4x the teacher's batch-1
latency under load, so a slow measurement does not push a student out of the box), params = the space's
``max_params``. Hypervolume is reported as a fraction of that reference box (1.0 = a perfect
student with zero latency and zero parameters).

HV against compute: from the MLflow nested runs of each search, every trial's results (metric
history of ``epoch``, fractions of an epoch included, time-stamped by the driver in the order
Tune processed them) give the order in which epochs were spent, stopped trials included; a complete
trial joins the front when its last result arrives, with its accuracy and params and a latency
measured once more after the last search: every search's students side by side, three shuffled
rounds, the median (``remeasure_side_by_side``). Each search's own quiet phase runs at its own
time, and over an hour on a shared machine that drift alone moved the HV of two searches that
trained the same students by 0.04; the own-phase figure is kept as ``hv_own_phase``. The
curve's value at the budget is the method's figure. A second hypervolume uses MACs instead of
latency (deterministic: no timing noise) as a check.

The default budget is 480 epochs (about 60 random trials). At 240 the students on random
search's final front took about half the budget to train on their own (the script prints this
as ``random_front_epochs``), so no stopping rule over a sampler that draws as random search does
could reach that front with half the compute, however well it stopped the rest.

Per method: mean +- std HV at the budget, and the compute at which the mean curve first
reaches random search's mean HV at the budget. Writes into ``--out`` (default ``benchmarks/out/``,
ignored by git): ``TAG.json``, the summary (``summary_doc``: per method the HV per seed, mean and
std, the mean HV-vs-epochs curve at about 100 points, trial counts), ``TAG.png``, its plot, and
``TAG.runs.json``, every run in full (curves, one record per trial) for ``--from-json`` and
``--remeasure``. Only summaries are committed, under ``benchmarks/results/``. Last line printed
is one JSON object.

    python benchmarks/search_quality.py [--quick] [--seeds 3] [--budget 480] [--epochs N] [--out DIR]
    python benchmarks/search_quality.py --from-json benchmarks/results/search_quality.json   # table + plot again
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kdsearch.search.driver import run_search  # noqa: E402
from kdsearch.search.options import SearchOptions  # noqa: E402
from kdsearch.search.pareto import box_volume, hypervolume  # noqa: E402
from kdsearch.spaces import load_space  # noqa: E402

#: name -> (searcher, scheduler)
METHODS = {
    "random": ("random", "none"),
    "nsga2": ("nsga2", "none"),
    "nsga2+asha": ("nsga2", "asha"),
    "nsga2+pasha": ("nsga2", "pareto-asha"),
    "tpe+pasha": ("tpe", "pareto-asha"),  # beyond the four: a sampler that learns from the stopped trials
    "mf-gp+pasha": ("mf-gp", "pareto-asha"),  # the driver's defaults: GP fitted on the rung results too
    # Syne Tune's MOASHA as shipped (benchmarks/peers.py's adapter), same sampler, rungs and objectives
    "mf-gp+moasha": ("mf-gp", "moasha"),
    "mf-gp+asha": ("mf-gp", "asha"),  # Ray Tune's ASHA on val_acc alone, same sampler and rungs
}
EXPERIMENT = "search-quality"
#: the driver's first rung (epochs) and eta, the defaults here too
DRIVER_GRACE = SearchOptions.model_fields["grace_period"].default
DRIVER_ETA = SearchOptions.model_fields["reduction_factor"].default
#: where results go unless --out says otherwise: ignored by git, so a run never overwrites committed results
DEFAULT_OUT = ROOT / "benchmarks" / "out"


def say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- one search


def write_space(folder: Path, ref_latency_ms: float) -> tuple[str, dict[str, float]]:
    """The built-in space with one declared reference point; returns its path and the point."""
    base = load_space()
    raw = yaml.safe_load(base.text)
    reference = {"val_acc": 0.0, "latency_ms": float(ref_latency_ms), "params": float(base.constraints["max_params"])}
    assert set(reference) == set(base.objectives), f"objectives changed: {base.objectives}"
    raw["reference_point"] = reference
    path = folder / "digits-ref.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path), reference


def timeline(mlflow_client, parent_run_id: str) -> tuple[list[tuple[str, float, float]], list[Any]]:
    """Every result of the search's trials in the order the driver processed it: (run_id, epoch, epochs it
    added), reports inside an epoch included; and the trial runs."""
    from kdsearch.search.tracking import trial_runs

    events = []
    parent = mlflow_client.get_run(parent_run_id)
    runs = list(trial_runs(mlflow_client, parent))
    for run in runs:
        trained = 0.0
        history = mlflow_client.get_metric_history(run.info.run_id, "epoch")
        for metric in sorted(history, key=lambda m: (m.timestamp, m.step)):
            if metric.value > trained:  # a re-logged epoch (e.g. after a restore) costs nothing new
                events.append((metric.timestamp, metric.step, metric.value, metric.value - trained, run.info.run_id))
                trained = metric.value
    events.sort()
    return [(run_id, epoch, added) for _, _, epoch, added, run_id in events], runs


def trial_records(runs: list[Any], events: list[tuple[str, float, float]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One compact line per trial, in launch order: what it was, how long it trained, how it ended."""
    import hashlib

    spent: dict[str, float] = {}
    for run_id, _, added in events:
        spent[run_id] = spent.get(run_id, 0.0) + added
    complete = {row["run_id"]: row for row in rows}
    records = []
    for run in sorted(runs, key=lambda r: r.info.run_name or ""):
        metrics, params = run.data.metrics, run.data.params
        row = complete.get(run.info.run_id, {})
        records.append({
            "trial": run.info.run_name, "status": run.data.tags.get("kdsearch.status"), "epochs": spent.get(run.info.run_id, 0),
            "family": params.get("student.family"), "prune": params.get("compress.prune_ratio"),
            "quantize": params.get("compress.quantize"),
            "config_hash": hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10],
            "params": metrics.get("params"), "macs": metrics.get("macs"),
            "val_acc": row.get("val_acc", metrics.get("val_acc")), "latency_ms": row.get("latency_ms"),
            "latency_ms_search": row.get("latency_ms_search"),
        })
    return records


def hv_curve(events: list[tuple[str, float, float]], rows: list[dict[str, Any]], objectives: dict[str, str],
             reference: dict[str, float]) -> list[tuple[float, float]]:
    """(cumulative epochs, HV) after each complete trial joins, starting at (0, 0)."""
    final_epoch = {row["run_id"]: float(row["epoch"]) for row in rows}
    by_run = {row["run_id"]: row for row in rows}
    joined: list[dict[str, Any]] = []
    curve = [(0.0, 0.0)]
    spent = 0.0
    for run_id, epoch, added in events:
        spent += added
        if run_id in final_epoch and epoch == final_epoch[run_id]:
            joined.append(by_run[run_id])
            curve.append((spent, hypervolume(joined, objectives, reference)))
    curve.append((spent, curve[-1][1]))
    return curve


def at(curve: list[tuple[float, float]], compute: float) -> float:
    """The step curve's value once ``compute`` epochs have been spent."""
    value = 0.0
    for spent, hv in curve:
        if spent > compute:
            break
        value = hv
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each default; an option whose default is worked out at run time says so in its own help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


class MessageLog(logging.Handler):
    """Keeps the messages of the "kdsearch" logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def complete_rows(trials: Any) -> list[dict[str, Any]]:
    """The complete trials of a ``SearchResult.trials`` DataFrame as dicts, missing figures as None."""
    rows = trials[trials["status"] == "complete"].to_dict("records")
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows]


@contextlib.contextmanager
def moasha_in_driver():
    """The driver builds Syne Tune's MOASHA where it would build Pareto-ASHA (a benchmark-only swap:
    MOASHA is not a Ray Tune scheduler, ``peers.SyneTuneMOASHA`` makes it speak as one)."""
    from peers import SyneTuneMOASHA

    from kdsearch.search import driver

    original = driver.make_scheduler

    def make(name, space, max_t, grace_period, reduction_factor):
        metrics, modes = driver.scheduler_objectives(space)
        return SyneTuneMOASHA(dict(zip(metrics, modes)), "epoch", min(grace_period, max_t), reduction_factor, max_t)

    driver.make_scheduler = make
    try:
        yield
    finally:
        driver.make_scheduler = original


def one_search(method: str, seed: int, args: argparse.Namespace, space_path: str, reference: dict[str, float],
               macs_reference: dict[str, float], tmp: Path, tracking_uri: str) -> dict[str, Any]:
    from kdsearch.search.tracking import client

    searcher, scheduler = METHODS[method]
    storage = tmp / f"ray-{method}-{seed}"
    patched = contextlib.nullcontext()
    if scheduler == "moasha":  # not a driver option: the driver's Pareto-ASHA swapped for MOASHA, same rungs
        patched = moasha_in_driver()
        scheduler = "pareto-asha"
    options = SearchOptions(
        num_samples=args.num_samples, max_concurrent=args.max_concurrent, tracking_uri=tracking_uri,
        experiment=EXPERIMENT, storage=str(storage), seed=seed, searcher=searcher, scheduler=scheduler,
        epochs=args.epochs, grace_period=args.grace_period, reduction_factor=args.reduction_factor,
        name=f"{method.replace('+', '-')}-seed{seed}", budget_epochs=args.budget, log_models=False,
    )
    messages = MessageLog()  # the search logs to the "kdsearch" logger; shown only if it fails
    logger = logging.getLogger("kdsearch")
    logger.addHandler(messages)
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), patched:  # Ray chatter
            warnings.simplefilter("ignore")
            result = run_search(space_path, options=options)
    except BaseException:
        say("  the search failed; its last messages:\n    " + "\n    ".join(messages.lines[-15:]))
        raise
    finally:
        logger.removeHandler(messages)
    wall = time.perf_counter() - started
    shutil.rmtree(storage, ignore_errors=True)

    objectives = load_space(space_path).objectives
    rows = complete_rows(result.trials)
    events, trial_runs_ = timeline(client(tracking_uri), result.parent_run_id)
    trials = len(trial_runs_)
    curve = hv_curve(events, rows, objectives, reference)
    macs_objectives = {"val_acc": "max", "macs": "min", "params": "min"}
    macs_curve = hv_curve(events, rows, macs_objectives, macs_reference)
    box = box_volume(reference, objectives)
    macs_box = box_volume(macs_reference, macs_objectives)
    if not math.isclose(curve[-1][1] / box, result.hypervolume, rel_tol=1e-9, abs_tol=1e-12):  # a fraction of the box
        say(f"  warning: reconstructed final HV {curve[-1][1] / box:.6g} != search's {result.hypervolume:.6g}")
    counts = result.counts
    return {
        "method": method, "seed": seed, "wall_s": round(wall, 1), "epochs_spent": round(curve[-1][0], 2), "trials": trials,
        "complete": counts.get("complete", 0), "pruned": counts.get("pruned", 0), "failed": counts.get("failed", 0),
        "rejected": counts.get("rejected", 0),
        "hv_budget": at(curve, args.budget) / box, "hv_final": curve[-1][1] / box,
        "hv_macs_budget": at(macs_curve, args.budget) / macs_box,
        "front": len(result.front), "parent_run_id": result.parent_run_id,
        "curve": [(c, v / box) for c, v in curve], "macs_curve": [(c, v / macs_box) for c, v in macs_curve],
        "latency_ms_max": max((r["latency_ms"] for r in rows), default=None),
        "trial_records": trial_records(trial_runs_, events, rows),
    }


# --------------------------------------------------------------------------- latency, side by side


def param_value(text: str) -> Any:
    """A logged param back as its value: ``str(1e-05)`` is JSON's float but YAML's string.

    >>> [param_value(t) for t in ("1e-05", "0.5", "mlp", "True", "[1, 2]")]
    [1e-05, 0.5, 'mlp', True, [1, 2]]
    """
    try:
        return json.loads(text)
    except ValueError:
        return yaml.safe_load(text)


def remeasure_side_by_side(runs: list[dict[str, Any]], budget: float, tracking_uri: str, artifacts: Path,
                           space_path: str, reference: dict[str, float], context: Any = None, rounds: int = 3) -> None:
    """Measure the complete students of every search again in one pass, and redo the HV curves.

    Each search's own quiet phase runs at its own time, and on a shared machine latency drifts
    over a benchmark that lasts an hour: two searches that trained the same students (random and
    NSGA-II's first generation, same seed) once differed by 0.04 in HV. Here every student
    structure is measured ``rounds`` times, in a shuffled order each round, and keeps the median:
    figures taken side by side, as the same structure gets the same one. ``hv_own_phase`` keeps
    the search's own figure.
    """
    import random

    from kdsearch.search.latency import artifact_latency, runtime_example, structure_key
    from kdsearch.search.tracking import STATUS_TAG, client, trial_runs
    from kdsearch.trainers.trial import prepare

    mlflow_client = client(tracking_uri)
    space = load_space(space_path)
    if context is None:  # a --from-json run: prepare the data and teacher outputs again
        with contextlib.redirect_stdout(io.StringIO()):
            context = prepare(space)
    data = context.data
    students: dict[str, Any] = {}  # structure key -> (config, folder of its logged files)
    rows_by_run: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        rows = []
        for trial in trial_runs(mlflow_client, mlflow_client.get_run(run["parent_run_id"])):
            if trial.data.tags.get(STATUS_TAG) != "complete":
                continue
            config = {k: param_value(v) for k, v in trial.data.params.items()}  # MLflow keeps params as text
            key = structure_key(config)
            path = artifacts / trial.info.run_id / "artifacts" / "student" / "student.pt"
            if key not in students and path.is_file():
                students[key] = (config, path.parent)  # the trial's logged files, measured in the space's runtime
            rows.append({"run_id": trial.info.run_id, "key": key, "own_latency_ms": trial.data.metrics["latency_ms"],
                         **{m: trial.data.metrics[m] for m in ("val_acc", "params", "epoch")}})
        rows_by_run[run["parent_run_id"]] = rows
    say(f"measuring the latency of {len(students)} student structures side by side, {rounds} rounds...")
    figures: dict[str, list[float]] = {key: [] for key in students}
    order = list(students)
    for round_ in range(rounds):
        random.Random(round_).shuffle(order)
        for key in order:
            config, folder = students[key]
            figures[key].append(artifact_latency(space, config, folder, runtime_example(space, data), data.input_shape,
                                                 data.num_classes).median_ms)
    latency = {key: statistics.median(values) for key, values in figures.items()}
    missing = sum(row["key"] not in latency for rows in rows_by_run.values() for row in rows)
    if missing:  # an artifact a copied folder lacks: that student keeps its search's own figure
        say(f"  {missing} students had no artifact to measure: they keep their own quiet-phase figure")
    objectives = space.objectives
    box = box_volume(reference, objectives)
    for run in runs:
        rows = [{**row, "latency_ms": latency.get(row["key"], row["own_latency_ms"])} for row in rows_by_run[run["parent_run_id"]]]
        events, _ = timeline(mlflow_client, run["parent_run_id"])
        curve = hv_curve(events, rows, objectives, reference)
        run.setdefault("hv_own_phase", run["hv_budget"])
        run["curve"] = [(c, v / box) for c, v in curve]
        run["hv_budget"] = at(curve, budget) / box
        run["hv_final"] = curve[-1][1] / box
        run["latency_ms_max"] = max((r["latency_ms"] for r in rows), default=None)


# --------------------------------------------------------------------------- summary


def reach(grid: np.ndarray, curve: np.ndarray, target: float) -> float | None:
    hit = np.flatnonzero(curve >= target - 1e-12)
    return float(grid[hit[0]]) if hit.size else None


def summarise(runs: list[dict[str, Any]], methods: list[str], budget: int, key: str = "curve") -> dict[str, Any]:
    grid = np.arange(budget + 1)
    curves = {m: np.array([[at(r[key], c) for c in grid] for r in runs if r["method"] == m]) for m in methods}
    means = {m: c.mean(axis=0) for m, c in curves.items()}
    target = float(means["random"][-1]) if "random" in means else None
    out = {}
    for m in methods:
        finals = curves[m][:, -1]
        per_seed = [reach(grid, row, target) for row in curves[m]] if target is not None else []
        # the same seed draws the same configurations while NSGA-II is in its first generation: pair by seed
        paired = [float(x - y) for x, y in zip(finals, curves["random"][:, -1])] if "random" in curves else []
        out[m] = {
            "paired_delta_vs_random": paired,
            "hv_mean": float(finals.mean()), "hv_std": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
            "hv_per_seed": [float(x) for x in finals],
            "epochs_to_random_hv": reach(grid, means[m], target) if target is not None else None,
            "epochs_to_random_hv_per_seed": per_seed,
            "mean_curve": [float(x) for x in means[m]],
            "std_curve": [float(x) for x in curves[m].std(axis=0, ddof=1)] if len(finals) > 1 else [0.0] * len(grid),
        }
    return {"target": target, "methods": out}


def plot(doc: dict[str, Any], path: Path) -> None:
    """HV against compute, mean +- 1 std over seeds, from a summary document's curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, grid = doc["config"], np.array(doc["curve_epochs"])
    budget = config["budget_epochs"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, prefix, target, label in ((axes[0], "", doc["target"], "HV (val_acc, latency_ms, params)"),
                                      (axes[1], "macs_", doc["macs_target"], "HV with MACs for latency (no timing noise)")):
        for method, s in doc["methods"].items():
            mean, std = np.array(s[prefix + "mean_curve"]), np.array(s[prefix + "std_curve"])
            hv_mean, hv_std = s[f"hv_{prefix}mean"], s[f"hv_{prefix}std"]
            line, = ax.step(grid, mean, where="post", label=f"{method}: {hv_mean:.3f} ± {hv_std:.3f}")
            ax.fill_between(grid, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), step="post",
                            color=line.get_color(), alpha=0.15)
        if target is not None:
            ax.axhline(target, color="grey", ls="--", lw=1, label="random's mean HV at the budget")
        ax.axvline(budget / 2, color="grey", ls=":", lw=1, label="half the budget")
        ax.set_xlabel("compute spent (training epochs, all trials)")
        ax.set_ylabel("hypervolume (fraction of the reference box)")
        ax.set_title(label, fontsize=10)
        ax.set_xlim(0, budget)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"digits, {config['seeds']} seeds, budget {budget} epochs, distil epochs {config['epochs'] or 8}, "
                 f"grace {Fraction(config['grace_period']).limit_denominator(100)}, eta {config['reduction_factor']}; mean ± 1 std", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt_epochs(value: float | None, budget: int) -> str:
    return "not reached" if value is None else f"{value:.0f} ({value / budget:.0%})"


def front_epochs(run: dict[str, Any], objectives: dict[str, str]) -> int:
    """What the run's final front cost to train: no method can rebuild that front with less compute."""
    from kdsearch.search.pareto import pareto_mask

    complete = [t for t in run["trial_records"] if t["status"] == "complete"]
    return sum(t["epochs"] for t, keep in zip(complete, pareto_mask(complete, objectives)) if keep)


#: points of the HV-vs-epochs curves a summary keeps (the figures themselves are computed epoch by epoch)
SUMMARY_POINTS = 96


def curve_epochs(budget: int, points: int = SUMMARY_POINTS) -> list[int]:
    """Whole epochs from 0 to the budget, about ``points`` steps apart."""
    return sorted({int(round(x)) for x in np.linspace(0, budget, min(budget, points) + 1)})


def rung_of(epochs: float, grace: float, eta: int, rungs: int) -> int:
    """The last rung (0: the first, at ``grace`` epochs) a trial that trained ``epochs`` epochs reached."""
    k = 0
    while k < rungs - 1 and epochs >= grace * eta ** (k + 1) - 1e-9:
        k += 1
    return k


def summary_doc(runs: list[dict[str, Any]], config: dict[str, Any], elapsed: float,
                points: int = SUMMARY_POINTS) -> dict[str, Any]:
    """The summary of a benchmark run: what ``benchmarks/results/`` keeps, and what ``TAG.json`` holds.

    Per method: HV at the budget per seed (and its mean and std), the same with MACs for latency,
    the paired difference to random search of the same seed, the compute for the mean curve (and
    each seed's) to reach random's mean HV, computed epoch by epoch; the mean and std HV curves at
    ``curve_epochs``; and per-seed counts: trials, complete, pruned, failed, rejected, front size,
    and ``stopped_at_rung`` (pruned trials by the last rung they reached, rungs at
    grace * eta**k epochs; a trial the budget's end cut off counts too). The full runs are not kept.
    """
    methods = list(config["methods"])
    budget, reference = config["budget_epochs"], config["reference_point"]
    summary = summarise(runs, methods, budget)
    macs_summary = summarise(runs, methods, budget, key="macs_curve")
    grid = curve_epochs(budget, points)
    grace, eta = config["grace_period"], config["reduction_factor"]
    # rungs as far as any trial trained (the last ones hold trials that ran to the end)
    rungs = 1 + max((rung_of(t["epochs"], grace, eta, 64) for r in runs for t in r["trial_records"]), default=0)

    def r5(values: Any) -> Any:
        return None if values is None else ([r5(v) for v in values] if isinstance(values, list) else round(float(values), 5))

    out: dict[str, Any] = {}
    for m in methods:
        s, sm = summary["methods"][m], macs_summary["methods"][m]
        mine = sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
        stopped = []
        for r in mine:
            counts = [0] * rungs
            for t in r["trial_records"]:
                if t["status"] == "pruned":
                    counts[rung_of(t["epochs"], grace, eta, rungs)] += 1
            stopped.append(counts)
        out[m] = {
            "hv_mean": r5(s["hv_mean"]), "hv_std": r5(s["hv_std"]), "hv_per_seed": r5(s["hv_per_seed"]),
            "hv_own_phase_per_seed": r5([r.get("hv_own_phase", r["hv_budget"]) for r in mine]),
            "paired_delta_vs_random": r5(s["paired_delta_vs_random"]),
            "epochs_to_random_hv": s["epochs_to_random_hv"], "epochs_to_random_hv_per_seed": s["epochs_to_random_hv_per_seed"],
            "hv_macs_mean": r5(sm["hv_mean"]), "hv_macs_std": r5(sm["hv_std"]), "hv_macs_per_seed": r5(sm["hv_per_seed"]),
            "mean_curve": r5([s["mean_curve"][c] for c in grid]), "std_curve": r5([s["std_curve"][c] for c in grid]),
            "macs_mean_curve": r5([sm["mean_curve"][c] for c in grid]), "macs_std_curve": r5([sm["std_curve"][c] for c in grid]),
            "per_seed": {
                "seed": [r["seed"] for r in mine],
                **{k: [r[k] for r in mine] for k in ("trials", "complete", "pruned", "failed", "rejected", "front",
                                                     "epochs_spent", "wall_s")},
                "latency_ms_max": r5([r["latency_ms_max"] for r in mine]),
                "stopped_at_rung": stopped,
            },
        }
    random_front: dict[str, Any] = {}
    if "random" in methods:
        objectives = dict(zip(reference, ("max", "min", "min")))  # val_acc, latency_ms, params
        mine = sorted((r for r in runs if r["method"] == "random"), key=lambda r: r["seed"])
        random_front = {"students": [r["front"] for r in mine], "epochs": [front_epochs(r, objectives) for r in mine]}
    verdict: dict[str, Any] = {}
    if {"random", "nsga2+asha", "nsga2+pasha"} <= set(methods):
        s = summary["methods"]
        to_random = s["nsga2+pasha"]["epochs_to_random_hv"]
        verdict = {
            "pasha_ge_asha": s["nsga2+pasha"]["hv_mean"] >= s["nsga2+asha"]["hv_mean"],
            "pasha_ge_random": s["nsga2+pasha"]["hv_mean"] >= s["random"]["hv_mean"],
            "pasha_reaches_random_in_half": to_random is not None and to_random <= budget / 2,
        }
    return {"benchmark": "search_quality", "form": "summary", "config": config, "elapsed_s": round(elapsed, 1),
            "target": r5(summary["target"]), "macs_target": r5(macs_summary["target"]), "curve_epochs": grid,
            "methods": out, "random_front": random_front, "verdict": verdict}


def report(doc: dict[str, Any], out: Path, tag: str, runs: list[dict[str, Any]] | None = None) -> None:
    """The table, the claim, the plot and the summary JSON (and the full runs, when given, as ``TAG.runs.json``);
    the last line printed is one JSON object."""
    config, summary, target = doc["config"], doc["methods"], doc["target"]
    methods, budget, seeds = list(summary), config["budget_epochs"], config["seeds"]
    say("")
    say(f"hypervolume at {budget} epochs (fraction of the reference box), mean ± std over {seeds} seeds"
        + (f"; paired difference to random of the same seed; compute for the mean curve to reach random's mean HV "
           f"({target:.4f}), and how many seeds' own curves reach it" if target is not None else ""))
    header = (f"{'method':<12} {'HV':>17} {'HV own phase':>13} {'HV (MACs)':>17} {'HV - random':>17} "
              f"{'epochs to random HV':>20} {'seeds':>6} {'trials':>7} {'wall s':>7}")
    say(header)
    say("-" * len(header))
    for m in methods:
        s, per_seed = summary[m], summary[m]["per_seed"]
        reached = f"{sum(x is not None for x in s['epochs_to_random_hv_per_seed'])}/{len(per_seed['seed'])}"
        delta = s["paired_delta_vs_random"]
        delta_text = (f"{statistics.mean(delta):+8.4f} ± {statistics.stdev(delta) if len(delta) > 1 else 0.0:<6.4f}"
                      if delta else "-")
        own = statistics.mean(s["hv_own_phase_per_seed"])
        say(f"{m:<12} {s['hv_mean']:>8.4f} ± {s['hv_std']:<6.4f} {own:>13.4f} {s['hv_macs_mean']:>8.4f} ± "
            f"{s['hv_macs_std']:<6.4f} {delta_text:>17} {fmt_epochs(s['epochs_to_random_hv'], budget):>20} "
            f"{reached:>6} {statistics.mean(per_seed['trials']):>7.1f} "
            f"{statistics.mean(per_seed['wall_s']):>7.0f}")
    random_front = doc["random_front"]
    if random_front:
        say(f"random's final fronts: {statistics.mean(random_front['students']):.1f} students whose own training took "
            f"{statistics.mean(random_front['epochs']):.0f} epochs on average {random_front['epochs']}: a method drawing "
            f"the same configurations cannot rebuild such a front with less compute")
    verdict = doc["verdict"]
    if verdict:
        say("")
        say("claim: pareto-asha mean HV >= ASHA's: {pasha_ge_asha}; >= random's: {pasha_ge_random}; "
            "reaches random's final HV within half the budget: {pasha_reaches_random_in_half}".format(**verdict))

    out.mkdir(parents=True, exist_ok=True)
    png, js = out / f"{tag}.png", out / f"{tag}.json"
    plot(doc, png)
    js.write_text(json.dumps(doc, indent=1) + "\n")
    written = f"plot {png}; summary {js}"
    if runs is not None:
        full = out / f"{tag}.runs.json"
        full.write_text(json.dumps({"benchmark": "search_quality", "form": "runs", "config": config,
                                    "elapsed_s": doc["elapsed_s"], "runs": runs}))
        written += f"; every run in full {full}"
    say(f"{written}; {doc['elapsed_s'] / 60:.1f} min")
    print(json.dumps({
        "benchmark": "search_quality", "seeds": seeds, "budget_epochs": budget, "epochs": config["epochs"],
        "grace_period": config["grace_period"], "reduction_factor": config["reduction_factor"],
        "elapsed_s": doc["elapsed_s"], "reference_point": config["reference_point"], "random_hv_target": target,
        "methods": {m: {"hv_mean": s["hv_mean"], "hv_std": s["hv_std"], "hv_macs_mean": s["hv_macs_mean"],
                        "paired_delta_vs_random": s["paired_delta_vs_random"],
                        "epochs_to_random_hv": s["epochs_to_random_hv"]} for m, s in summary.items()},
        "random_front_epochs": random_front.get("epochs"), "verdict": verdict, "png": str(png), "json": str(js),
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, budget 16, 2 distil epochs: a check, not a result")
    parser.add_argument("--seeds", type=int, help="seeds per method (default: 3; --quick 1)")
    parser.add_argument("--budget", type=int, help="training epochs per search, all trials together (default: 480; --quick 16)")
    parser.add_argument("--epochs", type=int, help="distillation epochs per trial (default: the space's 8; --quick 2)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    grace = Fraction(DRIVER_GRACE).limit_denominator(100)
    parser.add_argument("--grace-period", type=float, help=f"ASHA / pareto-asha grace period in epochs (default: the driver's, {grace})")
    parser.add_argument("--reduction-factor", type=int,
                        help=f"ASHA / pareto-asha eta (default: the driver's, {DRIVER_ETA})")
    parser.add_argument("--max-concurrent", type=int, default=2, help="trials at a time")
    parser.add_argument("--num-samples", type=int, help="trial cap (default: enough that the budget ends every search)")
    parser.add_argument("--ref-latency-ms", type=float, default=1.0, help="reference point's latency_ms")
    parser.add_argument("--out", help="folder for TAG.json (summary), TAG.png and TAG.runs.json (every run in full) "
                        "(default: benchmarks/out/, ignored by git)")
    parser.add_argument("--tag", help="file name stem of the outputs (default: search_quality; --quick search_quality_quick; "
                        "--from-json: that file's stem)")
    parser.add_argument("--from-json", help="no searches: print, plot and write into --out again from a JSON this script "
                        "wrote (a summary, or TAG.runs.json / an old full file, which is summarised again)")
    parser.add_argument("--remeasure", metavar="FOLDER", help="with --from-json of full runs: a copy of that run's temporary "
                        "folder (mlflow.db, artifacts/, digits-ref.yaml) whose students to measure side by side again")
    args = parser.parse_args()
    args.out = args.out or str(DEFAULT_OUT)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        tag = args.tag or Path(args.from_json).name.removesuffix(".json").removesuffix(".runs")
        if "runs" not in saved:  # a summary: print and plot it again
            if args.remeasure:
                parser.error("--remeasure needs the full runs (TAG.runs.json), not a summary")
            report(saved, Path(args.out), tag)
            return
        if args.remeasure:
            folder = Path(args.remeasure)
            remeasure_side_by_side(saved["runs"], saved["config"]["budget_epochs"], f"sqlite:///{folder / 'mlflow.db'}",
                                   folder / "artifacts", str(folder / "digits-ref.yaml"), saved["config"]["reference_point"])
        report(summary_doc(saved["runs"], saved["config"], saved["elapsed_s"]), Path(args.out), tag, saved["runs"])
        return
    args.tag = args.tag or ("search_quality_quick" if args.quick else "search_quality")
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.budget = args.budget or (16 if args.quick else 480)
    args.epochs = args.epochs or (2 if args.quick else None)
    args.grace_period = args.grace_period or DRIVER_GRACE
    args.reduction_factor = args.reduction_factor or DRIVER_ETA
    # a stopped trial has trained at least grace_period epochs: this many trials cannot run out first
    args.num_samples = args.num_samples or math.ceil(args.budget / args.grace_period) + 2 * args.max_concurrent
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; pick from {list(METHODS)}")

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("ray").setLevel(logging.ERROR)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="kdsearch-quality-"))
    try:
        from kdsearch.search.tracking import client
        from kdsearch.trainers.trial import prepare

        tracking_uri = f"sqlite:///{tmp}/mlflow.db"
        mlflow_client = client(tracking_uri)
        mlflow_client.create_experiment(EXPERIMENT, artifact_location=(tmp / "artifacts").as_uri())
        space_path, reference = write_space(tmp, args.ref_latency_ms)
        with contextlib.redirect_stdout(io.StringIO()):
            context = prepare(load_space(space_path))
        teacher = context.targets.footprint
        macs_reference = {"val_acc": 0.0, "macs": float(teacher["macs"]), "params": reference["params"]}
        say(f"search quality: {', '.join(methods)} x {args.seeds} seeds, budget {args.budget} epochs per search, "
            f"distil epochs {args.epochs or 'space default'}, grace {args.grace_period}, eta {args.reduction_factor}, "
            f"num_samples {args.num_samples}, {args.max_concurrent} at a time")
        say(f"reference point {reference} (teacher latency now {teacher['latency_ms']:.3f} ms); "
            f"MACs check: macs {teacher['macs']:,.0f} (the teacher's)")
        runs = []
        total = len(methods) * args.seeds
        for seed in range(args.seeds):  # seed-major: machine load drifts over the whole benchmark alike
            for method in methods:
                say(f"[{len(runs) + 1:>2}/{total}] {method} seed {seed} ...")
                run = one_search(method, seed, args, space_path, reference, macs_reference, tmp, tracking_uri)
                runs.append(run)
                say(f"        HV {run['hv_budget']:.4f} at {args.budget} epochs (MACs HV {run['hv_macs_budget']:.4f}); "
                    f"{run['epochs_spent']} epochs spent, {run['trials']} trials: {run['complete']} complete, "
                    f"{run['pruned']} pruned, {run['failed']} failed, {run['rejected']} rejected; front {run['front']}; "
                    f"{run['wall_s']:.0f} s")
        remeasure_side_by_side(runs, args.budget, tracking_uri, tmp / "artifacts", space_path, reference, context)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    config = {"quick": args.quick, "seeds": args.seeds, "budget_epochs": args.budget, "epochs": args.epochs,
              "methods": {m: METHODS[m] for m in methods}, "grace_period": args.grace_period,
              "reduction_factor": args.reduction_factor, "max_concurrent": args.max_concurrent,
              "num_samples": args.num_samples,
              "reference_point": reference, "macs_reference_point": macs_reference}
    report(summary_doc(runs, config, time.perf_counter() - started), Path(args.out), args.tag, runs)


if __name__ == "__main__":
    main()
