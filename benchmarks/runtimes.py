"""Does the runtime change the front? The same students timed in PyTorch eager and in ONNX Runtime.

``--students`` configurations (30) are sampled from the built-in digits space
(``spaces/digits.yaml``) with a fixed seed: family, architecture, prune ratio and
``compress.quantize`` as a search would sample them. Each is trained briefly by ``run_trial``
(``--epochs``, no post-pruning fine-tune: latency does not depend on the weights) with
``measure.runtime: onnxruntime``, which leaves the trial's two files: ``student.onnx`` (what
the trial shipped and measured: the standardisation inside, ONNX Runtime's static QDQ int8
where ``static_int8`` was sampled) and ``student.pt`` (the float checkpoint). The torch side is
that checkpoint deployed by the ``torch`` runtime, quantized by torch.ao where ``static_int8``
was sampled: what ``measure.runtime: torch`` would have shipped.

Both files are then timed side by side with the one protocol of ``kdsearch.trainers.measure``
(one thread, warm-up, median of 50 runs at ``--batch-size``), in ``--rounds`` rounds, a
shuffled order each round, so machine load hits both runtimes alike; a student's figure is the
median over rounds. Reported: the Spearman rank correlation of the two latencies over the
students (does the runtime reorder them?), the speed ratio torch / onnxruntime (median, min,
max), and each runtime's validation accuracy of its own file.

    nice -n 10 python benchmarks/runtimes.py              # 30 students (writes benchmarks/out/runtimes.json)
    python benchmarks/runtimes.py --quick                 # 6 students, 2 rounds: a check

The last stdout line is one JSON object: the summary (``--out`` holds the per-student rows too).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def benchmark_space(epochs: int) -> Any:
    """The built-in digits space, trained ``epochs`` with no post-pruning fine-tune, measured in onnxruntime."""
    from kdsearch.spaces import DEFAULT_SPACE, parse_space

    raw = yaml.safe_load(DEFAULT_SPACE.read_text())
    raw["train"]["epochs"] = epochs
    raw["compress"]["finetune_epochs"] = 0
    raw["measure"] = {"runtime": "onnxruntime", "batch_size": 1}
    return parse_space(raw, text=yaml.safe_dump(raw, sort_keys=False))


def build_students(space: Any, count: int, seed: int, folder: Path, batch_size: int) -> list[dict[str, Any]]:
    """Train ``count`` sampled students; each entry holds both runtimes' loaded files."""
    from kdsearch.spaces import RandomSuggester
    from kdsearch.trainers.checkpoint import load_student
    from kdsearch.trainers.data import batches
    from kdsearch.trainers.runtimes import get_runtime
    from kdsearch.trainers.trial import expected_footprint, prepare, run_trial

    context = prepare(space)
    data = context.data
    ort, eager = get_runtime("onnxruntime"), get_runtime("torch")
    suggester = RandomSuggester(seed)
    students = []
    max_params = space.constraints.get("max_params", float("inf"))
    for i in range(count):
        params = space.sample(suggester)
        config = space.resolve(params)
        while expected_footprint(space, config, data.input_shape, data.num_classes)["params"] > max_params:
            params = space.sample(suggester)  # a search rejects these before launch: so does this benchmark
            config = space.resolve(params)
        trial_dir = folder / f"s{i:02d}"
        result = run_trial(space, params, context=context, seed=seed, artifact_dir=trial_dir)
        checkpoint, _ = load_student(trial_dir / "student.pt",
                                     lambda: space.build_student(config, data.input_shape, data.num_classes))
        calib = [x for _, (_, x, _) in zip(range(config.compress.calib_batches),
                                           batches(data.train, config.train.batch_size, shuffle=True, seed=seed))]
        shipped = {"onnxruntime": ort.load(trial_dir / ort.artifact),
                   "torch": eager.deploy(checkpoint, config.compress.quantize, calib, data, trial_dir / "torch")}
        row = {"student": i, "family": config.family, "knobs": config.student,
               "prune_ratio": config.compress.prune_ratio, "quantize": config.compress.quantize,
               "params": result["params"], "macs": result["macs"],
               "val_acc": {"onnxruntime": result["val_acc"], "torch": eager.accuracy(shipped["torch"], data)},
               "size_bytes": {name: d.size_bytes for name, d in shipped.items()},
               "latency_ms_trial": result["latency_ms"]}
        students.append({"row": row, "deployed": shipped,
                         "example": {"onnxruntime": ort.example(data), "torch": eager.example(data)}})
        say(f"  [{i + 1:>2}/{count}] {config.family:<9} prune {config.compress.prune_ratio:<3} "
            f"{config.compress.quantize:<11} params {result['params']:>6,}  val_acc ort {row['val_acc']['onnxruntime']:.3f} "
            f"torch {row['val_acc']['torch']:.3f}")
    return students


