"""``kdsearch export`` and :func:`export_student`: the most accurate front student that meets
the limits, as deployable files.

The student is rebuilt from the checkpoint its trial logged (``student/student.pt`` in the
nested run) and the space the search logged (``space.yaml`` in the parent run), then written
in the asked formats and *verified*: every file is run by its own runtime and compared with
the rebuilt in-process model on the validation set. A file that does not match is an error,
never a warning.

What you measure is what you ship: the file the trial's runtime measured (``measure.runtime``:
``student/student.onnx`` for onnxruntime, ``student/student.pt`` for torch) is not rebuilt but
copied byte for byte (its sha256 checked against the one the trial recorded, both in the card)
and held to the accuracy the search logged for it. The other formats are built from the
checkpoint as above (under onnxruntime the checkpoint is the float student: ONNX Runtime's
int8 is its own, so a ``static_int8`` trial's pt2 is float and matches ``val_acc_checkpoint``).

Deployable: the ONNX and pt2/TorchScript files hold the data's preprocessing (the per-channel
standardisation with training statistics, :class:`~kdsearch.trainers.data.Standardize`) in
front of the student, so they take *raw* inputs as ``data.source`` gives them, and any batch
size. Parity is checked on raw validation inputs at batch 1, 7 and :data:`VAL_BATCH`, and the
whole validation set's accuracy on raw inputs must match the in-process student's and the
accuracy the search logged. ``student.pt`` stays the trial's checkpoint as logged: the student
alone, which takes preprocessed inputs (``model_card.json``'s ``preprocessing`` says how).

Where files go: ``<out>/<search run name>/<trial>/`` (e.g. ``exports/digits-20261125-021928/
trial-002/``), written in a staging folder and moved there only once every file passed, so a
folder holding a ``model_card.json`` is always a complete, verified export. Exporting the
same trial again replaces it. The card (input shape and dtype, class count, preprocessing,
metrics, the trial and search it came from, each file's parity) is also the description of the
registered model version (``--register``).

Formats and how each kind of student gets there:

==============  ===========================================  =========================================
format          float student                                int8 student (``kdsearch.trainers.quantize``)
==============  ===========================================  =========================================
``onnx``        ``student.onnx``: ``torch.onnx.export``      ``static_int8``: ``student.onnx`` as a QDQ
                (TorchScript-based exporter, dynamic         graph (QuantizeLinear/DequantizeLinear
                batch axis; kdsearch.trainers.deployable)    around float Conv/Gemm) from the
                                                             TorchScript-based exporter, which knows
                                                             the FX-quantized ops (the dynamo exporter
                                                             cannot trace them).
                                                             ``dynamic_int8``: the exact int8 weights
                                                             and scales feed DequantizeLinear -> Gemm,
                                                             and the activations are fake-quantized per
                                                             batch in ONNX ops as torch's dynamic int8
                                                             kernel does (dynamo exporter).
``pt2``         ``student.pt2``: ``torch.export`` program    ``student.ts``: a TorchScript trace
                (``torch.export.load(f).module()``)          (``torch.jit.load``): quantized modules
                                                             neither ``torch.export`` nor pickle.
``state_dict``  ``student.pt``: the trial's checkpoint as logged (load with
                ``kdsearch.trainers.checkpoint.load_student``; ``weights_only`` safe); the student
                alone: it takes *preprocessed* inputs (apply the card's ``preprocessing`` first)
==============  ===========================================  =========================================

Parity rule (:data:`TOLERANCE`): a float student's files must give logits within 1e-4 of the
in-process model on a validation batch and the same validation accuracy within 0.1 point;
an int8 student's within 0.5 point (int8 kernels round differently from runtime to runtime,
so their max abs difference is reported, not bounded).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from kdsearch.search.tracking import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI
from kdsearch.spaces.errors import ExportError, TrackingError, UserError
from kdsearch.trainers.deployable import onnx_session, quiet_exporters, write_onnx
from kdsearch.trainers.measure import THREADS
from kdsearch.trainers.runtimes import file_sha256

__all__ = [
    "FORMATS", "ExportError", "ExportResult", "Exported", "Limits", "NoTrialFits", "Parity", "cmd_export",
    "export_student", "select", "violation", "write_verified",
]

#: the ``--format`` names, in the order files are written
FORMATS = ("onnx", "pt2", "state_dict")
#: samples of the validation batch the max abs difference is taken on
VAL_BATCH = 64
#: batch sizes at which a file's logits are compared (the first n validation samples each)
PARITY_BATCHES = (1, 7, VAL_BATCH)
#: how far a file may be from the in-process model: logits (None: reported only) and accuracy points
TOLERANCE = {"float": {"max_abs_diff": 1e-4, "acc_points": 0.1}, "int8": {"max_abs_diff": None, "acc_points": 0.5}}
#: how many of the nearest trials a "nothing fits" error lists
CLOSEST = 3

Predict = Callable[[torch.Tensor], np.ndarray]
#: progress of :func:`export_student` (the library prints nothing; ``kdsearch export`` shows it)
log = logging.getLogger("kdsearch")


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Limits:
    """Upper bounds on front metrics; ``None`` leaves a metric free."""

    max_latency_ms: Optional[float] = None
    max_params: Optional[int] = None
    max_size_bytes: Optional[int] = None

    #: field -> (flag, metric of a front row)
    FIELDS: ClassVar[dict[str, tuple[str, str]]] = {
        "max_latency_ms": ("--max-latency-ms", "latency_ms"),
        "max_params": ("--max-params", "params"),
        "max_size_bytes": ("--max-size-bytes", "size_bytes"),
    }

    def checks(self) -> list[tuple[str, str, float]]:
        """``(flag, metric, bound)`` for every limit that is set."""
        return [(flag, metric, float(getattr(self, name))) for name, (flag, metric) in self.FIELDS.items()
                if getattr(self, name) is not None]

    def as_dict(self) -> dict[str, float]:
        """``{metric: bound}`` (what the model card records)."""
        return {metric: bound for _, metric, bound in self.checks()}

    def describe(self) -> str:
        checks = self.checks()
        return " ".join(f"{flag} {_fmt(bound)}" for flag, _, bound in checks) if checks else "no limits"

    def validate(self) -> "Limits":
        """Refuse limits no student can meet by construction (zero, negative, NaN)."""
        for flag, _, bound in self.checks():
            if not math.isfinite(bound) or bound <= 0:
                raise UserError(f"{flag} {_fmt(bound)}: a limit must be a positive number; fix: pass e.g. {flag} 1000")
        return self


class NoTrialFits(UserError):
    """No front trial meets the limits; ``closest`` holds the nearest rows (smallest violation first)."""

    def __init__(self, message: str, closest: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.closest = closest


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def violation(row: Mapping[str, Any], limits: Limits) -> float:
    """How far ``row`` is from meeting ``limits``: the sum of relative overshoots
    (``value / bound - 1`` where above the bound), 0 when it meets them all, ``inf`` when a
    limited metric is missing. Relative, so milliseconds and parameter counts add up."""
    total = 0.0
    for _, metric, bound in limits.checks():
        value = _number(row.get(metric))
        if value is None:
            return math.inf
        total += max(0.0, value / bound - 1.0)
    return total


def _accuracy_key(row: Mapping[str, Any]) -> tuple[float, float, float]:
    """Most accurate first; ties go to the faster, then the smaller student."""
    acc = _number(row.get("val_acc"))
    lat = _number(row.get("latency_ms"))
    params = _number(row.get("params"))
    return (-(acc if acc is not None else -math.inf), lat if lat is not None else math.inf,
            params if params is not None else math.inf)


def select(front: Sequence[Mapping[str, Any]], limits: Limits) -> dict[str, Any]:
    """The most accurate complete front row meeting every limit.

    Raises :class:`NoTrialFits` (a :class:`UserError`) naming the :data:`CLOSEST` trials with
    the smallest :func:`violation` and their figures when none does.
    """
    rows = [dict(r) for r in front if r.get("status", "complete") == "complete" and _number(r.get("val_acc")) is not None]
    if not rows:
        raise NoTrialFits("the search's front holds no complete trial; fix: run a longer search (more --num-samples)", [])
    fits = [r for r in rows if violation(r, limits) == 0.0]
    if fits:
        return min(fits, key=_accuracy_key)
    closest = sorted(rows, key=lambda r: (violation(r, limits), _accuracy_key(r)))[:CLOSEST]
    described = "; ".join(_describe_miss(r, limits) for r in closest)
    raise NoTrialFits(f"no front trial meets {limits.describe()} ({len(rows)} on the front); closest: {described}; "
                      "fix: relax a limit or search longer", closest)


def _describe_miss(row: Mapping[str, Any], limits: Limits) -> str:
    parts = [f"{row.get('trial', row.get('trial_id', '?'))} val_acc {_fmt(row.get('val_acc'))}"]
    for _, metric, bound in limits.checks():
        value = _number(row.get(metric))
        if value is None:
            parts.append(f"{metric} unknown")
        elif value > bound:
            parts.append(f"{metric} {_fmt(value)} > {_fmt(bound)} (+{(value / bound - 1) * 100:.0f}%)")
        else:
            parts.append(f"{metric} {_fmt(value)} ok")
    return " ".join(parts)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


# --------------------------------------------------------------------------- parity


@dataclass
class Parity:
    """One exported file against the in-process student on the validation set."""

    max_abs_diff: float          # logits: the largest over PARITY_BATCHES (the first n validation samples each)
    batch: int                   # the largest batch compared
    val_acc: float               # the file's accuracy on the whole validation set
    reference_val_acc: float     # the in-process model's
    acc_diff_points: float       # |val_acc - reference_val_acc| in percentage points
    samples: int
    tolerance: dict[str, Optional[float]]
    ok: bool
    inputs: str = "raw"          # what the file was fed: raw (as data.source gives them) or preprocessed
    max_abs_diff_by_batch: dict[str, float] = field(default_factory=dict)
    logged_val_acc: Optional[float] = None      # what the search logged for the trial
    logged_diff_points: Optional[float] = None  # |val_acc - logged_val_acc| in percentage points


@dataclass
class Exported:
    """One written and verified file."""

    format: str                  # onnx | pt2 | state_dict
    file: str                    # name inside the export folder
    kind: str                    # what the file holds, e.g. "onnx (QDQ int8)" or "torch.export program"
    bytes: int
    sha256: str
    runtime: str                 # what it was verified with
    parity: Parity
    inputs: str = "raw"          # raw: the preprocessing is in the file; preprocessed: apply it first (student.pt)
    shipped: bool = False        # the trial's logged file, copied as is (not rebuilt)
    logged_sha256: Optional[str] = None  # the sha256 the trial recorded for it (equal to sha256)


@dataclass(frozen=True)
class Shipped:
    """The deployed file a trial measured and logged (``student/student.onnx`` or ``student/student.pt``),
    which the export copies as is instead of rebuilding it."""

    path: Path                   # downloaded from the trial's run
    format: str                  # the export format it stands for: onnx | state_dict
    sha256: Optional[str]        # what the trial recorded (artifact_sha256)
    val_acc: Optional[float]     # what the search logged for it: its own accuracy in its runtime
    matches_reference: bool      # whether it computes what the rebuilt student does (not an int8 of a float one)


@dataclass
class ExportResult:
    """What :func:`export_student` wrote: the folder, the trial and its files, and the model card."""

    folder: Path                 # <out>/<search run name>/<trial>, holding the files and model_card.json
    trial: str                   # e.g. trial-003
    run_id: str                  # the trial's MLflow run
    files: list[Exported]
    card: dict[str, Any]         # model_card.json's content

    @property
    def registered(self) -> Optional[dict[str, str]]:
        """``{"name", "version", "source"}`` when ``register`` was given."""
        return self.card.get("registered")


def _predictions(predict: Predict, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """Arg-max predictions and labels over ``dataset`` (batches of 512, in order)."""
    from kdsearch.trainers.data import batches

    preds, labels = [], []
    for _, x, y in batches(dataset, 512):
        preds.append(np.asarray(predict(x.float())).argmax(axis=-1))
        labels.append(y.numpy())
    return np.concatenate(preds), np.concatenate(labels)


def torch_predict(model: Callable[[torch.Tensor], torch.Tensor]) -> Predict:
    """A :data:`Predict` running a torch module (or loaded program) without gradients."""

    def predict(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(x).float().numpy()

    return predict


@dataclass
class Reference:
    """The rebuilt in-process student's outputs that every file is compared with."""

    batch: torch.Tensor          # the first VAL_BATCH validation inputs, preprocessed (what the student takes)
    raw_batch: torch.Tensor      # the same samples as data.source gives them (what a deployable file takes)
    logits_at: dict[int, np.ndarray]  # the student on the first n of them, for n in PARITY_BATCHES
    val_acc: float
    samples: int
    logged_val_acc: Optional[float] = None

    @property
    def logits(self) -> np.ndarray:
        return self.logits_at[len(self.batch)]

    @property
    def sizes(self) -> list[int]:
        return sorted({min(n, len(self.batch)) for n in PARITY_BATCHES})


