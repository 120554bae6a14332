"""What compression buys on two reference students: bytes, latency, size and accuracy.

A reference CNN (3 stages, 64 channels, residual, BatchNorm: big enough for int8 kernels to
pay) and a reference MLP (3 x 256) are each distilled on digits *once* by ``run_trial``; the
distilled state is captured from its per-epoch report and every variant below resumes from
it, so all variants of a model start from the same weights and only the compression stage of
``run_trial`` (prune -> BatchNorm recalibration -> KD fine-tune -> quantize -> save) runs per
variant:

    none | prune 0.3 | prune 0.5 | int8 | prune 0.5 + int8

For each: parameters and MACs (of the float model), bytes of the deployable artifact
(``save_student``), validation accuracy and batch-1 latency (``measure_latency``: one thread,
warm-up, median of ``--runs`` runs; the variants are measured round-robin over ``--rounds``
rounds, order rotated each round, so machine load hits them alike; the figure is the median
over rounds), each also as a ratio to the uncompressed model of the same run (accuracy as a
change in points). Prints a table per model; last line is one JSON object.

Latency is measured twice per variant:

- ``latency`` (the headline): the artifact reloaded with ``load_student``, as the search's
  latency measurer (``kdsearch.search.latency``) and a deployment see it;
- ``trial_latency``: the in-process model ``run_trial`` hands to ``local_latency``, after its
  batch-512 accuracy pass. For static int8 on x86 this reads ~1.7x slower than the reloaded
  artifact: the oneDNN quantized conv/linear caches its primitive for the *first* call's
  input shape and thread count, and every later call with another shape (batch 1) takes the
  slow path that builds a primitive per call. Float models are unaffected.

The product's acceptance bar, checked on the reference CNN: prune 0.5 + int8 must give a
bytes ratio <= 0.1 and a batch-1 latency ratio <= 0.5.

    python benchmarks/compression.py [--epochs 8] [--finetune-epochs 3] [--rounds 10] [--runs 100]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch import nn

from kdsearch.spaces import DEFAULT_SPACE, Space, parse_space
from kdsearch.trainers.checkpoint import load_student
from kdsearch.trainers.measure import Latency, device_name, measure_latency
from kdsearch.trainers.quantize import get_quantizer
from kdsearch.trainers.trial import TrialContext, prepare, run_trial

#: reference students: family knobs (every knob fixed) and the int8 quantizer used for them
MODELS: dict[str, dict[str, Any]] = {
    "cnn": {"family": "cnn", "knobs": {"stages": 3, "channels": 64, "blocks": 2, "kernel": 3, "residual": True,
                                       "batch_norm": True, "width_mult": 1.0, "activation": "relu"},
            "int8": "static_int8", "lr": 0.003},
    "mlp": {"family": "mlp", "knobs": {"depth": 3, "width": 256, "taper": 1.0, "activation": "relu", "dropout": 0.0},
            "int8": "static_int8", "lr": 0.003},
}

#: variant name -> (prune ratio, int8?)
VARIANTS: dict[str, tuple[float, bool]] = {
    "none": (0.0, False),
    "prune 0.3": (0.3, False),
    "prune 0.5": (0.5, False),
    "int8": (0.0, True),
    "prune 0.5 + int8": (0.5, True),
}

#: the acceptance bar on the reference CNN's "prune 0.5 + int8"
BAR = {"bytes_ratio": 0.1, "latency_ratio": 0.5}


def reference_space(epochs: int, finetune_epochs: int) -> Space:
    """The digits space (same data and teacher, so the cached teacher is reused) with the two
    reference students as fixed families and the distillation settings fixed."""
    raw = yaml.safe_load(DEFAULT_SPACE.read_text())
    raw["students"] = {name: spec["knobs"] for name, spec in MODELS.items()}
    raw["distill"] = {"temperature": 4.0, "alpha": 0.7, "hint_stages": "none", "hint_weight": 0.1}
    raw["train"] = {"epochs": epochs, "batch_size": 64, "optimizer": "adamw",
                    "lr": {"choice": sorted({spec["lr"] for spec in MODELS.values()})}, "weight_decay": 1e-4}
    raw["compress"] = {"prune_ratio": {"choice": sorted({r for r, _ in VARIANTS.values()})}, "prune_criterion": "l1",
                       "finetune_epochs": finetune_epochs,
                       "quantize": {"choice": ["none", "dynamic_int8", "static_int8"]}, "calib_batches": 8}
    raw.pop("constraints", None)  # the reference CNN is larger than the search's max_params on purpose
    raw["measure"] = {"runtime": "torch"}  # torch.ao's compression, dynamic int8 included (benchmarks/runtimes.py: ORT)
    return parse_space(raw)


def variant_params(space: Space, model: str, variant: str) -> dict[str, Any]:
    """The flat configuration of one variant of a reference model."""
    spec = MODELS[model]
    ratio, int8 = VARIANTS[variant]
    params = {"student.family": spec["family"],
              **{f"student.{spec['family']}.{k}": v for k, v in spec["knobs"].items()},
              **{f"{section}.{k}": knob.value for section, knobs in space.sections.items()
                 for k, knob in knobs.items() if hasattr(knob, "value")},
              "train.lr": spec["lr"], "compress.prune_ratio": ratio,
              "compress.quantize": spec["int8"] if int8 else "none"}
    space.resolve(params)  # fails loudly if a value left the space
    return params


@dataclass
class Variant:
    name: str
    result: dict[str, Any]
    model: nn.Module  # as run_trial left it (after its batch-512 accuracy pass)
    loaded: nn.Module  # reloaded from the artifact, never called yet
    example: torch.Tensor
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"artifact": [], "trial": []})

    def latency_ms(self, which: str = "artifact") -> float:
        return statistics.median(self.latencies[which])


def run_model(space: Space, context: TrialContext, model: str, seed: int, epochs: int) -> tuple[list[Variant], float]:
    """Distil ``model`` once, then compress it every way; returns the variants and the seconds
    spent distilling (plus the first variant's compression)."""
    captured: dict[str, Any] = {}

    def keep(metrics: dict[str, Any], state: Optional[dict[str, Any]] = None) -> None:
        if state is not None and metrics["epoch"] == epochs:
            captured["state"] = copy.deepcopy(state)  # the state aliases the live weights: freeze it now

    hold: dict[str, Any] = {}

    def grab(deployed: Any, example: torch.Tensor, batch_size: int) -> Latency:
        hold["model"], hold["example"] = deployed.handle, example
        return Latency(float("nan"), float("nan"), 0, 1, "", "")  # measured later, round-robin

    data = context.data
    variants: list[Variant] = []
    # the first pruned variant distils (reporting its state at the end of distillation) ...
    first = next(name for name, (ratio, _) in VARIANTS.items() if ratio > 0)
    order = [first] + [name for name in VARIANTS if name != first]
    started = time.perf_counter()
    distil_seconds = 0.0
    with tempfile.TemporaryDirectory(prefix="kdsearch-compression-") as tmp:
        for i, name in enumerate(order):
            params = variant_params(space, model, name)
            folder = Path(tmp) / f"v{i}"
            # ... every other variant resumes from that state: same distilled weights, compression only
            resume = {"resume": captured["state"]} if i else {"checkpoint_state": True}
            result = run_trial(space, params, keep if not i else None, context=context, seed=seed, epochs=epochs,
                               latency_fn=grab, artifact_dir=folder, **resume)
            if not i:
                distil_seconds = time.perf_counter() - started
            else:
                same = result["val_acc_distilled"] == variants[0].result["val_acc_distilled"]
                assert same, "resuming changed the distilled student"
            config = space.resolve(params)
            loaded, _ = load_student(folder / "student.pt",
                                     lambda: space.build_student(config, data.input_shape, data.num_classes))
            variants.append(Variant(name, result, hold["model"], loaded, hold["example"]))
    variants.sort(key=lambda v: list(VARIANTS).index(v.name))
    return variants, distil_seconds


def measure_round_robin(variants: list[Variant], rounds: int, runs: int) -> None:
    """Batch-1 latency of every variant, ``rounds`` times, the order rotated each round."""
    for r in range(rounds):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            v.latencies["artifact"].append(measure_latency(v.loaded, v.example, runs=runs, warmup=20).median_ms)
            v.latencies["trial"].append(measure_latency(v.model, v.example, runs=runs, warmup=20).median_ms)


def figures(variants: list[Variant]) -> dict[str, dict[str, Any]]:
    base = variants[0]
    assert base.name == "none"
    out = {}
    for v in variants:
        r, b = v.result, base.result
        out[v.name] = {
            "params": r["params"], "macs": r["macs"], "size_bytes": r["size_bytes"],
            "latency_ms": round(v.latency_ms(), 5),
            "latency_ms_rounds": [round(x, 5) for x in v.latencies["artifact"]],
            "trial_latency_ms": round(v.latency_ms("trial"), 5),
            "trial_latency_ms_rounds": [round(x, 5) for x in v.latencies["trial"]],
            "val_acc": r["val_acc"], "quantize": r["config"]["compress.quantize"],
            "prune_ratio": r["config"]["compress.prune_ratio"],
            "params_ratio": round(r["params"] / b["params"], 4), "macs_ratio": round(r["macs"] / b["macs"], 4),
            "bytes_ratio": round(r["size_bytes"] / b["size_bytes"], 4),
            "latency_ratio": round(v.latency_ms() / base.latency_ms(), 4),
            "trial_latency_ratio": round(v.latency_ms("trial") / base.latency_ms("trial"), 4),
            "acc_change_points": round(100 * (r["val_acc"] - b["val_acc"]), 2),
        }
    return out


def print_table(model: str, variants: list[Variant], rows: dict[str, dict[str, Any]]) -> None:
    spec, base = MODELS[model], variants[0].result
    knobs = ", ".join(f"{k} {v}" for k, v in spec["knobs"].items())
    print(f"\n{model}: {spec['family']} ({knobs}); int8 = {spec['int8']}")
    print(f"distilled val acc {base['val_acc_distilled']:.4f} (teacher {base['teacher_val_acc']:.4f})")
    header = (f"{'variant':<18}{'params':>11}{'MACs':>12}{'bytes':>11}{'lat ms':>9}{'val acc':>9}"
              f"{'params x':>10}{'MACs x':>8}{'bytes x':>9}{'lat x':>7}{'acc pts':>9}  {'trial lat ms (x)':>17}")
    print(header)
    print("-" * len(header))
    for name, f in rows.items():
        print(f"{name:<18}{f['params']:>11,}{f['macs']:>12,}{f['size_bytes']:>11,}{f['latency_ms']:>9.4f}"
              f"{f['val_acc']:>9.4f}{f['params_ratio']:>10.3f}{f['macs_ratio']:>8.3f}{f['bytes_ratio']:>9.3f}"
              f"{f['latency_ratio']:>7.3f}{f['acc_change_points']:>+9.2f}"
              f"  {f['trial_latency_ms']:>9.4f} ({f['trial_latency_ratio']:.3f})")
    print("lat: the reloaded artifact (as the search's measurer and a deployment see it); trial lat: the "
          "in-process model run_trial measures after its batch-512 accuracy pass")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " Writes no files (artifacts go to a "
                                     "temporary folder).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8, help="distillation epochs (once per model)")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="KD fine-tune epochs after pruning")
    parser.add_argument("--rounds", type=int, default=10, help="round-robin latency rounds")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per latency measurement (>= 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the distillation")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="reference students")
    parser.add_argument("--mlp-int8", choices=("static_int8", "dynamic_int8"), default=MODELS["mlp"]["int8"],
                        help="the MLP's int8 quantizer (the CNN always uses static_int8)")
    args = parser.parse_args()
    MODELS["mlp"]["int8"] = args.mlp_int8
    started = time.perf_counter()
    torch.set_num_threads(1)  # training too: other jobs share the cores
    space = reference_space(args.epochs, args.finetune_epochs)
    context = prepare(space)
    prepare_seconds = time.perf_counter() - started
    report: dict[str, Any] = {}
    for model in args.models:
        t0 = time.perf_counter()
        variants, distil_seconds = run_model(space, context, model, args.seed, args.epochs)
        train_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        measure_round_robin(variants, args.rounds, args.runs)
        rows = figures(variants)
        print_table(model, variants, rows)
        base = variants[0].result
        report[model] = {"family": MODELS[model]["family"], "config": MODELS[model]["knobs"],
                         "int8": MODELS[model]["int8"], "val_acc_distilled": base["val_acc_distilled"],
                         "teacher_val_acc": base["teacher_val_acc"], "variants": rows,
                         "seconds": {"distil_and_first_variant": round(distil_seconds, 1),
                                     "all_variants": round(train_seconds, 1),
                                     "latency": round(time.perf_counter() - t1, 1)}}
    out: dict[str, Any] = {"benchmark": "compression", "epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
                           "rounds": args.rounds, "runs": args.runs, "seed": args.seed, "threads": 1,
                           "quant_backend": get_quantizer("static_int8").backend, "cpu": device_name(),
                           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                           "models": report}
    if "cnn" in report:
        cnn = report["cnn"]["variants"]["prune 0.5 + int8"]
        acceptance = {"bytes_ratio": cnn["bytes_ratio"], "latency_ratio": cnn["latency_ratio"],
                      "trial_latency_ratio": cnn["trial_latency_ratio"],
                      "bytes_ok": cnn["bytes_ratio"] <= BAR["bytes_ratio"],
                      "latency_ok": cnn["latency_ratio"] <= BAR["latency_ratio"]}
        acceptance["met"] = acceptance["bytes_ok"] and acceptance["latency_ok"]
        out["acceptance"] = {"bar": BAR, **acceptance}
        print(f"\nacceptance (cnn, prune 0.5 + int8): bytes x{cnn['bytes_ratio']:.3f} (<= {BAR['bytes_ratio']}), "
              f"latency x{cnn['latency_ratio']:.3f} (<= {BAR['latency_ratio']}; "
              f"trial path x{cnn['trial_latency_ratio']:.3f}): "
              f"{'MET' if acceptance['met'] else 'NOT MET'}")
    out["seconds"] = {"prepare": round(prepare_seconds, 1), "total": round(time.perf_counter() - started, 1)}
    print(f"total {out['seconds']['total']:.0f} s (prepare/teacher {prepare_seconds:.0f} s)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
