"""Does distillation pay? Each method against the same student trained on labels alone.

For each dataset (digits, mnist) and three fixed students (tiny, small, mid), plus a one-hidden-layer
MLP reported beside them (distillation does not help it here: see benchmarks/README.md), every run
trains the student with the same epochs and the same augmentation; only the loss differs:

- ``labels_only``: ``distill.method: none`` (cross-entropy on the labels, the baseline);
- each method (``kd``, ``dkd``, ``mlkd``, and ``kd`` / ``dkd`` with logit standardisation) over a
  small fixed grid of its knobs, with consistent (online) teaching on the augmented batch.

Seeds are paired: seed s gives labels-only and every method the same initialisation and batch
order. The data is split three ways: train, val (picks each method's grid point by mean val
accuracy over the seeds) and test (what is reported, never looked at for a choice). ``gain_pt`` is
test accuracy points over labels-only, ``ci95`` the paired t interval of the per-seed gains.

Then two 20-trial searches of the digits space with the same sampler seed and no early stopping,
one with ``teacher_views: online`` and one with ``teacher_views: 8``: their best accuracy and the
teacher forward passes each made (samples x teachers).

    python benchmarks/kd_gain.py                 # the full run (writes benchmarks/out/kd_gain.json)
    python benchmarks/kd_gain.py --quick         # digits, one student, 2 seeds, one grid point: a check
    # side by side on 2 cores, as committed: one process per dataset, then --merge
    python benchmarks/kd_gain.py --datasets digits --out benchmarks/out/kd_gain_digits.json &
    python benchmarks/kd_gain.py --datasets mnist --grid-points 1 --view-trials 0 --out benchmarks/out/kd_gain_mnist.json
    python benchmarks/kd_gain.py --merge benchmarks/out/kd_gain_digits.json benchmarks/out/kd_gain_mnist.json \
        --out benchmarks/results/kd_gain.json

The last stdout line is one JSON object (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"

#: per dataset: the teacher, the shared training recipe and the three fixed students
DATASETS: dict[str, dict[str, Any]] = {
    "digits": {
        "data": {"source": "digits", "val_fraction": 0.4, "seed": 0},
        "teacher": {"family": "cnn", "config": {"stages": 3, "channels": 32}, "epochs": 15},
        "train": {"epochs": 40, "lr": 0.005, "batch_size": 64, "augment": {"noise_std": 0.3, "mixup_alpha": 0.2}},
        "students": {
            "tiny": {"cnn": {"stages": 1, "channels": 8}},
            "small": {"cnn": {"stages": 2, "channels": 4}},
            "mid": {"mobilenet": {"stages": 2, "depth": 1, "expansion": 2, "channels": 8}},
            "mlp": {"mlp": {"depth": 1, "width": 8}},  # the tiny student until 2026-12: reported, outside the bar
        },
    },
    "mnist": {
        "data": {"source": "mnist", "val_fraction": 0.4, "seed": 0},
        "teacher": {"family": "cnn", "config": {"stages": 3, "channels": 32}, "epochs": 15},
        # 8 stored views: the teacher's pass over 28x28 views is paid once, not every epoch
        "distill": {"teacher_views": 8},
        "train": {"epochs": 15, "lr": 0.005, "batch_size": 64, "augment": {"crop_padding": 2}},
        "students": {
            "tiny": {"cnn": {"stages": 1, "channels": 8}},
            "small": {"cnn": {"stages": 3, "channels": 8}},
            "mid": {"mobilenet": {"stages": 3, "depth": 1, "expansion": 2, "channels": 8}},
            "mlp": {"mlp": {"depth": 1, "width": 16}},  # the tiny student until 2026-12: reported, outside the bar
        },
    },
}

#: method -> its grid (distill knobs); every point runs every seed
METHODS: dict[str, list[dict[str, Any]]] = {
    "kd": [{"method": "kd", "temperature": t, "alpha": 0.9} for t in (2.0, 4.0)],
    "dkd": [{"method": "dkd", "temperature": 4.0, "alpha": 0.9, "dkd_beta": b} for b in (1.0, 4.0)],
    "mlkd": [{"method": "mlkd", "temperature": 4.0, "alpha": 0.9}],
    "kd+ls": [{"method": "kd", "logit_standardize": True, "temperature": t, "alpha": 0.9} for t in (2.0, 4.0)],
    "dkd+ls": [{"method": "dkd", "logit_standardize": True, "temperature": 2.0, "alpha": 0.9, "dkd_beta": 1.0}],
}
LABELS_ONLY = {"method": "none"}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def student_space(dataset: dict[str, Any], student: dict[str, Any], distill: dict[str, Any]) -> Any:
    import kdsearch

    return kdsearch.load_space({"name": "kd-gain", "data": dataset["data"], "teacher": dataset["teacher"],
                                "students": student, "distill": {**dataset.get("distill", {}), **distill},
                                "train": dataset["train"]})


def prepare_dataset(name: str) -> tuple[Any, Any, Any, float]:
    """The context (train and val) with its teacher, the held-out test split, and the teacher's test accuracy."""
    from kdsearch.trainers.data import TensorData, load_data
    from kdsearch.trainers.measure import accuracy
    from kdsearch.trainers.teachers import compute_targets, load_teacher
    from kdsearch.trainers.trial import TrialContext

    dataset = DATASETS[name]
    space = student_space(dataset, {"mlp": {}}, LABELS_ONLY)
    data = load_data(space.data)
    half = len(data.val) // 2
    x, y = data.val.x, data.val.y
    test, data.val = TensorData(x[half:], y[half:]), TensorData(x[:half], y[:half])
    teacher = load_teacher(space.teacher, data)  # trained on the train split only
    targets = compute_targets(teacher, data, False, str(space.teacher.family))
    return TrialContext(data, [targets], view_seed=space.data.seed), test, space, accuracy(teacher, test)


