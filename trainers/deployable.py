"""The student as it ships: the data's preprocessing in front of it, written to ONNX, run by ONNX Runtime.

A student trains on standardised inputs (``(x / scale - mean) / std``, the training statistics a
:class:`~kdsearch.trainers.data.DataBundle` records). What a user deploys takes *raw* inputs, as
``data.source`` gives them, at any batch size: :func:`deployable` puts
:class:`~kdsearch.trainers.data.Standardize` in front of the student, and :func:`write_onnx`
writes that module as ``student.onnx`` (input ``input``, output ``logits``, dynamic batch).

Both a trial (:mod:`kdsearch.trainers.runtimes`, which measures the file it ships) and
``kdsearch export`` (:mod:`kdsearch.search.export`, which copies that file or writes the
formats a trial did not ship) go through these functions: one way to write and run ONNX.

Exporters: float and ``static_int8`` (torch.ao FX) students go through the TorchScript-based
``torch.onnx`` exporter: ~10 ms for a digits student where the torch.export-based one takes
1.3-4 s, which matters when every trial exports (twice: its untrained structure for the
per-epoch latency, then the trained student), and FX-quantized modules trace only through
TorchScript anyway. ``dynamic_int8`` students need ``quantized_decomposed`` ops that only the
torch.export-based exporter knows.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from kdsearch.trainers.quantize import dynamic_int8_copy

__all__ = ["compact_names", "deployable", "dynamic_int8_exportable", "onnx_session", "quiet_exporters", "raw_inputs", "write_onnx"]

#: the ONNX graph's input and output names (the model card's ``io``)
INPUT, OUTPUT = "input", "logits"


def deployable(student: nn.Module, data: Any) -> nn.Sequential:
    """``Standardize`` (from ``data``'s recorded preprocessing) then ``student``: takes raw inputs."""
    return nn.Sequential(OrderedDict(standardize=data.standardize(), student=student)).eval()


def raw_inputs(data: Any, x: torch.Tensor) -> torch.Tensor:
    """Preprocessed inputs ``x`` (what a student trains on) back as ``data.source`` gave them:
    the inverse of ``data.standardize()``, as ``DataBundle.raw_validation`` computes it."""
    if data.mean is not None and data.std is not None:
        x = x * data.std + data.mean
    return x * data.scale


@contextlib.contextmanager
def quiet_exporters() -> Iterator[None]:
    """No warnings or INFO chatter from the exporters and ONNX Runtime's quantization tool
    (deprecations, "torchvision is not installed", "Please consider pre-processing")."""
    names = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir",
             "torch.jit", "onnxruntime")
    saved = {n: logging.getLogger(n).level for n in names}
    root = logging.getLogger()
    # onnxruntime.quantization logs through the root logger (logging.warning): drop only its records
    from_ort = _DropFrom("onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        root.addFilter(from_ort)
        try:
            yield
        finally:
            root.removeFilter(from_ort)
            for n, level in saved.items():
                logging.getLogger(n).setLevel(level)


class _DropFrom(logging.Filter):
    """Drops records below ERROR logged from a file under a package's folder."""

    def __init__(self, package: str) -> None:
        super().__init__()
        self.marker = f"/{package}/"

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or self.marker not in record.pathname.replace("\\", "/")


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1)


def dynamic_int8_exportable(model: nn.Module, batch: torch.Tensor) -> tuple[nn.Module, int]:
    """The :func:`dynamic_int8_copy` closest to ``model`` on ``batch``, and its activation ``qmax``.

    Whether the int8 kernel uses the reduced 7-bit activation range depends on the quantized
    engine (fbgemm/x86 do, qnnpack does not): measuring both beats guessing.
    """
    with torch.inference_mode():
        reference = model(batch)
        candidates = []
        for qmax in (127, 255):
            copy_ = dynamic_int8_copy(model, qmax)
            candidates.append((float((copy_(batch) - reference).abs().max()), qmax, copy_))
    _, qmax, best = min(candidates, key=lambda c: (c[0], c[1]))
    return best, qmax


