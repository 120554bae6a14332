"""Post-training quantization behind one small interface.

A trial only calls ``get_quantizer(name).quantize(model, calib, example)`` and records
``quantizer.backend``; ``kdsearch.trainers.checkpoint`` calls ``rebuild`` to re-create the quantized
structure before loading int8 weights. Every ``torch.ao`` import lives in this file, so the
deprecated ``torch.ao.quantization`` flow can be swapped for torchao's PT2E flow
(``prepare_pt2e``/``convert_pt2e``) by registering another :class:`Quantizer`, without
touching trial or checkpoint code.

Quantizers:

- ``none``: the float model, unchanged.
- ``dynamic_int8``: ``quantize_dynamic`` on ``nn.Linear``: int8 weights, activations
  quantized on the fly per batch. Convolutions stay float (only the head of a CNN shrinks).
- ``static_int8``: FX graph mode post-training static quantization (``prepare_fx`` /
  ``convert_fx``) with the backend's default qconfig mapping, calibrated on the given
  batches: Conv+BN(+ReLU) are fused, convs and linears run in int8 with per-channel weights,
  residual adds become quantized adds.

Quantized models run on the CPU only (the int8 kernels are fbgemm/oneDNN on x86, qnnpack
on ARM), in eval mode, and cannot be trained. Their kernels read the process-wide
``torch.backends.quantized.engine``; it is set to the quantizer's backend when one is built
(the default backend is the engine already selected, so normally nothing changes).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Optional

import torch
from torch import nn

from kdsearch.spaces.errors import SpaceError
from kdsearch.spaces.registry import QUANTIZERS
from kdsearch.trainers.compress import capture_structure, is_pruned

__all__ = [
    "QuantInfo",
    "Quantizer",
    "default_backend",
    "get_quantizer",
    "quant_info",
    "quantizer_names",
    "register_quantizer",
]

#: attribute holding a quantized model's :class:`QuantInfo`
QUANT_ATTR = "kdsearch_quant"


@dataclass(frozen=True)
class QuantInfo:
    """What a saved quantized model needs to be rebuilt: the quantizer, its backend, the
    input shape used to trace it, and the float model's (pruned) structure, if pruned."""

    name: str
    backend: str
    example_shape: list[int]
    structure: Optional[dict[str, Any]]


def quant_info(model: nn.Module) -> Optional[QuantInfo]:
    """The :class:`QuantInfo` of a model returned by a quantizer, ``None`` for a float model."""
    info = getattr(model, QUANT_ATTR, None)
    return info if isinstance(info, QuantInfo) else None


def default_backend() -> str:
    """The quantized engine selected in this process (``x86`` on x86 CPUs, ``qnnpack`` on ARM)."""
    engine = torch.backends.quantized.engine
    if engine and engine != "none":
        return engine
    supported = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack", "onednn"):
        if name in supported:
            return name
    raise RuntimeError("this PyTorch build has no quantized CPU engine")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.ao's deprecation chatter (and that of quantized tensor (de)serialisation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=r".*(deprecated|reduce_range|TypedStorage|must run observer).*", category=UserWarning)
        yield


class Quantizer(ABC):
    """Turns a float model into a quantized one; subclasses implement :meth:`_convert`."""

    name: ClassVar[str]
    #: whether quantize() needs calibration batches
    needs_calibration: ClassVar[bool] = False

    def __init__(self, backend: Optional[str] = None) -> None:
        self.backend = backend or default_backend()

    def quantize(self, model: nn.Module, calib: Iterable[torch.Tensor], example: torch.Tensor) -> nn.Module:
        """A quantized copy of ``model`` (moved to the CPU, in eval mode); ``model`` is untouched.

        ``calib``: input batches for the activation observers (static only); ``example``: one
        input batch, used to trace the model.
        """
        batches = [x.cpu() for x in calib]
        if self.needs_calibration and not batches:
            raise ValueError(f"{self.name} needs at least one calibration batch")
        structure = capture_structure(model, shapes=True) if is_pruned(model) else None
        work = copy.deepcopy(model).cpu().eval()
        example = example.cpu()
        with quiet(), torch.no_grad():
            self._select_engine()
            quantized = self._convert(work, batches, example)
        setattr(quantized, QUANT_ATTR, QuantInfo(self.name, self.backend, list(example.shape), structure))
        return quantized.eval()

    def rebuild(self, model: nn.Module, info: QuantInfo) -> nn.Module:
        """The quantized structure of a float ``model`` without meaningful calibration.

        Its weights and quantization parameters are placeholders: load the saved int8
        state_dict into it (``kdsearch.trainers.checkpoint.load_student`` does).
        """
        model = model.cpu().eval()
        example = torch.zeros(info.example_shape)
        with quiet(), torch.no_grad():
            self._select_engine()
            quantized = self._convert(model, [], example)  # uncalibrated observers give placeholder qparams
        setattr(quantized, QUANT_ATTR, info)
        return quantized.eval()

    def _select_engine(self) -> None:
        if self.backend == "none":
            return
        if self.backend not in torch.backends.quantized.supported_engines:
            raise RuntimeError(f"quantized backend {self.backend!r} is not available here; "
                               f"supported: {torch.backends.quantized.supported_engines}")
        if torch.backends.quantized.engine != self.backend:
            torch.backends.quantized.engine = self.backend

    @abstractmethod
    def _convert(self, model: nn.Module, calib: list[torch.Tensor], example: torch.Tensor) -> nn.Module:
        """Quantize ``model`` (a private float model in eval mode, may be modified in place),
        calibrating on ``calib`` (empty when rebuilding a structure to load weights into)."""