def reference_outputs(model: nn.Module, data: Any, logged_val_acc: Optional[float] = None) -> Reference:
    """The in-process student (preprocessed inputs, as the search measured it) on the first
    :data:`PARITY_BATCHES` validation samples and on the whole set."""
    from kdsearch.trainers.data import batches

    predict = torch_predict(model)
    _, x, _ = next(batches(data.val, VAL_BATCH))
    _, raw, _ = next(batches(data.raw_validation(), VAL_BATCH))
    x, raw = x.float(), raw.float()
    preds, labels = _predictions(predict, data.val)
    logits = {n: predict(x[:n]) for n in sorted({min(n, len(x)) for n in PARITY_BATCHES})}
    return Reference(x, raw, logits, float((preds == labels).mean()), len(labels), logged_val_acc)


def check_parity(predict: Predict, reference: Reference, dataset: Any, quantized: bool, raw: bool = True,
                 shipped: Optional[Shipped] = None) -> Parity:
    """``predict`` (a file's runtime) against the in-process reference, judged by :data:`TOLERANCE`.

    ``raw``: the file takes raw inputs (``dataset`` is the raw validation set) and is fed the raw
    samples; otherwise the preprocessed ones. Logits are compared at every :data:`PARITY_BATCHES`
    size; the whole set's accuracy with the in-process student's and the logged one (when known).
    A ``shipped`` file is held to the accuracy the search logged for *it*; one that does not
    compute what the rebuilt student does (ONNX Runtime's int8 of a float checkpoint) has its
    distance to the reference reported, not bounded.
    """
    tolerance = TOLERANCE["int8" if quantized else "float"]
    if shipped is not None:
        reference = dataclasses.replace(reference, logged_val_acc=shipped.val_acc)
        if not shipped.matches_reference:
            tolerance = {"max_abs_diff": None, "acc_points": tolerance["acc_points"], "reference_acc_points": None}
    inputs = reference.raw_batch if raw else reference.batch
    by_batch = {str(n): float(np.abs(np.asarray(predict(inputs[:n]), dtype=np.float64) - reference.logits_at[n]).max())
                for n in reference.sizes}
    diff = max(by_batch.values())
    preds, labels = _predictions(predict, dataset)
    acc = float((preds == labels).mean())
    points = abs(acc - reference.val_acc) * 100.0
    logged = reference.logged_val_acc
    logged_points = None if logged is None else abs(acc - logged) * 100.0
    bound, limit = tolerance["max_abs_diff"], tolerance["acc_points"] + 1e-9
    versus_reference = tolerance.get("reference_acc_points", tolerance["acc_points"])
    ok = ((versus_reference is None or points <= versus_reference + 1e-9) and (bound is None or diff <= bound)
          and (logged_points is None or logged_points <= limit))
    return Parity(diff, max(reference.sizes), acc, reference.val_acc, points, len(labels), dict(tolerance), bool(ok),
                  "raw" if raw else "preprocessed", by_batch, logged, logged_points)


