"""Students packed onto one GPU: trials per hour with 1, 2 and 4 students per GPU, on real trials.

CIFAR-shaped data is generated on the fly (50k 3x32x32 images in 10 classes, the generator of
``benchmarks/scale.py``) and the teacher is scale.py's (cnn, 3 stages, 64 channels, one epoch),
so the teacher phase here and scale.py's on a CPU time the same work. Then a fixed set of 16
students drawn with fixed seeds from the built-in space's families and knobs (its students,
distillation, augmentation and compression sections; shorter training) runs as kdsearch's own
trainable (``search.driver.distil_trainable``) through Ray Tune with the resources the driver
asks for (``{"cpu": --cpus-per-trial, "gpu": 1/k}``, what ``--gpus-per-trial 1/k`` gives), for
k = 1, 2 and 4 students per GPU; every trial gets the same CPUs in every run. Where the
untimed warm-up trial says 16 students a run would not fit in ``--budget-s`` (default 450 s),
every run takes the same first few of them instead (``configs_run``). It prints:

- ``trials_per_hour`` for each k (the 16 trials over Tune's wall time for them);
- ``util``: GPU utilisation and memory sampled through NVML every 0.2 s during each run;
- ``teacher_phase_s``: the teacher phase (training, the pass filling the store, validation) on
  the GPU, and on a CPU: this machine's CPUs with ``--cpu-teacher``, else the figure
  scale.py measured on the build machine's 2 cores (``benchmarks/results/scale.json``, its
  50k ``teacher_phase_s``), named in ``cpu_source``;
- ``accuracy``: each run's mean final accuracy of the 16 students, and the largest difference
  of one student's accuracy between runs (packing must not change what a trial learns).

    python benchmarks/gpu_packing.py --out benchmarks/results/gpu_packing.json   # on a GPU, under 8 minutes
    python benchmarks/gpu_packing.py --cpu-check    # the same code on a CPU, tiny: a rehearsal, no figures

The last stdout line is one JSON object:
``{"gpu": ..., "trials_per_hour": {"1": x, "2": y, "4": z}, "util": {...}, "teacher_phase_s": {"cuda": a, "cpu": b}, ...}``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import TEACHER, write_cifar_like  # noqa: E402  (the same data and teacher as scale.py)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def packing_space(path: Path, epochs: int, device: str) -> Any:
    """The built-in space's students, distillation, augmentation and compression on the generated data."""
    import kdsearch
    from kdsearch.spaces import DEFAULT_SPACE

    raw = yaml.safe_load(DEFAULT_SPACE.read_text())
    students = {name: knobs for name, knobs in raw["students"].items() if name != "mlp"}  # 3072 inputs: over max_params
    return kdsearch.load_space({
        "name": "gpu-packing", "data": {"source": "npz", "path": str(path), "val_fraction": 0.2},
        # hints at the last stage at most, as scale.py: the store holds the same stage outputs
        "teacher": {**TEACHER, "device": device}, "students": students,
        "distill": {**raw["distill"], "hint_stages": {"choice": ["none", "last"]}},
        "train": {**raw["train"], "epochs": epochs, "batch_size": 256},  # a GPU-sized batch
        "compress": {**raw["compress"], "finetune_epochs": 1},
        "measure": raw["measure"], "objectives": raw["objectives"], "constraints": raw["constraints"],
    })


def fixed_configs(space: Any, count: int, input_shape: tuple[int, ...], num_classes: int) -> list[dict[str, Any]]:
    """``count`` students drawn with seeds 0, 1, ... that pass the space's constraints (the same set every run)."""
    from kdsearch.spaces import SpaceError
    from kdsearch.trainers.trial import check_student_size

    configs, seed = [], 0
    while len(configs) < count:
        params = space.sample_random(seed)
        seed += 1
        try:
            check_student_size(space, space.resolve(params), input_shape, num_classes)
        except SpaceError:
            continue
        configs.append(params)
    return configs


class GpuSampler:
    """GPU utilisation and memory in use, sampled through NVML every ``period`` seconds in a thread."""

    def __init__(self, period: float = 0.2) -> None:
        self.period, self.util, self.memory = period, [], []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML (a CPU rehearsal)
            self._nvml = self._handle = None

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            self.util.append(rates.gpu)
            self.memory.append(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20)

    def __enter__(self) -> "GpuSampler":
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> Optional[dict[str, float]]:
        if not self.util:
            return None
        return {"mean_pct": round(statistics.fmean(self.util), 1), "median_pct": statistics.median(self.util),
                "max_memory_mb": round(max(self.memory)), "samples": len(self.util)}