def register_quantizer(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    """Register a :class:`Quantizer` subclass in :data:`QUANTIZERS` under ``name`` (a ``compress.quantize`` value)."""

    def wrap(cls: type[Quantizer]) -> type[Quantizer]:
        cls.name = name
        return QUANTIZERS.register(name, cls)

    return wrap


def quantizer_names() -> list[str]:
    return QUANTIZERS.names()


def get_quantizer(name: str, backend: Optional[str] = None) -> Quantizer:
    """The quantizer registered as ``name`` (or a ``module:attr`` ref to a :class:`Quantizer` subclass);
    ``backend`` defaults to the current engine.

    The instance's ``name`` is the one asked for, so an artifact it quantizes records that
    name (a ref included) and :func:`kdsearch.trainers.checkpoint.load_student` finds the same
    quantizer again. An unknown name raises a ``SpaceError`` that is also a ``KeyError``.
    """
    cls = QUANTIZERS.get(name, "compress.quantize")
    quantizer = cls(backend)
    if not isinstance(quantizer, Quantizer):
        raise SpaceError("compress.quantize", f"{name!r} built a {type(quantizer).__name__}, not a Quantizer",
                         "register a subclass of kdsearch.trainers.quantize.Quantizer")
    quantizer.name = name  # type: ignore[misc]
    return quantizer


@register_quantizer("none")
class NoQuantizer(Quantizer):
    """The float model as it is (``quantize`` returns the same object, untagged)."""

    def __init__(self, backend: Optional[str] = None) -> None:
        self.backend = "none"

    def quantize(self, model: nn.Module, calib: Iterable[torch.Tensor], example: torch.Tensor) -> nn.Module:
        return model

    def rebuild(self, model: nn.Module, info: QuantInfo) -> nn.Module:
        return model

    def _convert(self, model: nn.Module, calib: list[torch.Tensor], example: torch.Tensor) -> nn.Module:
        return model


@register_quantizer("dynamic_int8")
class DynamicInt8(Quantizer):
    """int8 weights for every ``nn.Linear``; activations quantized per batch at run time."""

    def _convert(self, model: nn.Module, calib: list[torch.Tensor], example: torch.Tensor) -> nn.Module:
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


@register_quantizer("static_int8")
class StaticInt8(Quantizer):
    """FX graph mode post-training static int8 (convs and linears), calibrated on batches."""

    needs_calibration = True

    def _convert(self, model: nn.Module, calib: list[torch.Tensor], example: torch.Tensor) -> nn.Module:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        prepared = prepare_fx(model, get_default_qconfig_mapping(self.backend), (example,))
        for batch in calib:
            prepared(batch)
        return convert_fx(prepared)


# --------------------------------------------------------------------------- export support


class ExportableDynamicLinear(nn.Module):
    """A dynamically quantized Linear in exportable ops, with its exact int8 weights.

    ``quantized_decomposed.dequantize_per_*`` on an int8 buffer is what ``torch.onnx``
    turns into ``DequantizeLinear``, so the ONNX file keeps the int8 weights and scales.
    The activations are fake-quantized per batch as torch's int8 kernel does at run time
    (per-tensor min/max over the batch, zero included, ``qmax`` 127 with fbgemm/x86's
    reduced range, 255 otherwise), so the file reproduces the int8 student's logits to
    about 1e-5 instead of the ~0.05 a float-activation copy is off by.
    """

    def __init__(self, qlinear: nn.Module, qmax: int) -> None:
        super().__init__()
        weight = qlinear.weight()
        if weight.dtype != torch.qint8:
            raise ValueError(f"a dynamic Linear with {weight.dtype} weights is not supported (only qint8)")
        self.qmax = qmax
        self.register_buffer("weight_int8", weight.int_repr())
        self.per_channel = weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        if self.per_channel:
            self.register_buffer("scales", weight.q_per_channel_scales().float())
            self.register_buffer("zero_points", weight.q_per_channel_zero_points())
            self.axis = int(weight.q_per_channel_axis())
        else:
            self.scale, self.zero_point = float(weight.q_scale()), int(weight.q_zero_point())
        bias = qlinear.bias()
        self.register_buffer("bias", bias.detach().float().clone() if bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = torch.clamp(x.min(), max=0.0)
        high = torch.clamp(x.max(), min=0.0)
        scale = (high - low) / self.qmax
        scale = torch.where(scale == 0, torch.full_like(scale, 0.1), scale)
        zero_point = torch.clamp(torch.round(-low / scale), 0, self.qmax)
        x = (torch.clamp(torch.round(x / scale) + zero_point, 0, self.qmax) - zero_point) * scale
        ops = torch.ops.quantized_decomposed
        if self.per_channel:
            weight = ops.dequantize_per_channel(self.weight_int8, self.scales, self.zero_points, self.axis, -128, 127,
                                                torch.int8)
        else:
            weight = ops.dequantize_per_tensor(self.weight_int8, self.scale, self.zero_point, -128, 127, torch.int8)
        return nn.functional.linear(x, weight, self.bias)


def dynamic_int8_copy(model: nn.Module, qmax: int) -> nn.Module:
    """``model`` (a ``dynamic_int8`` student) with every dynamic int8 Linear as a
    :class:`ExportableDynamicLinear`: traceable by ``torch.export``, int8 weights kept."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers the quantized_decomposed ops
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    work = copy.deepcopy(model)
    for module in list(work.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, DynamicLinear):
                setattr(module, name, ExportableDynamicLinear(child, qmax))
    return work.eval()
