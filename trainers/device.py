"""Trials that use an accelerator well: where a trial's tensors live, its step's precision, its layouts.

On a CPU every function here leaves things as they are, so one code path serves both.
On a GPU:

- the trial's in-memory data and its teachers' stored outputs move to the GPU once, when they
  fit in a share of its free memory (:data:`DEVICE_SHARE`: several students may share one GPU),
  so a step indexes device memory instead of copying a batch from the host; what does not fit
  stays on the host and each batch crosses in pinned memory, without blocking;
- the step runs under autocast in ``train.precision`` (bf16, or fp16 with a gradient scaler);
- convolutional students and teachers train channels-last, and cuDNN picks its fastest kernels
  once (``cudnn.benchmark``: a trial's input shape is fixed).

>>> import torch
>>> on_accelerator("cpu"), autocast_dtype("cpu", "bf16") is None
(False, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Iterator, Optional

import torch
from torch import nn

log = logging.getLogger("kdsearch")

__all__ = ["DEVICE_SHARE", "autocast", "autocast_dtype", "fits_on", "gradient_scaler", "on_accelerator",
           "place_data", "place_teachers", "setup_device", "to_channels_last", "to_contiguous", "to_device", "uses_conv"]

#: the share of a GPU's free memory a trial may fill with its data and teacher outputs
DEVICE_SHARE = 0.25

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def on_accelerator(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def setup_device(device: str | torch.device) -> None:
    """cuDNN benchmarks its kernels once per shape (a trial's shapes are fixed); fp32 matrix products use TF32."""
    if on_accelerator(device):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def fits_on(device: str | torch.device, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether ``tensors`` (None skipped) fit in :data:`DEVICE_SHARE` of the device's free memory
    (never on a CPU: they are already there)."""
    if not on_accelerator(device):
        return False
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) <= DEVICE_SHARE * free


def to_device(x: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A batch on ``device``: from the host through pinned memory without blocking, or as it is."""
    if x.device == torch.device(device):
        return x
    if on_accelerator(device) and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def place_data(data: Any, device: str | torch.device) -> Any:
    """``data`` (a :class:`~kdsearch.trainers.data.DataBundle`) with its in-memory splits on ``device``
    when they fit; unchanged otherwise (on a CPU, or a loader-backed dataset)."""
    from kdsearch.trainers.data import TensorData

    splits = {"train": data.train, "val": data.val}
    if not all(isinstance(s, TensorData) for s in splits.values()):
        return data
    if not fits_on(device, *(t for s in splits.values() for t in (s.x, s.y))):
        return data
    return dataclasses.replace(data, **{k: TensorData(s.x.to(device), s.y.to(device)) for k, s in splits.items()})


def place_teachers(teachers: list[Any], device: str | torch.device) -> list[Any]:
    """Each teacher's stored outputs (:class:`~kdsearch.trainers.teachers.TeacherTargets`) on ``device``
    when they fit, and its model there (channels-last where convolutional)."""
    if not on_accelerator(device):
        return teachers
    placed = []
    for targets in teachers:
        if targets.model is not None:
            to_channels_last(targets.model.to(device))
        if fits_on(device, targets.logits, *targets.features):
            targets = dataclasses.replace(targets, logits=targets.logits.to(device),
                                          features=[None if f is None else f.to(device) for f in targets.features])
        placed.append(targets)
    return placed


def uses_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def to_channels_last(model: nn.Module) -> nn.Module:
    """A convolutional model on an accelerator in channels-last (its faster layout there); others as they are."""
    if uses_conv(model) and on_accelerator(next(model.parameters(), torch.empty(0)).device):
        model.to(memory_format=torch.channels_last)
    return model


def to_contiguous(model: nn.Module) -> nn.Module:
    """Back to the default layout (what pruning, safetensors and ONNX export take)."""
    return model.to(memory_format=torch.contiguous_format) if uses_conv(model) else model


def autocast_dtype(device: str | torch.device, precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``train.precision`` on ``device``: None for fp32, and on a CPU (it trains in fp32)."""
    if not on_accelerator(device) or precision == "fp32":
        return None
    dtype = _DTYPES[precision]
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return torch.float16  # pre-Ampere GPUs: fp16 with its scaler
    return dtype


@contextlib.contextmanager
def autocast(device: str | torch.device, precision: str) -> Iterator[None]:
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype):
        yield


def gradient_scaler(device: str | torch.device, precision: str) -> Optional["torch.amp.GradScaler"]:
    """fp16's gradient scaler (bf16 and fp32 need none)."""
    if autocast_dtype(device, precision) is torch.float16:
        return torch.amp.GradScaler(torch.device(device).type)
    return None
