"""What a FitNets hint step costs over a plain KD step, with the hint adapter's old order and the new.

A cnn student (spaces/families.py) trains on random CIFAR-shaped batches (3x32x32, 10 classes)
against a cnn(stages 3, channels 64) teacher whose logits and stage outputs were computed once
and cached as tensors, as the trial's teacher store serves them. A step is forward, loss,
backward and AdamW step. ``before`` projects with the 1x1 conv at the student's resolution and
then pools (the old adapter); ``after`` is today's adapter (pools first when that shrinks the
map). One thread; the median of ``--steps`` timed steps after warm-up, the three variants
alternated step by step so machine noise hits them alike. Last line: one JSON object.

    python benchmarks/hint_cost.py [--steps 30] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdsearch.spaces import DistillConfig
from kdsearch.spaces.families import CNNConfig, build_cnn
from kdsearch.trainers.losses import DistillLoss, FeatureHints, HintAdapter, Outputs, Teachers, build_distill_loss

INPUT, CLASSES = (3, 32, 32), 10
TEACHER = CNNConfig(stages=3, channels=64)
#: (student knobs, hint_stages): students whose hinted stage is larger than the teacher's, and one of equal size
CASES = [({"stages": 1, "channels": 16}, "last"), ({"stages": 1, "channels": 32}, "last"),
         ({"stages": 2, "channels": 32}, "last"), ({"stages": 2, "channels": 32}, "all"),
         ({"stages": 3, "channels": 32}, "last")]


def conv_then_pool(adapter: HintAdapter, x: torch.Tensor) -> torch.Tensor:
    """The old adapter order: project every student pixel, then pool to the teacher's size."""
    if not adapter.spatial:
        return adapter.proj(x.mean(dim=tuple(range(2, x.ndim))) if x.ndim > 2 else x)
    y = adapter.proj(x)
    return y if tuple(y.shape[2:]) == adapter.size else F.adaptive_avg_pool2d(y, adapter.size)


def use_old_order(loss: DistillLoss) -> DistillLoss:
    """``loss`` with each hint adapter's forward replaced by :func:`conv_then_pool`."""
    for term in loss.terms.values():
        if isinstance(term, FeatureHints):
            for adapter in term.adapters:
                adapter.forward = types.MethodType(conv_then_pool, adapter)  # type: ignore[method-assign]
    return loss


def step_fn(student: nn.Module, loss: DistillLoss, x: torch.Tensor, y: torch.Tensor,
            teachers: Teachers) -> Callable[[], None]:
    """One training step of ``student`` (and the loss's adapters) under ``loss``."""
    optimizer = torch.optim.AdamW(list(student.parameters()) + list(loss.parameters()), lr=1e-3)

    def step() -> None:
        if loss.needs_features:
            logits, features = student.forward_stages(x)
            out = Outputs(logits, features)
        else:
            out = Outputs(student(x))
        value = loss(out, teachers, y)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    return step


def time_alternating(steps: dict[str, Callable[[], None]], runs: int, warmup: int = 3) -> dict[str, float]:
    """Median ms of each step, the steps called in turn so noise hits them alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(runs):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def case(knobs: dict, hint_stages: str, batch_size: int, runs: int) -> dict:
    """Hint step (old and new order) and KD step of one student, in ms, and their ratios."""
    torch.manual_seed(0)
    teacher = build_cnn(TEACHER, INPUT, CLASSES).eval()
    x, y = torch.randn(batch_size, *INPUT), torch.randint(0, CLASSES, (batch_size,))
    with torch.no_grad():
        t_logits, t_features = teacher.forward_stages(x)  # cached once, as the teacher store serves them
    teachers = Teachers.single(Outputs(t_logits, list(t_features)))
    s_shapes = [f.shape for f in build_cnn(CNNConfig(**knobs), INPUT, CLASSES).eval().forward_stages(x[:1])[1]]
    t_shapes = [f.shape for f in t_features]
    hint_config = DistillConfig(hint_stages=hint_stages, hint_weight=1.0)
    steps = {}
    for name in ("kd", "before", "after"):
        torch.manual_seed(1)
        student = build_cnn(CNNConfig(**knobs), INPUT, CLASSES).train()
        config = DistillConfig() if name == "kd" else hint_config
        loss = build_distill_loss(config, s_shapes, t_shapes)
        steps[name] = step_fn(student, use_old_order(loss) if name == "before" else loss, x, y, teachers)
    ms = time_alternating(steps, runs)
    pairs = build_distill_loss(hint_config, s_shapes, t_shapes).terms["fitnets"].pairs
    return {"student": knobs, "hint_stages": hint_stages,
            "pairs": [f"{tuple(s_shapes[s][1:])}->{tuple(t_shapes[t][1:])}" for t, s in pairs],
            "kd_ms": ms["kd"], "hint_before_ms": ms["before"], "hint_after_ms": ms["after"],
            "ratio_before": ms["before"] / ms["kd"], "ratio_after": ms["after"] / ms["kd"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [case(knobs, hints, args.batch_size, args.steps) for knobs, hints in CASES]
    for r in rows:
        print(f"cnn {r['student']} hints {r['hint_stages']:>4} {', '.join(r['pairs'])}: KD {r['kd_ms']:.1f} ms, "
              f"hint {r['hint_before_ms']:.1f} -> {r['hint_after_ms']:.1f} ms, "
              f"hint/KD {r['ratio_before']:.2f} -> {r['ratio_after']:.2f}")
    print(json.dumps({"batch_size": args.batch_size, "steps": args.steps, "threads": 1, "cases": rows}))


if __name__ == "__main__":
    main()