def run_packing(space: Any, context_ref: Any, configs: list[dict[str, Any]], per_gpu: int, cpus: float,
                gpu: bool, storage: Path) -> dict[str, Any]:
    """The fixed students with ``per_gpu`` of them on one GPU (``gpu: False``: as many at once on the CPU)."""
    from ray import tune
    from ray.tune.search import Searcher

    from kdsearch.search.driver import distil_trainable

    class FixedConfigs(Searcher):
        """The same students, in the same order, every run (the driver's searcher gives flat configs the same way)."""

        def __init__(self) -> None:
            super().__init__()
            self.pending = [dict(c) for c in configs]

        def suggest(self, trial_id: str) -> Optional[dict[str, Any]]:
            return self.pending.pop(0) if self.pending else Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
            pass

    trainable = tune.with_resources(
        tune.with_parameters(distil_trainable, space=space, context=context_ref, measurer=None, seed=0, epochs=None),
        {"cpu": cpus, "gpu": 1.0 / per_gpu if gpu else 0},
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=FixedConfigs(), num_samples=len(configs),
                                    max_concurrent_trials=per_gpu, reuse_actors=True),
        run_config=tune.RunConfig(name=f"pack{per_gpu}", storage_path=str(storage), verbose=0),
    )
    with GpuSampler() as sampler:
        started = time.perf_counter()
        results = tuner.fit()
        wall = time.perf_counter() - started
    rows = {}
    for result in results:
        metrics = result.metrics or {}
        key = json.dumps({k: result.config[k] for k in sorted(result.config)}, default=str)
        rows[key] = {"val_acc": metrics.get("val_acc"), "train_seconds": metrics.get("train_seconds"),
                     "error": None if result.error is None else str(result.error)[:200]}
    done = [r for r in rows.values() if r["val_acc"] is not None and r["error"] is None]
    return {"wall_s": round(wall, 1), "trials": len(done), "failed": len(rows) - len(done),
            "trials_per_hour": round(len(done) / wall * 3600, 1),
            "mean_trial_s": round(statistics.fmean(r["train_seconds"] for r in done), 2) if done else None,
            "mean_acc": round(statistics.fmean(r["val_acc"] for r in done), 4) if done else None,
            "util": sampler.summary(), "rows": rows}


def build_view_stores(space: Any, context: Any, configs: list[dict[str, Any]], device: str) -> float:
    """The stored views the students ask for, built once before any timed run (a search builds each
    once for all its trials): otherwise the first run would pay for them and the later ones not."""
    from kdsearch.trainers.teaching import Teaching

    started = time.perf_counter()
    for params in configs:
        Teaching(context, space.resolve(params), device, 0)
    return time.perf_counter() - started


def teacher_phase(space: Any, cache: Path) -> tuple[Any, float, float]:
    """``prepare`` with an empty cache: (context, load seconds, teacher-phase seconds)."""
    os.environ["KDSEARCH_CACHE_DIR"] = str(cache)
    from kdsearch.trainers import trial as trial_module

    loaded: dict[str, float] = {}
    load_data = trial_module.load_data

    def timed_load(config: Any) -> Any:
        started = time.perf_counter()
        data = load_data(config)
        loaded["s"] = time.perf_counter() - started
        return data

    trial_module.load_data = timed_load
    try:
        started = time.perf_counter()
        context = trial_module.prepare(space)
        total = time.perf_counter() - started
    finally:
        trial_module.load_data = load_data
    return context, loaded.get("s", 0.0), total - loaded.get("s", 0.0)


