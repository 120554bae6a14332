"""Latency measured where it is not noise, in the runtime the student ships in (``measure.runtime``).

During the search, one Ray actor measures every student in turn (serialized: no two
measurements overlap), placed on a node resource that only it holds, and caches figures by
the student's structure. It receives the bytes of the trial's deployed file (``student.onnx``
for onnxruntime, ``student.pt`` for torch) and runs that file. After the search, the driver
measures every complete student's logged file again in a quiet phase with no training
running (:func:`artifact_latency`); the front uses those figures.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Mapping

import ray
import torch
from torch import nn

from kdsearch.spaces import Space
from kdsearch.trainers.checkpoint import load_student
from kdsearch.trainers.measure import Latency
from kdsearch.trainers.runtimes import Deployed, get_runtime

#: the custom node resource that only the latency measurer holds
LATENCY_RESOURCE = "kdsearch_latency"


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
    """The latency of the deployed file a trial left in ``folder``, in the space's runtime, at ``measure.batch_size``.

    ``example``: one input as the file takes it (``Runtime.example``: raw for onnxruntime).
    """
    runtime = get_runtime(space.measure.runtime)
    config = space.resolve(dict(params))
    deployed = runtime.load(Path(folder) / runtime.artifact,
                            lambda: space.build_student(config, tuple(input_shape), num_classes))
    return runtime.latency(deployed, example, space.measure.batch_size)


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


def start_measurer(space: Space, input_shape: tuple[int, ...], num_classes: int) -> "ray.actor.ActorHandle":
    """The measurer, pinned to the latency resource when the cluster declares one."""
    options: dict[str, Any] = {}
    if ray.cluster_resources().get(LATENCY_RESOURCE, 0) >= 1:
        options["resources"] = {LATENCY_RESOURCE: 1}
    return LatencyMeasurer.options(**options).remote(space, tuple(input_shape), num_classes)


def remote_latency_fn(measurer: "ray.actor.ActorHandle", params: Mapping[str, Any]):
    """A ``latency_fn`` for :func:`kdsearch.trainers.trial.run_trial` that asks the measurer."""

    def latency(deployed: Deployed, example: torch.Tensor, batch_size: int) -> Latency:
        # the measurer times at the space's measure.batch_size, the batch_size the trial passes
        return ray.get(measurer.measure.remote(dict(params), deployed.path.read_bytes(), example))

    return latency