# --------------------------------------------------------------------------- writers


def onnx_predict(path: Path) -> tuple[Predict, str]:
    """Run ``path`` in an ONNX Runtime session with the trial's settings (:func:`~kdsearch.trainers.deployable.onnx_session`)."""
    import onnxruntime as ort

    session = onnx_session(path)
    name = session.get_inputs()[0].name

    def predict(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {name: x.numpy()})[0]

    return predict, f"onnxruntime {ort.__version__} (CPUExecutionProvider, {THREADS} thread)"


def _batch_dim() -> Any:
    return torch.export.Dim("batch", min=1)


def write_program(model: nn.Module, example: torch.Tensor, folder: Path, quantized: bool) -> tuple[Path, str]:
    """``student.pt2`` (torch.export, dynamic batch ``Dim``) for a float student, ``student.ts``
    (TorchScript trace, which keeps the batch size symbolic) for an int8 one. ``example``: at least 2 rows."""
    with quiet_exporters(), torch.no_grad():
        if not quantized:
            path = folder / "student.pt2"
            program = torch.export.export(model, (example,), dynamic_shapes=({0: _batch_dim()},))
            torch.export.save(program, str(path))
            return path, "torch.export program (.pt2, dynamic batch)"
        path = folder / "student.ts"
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))
        return path, "TorchScript trace (.ts, any batch size): int8 modules do not torch.export"


