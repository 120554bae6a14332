"""The runtimes a student ships in, each measuring the very file it ships (``measure.runtime``).

Latency and even accuracy depend on the runtime: on 30 digits students ONNX Runtime is several
times faster than PyTorch eager and ranks them differently (``benchmarks/runtimes.py``), so a
trial measures its student in the runtime the user deploys. One small interface,
:class:`Runtime`, registered by name in :data:`~kdsearch.spaces.registry.RUNTIMES`:

- ``deploy(student, quantize, calib, data, folder)`` compresses the float student as
  ``compress.quantize`` asks *for this runtime*, writes the deployed file into ``folder`` and
  returns it loaded (:class:`Deployed`);
- ``latency(deployed, example, batch_size, device)`` times that file with the protocol of
  :mod:`kdsearch.trainers.measure`, at ``measure.batch_size`` on ``measure.device`` (both passed
  by the caller from the space's ``measure``); ``accuracy(deployed, data)`` scores it on the validation set;
- ``load(path, build)`` runs a file written by ``deploy`` again (the search's latency measurer
  gets its bytes, the quiet phase and ``kdsearch export`` its logged copy).

Runtimes:

- ``onnxruntime`` (the default: ``kdsearch export`` ships ONNX): ``student.onnx``, the
  :func:`~kdsearch.trainers.deployable.deployable` student (raw inputs, the standardisation
  inside, dynamic batch), run by an ONNX Runtime CPU session with one intra-op and one
  inter-op thread, sequential execution (timed on ``measure.device: cuda`` by a session of the
  same file on the CUDAExecutionProvider). ``compress.quantize`` picks an entry of
  :data:`ONNX_QUANTIZERS`: ``none``, or ``static_int8``, ONNX Runtime's own static
  quantization (``quantize_static``, QDQ format, uint8 activations and per-channel int8
  weights as its guide advises for x86, min-max calibrated on the trial's training calibration
  batches). ONNX Runtime has no counterpart of torch's ``dynamic_int8`` for the ``Gemm`` a
  ``Linear`` exports to, so the space refuses it for this runtime.
- ``torch``: today's path. ``student.pt`` (:mod:`kdsearch.trainers.checkpoint`), the student
  alone (preprocessed inputs), quantized by :data:`~kdsearch.spaces.registry.QUANTIZERS`,
  timed in PyTorch eager. A per-trial ``.pt2`` is not practical: ``torch.export`` costs about a
  second per student and int8 students do not ``torch.export`` at all.
"""

from __future__ import annotations

import hashlib
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

import numpy as np
import torch
from torch import nn

from kdsearch.spaces.errors import SpaceError
from kdsearch.spaces.registry import QUANTIZERS, RUNTIMES, Registry
from kdsearch.trainers.checkpoint import load_student, save_student
from kdsearch.trainers.data import batches
from kdsearch.trainers.deployable import (INPUT, compact_names, deployable, onnx_session, quiet_exporters, raw_inputs,
                                          write_onnx)
from kdsearch.trainers.measure import (RUNS, Latency, accuracy, batch_of, cuda_device, device_name, measure_latency,
                                       time_calls)
from kdsearch.trainers.quantize import get_quantizer

__all__ = ["CHECKPOINT", "ONNX_QUANTIZERS", "Deployed", "Runtime", "file_sha256", "get_runtime",
           "register_runtime", "student_files"]

#: the trial's torch checkpoint (what ``kdsearch export`` rebuilds the formats a runtime did not ship from)
CHECKPOINT = "student.pt"


def student_files() -> tuple[str, ...]:
    """The files a trial leaves in its folder: the checkpoint, then each registered runtime's deployed file."""
    return tuple(dict.fromkeys([CHECKPOINT, *(cls.artifact for _, cls in RUNTIMES.items())]))


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Deployed:
    """A student as one runtime ships it: the file, loaded and ready to run."""

    runtime: "Runtime"
    path: Path
    handle: Any              # torch: the nn.Module; onnxruntime: the InferenceSession
    size_bytes: int
    sha256: str
    quant_backend: str = "none"  # what ran the int8 conversion (torch's quantized engine, onnxruntime-qdq)

    def predict(self, x: torch.Tensor) -> np.ndarray:
        """Logits on ``x`` (inputs as the file takes them: raw for onnxruntime, preprocessed for torch)."""
        return self.runtime.predict(self, x)