def write_onnx(model: nn.Module, batch: torch.Tensor, path: Path, quantizer: str) -> str:
    """Write ``model`` to ``path`` as ONNX (input ``input``, output ``logits``, dynamic batch); return what it holds.

    ``model``: a :func:`deployable` (``standardize`` then ``student``); ``quantizer``: the torch
    quantizer its student went through (``none`` for a float one); ``batch``: raw inputs (at
    least 2, so no size is specialised to 1).
    """
    common = {"input_names": [INPUT], "output_names": [OUTPUT], "verbose": False}
    example = batch[:2]
    with quiet_exporters():
        if quantizer == "dynamic_int8":
            pre = getattr(model, "standardize", nn.Identity())
            with torch.no_grad():
                student_batch = pre(batch)
            student, qmax = dynamic_int8_exportable(getattr(model, "student", model), student_batch)
            exportable = nn.Sequential(OrderedDict(standardize=pre, student=student)).eval()
            torch.onnx.export(exportable, (example,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=({0: _batch_dim()},), **common)
            kind = (f"onnx (int8 weights via DequantizeLinear; activations fake-quantized per batch to 0..{qmax} "
                    "as torch's dynamic int8 kernel does)")
        else:
            # output_names is required: without it the exporter's dynamic_axes check fails on FX GraphModules
            with torch.no_grad():
                torch.onnx.export(model, (example,), str(path), dynamo=False,
                                  dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, **common)
            kind = ("onnx (float, torch.onnx TorchScript exporter)" if quantizer == "none" else
                    "onnx (QDQ int8: QuantizeLinear/DequantizeLinear around Conv/Gemm, torch.onnx TorchScript exporter)")
    _strip_debug_metadata(path)
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    return kind


def _strip_debug_metadata(path: Path) -> None:
    """Drop the per-node debug strings the torch.export-based exporter records (FX node, module
    path): for a small student they are most of the file."""
    import onnx

    model = onnx.load(str(path))
    if any(len(node.metadata_props) for node in model.graph.node):
        for node in model.graph.node:
            del node.metadata_props[:]
        onnx.save(model, str(path))


def compact_names(source: Path, out: Path) -> None:
    """Copy ``source`` to ``out`` with short tensor names and no node names or doc strings.

    A digits student's graph names (``/student/stages.0/stages.0.1/Clip_output_0_zero_point``)
    weigh more than its int8 weights: a QDQ graph has two or three names per tensor, and with
    them an int8 file came out *larger* than the float one. The names are not needed to run
    the graph; the input and output keep theirs (``input``, ``logits``). The graph itself is
    unchanged.
    """
    import onnx

    model = onnx.load(str(source))
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        return name if not name or name in keep else names.setdefault(name, format(len(names), "x"))

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
        tensor.doc_string = ""
    for node in graph.node:
        node.name, node.doc_string = "", ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del graph.value_info[:]  # shapes of intermediate tensors: ONNX Runtime infers them again
    model.doc_string = graph.doc_string = ""
    onnx.save(model, str(out))


def onnx_session(path: Path | str, threads: int = 1, device: str = "cpu") -> Any:
    """An ONNX Runtime session on ``path`` with the latency protocol's settings: ``threads``
    intra-op threads, one inter-op thread, sequential execution, every graph optimisation.

    The same settings run a trial's latency and accuracy and an export's parity check, so the
    export re-checks the file exactly as the trial measured it. ``device="cuda"`` (``measure.device``)
    runs it on ONNX Runtime's ``CUDAExecutionProvider`` (onnxruntime-gpu, the current GPU); a
    session that ONNX Runtime quietly put back on the CPU is refused.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if device == "cuda":
        session = ort.InferenceSession(str(path), options, providers=["CUDAExecutionProvider"])
        if "CUDAExecutionProvider" not in session.get_providers():
            raise RuntimeError("measure.device: cuda but ONNX Runtime fell back to the CPU (no CUDAExecutionProvider: "
                               "install onnxruntime-gpu matching this CUDA, or set measure.runtime: torch)")
        return session
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
