"""The data path at real scale: CIFAR-shaped data (3x32x32, 10 classes) at 5k, 20k and 50k samples.

For each size, in fresh processes run one after the other (so memory and time are each one's own):

- ``prepare_s``: the whole of ``prepare`` (load the data, train the cnn(3 stages, 64 channels)
  teacher, one pass filling the store with its logits and the stage ``hint_stages: last`` asks
  for); ``teacher_phase_s`` is the part after loading, split into ``split_s`` (training, the
  pass and store writing, the teacher's validation and footprint);
- ``prepare_over_bare``: the teacher phase over a bare PyTorch loop doing the same work with
  the same teacher, epochs, batch size, optimiser and threads (a plain training loop plus one
  ``inference_mode`` pass over the training set keeping the logits and that stage);
- ``driver_peak_over_data``: the preparing process's peak RSS increase over the bytes of the
  data it holds (float32 train and validation inputs, labels, raw validation inputs); the bare
  loop's own figure, measured the same way, is ``bare_peak_over_data`` in ``detail``;
- ``worker_rss_mb``: the RSS increase of a Ray worker when it takes the shared context (as a
  trial does), the largest of two workers (``worker_uss_mb``: its private memory);
- ``hint_store_fraction``: the share of hinted batches whose stage targets came from the store;
- ``hint_over_kd_step``: a training step with hints over a KD step (same student and batch).

Then ``search_over_ideal`` on the digits demo (``benchmarks/search_wall.py``).

    python benchmarks/scale.py            # 5k, 20k, 50k (about 25 minutes on 2 cores)
    python benchmarks/scale.py --quick    # 5k only, under 5 minutes

The last stdout line is one JSON object (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
SIZES = (5000, 20000, 50000)
TEACHER = {"family": "cnn", "config": {"stages": 3, "channels": 64}, "epochs": 1, "batch_size": 64}
STUDENT = {"cnn": {"stages": 3, "channels": 16}}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_cifar_like(path: Path, n: int, seed: int = 0) -> None:
    """``n`` uint8 32x32 RGB images in 10 classes: a smooth class pattern, shifted, plus noise (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    freq = rng.normal(size=(10, 3, 4, 4))
    grid = np.linspace(0, np.pi, 32)
    basis = np.stack([np.cos(k * grid) for k in range(4)])  # (4, 32)
    patterns = np.einsum("ncij,ih,jw->nchw", freq, basis, basis)
    patterns = (patterns - patterns.min()) / (patterns.max() - patterns.min()) * 255
    y = rng.integers(0, 10, n)
    x = np.empty((n, 32, 32, 3), np.uint8)
    for start in range(0, n, 5000):
        part = slice(start, min(n, start + 5000))
        shift = rng.integers(-4, 5, size=(part.stop - start, 2))
        imgs = patterns[y[part]]
        imgs = np.stack([np.roll(im, tuple(s), axis=(1, 2)) for im, s in zip(imgs, shift)])
        noise = rng.normal(0, 60, imgs.shape)
        x[part] = np.clip(imgs + noise, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.savez(path, x_train=x, y_train=y)


def space_for(path: Path, hint_stages: str = "last") -> Any:
    import kdsearch

    return kdsearch.load_space({"name": "scale", "data": {"source": "npz", "path": str(path), "val_fraction": 0.2},
                                "teacher": {**TEACHER, "device": "cpu"}, "students": STUDENT,
                                "distill": {"hint_stages": hint_stages, "hint_weight": 1.0},
                                "train": {"epochs": 1, "batch_size": 64}})


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS since start or the last :func:`reset_peak` (Linux's VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def mapped_file(address: int) -> str:
    """The file whose memory map holds ``address`` ('' for ordinary memory)."""
    for line in open("/proc/self/maps"):
        fields = line.split()
        start, end = (int(a, 16) for a in fields[0].split("-"))
        if start <= address < end:
            return fields[5] if len(fields) > 5 else ""
    return ""


# --------------------------------------------------------------------------- children (one process each)


def child_prepare(path: Path) -> dict[str, Any]:
    """``prepare`` timed piece by piece, with the process's peak RSS over the data it holds."""
    import torch

    from kdsearch.trainers import trial as trial_module
    from kdsearch.trainers import teachers as teachers_module

    space = space_for(path)
    import kdsearch.trainers.data, kdsearch.trainers.measure, kdsearch.trainers.store  # noqa: E401,F401  (imports are not data)
    import safetensors.torch, sklearn  # noqa: E401,F401

    reset_peak()
    base = peak_rss_mb()
    timings: dict[str, float] = {}
    peaks: dict[str, float] = {}

    def timed(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - started
                peaks[name] = peak_rss_mb() - base
        return wrapper

    trial_module.load_data = timed("load_data", trial_module.load_data)
    trial_module.load_teacher = timed("train", trial_module.load_teacher)
    trial_module.compute_targets = timed("targets", trial_module.compute_targets)
    teachers_module.accuracy = timed("validation", teachers_module.accuracy)
    teachers_module.footprint = timed("footprint", teachers_module.footprint)
    started = time.perf_counter()
    context = trial_module.prepare(space)
    total = time.perf_counter() - started
    data = context.data
    held = sum(t.nbytes for t in (data.train.x, data.train.y, data.val.x, data.val.y, data.raw_val.x, data.raw_val.y))
    increase = peak_rss_mb() - base
    split = {"train_s": timings["train"], "pass_and_store_s": timings["targets"] - timings["validation"] - timings["footprint"],
             "validation_s": timings["validation"], "footprint_s": timings["footprint"]}
    return {"prepare_s": total, "load_s": timings["load_data"], "teacher_phase_s": total - timings["load_data"],
            "split_s": split, "data_mb": held / 2**20, "peak_increase_mb": increase, "peak_by_step_mb": peaks,
            "driver_peak_over_data": increase * 2**20 / held, "threads": torch.get_num_threads(),
            "store_mb": sum(p.stat().st_size for p in (Path(os.environ["KDSEARCH_CACHE_DIR"]) / "targets").rglob("*.npy")) / 2**20}


def child_bare(path: Path) -> dict[str, Any]:
    """The same teacher, epochs, batch size, optimiser, schedule and threads in a plain loop, then one inference pass."""
    import torch
    from torch import nn

    from kdsearch.spaces import get_family
    from kdsearch.trainers.data import load_data

    space = space_for(path)
    reset_peak()
    base = peak_rss_mb()
    data = load_data(space.data)
    config = space.teachers[0]
    family = get_family(config.family)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    model = family.build(family.config.model_validate(config.config), data.input_shape, data.num_classes)
    x, y = data.train.x, data.train.y
    steps = (len(y) + config.batch_size - 1) // config.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps)
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(y), config.batch_size):
            idx = order[start:start + config.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    trained = time.perf_counter() - started
    model.eval()
    logits, stage = [], []
    with torch.inference_mode():
        for start in range(0, len(y), 512):
            out, features = model.forward_stages(x[start:start + 512])
            logits.append(out.half())
            stage.append(features[-1].half())
    total = time.perf_counter() - started
    held = sum(t.nbytes for t in (data.train.x, data.train.y, data.val.x, data.val.y, data.raw_val.x, data.raw_val.y))
    increase = peak_rss_mb() - base  # the same measure as child_prepare's: what plain PyTorch needs for this work
    return {"bare_s": total, "bare_train_s": trained, "bare_pass_s": total - trained, "threads": torch.get_num_threads(),
            "bare_peak_increase_mb": increase, "bare_peak_over_data": increase * 2**20 / held}


def child_steps(path: Path) -> dict[str, Any]:
    """Hint steps over KD steps, and the share of hinted batches served from the store (the store exists by now)."""
    import torch

    from kdsearch.trainers.teaching import Teaching
    from kdsearch.trainers.trial import _Distiller, prepare

    torch.set_num_threads(1)
    space = space_for(path)
    context = prepare(space)
    data = context.data
    out: dict[str, Any] = {}
    for label, hints in (("kd", "none"), ("hint", "last")):
        params = {**space.sample_random(0), "distill.hint_stages": hints}
        config = space.resolve(params)
        torch.manual_seed(0)
        student = space.build_student(config, data.input_shape, data.num_classes)
        teaching = Teaching(context, config, "cpu", seed=0)
        distiller = _Distiller(student, config, context, 1, "cpu", teaching)
        times = []
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
        for step in range(25):
            idx = order[step * 64:(step + 1) * 64]
            started = time.perf_counter()
            loss = distiller.step_loss(idx, data.train.x[idx], data.train.y[idx])
            distiller.optimizer.zero_grad()
            loss.backward()
            distiller.optimizer.step()
            times.append(time.perf_counter() - started)
        out[label] = statistics.median(times[5:])
        if hints != "none":
            out["hint_store_fraction"] = teaching.hint_batches_stored / max(teaching.hint_batches, 1)
    return {"kd_step_ms": out["kd"] * 1e3, "hint_step_ms": out["hint"] * 1e3, "hint_over_kd_step": out["hint"] / out["kd"],
            "hint_store_fraction": out["hint_store_fraction"]}


def child_workers(path: Path) -> dict[str, Any]:
    """Two Ray workers take the shared context as trials do (``ray.get`` of one ``ray.put``): their RSS increase."""
    import ray

    from kdsearch.trainers.trial import prepare

    context = prepare(space_for(path))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ref = ray.put(context)

        @ray.remote(num_cpus=1)
        def take(refs: list) -> dict[str, float]:
            import psutil
            import torch  # noqa: F401  (what a trial's worker has imported anyway: not the context's cost)

            import kdsearch.trainers.trial  # noqa: F401

            process = psutil.Process()
            before, uss_before = process.memory_info().rss, process.memory_full_info().uss
            shared = ray.get(refs[0])
            shared.targets.logits.sum()  # read what a trial reads every step: the logits, the data's first batch
            shared.data.train.x[:64].sum()
            after, uss_after = process.memory_info().rss, process.memory_full_info().uss
            return {"rss_mb": (after - before) / 2**20, "uss_mb": (uss_after - uss_before) / 2**20,
                    "zero_copy": "plasma" in mapped_file(shared.data.train.x.data_ptr()) or
                                 "/dev/shm" in mapped_file(shared.data.train.x.data_ptr()),
                    "mapped": mapped_file(shared.data.train.x.data_ptr())}

        results = ray.get([take.remote([ref]) for _ in range(2)])
    finally:
        ray.shutdown()
    return {"worker_rss_mb": max(r["rss_mb"] for r in results), "worker_uss_mb": max(r["uss_mb"] for r in results),
            "zero_copy": all(r["zero_copy"] for r in results), "mapped": results[0]["mapped"]}


CHILDREN = {"prepare": child_prepare, "bare": child_bare, "steps": child_steps, "workers": child_workers}


def run_child(kind: str, path: Path, cache: Path) -> dict[str, Any]:
    env = {**os.environ, "KDSEARCH_CACHE_DIR": str(cache), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, __file__, "--child", kind, str(path)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_size(n: int, tmp: Path) -> dict[str, Any]:
    path, cache = tmp / f"cifar-{n}.npz", tmp / f"cache-{n}"
    write_cifar_like(path, n)
    prepared = run_child("prepare", path, cache)  # builds the teacher and the store
    bare = run_child("bare", path, cache)
    steps = run_child("steps", path, cache)       # reuses them
    workers = run_child("workers", path, cache)
    row = {"prepare_s": round(prepared["prepare_s"], 1), "teacher_phase_s": round(prepared["teacher_phase_s"], 1),
           "bare_s": round(bare["bare_s"], 1), "prepare_over_bare": prepared["teacher_phase_s"] / bare["bare_s"],
           "driver_peak_over_data": prepared["driver_peak_over_data"], "worker_rss_mb": workers["worker_rss_mb"],
           "worker_uss_mb": workers["worker_uss_mb"], "hint_store_fraction": steps["hint_store_fraction"],
           "hint_over_kd_step": steps["hint_over_kd_step"], "detail": {**prepared, **bare, **steps, **workers}}
    say(f"{n}: prepare {row['prepare_s']} s (teacher phase {row['teacher_phase_s']} s, bare {row['bare_s']} s: "
        f"x{row['prepare_over_bare']:.2f}), peak/data {row['driver_peak_over_data']:.2f}, worker +{row['worker_rss_mb']:.0f} MB, "
        f"hints from store {row['hint_store_fraction']:.2f}, hint/kd step {row['hint_over_kd_step']:.2f}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the 5k size only")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated sample counts")
    parser.add_argument("--no-search", action="store_true", help="skip the digits demo's search_over_ideal")
    parser.add_argument("--out", default=str(OUT / "scale.json"), help="where the JSON goes")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(CHILDREN[args.child[0]](Path(args.child[1]))))
        return
    sizes = [5000] if args.quick else [int(s) for s in args.sizes.split(",")]
    started = time.perf_counter()
    report: dict[str, Any] = {"sizes": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            report["sizes"][str(n)] = measure_size(n, Path(tmp))
            out.write_text(json.dumps({**report, "partial": True}, indent=1))  # a long run keeps what it measured
    if not args.no_search:
        sys.path.insert(0, str(Path(__file__).parent))
        from search_wall import measure_search_over_ideal

        wall = measure_search_over_ideal(quick=args.quick)
        report["search_over_ideal"] = wall["search_over_ideal"]
        report["search"] = wall
    report.update({"quick": bool(args.quick), "teacher": TEACHER, "seconds": round(time.perf_counter() - started, 1)})
    out.write_text(json.dumps(report, indent=1))
    say(f"wrote {out}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