class Runtime(ABC):
    """A runtime a student ships in: how the file is written, run, timed and scored."""

    name: ClassVar[str]
    #: the deployed file's name in a trial's folder (and under ``student/`` in its MLflow run)
    artifact: ClassVar[str]
    #: whether the file takes raw inputs (the standardisation inside) rather than preprocessed ones
    raw_inputs: ClassVar[bool]

    @classmethod
    @abstractmethod
    def quantizer_names(cls) -> list[str]:
        """The ``compress.quantize`` names this runtime ships."""

    @classmethod
    def supports(cls, quantize: str) -> bool:
        """Whether ``compress.quantize: quantize`` can ship in this runtime (the space checks it)."""
        return quantize in cls.quantizer_names()

    def example(self, data: Any) -> torch.Tensor:
        """One input (batch of 1) as the file takes it."""
        x = data.train[0][0].unsqueeze(0)
        return raw_inputs(data, x) if self.raw_inputs else x

    def validation(self, data: Any) -> Any:
        """The validation set as the file takes it."""
        return data.raw_validation() if self.raw_inputs else data.val

    @abstractmethod
    def deploy(self, student: nn.Module, quantize: str, calib: Sequence[torch.Tensor], data: Any, folder: Path,
               meta: Optional[dict[str, Any]] = None) -> Deployed:
        """Compress the float ``student`` as ``quantize`` asks (``calib``: preprocessed training
        batches), write the deployed file into ``folder`` and return it loaded."""

    @abstractmethod
    def load(self, path: Path, build: Callable[[], nn.Module]) -> Deployed:
        """A file :meth:`deploy` wrote, loaded (``build``: a fresh float student of its config)."""

    @abstractmethod
    def predict(self, deployed: Deployed, x: torch.Tensor) -> np.ndarray:
        """Logits of ``deployed`` on the batch ``x``."""

    @abstractmethod
    def latency(self, deployed: Deployed, example: torch.Tensor, batch_size: int = 1, device: str = "cpu") -> Latency:
        """``deployed``'s latency on ``batch_size`` copies of ``example`` on ``device`` (``measure.device``:
        cpu or cuda), with the protocol of trainers.measure."""

    def accuracy(self, deployed: Deployed, data: Any) -> float:
        """Top-1 accuracy of the file on the validation set."""
        correct = total = 0
        for _, x, y in batches(self.validation(data), 512):
            correct += int((self.predict(deployed, x.float()).argmax(-1) == y.numpy()).sum())
            total += len(y)
        return correct / max(total, 1)


def register_runtime(name: str) -> Callable[[type[Runtime]], type[Runtime]]:
    """Register a :class:`Runtime` subclass in :data:`RUNTIMES` under ``name`` (a ``measure.runtime`` value)."""

    def wrap(cls: type[Runtime]) -> type[Runtime]:
        cls.name = name
        return RUNTIMES.register(name, cls)

    return wrap


def get_runtime(name: str) -> Runtime:
    """The runtime registered as ``name`` (or a ``module:attr`` ref to a :class:`Runtime` subclass)."""
    cls = RUNTIMES.get(name, "measure.runtime")
    runtime = cls()
    if not isinstance(runtime, Runtime):
        raise SpaceError("measure.runtime", f"{name!r} built a {type(runtime).__name__}, not a Runtime",
                         "register a subclass of kdsearch.trainers.runtimes.Runtime")
    return runtime


# --------------------------------------------------------------------------- torch


