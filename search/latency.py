"""Latency measured where it is not noise, in the runtime the student ships in (``measure.runtime``).

During the search, where a trial times its deployed file (``student.onnx`` for onnxruntime,
``student.pt`` for torch) depends on one rule: :func:`trials_share_cores` under
``measure.device: cpu`` (the default), :func:`trials_share_gpu` under ``measure.device: cuda``.

On the CPU:

- trials do not share cores (one trial at a time, or every trial that can run at once fits,
  with its whole CPUs, on the smallest node): each trial times its own file in its own process,
  on the cores it holds, with no queue to wait in (:func:`local_latency_fn`);
- trials may share cores: one Ray actor measures every student in turn (serialized: no two
  measurements overlap), placed on a node resource that only it holds where the cluster
  declares one (:data:`LATENCY_RESOURCE`), receiving the file's bytes (:func:`remote_latency_fn`).

On a GPU (``measure.device: cuda``, timed by CUDA events):

- each trial holds whole GPUs (``gpus_per_trial >= 1``), or only one trial runs at a time on
  one: each trial times its own file on its own GPU;
- trials may share a GPU (``gpus_per_trial < 1`` with more than one at once), or hold none
  (``gpus_per_trial 0``): the same serialized actor measures every student in turn, asking Ray
  for :data:`MEASURER_GPUS` of a GPU so that it lands on a GPU node with ``CUDA_VISIBLE_DEVICES``
  set. That sliver counts against the GPU's packing: with ``gpus_per_trial`` exactly ``1/k``,
  the GPU the measurer sits on takes ``k - 1`` trials beside it, not ``k``. Training kernels of
  the trials sharing that GPU still run while it measures; the quiet phase is the figure the
  front uses.

Both cache figures by the student's structure. The protocol is the same either way (one
thread, warm-up, median of at least 30 runs: :mod:`kdsearch.trainers.measure`). After the
search, the driver measures every complete student's logged file again in a quiet phase with
no training running (:func:`artifact_latency`), on ``measure.device``: under ``cuda`` on the
driver's GPU (the probes refuse a driver where torch sees none); the front uses those figures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import ray
import torch
from torch import nn

from kdsearch.spaces import Space
from kdsearch.trainers.checkpoint import load_student
from kdsearch.trainers.measure import Latency
from kdsearch.trainers.runtimes import Deployed, get_runtime

log = logging.getLogger("kdsearch")

#: the custom node resource that only the latency measurer holds
LATENCY_RESOURCE = "kdsearch_latency"
#: the GPU fraction the measurer asks for under ``measure.device: cuda`` (a GPU node and a visible GPU)
MEASURER_GPUS = 0.01


def structure_key(params: Mapping[str, Any]) -> str:
    """Students with the same architecture and compression share a latency figure."""
    family = params.get("student.family")
    keys = {k: v for k, v in params.items()
            if k.startswith(f"student.{family}.") or k in ("student.family", "compress.prune_ratio", "compress.quantize")}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_trial_student(space: Space, params: Mapping[str, Any], path: Path | str,
                       input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A trial's compressed student, rebuilt from its artifact (quantized models do not pickle)."""
    config = space.resolve(dict(params))
    model, _ = load_student(path, lambda: space.build_student(config, tuple(input_shape), num_classes))
    return model.eval()


def runtime_example(space: Space, data: Any) -> torch.Tensor:
    """One input as the space's runtime's deployed file takes it."""
    return get_runtime(space.measure.runtime).example(data)


def artifact_latency(space: Space, params: Mapping[str, Any], folder: Path | str, example: torch.Tensor,
                     input_shape: tuple[int, ...], num_classes: int) -> Latency:
    """The latency of the deployed file a trial left in ``folder``, in the space's runtime, at
    ``measure.batch_size`` on ``measure.device``.

    ``example``: one input as the file takes it (``Runtime.example``: raw for onnxruntime).
    """
    runtime = get_runtime(space.measure.runtime)
    config = space.resolve(dict(params))
    deployed = runtime.load(Path(folder) / runtime.artifact,
                            lambda: space.build_student(config, tuple(input_shape), num_classes))
    return runtime.latency(deployed, example, space.measure.batch_size, device=space.measure.device)


@ray.remote(num_cpus=0, max_concurrency=1)
class LatencyMeasurer:
    """Serialized latency measurement with a cache by structure."""

    def __init__(self, space: Space, input_shape: tuple[int, ...], num_classes: int) -> None:
        self._space, self._input_shape, self._num_classes = space, input_shape, num_classes
        self._cache: dict[str, Latency] = {}

    def measure(self, params: dict[str, Any], artifact: bytes, example: torch.Tensor) -> Latency:
        """The latency of a trial's deployed file (its bytes), run by the space's runtime."""
        key = structure_key(params)
        if key not in self._cache:
            runtime = get_runtime(self._space.measure.runtime)
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / runtime.artifact).write_bytes(artifact)
                self._cache[key] = artifact_latency(self._space, params, tmp, example, self._input_shape,
                                                    self._num_classes)
        return self._cache[key]