def one_run(dataset: dict[str, Any], student: dict[str, Any], distill: dict[str, Any], context: Any, test: Any,
            seed: int) -> tuple[float, float]:
    """(val accuracy, test accuracy) of one student trained with ``distill`` and ``seed``."""
    from kdsearch.search.latency import load_trial_student
    from kdsearch.trainers.measure import accuracy
    from kdsearch.trainers.trial import run_trial

    space = student_space(dataset, student, distill)
    params = space.sample_random(0)  # every knob is fixed: the same student and recipe
    with tempfile.TemporaryDirectory() as tmp:
        result = run_trial(space, params, context=context, seed=seed, artifact_dir=tmp)
        model = load_trial_student(space, params, Path(tmp) / "student.pt", context.data.input_shape,
                                   context.data.num_classes)
    return float(result["val_acc"]), float(accuracy(model, test))


def paired(gains: list[float]) -> tuple[float, list[float]]:
    """Mean and paired 95% t interval of per-seed gains (in points)."""
    from scipy import stats

    values = np.asarray(gains, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, [mean, mean]
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, [mean - half, mean + half]


def gain_table(name: str, students: list[str], methods: dict[str, list[dict[str, Any]]], seeds: int) -> dict[str, Any]:
    from kdsearch.trainers.measure import count_params

    context, test, space, teacher_acc = prepare_dataset(name)
    dataset = DATASETS[name]
    say(f"{name}: teacher test accuracy {teacher_acc:.4f}, {len(context.data.train)} train / {len(context.data.val)} val /"
        f" {len(test)} test")
    out: dict[str, Any] = {"teacher_acc": teacher_acc, "train": dataset["train"], "students": {}}
    for student_name in students:
        student = dataset["students"][student_name]
        probe = student_space(dataset, student, LABELS_ONLY)
        params = count_params(probe.build_student(probe.resolve(probe.sample_random(0)), context.data.input_shape,
                                                  context.data.num_classes))
        started = time.perf_counter()
        base = [one_run(dataset, student, LABELS_ONLY, context, test, seed) for seed in range(seeds)]
        base_test = [b[1] for b in base]
        row: dict[str, Any] = {"architecture": student, "params": params,
                               "labels_only": {"acc_mean": float(np.mean(base_test)), "acc_std": float(np.std(base_test)),
                                               "per_seed": base_test},
                               "methods": {}}
        for method, grid in methods.items():
            runs = [[one_run(dataset, student, point, context, test, seed) for seed in range(seeds)] for point in grid]
            chosen = max(range(len(grid)), key=lambda i: np.mean([r[0] for r in runs[i]]))  # on val, never test
            tests = [r[1] for r in runs[chosen]]
            gain, ci = paired([(t - b) * 100 for t, b in zip(tests, base_test)])
            row["methods"][method] = {"acc_mean": float(np.mean(tests)), "acc_std": float(np.std(tests)), "gain_pt": gain,
                                      "ci95": ci, "knobs": grid[chosen], "per_seed": tests}
            say(f"  {name} {student_name:<5} {method:<7} test {np.mean(tests):.4f} vs labels {np.mean(base_test):.4f}: "
                f"{gain:+.2f} pt [{ci[0]:+.2f}, {ci[1]:+.2f}]")
        best = max(row["methods"], key=lambda m: row["methods"][m]["gain_pt"])
        row["best"] = {"method": best, **{k: row["methods"][best][k] for k in ("acc_mean", "gain_pt", "ci95")}}
        row["seconds"] = round(time.perf_counter() - started, 1)
        out["students"][student_name] = row
    return out


def views_searches(trials: int, tmp: Path) -> dict[str, Any]:
    """Two searches of the same 20 students: teachers online on every batch, or 8 stored views."""
    import kdsearch

    base = kdsearch.load_space()
    raw = yaml_of(base)
    raw["train"]["augment"] = {"noise_std": 0.3, "mixup_alpha": 0.2}
    raw["distill"]["hint_stages"] = "none"  # stage outputs are never stored: hints would run the teacher either way
    out = {}
    for label, views in (("online", "online"), ("shared", 8)):
        raw["distill"]["teacher_views"] = views
        result = kdsearch.run_search(kdsearch.load_space(raw), num_samples=trials, scheduler="none", seed=0,
                                     tracking_uri=f"sqlite:///{tmp}/views-{label}.db", log_models=False)
        complete = result.trials[result.trials.status == "complete"]
        out[label] = {"best_acc": float(complete.val_acc.max()), "teacher_passes": int(result.teacher_passes),
                      "trials": int(len(complete))}
        if views != "online":
            out[label]["k"] = views
        say(f"views {label}: best val_acc {out[label]['best_acc']:.4f}, {out[label]['teacher_passes']:,} teacher passes")
    return out


def yaml_of(space: Any) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(space.text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="digits, the tiny student, 2 seeds, one grid point per method, 3-trial views searches")
    parser.add_argument("--seeds", type=int, default=5, help="paired seeds per configuration")
    parser.add_argument("--datasets", default="digits,mnist", help="comma-separated (none: only the views searches)")
    parser.add_argument("--students", default="tiny,small,mid,mlp", help="comma-separated")
    parser.add_argument("--grid-points", type=int, default=0, help="grid points per method (0: all)")
    parser.add_argument("--view-trials", type=int, default=20, help="trials of each views search (0: skip them)")
    parser.add_argument("--out", default=str(OUT / "kd_gain.json"), help="where the JSON goes")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="only merge the JSON of runs made side by side (one per dataset) into --out")
    args = parser.parse_args()
    if args.merge:
        merged: dict[str, Any] = {"datasets": {}}
        for path in args.merge:
            part = json.loads(Path(path).read_text())
            merged["datasets"].update(part["datasets"])
            merged.update({k: v for k, v in part.items() if k not in ("datasets", "seconds")})
            merged["seconds"] = max(merged.get("seconds", 0), part.get("seconds", 0))
        Path(args.out).write_text(json.dumps(merged, indent=1))
        print(json.dumps(merged))
        return
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    datasets = [d for d in args.datasets.split(",") if d and d != "none"]  # none: only the views searches
    students, methods, seeds = args.students.split(","), METHODS, args.seeds
    if args.grid_points:
        methods = {m: grid[:args.grid_points] for m, grid in METHODS.items()}
    if args.quick:
        datasets, students, seeds = ["digits"], ["tiny"], 2
        methods = {m: grid[:1] for m, grid in METHODS.items()}
    started = time.perf_counter()
    report: dict[str, Any] = {"datasets": {name: gain_table(name, students, methods, seeds) for name in datasets}}
    view_trials = min(args.view_trials, 3) if args.quick else args.view_trials
    if view_trials:
        with tempfile.TemporaryDirectory() as tmp:
            report["views"] = views_searches(view_trials, Path(tmp))
    report.update({"seeds": seeds, "quick": bool(args.quick), "seconds": round(time.perf_counter() - started, 1)})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    say(f"wrote {out}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