@register_runtime("torch")
class TorchRuntime(Runtime):
    """PyTorch eager: ``student.pt`` (the student alone, preprocessed inputs), torch.ao int8."""

    artifact = CHECKPOINT
    raw_inputs = False

    @classmethod
    def quantizer_names(cls) -> list[str]:
        return QUANTIZERS.names()

    @classmethod
    def supports(cls, quantize: str) -> bool:
        return True  # every compress.quantize value is a torch quantizer: the schema's field checked it

    def deploy(self, student: nn.Module, quantize: str, calib: Sequence[torch.Tensor], data: Any, folder: Path,
               meta: Optional[dict[str, Any]] = None) -> Deployed:
        quantizer = get_quantizer(quantize)
        model = quantizer.quantize(student.cpu().eval(), calib, self.example(data))
        path = Path(folder) / self.artifact
        path.parent.mkdir(parents=True, exist_ok=True)
        size = save_student(model, path, meta=meta)
        return Deployed(self, path, model, size, file_sha256(path), quantizer.backend)

    def load(self, path: Path, build: Callable[[], nn.Module]) -> Deployed:
        model, _ = load_student(path, build)
        return Deployed(self, Path(path), model.eval(), Path(path).stat().st_size, file_sha256(path))

    def predict(self, deployed: Deployed, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return deployed.handle(x).float().numpy()

    def latency(self, deployed: Deployed, example: torch.Tensor, batch_size: int = 1, device: str = "cpu") -> Latency:
        return measure_latency(deployed.handle, example, batch_size=batch_size, device=device)

    def accuracy(self, deployed: Deployed, data: Any) -> float:
        return accuracy(deployed.handle, data.val)


# --------------------------------------------------------------------------- onnxruntime

#: ONNX Runtime quantizers (``compress.quantize`` under ``measure.runtime: onnxruntime``):
#: name -> ``apply(float_onnx, out_onnx, raw_calib_batches)``, with a ``backend`` attribute
ONNX_QUANTIZERS: Registry[Any] = Registry("onnxruntime quantization")


def register_onnx_quantizer(name: str, backend: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def wrap(apply: Callable[..., None]) -> Callable[..., None]:
        apply.backend = backend  # type: ignore[attr-defined]
        return ONNX_QUANTIZERS.register(name, apply)

    return wrap


@register_onnx_quantizer("none", backend="none")
def _float(source: Path, out: Path, calib: Sequence[torch.Tensor]) -> None:
    """The float graph as exported."""
    Path(out).write_bytes(Path(source).read_bytes())


@register_onnx_quantizer("static_int8", backend="onnxruntime-qdq")
def _static_int8(source: Path, out: Path, calib: Sequence[torch.Tensor]) -> None:
    """ONNX Runtime static int8, QDQ: uint8 activations, per-channel int8 weights, min-max calibrated on ``calib``."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{INPUT: x.numpy()} for x in calib])

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            return next(self.feeds, None)

    if not calib:
        raise ValueError("static_int8 needs at least one calibration batch")
    quantize_static(str(source), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


@register_runtime("onnxruntime")
class OnnxRuntime(Runtime):
    """ONNX Runtime (CPU): ``student.onnx`` with the standardisation inside (raw inputs, any batch)."""

    artifact = "student.onnx"
    raw_inputs = True

    @classmethod
    def quantizer_names(cls) -> list[str]:
        return ONNX_QUANTIZERS.names()

    def deploy(self, student: nn.Module, quantize: str, calib: Sequence[torch.Tensor], data: Any, folder: Path,
               meta: Optional[dict[str, Any]] = None) -> Deployed:
        apply = ONNX_QUANTIZERS.get(quantize, "compress.quantize")
        model = deployable(student.cpu().eval(), data)
        raw_calib = [raw_inputs(data, x.cpu().float()) for x in calib]
        trace = torch.cat(raw_calib)[:2] if raw_calib else self.example(data)
        trace = trace.repeat(2, *[1] * (trace.ndim - 1))[:2] if len(trace) < 2 else trace
        path = Path(folder) / self.artifact
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp, quiet_exporters():
            from onnxruntime.quantization import quant_pre_process

            exported, optimized, quantized = (Path(tmp) / f"{n}.onnx" for n in ("exported", "optimized", "quantized"))
            write_onnx(model, trace, exported, "none")
            # ONNX Runtime's own preparation (shape inference, basic graph optimisation): what its quantizer expects
            quant_pre_process(str(exported), str(optimized))
            apply(optimized, quantized, raw_calib)
            compact_names(quantized, path)
        return Deployed(self, path, onnx_session(path), path.stat().st_size, file_sha256(path),
                        getattr(apply, "backend", quantize))

    def load(self, path: Path, build: Optional[Callable[[], nn.Module]] = None) -> Deployed:
        return Deployed(self, Path(path), onnx_session(path), Path(path).stat().st_size, file_sha256(path))

    def predict(self, deployed: Deployed, x: torch.Tensor) -> np.ndarray:
        return deployed.handle.run(None, {INPUT: x.float().numpy()})[0]

    def latency(self, deployed: Deployed, example: torch.Tensor, batch_size: int = 1, device: str = "cpu") -> Latency:
        """On ``cuda``: a session of the same file on the CUDAExecutionProvider, timed by the host
        clock (``session.run`` returns when the GPU is done and the outputs are back: the figure
        includes the input's and the logits' copies, as a deployed ONNX Runtime GPU service pays them)."""
        session = deployed.handle if device == "cpu" else onnx_session(deployed.path, device=device)
        feed = {INPUT: batch_of(example.float(), batch_size).numpy()}
        median, iqr = time_calls(lambda: session.run(None, feed), RUNS)
        threads = session.get_session_options().intra_op_num_threads
        if device == "cuda":
            name, capability = cuda_device() if torch.cuda.is_available() else ("cuda", "cuda")
        else:
            name, capability = device_name(), torch.backends.cpu.get_cpu_capability()
        return Latency(median, iqr, RUNS, threads, name, capability, batch_size)
