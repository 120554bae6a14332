"""Cheap probes of everything a space points at: checked before anything is trained or created.

:func:`probe_space` is the one check that ``kdsearch validate`` prints and that ``run`` and
``trial`` make before any store, folder, run or Ray session exists. Without training anything
it checks that

* the data files open and agree: lengths, labels (integers, not negative, at least two classes,
  no class index without samples), finite inputs; npz files are read from their headers and a
  streamed pass, image folders from their file lists and image headers (:func:`probe_data`);
* each teacher file loads through the safe readers of :mod:`kdsearch.trainers.teachers`, each
  ``module:attr`` resolves, and one forward pass on one zero input of the data's shape gives
  as many outputs as the data has classes (a built-in teacher is built on the meta device:
  its width is the class count by construction, its size is checked against the limits);
* the hint stages exist on the hint teacher;
* ``measure.device: cuda`` can be timed here: torch sees a GPU on this machine (the one that
  validates or drives the search, where the quiet phase measures after the search; a driver
  without a GPU is refused even if its cluster's workers have one: validate and run the search
  where a GPU is), and ``measure.runtime: onnxruntime`` has ONNX Runtime's
  ``CUDAExecutionProvider`` (onnxruntime-gpu) (:func:`probe_measure`);
* some point of the space is a student that meets the constraints and the sane size limits,
  its footprint taken on the meta device (nothing allocated, whatever a knob says).

Each failure is one line naming the field, the problem and the fix (:class:`SpaceError`, or a
:class:`UserError` for the constraints as a whole). :func:`~kdsearch.trainers.trial.prepare`
makes the same checks, by the same functions, on the real data and teachers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from kdsearch.spaces import Space, SpaceError, TeacherConfig, get_family
from kdsearch.spaces.errors import UserError
from kdsearch.trainers.data import DataSummary, probe_data
from kdsearch.trainers.teachers import build_teacher_module, check_outputs, read_teacher_file, teacher_field
from kdsearch.trainers.trial import (build_on_meta, check_hint_stages, check_student_size, constraint_violation,
                                     device_of, expected_footprint, footprint_of, hint_teachers, over_limits)

__all__ = ["ProbeReport", "TeacherSummary", "check_satisfiable", "probe_measure", "probe_space", "probe_teacher",
           "space_imports"]

#: random points of the space tried for one that meets the constraints
SATISFIABILITY_SAMPLES = 200


@dataclass(frozen=True)
class TeacherSummary:
    """One teacher as probed: where it comes from, its output width, its stage count (None: no hints asked)."""

    field: str
    kind: str
    outputs: int
    stages: Optional[int] = None

    def describe(self) -> str:
        stages = f", {self.stages} stages" if self.stages is not None else ""
        return f"{self.field}: {self.kind}, {self.outputs} outputs{stages}"


@dataclass(frozen=True)
class ProbeReport:
    """What :func:`probe_space` found: what ``kdsearch validate`` prints after the resolved space."""

    data: DataSummary
    teachers: tuple[TeacherSummary, ...]
    #: modules the space's ``module:attr`` refs import: their code runs, trusted like any Python you import
    imports: tuple[str, ...]
    #: params and MACs (after pruning) of the first random student that meets the constraints and limits
    fitting: dict[str, int]
    constrained: bool = False

    def lines(self) -> list[str]:
        """One line per finding, for a person."""
        lines = [self.data.describe(), *(t.describe() for t in self.teachers)]
        what = "meets the constraints" if self.constrained else "fits the size limits"
        lines.append(f"students: a random student {what} ({self.fitting['params']:,} params, "
                     f"{self.fitting['macs']:,} MACs)")
        if self.imports:
            lines.append(f"imports (runs their code, trusted like any Python you import): {', '.join(self.imports)}")
        return lines


def probe_space(space: Space, samples: int = SATISFIABILITY_SAMPLES) -> ProbeReport:
    """Check the data, the teachers, the hints and the constraints of ``space`` without training anything.

    Raises :class:`SpaceError` (a field) or :class:`UserError` (the constraints), one line each.
    """
    probe_measure(space)
    data = probe_data(space.data)
    hinted = hint_teachers(space)
    teachers = tuple(probe_teacher(space, index, data, index in hinted) for index in range(len(space.teachers)))
    fitting = check_satisfiable(space, data.input_shape, data.num_classes, samples)
    return ProbeReport(data, teachers, space_imports(space), fitting, bool(space.constraints))


def probe_measure(space: Space) -> None:
    """``measure.device: cuda`` needs a GPU torch sees here and, for ``runtime: onnxruntime``, ONNX
    Runtime's CUDAExecutionProvider (the space file cannot know either: checked on this machine)."""
    measure = space.measure
    if measure.device != "cuda":
        return
    if not torch.cuda.is_available():
        raise SpaceError("measure.device", "cuda but torch sees no GPU on this machine (the driver measures the "
                                           "front's latency after the search)", "set measure.device: cpu, or run where a GPU is")
    if measure.runtime == "onnxruntime":
        import onnxruntime

        available = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise SpaceError("measure.runtime", "onnxruntime on measure.device: cuda needs ONNX Runtime's "
                                                f"CUDAExecutionProvider (this one has {', '.join(available)})",
                             "set measure.runtime: torch, or install onnxruntime-gpu")


