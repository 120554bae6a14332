"""Measurement of a student for real: accuracy, parameters, MACs and latency.

Latency follows one protocol everywhere so figures compare, in every runtime
(:mod:`kdsearch.trainers.runtimes`): one thread, inference mode, warm-up, then the median and
inter-quartile range of at least 30 timed runs, at ``measure.batch_size`` (default 1) copies of
one input.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from kdsearch.trainers.data import batches


@torch.inference_mode()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 512, device: str = "cpu") -> float:
    """Top-1 accuracy over ``dataset`` (in inference mode: no graph, no saved activations)."""
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for _, x, y in batches(dataset, batch_size):
            pred = model(x.to(device)).argmax(dim=-1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    return correct / max(total, 1)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example`` (FLOPs / 2).

    Count on the float model: FLOP counters read zero on quantized kernels.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    model.train(was_training)
    return counter.get_total_flops() // 2


#: the latency protocol's defaults: timed runs, untimed warm-up runs, threads; and the fewest timed runs allowed
RUNS, WARMUP, THREADS, MIN_RUNS = 50, 10, 1, 30


@dataclass(frozen=True)
class Latency:
    median_ms: float
    iqr_ms: float
    runs: int
    threads: int
    device: str
    cpu_capability: str
    batch_size: int = 1

    def as_metrics(self) -> dict:
        d = asdict(self)
        return {"latency_ms": d.pop("median_ms"), "latency_iqr_ms": d.pop("iqr_ms"),
                **{f"latency_{k}": v for k, v in d.items()}}


def device_name() -> str:
    """The CPU model (what a latency figure was measured on)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def batch_of(example: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``batch_size`` copies of ``example``'s first input: the batch latency is timed on."""
    return example[:1].expand(batch_size, *example.shape[1:]).contiguous()


def time_calls(call: Callable[[], Any], runs: int = RUNS, warmup: int = WARMUP) -> tuple[float, float]:
    """Median and inter-quartile range in ms of ``runs`` timed calls of ``call`` after ``warmup`` untimed ones."""
    if runs < MIN_RUNS:
        raise ValueError(f"latency needs at least {MIN_RUNS} timed runs to be comparable")
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    q1, _, q3 = statistics.quantiles(times, n=4)
    return statistics.median(times), q3 - q1


def measure_latency(model: nn.Module, example: torch.Tensor, runs: int = RUNS, warmup: int = WARMUP,
                    threads: int = THREADS, batch_size: int = 1) -> Latency:
    """Latency of ``model`` in PyTorch eager on the CPU with the protocol above."""
    # a fresh copy: quantized kernels keep the shape and threads of their first call (often a
    # batch-512 accuracy pass) and take a slow path for anything else, batch 1 included
    model = copy.deepcopy(model).eval().cpu()
    x = batch_of(example.cpu(), batch_size)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            median, iqr = time_calls(lambda: model(x), runs, warmup)
    finally:
        torch.set_num_threads(saved_threads)
    return Latency(median, iqr, runs, threads, device_name(), torch.backends.cpu.get_cpu_capability(), batch_size)
