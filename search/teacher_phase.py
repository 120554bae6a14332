"""Where the teacher phase runs: in the driver, or as a Ray task on a GPU node of the cluster.

The teacher phase (training a built-in teacher, the pass that fills its output store) is the
largest single piece of work a search does before its first trial. ``teacher.device: auto``
runs it on the driver's GPU when it has one. When it has none but the cluster it connects to
(``--address``) does, the phase runs there as one Ray task that asks for a GPU: the task
builds the stores on that node and returns the shared context, whose arrays come back
through Ray's object store as numpy buffers (no copy per reader). Without a GPU anywhere it
runs in the driver on all its cores.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from kdsearch.spaces import Space

log = logging.getLogger("kdsearch")

__all__ = ["remote_teacher_gpu", "prepare_where_the_gpu_is"]


def wants_gpu(space: Space) -> bool:
    """Whether some teacher asks for the accelerator (``auto`` or ``cuda``) while this process has none."""
    import torch

    return not torch.cuda.is_available() and any(t.device != "cpu" for t in space.teachers)


def remote_teacher_gpu(address: Optional[str]) -> bool:
    """Whether the teacher phase should run as a GPU task: a cluster was given and it has a GPU.

    Only a cluster the search connects to counts: a local Ray session would be started on this
    very machine, which has no GPU (:func:`wants_gpu` checked it).
    """
    if not address:
        return False
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) >= 1


def _prepare_task(space: Space) -> Any:
    from kdsearch.trainers.trial import prepare

    return prepare(space)


def prepare_where_the_gpu_is(space: Space, address: Optional[str], local: Any) -> Any:
    """The shared context, prepared by ``local(space)`` here or by the same call in a GPU task on the cluster.

    ``address``: the cluster the search runs on (None: this machine). The caller has connected
    to it (``ray.init``) before calling when it is given.
    """
    if not (wants_gpu(space) and remote_teacher_gpu(address)):
        return local(space)
    import ray

    log.info("no GPU here: the teacher phase runs as a task on a GPU node of the cluster")
    task = ray.remote(num_gpus=1, num_cpus=1, max_retries=0)(_prepare_task)
    return ray.get(task.remote(space))