def cpu_teacher_figure() -> tuple[Optional[float], str]:
    path = ROOT / "benchmarks" / "results" / "scale.json"
    try:
        size = json.loads(path.read_text())["sizes"]["50000"]
        return float(size["teacher_phase_s"]), "benchmarks/results/scale.json (50k, the build machine's 2 cores)"
    except (OSError, KeyError, ValueError, TypeError):
        return None, "none: run scale.py on the CPU machine, or pass --cpu-teacher"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=50000)
    parser.add_argument("--configs", type=int, default=16)
    parser.add_argument("--packings", default="1,2,4", help="students per GPU, comma-separated")
    parser.add_argument("--epochs", type=int, default=1, help="each student's distillation epochs")
    parser.add_argument("--cpus-per-trial", type=float, default=None,
                        help="CPUs every trial gets, the same in every run (default: the machine's CPUs / the most per GPU)")
    parser.add_argument("--cpu-teacher", action="store_true", help="also time the teacher phase on this machine's CPUs")
    parser.add_argument("--cpu-check", action="store_true",
                        help="a rehearsal on a CPU: 2,000 samples, 4 students, 1 and 2 at a time, no GPU")
    parser.add_argument("--budget-s", type=float, default=450,
                        help="the whole run's seconds: after the warm-up trial, fewer students a run where 16 would not fit")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.cpu_check:
        args.samples, args.configs, args.packings = 2000, 4, "1,2"
    packings = [int(k) for k in args.packings.split(",")]
    begun = time.perf_counter()

    import ray
    import torch

    gpu = torch.cuda.is_available() and not args.cpu_check
    if not gpu and not args.cpu_check:
        raise SystemExit("gpu_packing: torch sees no GPU; run it on one, or pass --cpu-check for a rehearsal")
    cpus = os.cpu_count() or 2
    cpus_per_trial = args.cpus_per_trial or max(1, cpus // max(packings))
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name() if gpu else "none (cpu check)",
                              "samples": args.samples, "configs": args.configs, "epochs": args.epochs,
                              "cpus_per_trial": cpus_per_trial, "machine_cpus": cpus, "torch": torch.__version__}

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = tmp / f"cifar-{args.samples}.npz"
        write_cifar_like(path, args.samples)
        space = packing_space(path, args.epochs, "cuda" if gpu else "cpu")
        say(f"teacher phase on {'the GPU' if gpu else 'the CPU'}...")
        context, load_s, phase_s = teacher_phase(space, tmp / "cache")
        result["load_s"] = round(load_s, 1)
        result["teacher_val_acc"] = round(context.targets.val_acc, 4)
        cpu_s, cpu_source = cpu_teacher_figure()
        if args.cpu_teacher or args.cpu_check:
            torch.set_num_threads(cpus)
            _, _, cpu_s = teacher_phase(packing_space(path, args.epochs, "cpu"), tmp / "cache-cpu")
            cpu_source = f"this machine's {cpus} CPUs"
        result["teacher_phase_s"] = {"cuda" if gpu else "this": round(phase_s, 1),
                                     "cpu": None if cpu_s is None else round(cpu_s, 1), "cpu_source": cpu_source}
        if gpu and cpu_s:
            result["teacher_speedup"] = round(cpu_s / phase_s, 1)
        say(f"teacher phase: {result['teacher_phase_s']}")

        configs = fixed_configs(space, args.configs, context.data.input_shape, context.data.num_classes)
        result["view_stores_s"] = round(build_view_stores(space, context, configs, "cuda" if gpu else "cpu"), 1)
        ray.init(num_cpus=cpus, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        try:
            context_ref = ray.put(context)
            say("warm-up: one untimed trial (Ray's workers, the page cache)...")
            warmup = run_packing(space, context_ref, configs[:1], 1, cpus_per_trial, gpu, tmp / "tune-warmup")
            warm = (warmup["mean_trial_s"] or warmup["wall_s"]) + 1.0  # the trial's own time, not its worker's start
            # the same students in every run: fewer of them where the budget cannot hold all (said in the JSON)
            left = args.budget_s - (time.perf_counter() - begun)
            # packing k students is assumed to pay sqrt(k), not k: a run cut short would lose its figure
            fit = int(left / (1.1 * warm * sum(1 / k ** 0.5 for k in packings)))
            if fit < len(configs):
                configs = configs[:max(4, fit)]
                say(f"budget: {len(configs)} students a run (a trial takes about {warm:.0f} s)")
            result["configs_run"] = len(configs)
            runs = {}
            for k in packings:
                say(f"{len(configs)} students, {k} per GPU...")
                runs[str(k)] = run_packing(space, context_ref, configs, k, cpus_per_trial, gpu, tmp / "tune")
                say(f"  {runs[str(k)]['trials_per_hour']} trials/h, {runs[str(k)]['wall_s']} s, "
                    f"util {runs[str(k)]['util']}, mean acc {runs[str(k)]['mean_acc']}")
                if args.out:  # what is done so far survives a run cut short
                    args.out.write_text(json.dumps({**result, "partial": True, "runs": runs}, default=str) + "\n")
        finally:
            ray.shutdown()

    result["trials_per_hour"] = {k: r["trials_per_hour"] for k, r in runs.items()}
    result["util"] = {k: r["util"] for k, r in runs.items()}
    result["wall_s"] = {k: r["wall_s"] for k, r in runs.items()}
    result["failed"] = {k: r["failed"] for k, r in runs.items()}
    result["accuracy"] = {k: r["mean_acc"] for k, r in runs.items()}
    first = runs[str(packings[0])]["rows"]
    diffs = [abs(r["rows"][key]["val_acc"] - row["val_acc"]) * 100 for r in runs.values() for key, row in first.items()
             if row["val_acc"] is not None and r["rows"].get(key, {}).get("val_acc") is not None]
    result["max_acc_diff_pt"] = round(max(diffs), 2) if diffs else None
    base = result["trials_per_hour"].get(str(packings[0]))
    result["speedup_over_1"] = {k: round(v / base, 2) for k, v in result["trials_per_hour"].items()} if base else None
    result["quick"] = bool(args.cpu_check)
    line = json.dumps(result, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
