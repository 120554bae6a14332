"""What a search costs over what its trials cost: ``search_over_ideal`` on the digits demo.

Runs the search ``make demo`` runs (``kdsearch run --num-samples 24``: the built-in digits space,
every other option at its default) in a fresh process in a temporary folder, and reports

- ``wall_s``: the command's wall time, process start to exit (imports, teacher phase, store,
  Ray, trials, quiet-phase latency, front artifacts and models, the printed front);
- ``sum_trial_s``: the sum over every trial that ran (complete, pruned or failed) of Tune's
  ``time_total_s``, the time its trainable ran; ``sum_train_seconds_complete``: the trials' own
  ``train_seconds`` (complete trials only report it), for comparison;
- ``concurrency``: trials at a time (``--max-concurrent``, at most the CPUs over ``--cpus-per-trial``);
- ``search_over_ideal = wall_s / (sum_trial_s / concurrency)``: 1.0 is a search that costs
  exactly what its trials cost;
- ``fixed_s``: the wall time outside the trials phase (first trial start to last trial end), and
  ``trials_over_ideal``: that phase over the ideal (what the loop itself costs: gaps between
  trials, the sampler's suggestions, the tail where one trial runs alone);
- ``phases``: where the rest goes, in seconds, from the search's own log lines: ``startup``
  (process start to the teacher phase: Python, imports, the space's probes), ``prepare`` (data
  and teacher phase), ``store``
  (MLflow store and parent run), ``ray_start`` (Ray's start-up, in the background) and
  ``ray_wait`` (what the driver waited for it after the store; both None before Ray started in the background),
  ``to_first_trial`` (process start to the first trial's start), ``trials`` (first trial start
  to last trial end), ``finalize`` (quiet-phase latency, front, artifacts, models) and ``after``
  (last trial end to exit: finalize, Ray shutdown, printing the front).

The teacher is prepared once first (in its own process) so a cold cache does not count as the
search's cost: ``make demo`` trains it once, then every search reuses it.

    python benchmarks/search_wall.py           # the demo: 24 trials (a few minutes on 2 cores)
    python benchmarks/search_wall.py --quick   # 8 trials

Another benchmark imports :func:`measure_search_over_ideal` (with ``benchmarks/`` on
``sys.path``). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
DEMO_SAMPLES, QUICK_SAMPLES = 24, 8  # the Makefile's `kdsearch run --num-samples 24`; --quick
#: log lines that mark the phases (the kdsearch logger's own messages)
MARKS = {
    "prepare_start": r"^preparing data and teacher",
    "prepare_end": r"^teacher .*: val_acc",
    "store_end": r"^search \S+: \d+ trials",
    "finalize_start": r"^(measuring latency of|Pareto front)",
    "finalize_end": r"^Pareto front",
}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the child: one search


def child(folder: str, argv: list[str]) -> int:
    """``kdsearch run ARGS`` in ``folder``, its log lines stamped with their time (epoch seconds)."""
    import logging

    os.chdir(folder)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("@%(created).3f %(message)s"))
    logging.getLogger().addHandler(handler)  # cli's basicConfig then leaves the root alone
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("kdsearch").setLevel(logging.DEBUG)  # the driver's timing lines are DEBUG
    from kdsearch.search.cli import main

    return main(argv)


def warm_teacher() -> None:
    """Prepare the digits space once in its own process: the teacher and its stores are cached."""
    code = "from kdsearch.spaces import load_space; from kdsearch.trainers.trial import prepare; prepare(load_space())"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


class Lines:
    """A child's stderr lines with the time each was logged (the stamp) or read (no stamp)."""

    def __init__(self, stream) -> None:
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for raw in stream:
            m = re.match(r"@(\d+\.\d+) (.*)", raw.rstrip("\n"))
            self.lines.append((float(m.group(1)), m.group(2)) if m else (time.time(), raw.rstrip("\n")))

    def join(self) -> None:
        self._thread.join(timeout=30)

    def first(self, pattern: str) -> Optional[float]:
        return next((t for t, line in self.lines if re.search(pattern, line)), None)

    def last(self, pattern: str) -> Optional[float]:
        return next((t for t, line in reversed(self.lines) if re.search(pattern, line)), None)

    def find(self, pattern: str) -> Optional[re.Match]:
        return next((m for _, line in self.lines if (m := re.search(pattern, line))), None)


def trial_times(tune_folder: str) -> list[dict[str, Any]]:
    """Every trial Tune ran, from its saved experiment state: status, ``time_total_s``, ``train_seconds``."""
    import logging

    from ray.tune import ExperimentAnalysis

    logging.getLogger("ray.tune").setLevel(logging.ERROR)  # the search keeps no result.json: Tune says so per trial
    analysis = ExperimentAnalysis(tune_folder)
    rows = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        if not last:
            continue  # created but never started
        rows.append({"trial_id": trial.trial_id, "status": trial.status, "time_total_s": float(last.get("time_total_s", 0.0)),
                     "train_seconds": last.get("train_seconds"), "epoch": last.get("epoch"),
                     "start_time": trial.run_metadata.start_time})
    return rows