def program_predict(path: Path) -> tuple[Predict, str]:
    with quiet_exporters():
        if path.suffix == ".pt2":
            module = torch.export.load(str(path)).module()
            runtime = f"torch {torch.__version__} torch.export.load"
        else:
            module = torch.jit.load(str(path), map_location="cpu").eval()
            runtime = f"torch {torch.__version__} torch.jit.load"
    return torch_predict(module), runtime


# --------------------------------------------------------------------------- export


def rebuild(space: Any, config: Mapping[str, Any], checkpoint: Path, data: Any, trial: str = "the trial") -> nn.Module:
    """The trial's compressed student from its checkpoint, exactly as the search measured it."""
    from kdsearch.search.latency import load_trial_student

    try:
        with quiet_exporters():
            return load_trial_student(space, config, checkpoint, data.input_shape, data.num_classes)
    except Exception as exc:  # a wrong or damaged artifact surfaces as many kinds
        raise ExportError(f"{trial}: cannot rebuild the student from its student.pt ({_first_line(exc)}); "
                          "fix: export a trial of a search made with this version of kdsearch") from None


def write_verified(space: Any, config: Mapping[str, Any], checkpoint: Path, folder: Path, formats: Sequence[str],
                   data: Any, trial: str = "the trial", logged_val_acc: Optional[float] = None,
                   shipped: Optional[Shipped] = None) -> tuple[list[Exported], Reference, nn.Module]:
    """Write ``formats`` of the student in ``checkpoint`` into ``folder`` and verify each file.

    ONNX and pt2/TorchScript files are :func:`~kdsearch.search.deploy.deployable` (raw inputs,
    any batch); ``student.pt`` is the checkpoint (preprocessed inputs). ``logged_val_acc``: the
    accuracy the search logged for the checkpoint, which the rebuilt student and every file
    must match too. ``shipped``: the deployed file the trial measured; its format is that file
    copied byte for byte (its sha256 checked against the trial's record) and held to the
    accuracy logged for it, not rebuilt.
    Returns the files, the in-process reference they were compared with, and the student.
    Raises :class:`ExportError` when a file cannot be written or misses :data:`TOLERANCE`.
    """
    from kdsearch.search.deploy import deployable
    from kdsearch.trainers.quantize import quant_info

    model = rebuild(space, config, checkpoint, data, trial)
    info = quant_info(model)
    quantizer = info.name if info is not None else "none"
    quantized = info is not None
    with quiet_exporters():
        reference = reference_outputs(model, data, logged_val_acc)
    limit = TOLERANCE["int8" if quantized else "float"]["acc_points"]
    if logged_val_acc is not None and abs(logged_val_acc - reference.val_acc) * 100 > limit + 1e-9:
        raise ExportError(f"{trial}: the rebuilt student scores val_acc {reference.val_acc:.4f} on this data, the search "
                          f"logged {logged_val_acc:.4f} ({abs(logged_val_acc - reference.val_acc) * 100:.2f} points, "
                          f"limit {limit}); fix: export with the data the search ran on (has data.source changed?)")
    deploy = deployable(model, data)
    raw_val = data.raw_validation()
    batch = reference.raw_batch
    if len(batch) < 2:
        batch = batch.repeat(2, *[1] * (batch.ndim - 1))
    example = batch[:2]
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Exported] = []
    for fmt in formats:
        raw = fmt != "state_dict"
        copied = shipped is not None and shipped.format == fmt
        try:
            if copied:
                assert shipped is not None
                path = folder / shipped.path.name
                shutil.copyfile(shipped.path, path)
                if shipped.sha256 and file_sha256(path) != shipped.sha256:
                    raise ExportError(f"{fmt}: {trial}'s logged {path.name} has sha256 {file_sha256(path)[:12]}..., the "
                                      f"trial recorded {shipped.sha256[:12]}...; fix: the run's artifacts were changed: "
                                      "export another trial or search again")
                kind = f"the trial's deployed file, copied as measured ({path.name}, {config.get('compress.quantize', 'none')})"
                predict, runtime = onnx_predict(path) if fmt == "onnx" else (
                    torch_predict(rebuild(space, config, path, data, trial)), "kdsearch.trainers.checkpoint.load_student")
            elif fmt == "onnx":
                path = folder / "student.onnx"
                kind = write_onnx(deploy, batch, path, quantizer)
                predict, runtime = onnx_predict(path)
            elif fmt == "pt2":
                path, kind = write_program(deploy, example, folder, quantized)
                predict, runtime = program_predict(path)
            else:
                path = folder / "student.pt"
                shutil.copyfile(checkpoint, path)
                kind = ("kdsearch student checkpoint (trainers.checkpoint.load_student, weights_only): the student "
                        "alone")
                predict = torch_predict(rebuild(space, config, path, data, trial))
                runtime = "kdsearch.trainers.checkpoint.load_student"
        except ExportError:
            raise
        except Exception as exc:
            others = ",".join(f for f in FORMATS if f != fmt)
            raise ExportError(f"{fmt}: cannot write {trial} ({quantizer} student): {_first_line(exc)}; "
                              f"fix: pass --format {others}") from None
        with quiet_exporters():
            try:
                parity = check_parity(predict, reference, raw_val if raw else data.val,
                                      quantized or (copied and config.get("compress.quantize", "none") != "none"), raw=raw,
                                      shipped=shipped if copied else None)
            except Exception as exc:  # e.g. a file that refuses a batch size
                raise ExportError(f"{fmt}: {path.name} fails on validation inputs of {trial}: {_first_line(exc)}; "
                                  f"fix: report it; meanwhile pass --format {','.join(f for f in FORMATS if f != fmt)}") from None
        if not parity.ok:
            tol = parity.tolerance
            bound = f"max abs diff {parity.max_abs_diff:.3g} (limit {tol['max_abs_diff']}), " if tol["max_abs_diff"] else ""
            logged = (f", {parity.logged_diff_points:.2f} points from the logged {parity.logged_val_acc:.4f}"
                      if parity.logged_val_acc is not None else "")
            raise ExportError(f"{fmt}: {path.name} does not match the in-process student of {trial}: {bound}"
                              f"val_acc {parity.val_acc:.4f} vs {parity.reference_val_acc:.4f} "
                              f"({parity.acc_diff_points:.2f} points{logged}, limit {tol['acc_points']}); "
                              f"fix: report it; meanwhile pass --format {','.join(f for f in FORMATS if f != fmt)}")
        out.append(Exported(fmt, path.name, kind, path.stat().st_size, file_sha256(path), runtime, parity,
                            "raw" if raw else "preprocessed", copied, shipped.sha256 if copied and shipped else None))
    return out, reference, model