def probe_teacher(space: Space, index: int, data: DataSummary, hinted: bool) -> TeacherSummary:
    """Teacher ``index`` loaded (a built-in family: built on the meta device) and run on one zero input."""
    config = space.teachers[index]
    field = teacher_field(index, len(space.teachers))
    if config.family:
        model = _meta_teacher(config, data, field)
        kind = f"{config.family}, built-in (trained on first use, then cached)"
    elif config.path:
        model = read_teacher_file(Path(config.path), f"{field}.path")
        kind = f"{config.path} ({'torch.export' if Path(config.path).suffix == '.pt2' else 'TorchScript'})"
    else:
        model = build_teacher_module(config, field)
        kind = f"{config.module}()" + (f" with {config.state_dict}" if config.state_dict else "")
    out = check_outputs(model, torch.zeros(1, *data.input_shape, device=device_of(model)), data.num_classes, hinted, field)
    stages = None
    if hinted:
        stages = len(out.features) if hasattr(model, "forward_stages") else 0
        check_hint_stages(space, index, stages)
    return TeacherSummary(field, kind, int(out.logits.shape[-1]), stages)


def _meta_teacher(config: TeacherConfig, data: DataSummary, field: str) -> torch.nn.Module:
    """A built-in teacher on the meta device, refused (naming its config) past the size limits."""
    from pydantic import ValidationError

    family = get_family(config.family or "")
    try:
        knobs = family.config.model_validate(config.config)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise SpaceError(f"{field}.config", err["msg"], f"see the {config.family} family's knobs: kdsearch list families") from None
    model = build_on_meta(lambda: family.build(knobs, data.input_shape, data.num_classes)).eval()
    reason = over_limits(footprint_of(model, torch.zeros(1, *data.input_shape, device=device_of(model))))
    if reason:
        raise SpaceError(f"{field}.config", f"the {config.family} teacher would have {reason}", "give it smaller knobs")
    return model


def check_satisfiable(space: Space, input_shape: tuple[int, ...], num_classes: int,
                      samples: int = SATISFIABILITY_SAMPLES) -> dict[str, int]:
    """The footprint of the first of ``samples`` random students that meets the constraints and
    :data:`~kdsearch.trainers.trial.STUDENT_LIMITS` (else every trial would be rejected).

    Footprints come from the meta device, each architecture once. When no sample fits and the
    first was over the size limits, the error names the knob that makes it so.
    """
    seen: dict[str, Optional[str]] = {}
    first: Optional[tuple[str, Any]] = None
    for seed in range(samples):
        config = space.resolve(space.sample_random(seed))
        key = repr((config.family, sorted(config.student.items()), config.compress.prune_ratio))
        if key not in seen:
            seen[key] = constraint_violation(space, config, input_shape, num_classes)
        if seen[key] is None:
            return expected_footprint(space, config, input_shape, num_classes)
        first = first or (seen[key], config)
    assert first is not None
    reason, config = first
    check_student_size(space, config, input_shape, num_classes)  # over the size limits: names the knob
    raise UserError(f"constraints: none of {samples} random students of the space meets them (e.g. {reason}); "
                    "fix: relax the constraints or allow smaller students")


def space_imports(space: Space) -> tuple[str, ...]:
    """The modules a space's ``module:attr`` refs import (builders, sources, losses, quantizers, ...), sorted.

    Read from the space's own text (a student ``builder`` is not among the knobs it describes).
    """
    from kdsearch.spaces.schema import read_yaml

    raw = read_yaml(space.text, str(space.source or "space")) if space.text else space.describe()
    return tuple(sorted({ref.partition(":")[0] for ref in _refs(raw)}))


def _refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [ref for v in value.values() for ref in _refs(v)]
    if isinstance(value, (list, tuple)):
        return [ref for v in value for ref in _refs(v)]
    return [value] if isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value) else []