def trials_share_cores(max_concurrent: int, cpus_per_trial: float, node_cpus: Sequence[float]) -> bool:
    """The rule for where latency is timed: whether trials running at once may share CPU cores.

    ``node_cpus``: the CPUs of each node. At most ``max_concurrent`` trials run at once, and no
    more than the cluster's CPUs hold; each takes ``ceil(cpus_per_trial)`` whole cores (a
    fraction of a CPU still runs a thread on one). They do not share cores when at most one
    runs at a time, or when all of them fit together on the smallest node that has CPUs: then
    a trial timing its file has its cores to itself. With no CPU node known (an autoscaling
    cluster before its workers join) they may share.
    """
    cpu_nodes = [c for c in node_cpus if c > 0]
    if not cpu_nodes:
        return max_concurrent > 1
    concurrent = min(max_concurrent, math.floor(sum(cpu_nodes) / cpus_per_trial + 1e-9))
    return concurrent > 1 and concurrent * math.ceil(cpus_per_trial) > min(cpu_nodes)


def trials_share_gpu(max_concurrent: int, gpus_per_trial: float) -> bool:
    """The rule for where latency is timed under ``measure.device: cuda``: whether trials running at
    once may share a GPU. They may when each asks for less than a whole GPU (Ray packs fractions
    onto one) and more than one trial can run at once."""
    return gpus_per_trial < 1 and max_concurrent > 1


def node_cpus() -> list[float]:
    """The CPUs of each live node of the connected Ray cluster."""
    return [float(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]


def latency_measurer(space: Space, input_shape: tuple[int, ...], num_classes: int, max_concurrent: int,
                     cpus_per_trial: float, gpus_per_trial: float = 0.0) -> Optional["ray.actor.ActorHandle"]:
    """The serialized measurer where trials share cores (:func:`trials_share_cores`) or, under
    ``measure.device: cuda``, a GPU (:func:`trials_share_gpu`) or hold none; else None: each
    trial times its own file."""
    if space.measure.device == "cuda":
        fit = f"up to {max_concurrent} trials x {gpus_per_trial:g} GPUs"
        if gpus_per_trial <= 0:
            log.info(f"latency: one measurer on a GPU times every trial's file in turn ({fit}: trials hold no GPU)")
        elif trials_share_gpu(max_concurrent, gpus_per_trial):
            log.info(f"latency: one measurer on a GPU times every trial's file in turn ({fit}: trials may share a GPU; "
                     f"the measurer holds {MEASURER_GPUS:g} of one)")
        else:
            log.info(f"latency: each trial times its own file on its own GPU ({fit}: no GPU shared)")
            return None
        return start_measurer(space, input_shape, num_classes)
    cpus = node_cpus()
    smallest = min((c for c in cpus if c > 0), default=0)
    fit = f"up to {max_concurrent} trials x {cpus_per_trial:g} CPUs, smallest node {smallest:g} CPUs"
    if not trials_share_cores(max_concurrent, cpus_per_trial, cpus):
        log.info(f"latency: each trial times its own file ({fit}: no core shared)")
        return None
    log.info(f"latency: one measurer times every trial's file in turn ({fit}: trials may share cores)")
    return start_measurer(space, input_shape, num_classes)


def start_measurer(space: Space, input_shape: tuple[int, ...], num_classes: int) -> "ray.actor.ActorHandle":
    """The measurer, pinned to the latency resource when the cluster declares one; under
    ``measure.device: cuda`` on a GPU instead (:data:`MEASURER_GPUS` of one)."""
    options: dict[str, Any] = {}
    if space.measure.device == "cuda":
        options["num_gpus"] = MEASURER_GPUS
    elif ray.cluster_resources().get(LATENCY_RESOURCE, 0) >= 1:
        options["resources"] = {LATENCY_RESOURCE: 1}
    return LatencyMeasurer.options(**options).remote(space, tuple(input_shape), num_classes)


def remote_latency_fn(measurer: "ray.actor.ActorHandle", params: Mapping[str, Any]):
    """A ``latency_fn`` for :func:`kdsearch.trainers.trial.run_trial` that asks the measurer."""

    def latency(deployed: Deployed, example: torch.Tensor, batch_size: int, device: Optional[str] = None) -> Latency:
        # the measurer times at the space's measure.batch_size and measure.device, what the trial passes
        return ray.get(measurer.measure.remote(dict(params), deployed.path.read_bytes(), example))

    return latency


#: figures this process measured: (space, structure, batch size, device) -> latency (a Tune worker runs many trials)
_measured: dict[tuple[str, str, int, str], Latency] = {}


def local_latency_fn(space: Space, params: Mapping[str, Any]):
    """A ``latency_fn`` that times the deployed file in this process (the trial's own cores),
    once per structure as the measurer does."""
    key = (hashlib.sha256(space.text.encode()).hexdigest(), structure_key(params))

    def latency(deployed: Deployed, example: torch.Tensor, batch_size: int, device: Optional[str] = None) -> Latency:
        device = device or space.measure.device  # the trial passes measure.device, else it is the space's
        slot = (*key, batch_size, device)
        if slot not in _measured:
            _measured[slot] = deployed.runtime.latency(deployed, example, batch_size, device=device)
        return _measured[slot]

    return latency


def trial_latency_fn(measurer: Optional["ray.actor.ActorHandle"], space: Space, params: Mapping[str, Any]):
    """The trial's ``latency_fn``: the measurer's where there is one, else its own process's."""
    return remote_latency_fn(measurer, params) if measurer is not None else local_latency_fn(space, params)