def parse_formats(text: str) -> list[str]:
    """``onnx,pt2`` -> ``["onnx", "pt2"]`` (known names, each once, in :data:`FORMATS` order)."""
    names = [t.strip().lower() for t in (text or "").split(",") if t.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise UserError(f"--format {text}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
                        f"fix: pass a comma list of {', '.join(FORMATS)}")
    return [f for f in FORMATS if f in names]


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return (text.splitlines()[0][:200] if text else type(exc).__name__)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "search"


def _download(c: Any, run_id: str, artifact: str, folder: Path, what: str) -> Path:
    try:
        return Path(c.download_artifacts(run_id, artifact, str(folder)))
    except Exception:
        raise TrackingError(f"run {run_id} has no {artifact} ({what}); fix: export from a search that finished") from None


def load_logged_space(c: Any, parent_id: str, folder: Path) -> Any:
    """The space the search ran, from its ``space.yaml`` artifact."""
    from kdsearch.spaces import parse_space
    from kdsearch.spaces.schema import read_yaml

    text = _download(c, parent_id, "space.yaml", folder, "the search's space").read_text()
    return parse_space(read_yaml(text, "space.yaml"), text=text)


def _row_metrics(row: Mapping[str, Any]) -> dict[str, Any]:
    """The front row's figures (objectives, size, MACs, timings), without ids and config."""
    from kdsearch.search.deploy import row_metrics

    return row_metrics(row)


def _place(staging: Path, dest: Path) -> None:
    """Move a verified staging folder to ``dest``, replacing an earlier export (never anything else)."""
    if dest.exists():
        if not (dest / "model_card.json").is_file():
            raise UserError(f"--out: {dest} exists and is not a kdsearch export; fix: pass another --out")
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(dest)


def logged_model_uri(c: Any, experiment_id: str, run_id: str, trial: str) -> Optional[str]:
    """The MLflow model the search logged for this trial (named after it, e.g. ``trial-003``, in
    its run), if any. Models of older searches (named ``model``, taking preprocessed inputs at
    batch 1) are not deployable and are not returned."""
    name = str(trial).replace("'", "")
    try:
        models = c.search_logged_models(experiment_ids=[experiment_id],
                                        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'")
    except Exception:
        return None
    ready = [m for m in models if str(getattr(m.status, "name", m.status)).upper().endswith("READY")]
    return f"models:/{ready[0].model_id}" if ready else None


def log_student_model(run_id: str, model: nn.Module, data: Any, card: Mapping[str, Any], trial: str) -> str:
    """Log the deployable student as an MLflow model in its trial's run, named after the trial
    (as the search does for its front)."""
    from kdsearch.search.deploy import log_model

    with quiet_exporters():
        return log_model(run_id, model, data, card, name=str(trial))


def register(c: Any, experiment_id: str, run_id: str, name: str, model: nn.Module, data: Any,
             card: Mapping[str, Any], trial: str) -> dict[str, str]:
    """Register the trial's MLflow model as ``name`` (the one the search logged, else a new one)
    and set the version's description to the model card."""
    import mlflow

    from kdsearch.search.deploy import describe

    uri = logged_model_uri(c, experiment_id, run_id, trial) or log_student_model(run_id, model, data, card, trial)
    try:
        with quiet_exporters(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            version = mlflow.register_model(uri, name)  # MLflow eprints "Successfully registered"
    except Exception as exc:
        raise ExportError(f"--register {name}: the model registry refused it ({_first_line(exc)}); "
                          "fix: use a registry-capable store (sqlite:/// or a server) or another name") from None
    try:
        c.update_model_version(version.name, version.version, description=describe(card))
    except Exception as exc:
        raise ExportError(f"--register {name}: version {version.version} is registered but its description "
                          f"could not be set ({_first_line(exc)}); fix: check the registry's permissions") from None
    return {"name": version.name, "version": str(version.version), "source": uri}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("onnx", "onnxruntime", "onnxscript", "mlflow"):
        try:
            found[module] = __import__(module).__version__
        except Exception:
            found[module] = "not installed"
    return found


def export_student(run_id: Optional[str] = None, *, tracking_uri: str = DEFAULT_TRACKING_URI,
                   experiment: str = DEFAULT_EXPERIMENT, max_latency_ms: Optional[float] = None,
                   max_params: Optional[int] = None, max_size_bytes: Optional[int] = None,
                   out: str | Path = "exports", formats: str | Sequence[str] = FORMATS,
                   register: Optional[str] = None) -> ExportResult:
    """Export the most accurate front student of a search that meets the limits; print nothing.

    ``run_id``: the search's parent run (None: the latest search of ``experiment``). The files
    (``formats``: onnx, pt2, state_dict) go to ``<out>/<search run name>/<trial>/`` with a
    ``model_card.json``, each verified against the in-process student and the logged accuracy
    on the raw validation set. ``register``: also register the trial's MLflow model under this
    name, the card as the version's description. Progress goes to the ``kdsearch`` logger.

    Raises :class:`UserError` (bad limits or formats, :class:`NoTrialFits`), :class:`TrackingError`
    (store, experiment or run not found) or :class:`ExportError` (a file that cannot be written
    or does not match), each one line ending in a fix.

    >>> result = export_student(max_latency_ms=2)          # doctest: +SKIP
    >>> result.folder, [f.file for f in result.files]      # doctest: +SKIP
    (PosixPath('exports/digits-.../trial-003'), ['student.onnx', 'student.pt2', 'student.pt'])
    """
    from kdsearch.search.tracking import client, latest_search_run, read_artifact_json
    from kdsearch.search.ui import require_store

    names = formats if isinstance(formats, str) else ",".join(str(f) for f in formats)
    formats = parse_formats(names)
    limits = Limits(max_latency_ms, max_params, max_size_bytes).validate()

    c = client(require_store(tracking_uri))
    parent = latest_search_run(c, experiment, run_id, finished=True)
    parent_id = parent.info.run_id
    payload = read_artifact_json(c, parent_id, "pareto_front.json")
    front = payload.get("front", [])
    row = select(front, limits)
    search_name = parent.info.run_name or parent_id
    trial = str(row.get("trial") or row["run_id"])
    dest = Path(out) / _safe_name(search_name) / _safe_name(trial)
    log.info(f"search {search_name} ({parent_id}): {len(front)} front trials; {limits.describe()}")
    log.info(f"chosen {trial} (run {row['run_id']}): {_summary(row)}")

    created = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        files, card = _export_into(c, tracking_uri, parent, payload, row, limits, formats, dest, trial, register)
    except BaseException:
        for folder in created:  # the folders this export made, if the failure left them empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return ExportResult(dest, trial, str(row["run_id"]), files, card)


def cmd_export(args: argparse.Namespace) -> int:
    """``kdsearch export``: :func:`export_student` with the flags, then what it wrote, printed."""
    result = export_student(args.run_id, tracking_uri=args.tracking_uri, experiment=args.experiment,
                            max_latency_ms=args.max_latency_ms, max_params=args.max_params,
                            max_size_bytes=args.max_size_bytes, out=args.out, formats=args.format,
                            register=args.register)
    echo = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    for f in result.files:
        p = f.parity
        echo(f"  {f.file:<14} {f.bytes:>9,} B  max|diff| {p.max_abs_diff:.2g}  val_acc {p.val_acc:.4f} "
             f"({(p.val_acc - p.reference_val_acc) * 100:+.2f} pt vs in-process {p.reference_val_acc:.4f})  ok  "
             f"[{f.kind}; {f.inputs} inputs]")
    echo(f"  {'model_card.json':<14}")
    if result.registered:
        echo(f"registered {result.registered['name']} version {result.registered['version']}")
    print(result.folder)
    return 0


def _export_into(c: Any, tracking_uri: str, parent: Any, payload: Mapping[str, Any], row: Mapping[str, Any],
                 limits: Limits, formats: Sequence[str], dest: Path, trial: str,
                 register_as: Optional[str]) -> tuple[list[Exported], dict[str, Any]]:
    """Rebuild, write and verify in a staging folder, move it to ``dest``, then register."""
    from kdsearch.trainers.data import load_data

    parent_id = parent.info.run_id
    with tempfile.TemporaryDirectory() as tmp, \
            tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as staging_dir:
        space = load_logged_space(c, parent_id, Path(tmp))
        checkpoint = _download(c, row["run_id"], "student/student.pt", Path(tmp), "the trial's student")
        data = load_data(space.data)
        staging = Path(staging_dir) / "export"
        shipped = shipped_file(c, row, checkpoint, Path(tmp))
        files, reference, model = write_verified(space, row["config"], checkpoint, staging, formats, data, trial,
                                                 _number(row.get("val_acc_checkpoint", row.get("val_acc"))), shipped)
        card = model_card(tracking_uri, parent, payload, row, space, data, limits, files, reference, model)
        (staging / "model_card.json").write_text(json.dumps(card, indent=2, default=str))
        _place(staging, dest)
        if register_as:
            card["registered"] = register(c, parent.info.experiment_id, row["run_id"], register_as, model, data,
                                          card, trial)
            (dest / "model_card.json").write_text(json.dumps(card, indent=2, default=str))
    return files, card


#: the export format a runtime's deployed file stands for
SHIPPED_FORMAT = {"student.onnx": "onnx", "student.pt": "state_dict"}


def shipped_file(c: Any, row: Mapping[str, Any], checkpoint: Path, folder: Path) -> Optional[Shipped]:
    """The deployed file the trial of ``row`` logged (None for a search older than the runtimes)."""
    name = row.get("artifact")
    if name not in SHIPPED_FORMAT:
        return None
    path = checkpoint if name == checkpoint.name else _download(c, row["run_id"], f"student/{name}", folder,
                                                                 "the trial's deployed file")
    quantize = row.get("config", {}).get("compress.quantize", "none")
    # onnxruntime quantizes the float checkpoint itself: its int8 file computes other logits than the rebuilt student
    matches = name == checkpoint.name or quantize == "none"
    return Shipped(path, SHIPPED_FORMAT[name], row.get("artifact_sha256"), _number(row.get("val_acc")), matches)


def _summary(row: Mapping[str, Any]) -> str:
    parts = []
    for key in ("val_acc", "latency_ms", "params", "size_bytes", "macs"):
        value = _number(row.get(key))
        if value is not None:
            parts.append(f"{key} {value:,.0f}" if key in ("params", "size_bytes", "macs") else f"{key} {value:.4g}")
    config = row.get("config", {})
    parts.append(f"prune {config.get('compress.prune_ratio', 0)} quantize {config.get('compress.quantize', 'none')}")
    return "  ".join(parts)


def model_card(tracking_uri: str, parent: Any, payload: Mapping[str, Any], row: Mapping[str, Any], space: Any,
               data: Any, limits: Limits, files: Sequence[Exported], reference: Reference,
               model: nn.Module) -> dict[str, Any]:
    """What was exported, from where, by which rule, what it takes (raw inputs, any batch; the
    preprocessing it applies) and how well each file matches
    (:func:`kdsearch.search.deploy.card` plus the export's own entries)."""
    from kdsearch.search.deploy import card as deploy_card
    from kdsearch.trainers.quantize import quant_info

    info = quant_info(model)
    front = payload.get("front", [])
    search = {"run_id": parent.info.run_id, "run_name": parent.info.run_name,
              "experiment_id": parent.info.experiment_id, "tracking_uri": tracking_uri,
              "objectives": payload.get("objectives"), "hypervolume": payload.get("hypervolume")}
    card = deploy_card(data, row, search, space.data.model_dump())
    card["data"]["val_samples"] = reference.samples
    runtime = row.get("runtime", "torch")
    if runtime != "torch":  # the runtime quantized the float checkpoint itself
        quantize, backend = row.get("config", {}).get("compress.quantize", "none"), row.get("quant_backend")
    else:
        quantize, backend = (info.name, info.backend) if info else ("none", None)
    shipped = next((f for f in files if f.shipped), None)
    return {
        **card,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "architecture": row.get("architecture"),
        "config": row.get("config"),
        "compression": {"prune_ratio": row.get("config", {}).get("compress.prune_ratio", 0.0),
                        "quantize": quantize, "backend": backend,
                        **({"note": "activations are quantized per batch (one scale for the whole batch), in torch "
                                    "and in student.onnx alike: a sample's logits depend slightly on its batch"}
                           if info and info.name == "dynamic_int8" else {})},
        "teacher": space.teacher.model_dump(),
        "runtime": {"name": runtime, "batch_size": row.get("latency_batch_size", 1),
                    "what": "the runtime the search measured latency_ms, val_acc and size_bytes in (measure.runtime)",
                    "shipped": None if shipped is None else {"file": shipped.file, "sha256": shipped.sha256,
                                                            "logged_sha256": shipped.logged_sha256,
                                                            "val_acc": shipped.parity.val_acc}},
        "rule": {"select": "the most accurate complete front trial meeting every limit (ties: lower latency_ms, "
                           "then fewer params)",
                 "limits": limits.as_dict(), "front_size": len(front),
                 "eligible": sum(1 for r in front if violation(r, limits) == 0.0)},
        "reference": {"what": "the student rebuilt in-process from student.pt (trainers.checkpoint), fed "
                              "preprocessed validation inputs; the files are fed raw ones (student.pt: preprocessed)",
                      "val_acc": reference.val_acc, "val_acc_logged": row.get("val_acc_checkpoint", row.get("val_acc")),
                      "parity_batches": reference.sizes},
        "files": [{**{k: v for k, v in asdict(f).items() if k != "parity"}, "parity": asdict(f.parity)} for f in files],
        "versions": versions(),
    }
