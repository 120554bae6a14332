"""Measurement of a student for real: accuracy, parameters, MACs and latency.

Latency follows one protocol everywhere so figures compare, in every runtime
(:mod:`kdsearch.trainers.runtimes`): one thread, inference mode, warm-up, then the median and
inter-quartile range of at least 30 timed runs, at ``measure.batch_size`` (default 1) copies of
one input. On ``measure.device: cuda`` the student and its batch are on the GPU and each run is
timed by CUDA events rather than the host clock (:func:`time_calls`' ``timer``).
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

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
            pred = model(x.to(device)).argmax(dim=-1)
            correct += int((pred == y.to(pred.device)).sum())  # the labels may live on the GPU with the data
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


class WallClock:
    """Times one call by the host's clock: right for calls that return when their work is done
    (PyTorch eager on the CPU, an ONNX Runtime ``session.run``, which is synchronous on any provider)."""

    def settle(self) -> None:
        """Called once after the warm-up, before the first timed run: nothing to wait for."""

    def __call__(self, call: Callable[[], Any]) -> float:
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1e3


class CudaEvents(WallClock):
    """Times one call on the GPU: two ``torch.cuda.Event(enable_timing=True)`` recorded on the
    current stream around it, waited for with ``end.synchronize()`` (kernel launches return at once)."""

    def settle(self) -> None:
        torch.cuda.synchronize()  # the warm-up's kernels are done before the first timed run

    def __call__(self, call: Callable[[], Any]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def time_calls(call: Callable[[], Any], runs: int = RUNS, warmup: int = WARMUP,
               timer: Optional[WallClock] = None) -> tuple[float, float]:
    """Median and inter-quartile range in ms of ``runs`` timed calls of ``call`` after ``warmup`` untimed ones.

    ``timer``: how one call is timed (:class:`WallClock`, the default, or :class:`CudaEvents`).
    """
    if runs < MIN_RUNS:
        raise ValueError(f"latency needs at least {MIN_RUNS} timed runs to be comparable")
    timer = timer or WallClock()
    for _ in range(warmup):
        call()
    timer.settle()
    times = [timer(call) for _ in range(runs)]
    q1, _, q3 = statistics.quantiles(times, n=4)
    return statistics.median(times), q3 - q1


def cuda_device() -> tuple[str, str]:
    """The current GPU's name and capability (``"cuda sm_90"``): what a CUDA latency figure was measured on."""
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"cuda sm_{major}{minor}"


def check_device(device: str) -> None:
    """``device`` is a ``measure.device`` value this process can time on."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"latency is timed on cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("measure.device: cuda but torch sees no GPU in this process (CUDA_VISIBLE_DEVICES, drivers)")


def measure_latency(model: nn.Module, example: torch.Tensor, runs: int = RUNS, warmup: int = WARMUP,
                    threads: int = THREADS, batch_size: int = 1, device: str = "cpu") -> Latency:
    """Latency of ``model`` in PyTorch eager with the protocol above, on the CPU or the current GPU.

    ``device="cuda"``: the model and the batch are moved to the GPU, and each run is timed by
    CUDA events (:class:`CudaEvents`) after the warm-up and a ``torch.cuda.synchronize()``; the
    figure records the GPU's name as its ``device`` and ``"cuda sm_XY"`` as its capability.
    ``threads`` bounds the host threads either way.
    """
    check_device(device)
    # a fresh copy: quantized kernels keep the shape and threads of their first call (often a
    # batch-512 accuracy pass) and take a slow path for anything else, batch 1 included
    model = copy.deepcopy(model).eval().to(device)
    x = batch_of(example.cpu(), batch_size).to(device)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            median, iqr = time_calls(lambda: model(x), runs, warmup, CudaEvents() if device == "cuda" else WallClock())
    finally:
        torch.set_num_threads(saved_threads)
    name, capability = cuda_device() if device == "cuda" else (device_name(), torch.backends.cpu.get_cpu_capability())
    return Latency(median, iqr, runs, threads, name, capability, batch_size)