def measure_side_by_side(students: list[dict[str, Any]], rounds: int, batch_size: int) -> None:
    """Each student's latency in both runtimes, ``rounds`` times, a shuffled order each round; medians kept."""
    jobs = [(s, name) for s in students for name in ("onnxruntime", "torch")]
    times: dict[tuple[int, str], list[float]] = {}
    for r in range(rounds):
        random.Random(r).shuffle(jobs)
        for student, name in jobs:
            deployed = student["deployed"][name]
            latency = deployed.runtime.latency(deployed, student["example"][name], batch_size)
            times.setdefault((student["row"]["student"], name), []).append(latency.median_ms)
            student["row"].setdefault("latency_threads", {})[name] = latency.threads
    for student in students:
        i = student["row"]["student"]
        student["row"]["latency_ms"] = {name: statistics.median(times[(i, name)]) for name in ("onnxruntime", "torch")}
        student["row"]["speed_ratio"] = student["row"]["latency_ms"]["torch"] / student["row"]["latency_ms"]["onnxruntime"]


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from scipy.stats import spearmanr

    ort = [r["latency_ms"]["onnxruntime"] for r in rows]
    eager = [r["latency_ms"]["torch"] for r in rows]
    ratios = [r["speed_ratio"] for r in rows]
    by_quantize = {q: round(statistics.median(r["speed_ratio"] for r in rows if r["quantize"] == q), 2)
                   for q in sorted({r["quantize"] for r in rows})}
    return {
        "students": len(rows),
        "spearman_latency": round(float(spearmanr(ort, eager).statistic), 3),
        "speed_ratio_torch_over_ort": {"median": round(statistics.median(ratios), 2), "min": round(min(ratios), 2),
                                       "max": round(max(ratios), 2), "median_by_quantize": by_quantize},
        "latency_ms_median": {"onnxruntime": round(statistics.median(ort), 4), "torch": round(statistics.median(eager), 4)},
        "val_acc_mean": {name: round(statistics.mean(r["val_acc"][name] for r in rows), 4)
                         for name in ("onnxruntime", "torch")},
        "size_bytes_median": {name: statistics.median(r["size_bytes"][name] for r in rows) for name in ("onnxruntime", "torch")},
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    say(f"{'#':>3} {'family':<9} {'prune':>5} {'quantize':<11} {'params':>7} {'torch ms':>9} {'ort ms':>8} {'ratio':>6}")
    for r in sorted(rows, key=lambda r: r["latency_ms"]["torch"]):
        say(f"{r['student']:>3} {r['family']:<9} {r['prune_ratio']:>5} {r['quantize']:<11} {r['params']:>7,} "
            f"{r['latency_ms']['torch']:>9.4f} {r['latency_ms']['onnxruntime']:>8.4f} {r['speed_ratio']:>6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 students, 2 rounds: a check, not a result")
    parser.add_argument("--students", type=int, default=30, help="students sampled from the digits space")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's and the training's seed")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs of each student")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved measuring rounds (median kept)")
    parser.add_argument("--batch-size", type=int, default=1, help="inputs per timed call (measure.batch_size)")
    parser.add_argument("--out", default=str(OUT / "runtimes.json"), help="where the JSON goes")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    count, rounds = (6, 2) if args.quick else (args.students, args.rounds)
    started = time.perf_counter()
    space = benchmark_space(args.epochs)
    say(f"training {count} students sampled from the digits space (seed {args.seed}, {args.epochs} epoch each)...")
    with tempfile.TemporaryDirectory(prefix="kdsearch-runtimes-") as tmp:
        students = build_students(space, count, args.seed, Path(tmp), args.batch_size)
        say(f"measuring both runtimes side by side, {rounds} rounds...")
        measure_side_by_side(students, rounds, args.batch_size)
    rows = [s["row"] for s in students]
    print_table(rows)
    from kdsearch.trainers.measure import device_name

    summary = {**summarise(rows), "batch_size": args.batch_size, "rounds": rounds, "epochs": args.epochs,
               "seed": args.seed, "quick": bool(args.quick), "device": device_name(),
               "seconds": round(time.perf_counter() - started, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "students": rows}, indent=1, default=str))
    say(f"wrote {out}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