def rel(t: Optional[float], t0: float) -> Optional[float]:
    return None if t is None else round(t - t0, 2)


def span(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else round(b - a, 2)


def defaults():
    from kdsearch.search.options import SearchOptions

    return SearchOptions()


def measure_search_over_ideal(quick: bool = False, num_samples: Optional[int] = None,
                              keep: Optional[str] = None) -> dict[str, Any]:
    """Run the digits demo search in a fresh process and a temporary folder (``keep``: this folder,
    kept); return wall time, trial time, concurrency, ``search_over_ideal`` and the phases."""
    samples = num_samples or (QUICK_SAMPLES if quick else DEMO_SAMPLES)
    argv = ["run", "--num-samples", str(samples)]
    say("warming the teacher cache...")
    warm_teacher()
    with tempfile.TemporaryDirectory(prefix="search-wall-") as tmp:
        folder = Path(keep) if keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        load_before = os.getloadavg()[0]
        say(f"kdsearch {' '.join(argv)} in {folder} ...")
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(folder), *argv], cwd=folder,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines = Lines(proc.stderr)
        rc = proc.wait()
        t_end = time.time()
        lines.join()
        if rc != 0:
            tail = "\n".join(line for _, line in lines.lines[-40:])
            raise RuntimeError(f"the search exited {rc}:\n{tail}")
        if keep:
            (folder / "search.log").write_text("".join(f"{t:.3f} {line}\n" for t, line in lines.lines))
        tune = lines.find(r"tune folder (\S+) \(resume with")
        trials = trial_times(tune.group(1)) if tune else []
        load_after = os.getloadavg()[0]
    wall = t_end - t0
    sum_trial = sum(t["time_total_s"] for t in trials)
    cpus = os.cpu_count() or 1
    concurrency = max(1, min(defaults().max_concurrent, int(cpus // defaults().cpus_per_trial)))
    ideal = sum_trial / concurrency
    marks = {name: lines.first(pattern) for name, pattern in MARKS.items()}
    last_trial_end = lines.last(r"^\[\s*\d+/\d+\] running")
    first_trial = min((t["start_time"] for t in trials if t["start_time"]), default=None)  # Tune's: set when RUNNING
    ray_ready = lines.find(r"^Ray: ready \(([\d.]+) s to start, waited ([\d.]+) s")
    complete = [t["train_seconds"] for t in trials if t["train_seconds"] is not None]
    return {
        "command": f"kdsearch {' '.join(argv)}",
        "num_samples": samples,
        "trials": len(trials),
        "wall_s": round(wall, 2),
        "sum_trial_s": round(sum_trial, 2),
        "trial_time": "Tune's time_total_s of every trial that ran",
        "sum_train_seconds_complete": round(sum(complete), 2),
        "complete": len(complete),
        "concurrency": concurrency,
        "ideal_s": round(ideal, 2),
        "search_over_ideal": round(wall / ideal, 3) if ideal > 0 else math.nan,
        "fixed_s": round(wall - span(first_trial, last_trial_end), 2) if first_trial and last_trial_end else None,
        "trials_over_ideal": round(span(first_trial, last_trial_end) / ideal, 3) if first_trial and last_trial_end and ideal else None,
        "latency_measured_in": ("trial" if lines.find(r"^latency: each trial times its own file") else
                                "measurer" if lines.find(r"^latency: one measurer") else "measurer (before the rule)"),
        "phases": {
            "startup": span(t0, marks["prepare_start"]),
            "prepare": span(marks["prepare_start"], marks["prepare_end"]),
            "store": span(marks["prepare_end"], marks["store_end"]),
            "ray_start": float(ray_ready.group(1)) if ray_ready else None,
            "ray_wait": float(ray_ready.group(2)) if ray_ready else None,
            "to_first_trial": rel(first_trial, t0),
            "trials": span(first_trial, last_trial_end),
            "finalize": span(marks["finalize_start"], marks["finalize_end"]),
            "after": span(last_trial_end, t_end),
        },
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "cpus": cpus,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SAMPLES} trials instead of the demo's {DEMO_SAMPLES}")
    parser.add_argument("--num-samples", type=int, help="trials (overrides --quick)")
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()
    report = measure_search_over_ideal(quick=args.quick, num_samples=args.num_samples, keep=args.keep)
    phases = "  ".join(f"{k} {v}" for k, v in report["phases"].items())
    say(f"wall {report['wall_s']} s, trials {report['sum_trial_s']} s over {report['trials']} trials at "
        f"{report['concurrency']} at a time (ideal {report['ideal_s']} s): search_over_ideal {report['search_over_ideal']}")
    say(f"phases (s): {phases}")
    print(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # the search itself: --child FOLDER ARGS...
        sys.exit(child(sys.argv[2], sys.argv[3:]))
    main()
