"""Latency measured where it is not noise.

During the search, one Ray actor measures every student in turn (serialized: no two
measurements overlap), placed on a node resource that only it holds, and caches figures by
the student's structure. After the search, the driver measures every complete student again
in a quiet phase with no training running; the front uses those figures.
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
from kdsearch.trainers.measure import Latency, measure_latency

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


@ray.remote(num_cpus=0, max_concurrency=1)
class LatencyMeasurer:
    """Serialized latency measurement with a cache by structure."""

    def __init__(self, space: Space, input_shape: tuple[int, ...], num_classes: int) -> None:
        self._space, self._input_shape, self._num_classes = space, input_shape, num_classes
        self._cache: dict[str, Latency] = {}

    def measure(self, params: dict[str, Any], artifact: bytes, example: torch.Tensor) -> Latency:
        key = structure_key(params)
        if key not in self._cache:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "student.pt"
                path.write_bytes(artifact)
                model = load_trial_student(self._space, params, path, self._input_shape, self._num_classes)
            self._cache[key] = measure_latency(model, example)
        return self._cache[key]


def start_measurer(space: Space, input_shape: tuple[int, ...], num_classes: int) -> "ray.actor.ActorHandle":
    """The measurer, pinned to the latency resource when the cluster declares one."""
    options: dict[str, Any] = {}
    if ray.cluster_resources().get(LATENCY_RESOURCE, 0) >= 1:
        options["resources"] = {LATENCY_RESOURCE: 1}
    return LatencyMeasurer.options(**options).remote(space, tuple(input_shape), num_classes)


def remote_latency_fn(measurer: "ray.actor.ActorHandle", params: Mapping[str, Any]):
    """A ``latency_fn`` for :func:`kdsearch.trainers.trial.run_trial` that asks the measurer."""

    def latency(model: nn.Module, example: torch.Tensor, artifact: Path) -> Latency:
        return ray.get(measurer.measure.remote(dict(params), Path(artifact).read_bytes(), example))

    return latency
