"""The search-space file: loading, validation and sampling.

A space file declares the data, the teacher, the student families with their knobs, the
distillation, training and compression knobs, the objectives and the constraints. Every
error names the field path and the fix in one line (:class:`SpaceError`), because a search
that dies an hour in on a typo is the worst way to learn about it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from kdsearch.spaces.errors import SpaceError
from kdsearch.spaces.families import Family, KnobModel
from kdsearch.spaces.knobs import Choice, Fixed, FloatRange, IntRange, Knob, RandomSuggester, Suggester
from kdsearch.spaces.registry import (FAMILIES, LOSSES, PRUNERS, QUANTIZERS, RUNTIMES, SOURCES, TEACHER_MIXES, UnknownEntry,
                                      import_ref, is_ref)

BUILTIN_DIR = Path(__file__).parent
DEFAULT_SPACE = BUILTIN_DIR / "digits.yaml"

#: metric name -> whether a user may declare it as an objective or constraint
KNOWN_METRICS = ("val_acc", "latency_ms", "params", "macs", "size_bytes")
CONSTRAINT_KEYS = {f"max_{m}": m for m in ("params", "macs", "size_bytes", "latency_ms")} | {"min_val_acc": "val_acc"}


# --------------------------------------------------------------------------- fixed sections


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Strict):
    source: str = Field("digits", description="a registered data source (kdsearch list sources) or module:attr")
    path: Optional[str] = None
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 0
    image_size: Optional[int] = Field(None, ge=4, description="image_folder: resize to this square size")
    num_workers: Optional[int] = Field(None, ge=0, description="image_folder: loader processes decoding images "
                                                                "(default: the trial's CPUs; 0 decodes in the trial)")
    options: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for a module:attr source")


class TeacherConfig(Strict):
    """Exactly one of: a built-in ``family`` (trained on first use and cached), a ``path``
    to a torch.export (.pt2) or TorchScript file, or a ``module`` builder with a ``state_dict``."""

    family: Optional[str] = None
    config: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(30, ge=1)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    augment: "AugmentConfig" = Field(default_factory=lambda: AugmentConfig(),
                                     description="a built-in teacher's training augmentation (train.augment's knobs, fixed)")
    path: Optional[str] = None
    module: Optional[str] = None
    state_dict: Optional[str] = None
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="where the teacher phase (training a built-in teacher, filling the store) runs: "
                                    "auto (cuda when there is one), cpu or cuda")

    @model_validator(mode="after")
    def _one_kind(self) -> "TeacherConfig":
        kinds = [k for k in ("family", "path", "module") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError("give exactly one of family, path or module")
        return self


class MeasureConfig(Strict):
    """``measure``: how every trial's deployed student is measured. A setting of the search, not a
    searched knob: latencies from two runtimes (or two devices) do not compare, so one front has
    one runtime on one device.

    ``device``: ``cpu`` (the default: one thread, wall clock) or ``cuda`` (the student and its
    batch on the GPU, timed by CUDA events after warm-up, the GPU's name recorded as the
    latency's device). ``cuda`` refuses an int8 ``compress.quantize`` (torch.ao's and ONNX
    Runtime's int8 kernels run on the CPU) here, and in the probes, before anything runs, a
    machine where torch sees no GPU, and ``runtime: onnxruntime`` without ONNX Runtime's
    ``CUDAExecutionProvider`` (onnxruntime-gpu).
    """

    runtime: str = Field("onnxruntime", description="what the student ships in and is measured by: onnxruntime "
                                                    "(the exported ONNX file) or torch (eager; kdsearch list runtimes)")
    batch_size: int = Field(1, ge=1, le=4096, strict=True, description="inputs per timed call of the latency protocol")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where latency is timed: cpu (wall clock, one thread) or "
                                                              "cuda (CUDA events on the GPU, float students only)")

    @field_validator("runtime")
    @classmethod
    def _registered_runtime(cls, value: str) -> str:
        RUNTIMES.get(value, "measure.runtime")
        return value


# --------------------------------------------------------------------------- searched sections


class DistillConfig(KnobModel):
    method: str = Field("kd", description="a logit loss (kdsearch list losses, kind logit: kd, dkd, mlkd, none) or module:attr")
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="weight of the distillation term; 1 - alpha weighs label CE")
    logit_standardize: bool = Field(False, description="z-score each sample's logits before the softmax (kd, dkd, mlkd)")
    dkd_alpha: float = Field(1.0, ge=0.0, description="dkd: weight of the target-class term (TCKD)")
    dkd_beta: float = Field(8.0, ge=0.0, description="dkd: weight of the non-target-class term (NCKD)")
    feature: str = Field("fitnets", description="a feature loss (kdsearch list losses, kind feature: fitnets, at) or module:attr")
    hint_stages: str = Field("none", description="none | last | all | comma-separated teacher stage indices")
    hint_weight: float = Field(0.0, ge=0.0)
    hint_teacher: int = Field(0, ge=0, description="index of the teacher feature hints come from")
    teacher_views: Union[Literal["online"], Annotated[int, Field(ge=1, le=64)]] = Field(
        "online", description="with augmentation: online (teachers run on each augmented batch) or K (K views a "
                              "sample, the teachers' outputs on them computed once per search)")
    teacher_mix: str = Field("mean", description="how several teachers are mixed: mean | weighted | confidence "
                                                  "(kdsearch list mixes) or module:attr")
    teacher_weights: Optional[tuple[float, ...]] = Field(None, description="teacher_mix weighted: one weight per teacher")

    @field_validator("teacher_mix")
    @classmethod
    def _registered_mix(cls, value: str) -> str:
        TEACHER_MIXES.get(value, "distill.teacher_mix")
        return value

    @staticmethod
    def _term_of_kind(value: str, kind: str, path: str) -> str:
        """``value`` is a registered loss term of ``kind``, or a module:attr ref whose factory declares no other kind."""
        if is_ref(value):
            declared = getattr(LOSSES.get(value, path), "kind", kind)  # imports the ref
        else:
            declared = getattr(LOSSES.get(value, path), "kind", None) if value in LOSSES else None
        if declared != kind:
            names = ", ".join(n for n, e in LOSSES.items() if getattr(e, "kind", None) == kind)
            what = {"logit": "distillation method", "feature": "feature loss"}[kind]
            problem = f"unknown {what} {value!r}" if declared is None and value not in LOSSES else \
                f"{value!r} is a {declared or 'extra'} loss term, not a {what}"
            raise UnknownEntry(path, problem, f"use one of: {names}, or a module:attr ref")
        return value

    @field_validator("method")
    @classmethod
    def _registered_method(cls, value: str) -> str:
        return cls._term_of_kind(value, "logit", "distill.method")

    @field_validator("feature")
    @classmethod
    def _registered_feature(cls, value: str) -> str:
        return cls._term_of_kind(value, "feature", "distill.feature")

    @model_validator(mode="after")
    def _stages(self) -> "DistillConfig":
        if self.hint_stages not in ("none", "last", "all"):
            parts = self.hint_stages.split(",")
            if not all(p.strip().isdigit() for p in parts):
                raise ValueError("hint_stages must be none, last, all or indices like '0,2'")
        return self


class AugmentConfig(KnobModel):
    """``train.augment``: batched augmentations of the student's input (and, consistently, the teacher's)."""

    crop_padding: int = Field(0, ge=0, le=32, description="random crop after zero padding by this many pixels (0: off)")
    flip: bool = Field(False, description="random horizontal flip (off for digits: a flipped 2 is no 2)")
    mixup_alpha: float = Field(0.0, ge=0.0, le=10.0, description="mixup's Beta(alpha, alpha) (0: off)")
    cutmix_alpha: float = Field(0.0, ge=0.0, le=10.0, description="cutmix's Beta(alpha, alpha) (0: off)")
    mix_prob: float = Field(1.0, ge=0.0, le=1.0, description="share of samples mixed when mixup or cutmix is on")
    noise_std: float = Field(0.0, ge=0.0, le=5.0, description="Gaussian noise on the standardised inputs (0: off)")


class TrainConfig(KnobModel):
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only")
    grad_clip: float = Field(0.0, ge=0.0, le=1e6, description="clip the gradient norm to this (0: off)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "bf16", description="the training step's precision on a GPU: fp32, or autocast to bf16 or fp16 (fp16 with a "
                            "gradient scaler); on a CPU the step runs in fp32 whatever this says")


class CompressConfig(KnobModel):
    prune_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of channels removed")
    prune_criterion: str = Field("l1", description="a registered prune criterion (kdsearch list pruners) or module:attr")
    finetune_epochs: int = Field(2, ge=0)
    quantize: str = Field("none", description="a registered quantizer (kdsearch list quantizers) or module:attr")
    calib_batches: int = Field(8, ge=1)

    @field_validator("prune_criterion")
    @classmethod
    def _registered_criterion(cls, value: str) -> str:
        PRUNERS.get(value, "compress.prune_criterion")
        return value

    @field_validator("quantize")
    @classmethod
    def _registered_quantizer(cls, value: str) -> str:
        QUANTIZERS.get(value, "compress.quantize")
        return value


TeacherConfig.model_rebuild()  # its augment field names AugmentConfig, defined above now

SEARCHED_SECTIONS: dict[str, type[KnobModel]] = {"distill": DistillConfig, "train": TrainConfig,
                                                 "train.augment": AugmentConfig, "compress": CompressConfig}


# --------------------------------------------------------------------------- knob parsing


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return err["msg"][0].lower() + err["msg"][1:]


def _space_error(exc: ValidationError, path: str) -> Optional[SpaceError]:
    """The SpaceError a field validator raised (a registry lookup), moved to ``path``; else None."""
    inner = exc.errors()[0].get("ctx", {}).get("error")
    if isinstance(inner, SpaceError):
        return SpaceError(path, inner.problem, inner.fix)
    return None


def _check_value(model: Optional[type[KnobModel]], key: str, value: Any, path: str) -> Any:
    """Validate one value of knob ``key`` against the section's model; return the coerced value."""
    if model is None:
        return value
    try:
        return getattr(model.model_validate({key: value}), key)
    except ValidationError as exc:
        registry_error = _space_error(exc, path)
        if registry_error is not None:
            raise registry_error from None
        field_info = model.model_fields[key]
        hint = f"a value like {field_info.default!r}"
        if field_info.description:
            hint += f" ({field_info.description})"
        raise SpaceError(path, f"{_first_error(exc)}, got {value!r}", f"give {hint}, a {{choice: [...]}} or a {{low, high}} range") from None


def parse_knob(model: Optional[type[KnobModel]], key: str, raw: Any, path: str) -> Knob:
    """One knob from its space-file form; values are checked against ``model``'s field."""
    if model is not None and key not in model.model_fields:
        known = ", ".join(model.model_fields)
        raise SpaceError(path, f"unknown knob {key!r}", f"use one of: {known}")
    if isinstance(raw, dict) and "choice" in raw:
        if set(raw) != {"choice"} or not isinstance(raw["choice"], list) or not raw["choice"]:
            raise SpaceError(path, "a choice needs one non-empty list", "write {choice: [a, b, ...]}")
        return Choice(tuple(_check_value(model, key, v, f"{path}.choice[{i}]") for i, v in enumerate(raw["choice"])))
    if isinstance(raw, dict) and ("low" in raw or "high" in raw):
        extra = set(raw) - {"low", "high", "log", "step"}
        if extra or "low" not in raw or "high" not in raw:
            raise SpaceError(path, f"a range needs low and high (got keys {sorted(raw)})", "write {low: a, high: b, log: false}")
        low = _check_value(model, key, raw["low"], f"{path}.low")
        high = _check_value(model, key, raw["high"], f"{path}.high")
        if isinstance(low, bool) or not isinstance(low, (int, float)):
            raise SpaceError(path, f"a range needs numbers, got {raw['low']!r}", "use a {choice: [...]} for non-numeric knobs")
        if low > high:
            raise SpaceError(path, f"low {low} is above high {high}", "swap them")
        log = bool(raw.get("log", False))
        if log and low <= 0:
            raise SpaceError(f"{path}.low", "a log range needs low > 0", "raise low or set log: false")
        if isinstance(low, int) and isinstance(high, int):
            return IntRange(low, high, log, int(raw.get("step", 1)))
        return FloatRange(float(low), float(high), log)
    if isinstance(raw, dict):
        raise SpaceError(path, f"cannot read {raw!r} as a knob", "give a value, {choice: [...]} or {low, high}")
    return Fixed(_check_value(model, key, raw, path))


def parse_section(model: Optional[type[KnobModel]], raw: Any, path: str) -> dict[str, Knob]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpaceError(path, f"expected a mapping of knobs, got {type(raw).__name__}", "write knob: value pairs")
    return {key: parse_knob(model, key, value, f"{path}.{key}") for key, value in raw.items()}


# --------------------------------------------------------------------------- the space


@dataclass(frozen=True)
class StudentFamily:
    """A family as declared in a space: the registered family (or a user builder) and its knobs."""

    name: str
    family: Optional[Family]
    builder: Optional[Callable[..., nn.Module]]
    knobs: dict[str, Knob]

    def build(self, config: dict[str, Any], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if self.family is not None:
            return self.family.build(self.family.config.model_validate(config), input_shape, num_classes)
        assert self.builder is not None
        return self.builder(config, input_shape, num_classes)


@dataclass(frozen=True)
class TrialConfig:
    """A sampled point of the space, resolved to typed sections."""

    family: str
    student: dict[str, Any]
    distill: DistillConfig
    train: TrainConfig
    augment: AugmentConfig
    compress: CompressConfig
    params: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Space:
    name: str
    data: DataConfig
    teachers: tuple[TeacherConfig, ...]
    students: dict[str, StudentFamily]
    sections: dict[str, dict[str, Knob]]
    objectives: dict[str, Literal["max", "min"]]
    constraints: dict[str, float]
    reference_point: Optional[dict[str, float]] = None
    source: Optional[Path] = None
    text: str = ""
    measure: MeasureConfig = field(default_factory=MeasureConfig)

    @property
    def teacher(self) -> TeacherConfig:
        """The first teacher: the one students are measured against (footprint, reference point)."""
        return self.teachers[0]

    # ---- sampling ------------------------------------------------------------------

    def sample(self, suggester: Suggester) -> dict[str, Any]:
        """One flat configuration (``student.family``, ``student.cnn.kernel``, ``train.lr``, ...).

        Works as an Optuna define-by-run function: family knobs are conditional on the family.
        """
        params: dict[str, Any] = {}
        family_knob = Choice(tuple(self.students)) if len(self.students) > 1 else Fixed(next(iter(self.students)))
        family = family_knob.sample("student.family", suggester)
        params["student.family"] = family
        for key, knob in self.students[family].knobs.items():
            name = f"student.{family}.{key}"
            params[name] = knob.sample(name, suggester)
        for section, knobs in self.sections.items():
            for key, knob in knobs.items():
                name = f"{section}.{key}"
                params[name] = knob.sample(name, suggester)
        return params

    def sample_random(self, seed: Optional[int] = None) -> dict[str, Any]:
        return self.sample(RandomSuggester(seed))

    def knob(self, name: str) -> Knob:
        """The knob behind a flat parameter name."""
        parts = name.split(".")
        if name == "student.family":
            return Choice(tuple(self.students))
        if parts[0] == "student" and len(parts) == 3 and parts[1] in self.students:
            knob = self.students[parts[1]].knobs.get(parts[2])
        elif name.rpartition(".")[0] in self.sections:  # distill.alpha, train.augment.flip
            section, _, key = name.rpartition(".")
            knob = self.sections[section].get(key)
        else:
            knob = None
        if knob is None:
            raise SpaceError(f"params.{name}", "no such knob in this space", "run `kdsearch validate` to list the knobs")
        return knob

    def resolve(self, params: dict[str, Any]) -> TrialConfig:
        """Typed sections from a flat configuration; unknown names or out-of-space values raise."""
        for name, value in params.items():
            knob = self.knob(name)
            if not isinstance(knob, Fixed) and not knob.contains(value):
                raise SpaceError(f"params.{name}", f"{value!r} is outside the space {knob.describe()}", "pick a value inside it")
        family = params.get("student.family")
        if family not in self.students:
            raise SpaceError("params.student.family", f"{family!r} is not a family of this space", f"use one of {list(self.students)}")
        prefix = f"student.{family}."
        student = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
        typed = {}
        for section, model in SEARCHED_SECTIONS.items():
            values = {k.rpartition(".")[2]: v for k, v in params.items() if k.rpartition(".")[0] == section}
            try:
                typed[section] = model.model_validate(values)
            except ValidationError as exc:
                loc = ".".join(str(p) for p in exc.errors()[0]["loc"])
                raise _space_error(exc, f"params.{section}.{loc}") or SpaceError(
                    f"params.{section}.{loc}", _first_error(exc), "pick a valid value") from None
        return TrialConfig(family, student, typed["distill"], typed["train"], typed["train.augment"], typed["compress"],
                           dict(params))

    def build_student(self, config: TrialConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return self.students[config.family].build(config.student, input_shape, num_classes)

    # ---- description ---------------------------------------------------------------

    def _describe_sections(self) -> dict[str, Any]:
        """Searched sections as a space file writes them: ``train.augment`` nested in ``train``."""
        out: dict[str, Any] = {}
        for section, knobs in self.sections.items():
            parent, _, child = section.partition(".")
            described = {k: v.describe() for k, v in knobs.items()}
            if child:
                if described:
                    out.setdefault(parent, {})[child] = described
            else:
                out[parent] = {**described, **out.get(parent, {})}
        return out

    def describe(self) -> dict[str, Any]:
        """The resolved space as plain data (what `kdsearch validate` prints)."""
        return {
            "name": self.name,
            "data": self.data.model_dump(exclude_none=True),
            **({"teacher": self.teacher.model_dump(exclude_none=True)} if len(self.teachers) == 1 else
               {"teachers": [t.model_dump(exclude_none=True) for t in self.teachers]}),
            "students": {n: {k: v.describe() for k, v in f.knobs.items()} for n, f in self.students.items()},
            **self._describe_sections(),
            "objectives": dict(self.objectives),
            "constraints": dict(self.constraints),
            **({"reference_point": dict(self.reference_point)} if self.reference_point else {}),
            "measure": self.measure.model_dump(),
        }


TOP_LEVEL = ("name", "data", "teacher", "teachers", "students", "distill", "train", "compress", "measure", "objectives",
             "constraints", "reference_point")


def _strict(model: type[BaseModel], raw: Any, path: str) -> Any:
    try:
        return model.model_validate(raw or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        where = f"{path}.{loc}" if loc else path
        registry_error = _space_error(exc, where)
        if registry_error is not None:
            raise registry_error from None
        fields = ", ".join(model.model_fields)
        raise SpaceError(where, _first_error(exc), f"see the fields of {path}: {fields}") from None


def _parse_students(raw: Any) -> dict[str, StudentFamily]:
    if not isinstance(raw, dict) or not raw:
        raise SpaceError("students", "needs at least one family", f"declare one of: {', '.join(FAMILIES.names())}")
    students = {}
    for name, knobs in raw.items():
        path = f"students.{name}"
        knobs = dict(knobs or {})
        ref = knobs.pop("builder", None)
        if ref is not None:
            obj = import_ref(ref, f"{path}.builder")
            if isinstance(obj, Family):
                students[name] = StudentFamily(name, obj, None, parse_section(obj.config, knobs, path))
            elif callable(obj):
                students[name] = StudentFamily(name, None, obj, parse_section(None, knobs, path))
            else:
                raise SpaceError(f"{path}.builder", f"{ref!r} is neither a Family nor callable", "point to a builder function")
            continue
        if is_ref(name) or name not in FAMILIES:
            raise UnknownEntry(path, f"unknown {FAMILIES.kind} {name!r}",
                               f"use one of: {', '.join(FAMILIES.names())}, or add `builder: module:attr`")
        family = FAMILIES.get(name, path)
        students[name] = StudentFamily(name, family, None, parse_section(family.config, knobs, path))
    return students


def _section_raw(raw: dict[str, Any], section: str) -> Any:
    """A searched section's mapping; ``train.augment`` is nested in ``train`` (and left out of it)."""
    if section == "train.augment":
        train = raw.get("train")
        return train.get("augment") if isinstance(train, dict) else None
    value = raw.get(section)
    if section == "train" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "augment"}
    return value


def _parse_teacher(raw: Any, path: str) -> TeacherConfig:
    teacher = _strict(TeacherConfig, raw, path)
    if teacher.family:
        fam = FAMILIES.get(teacher.family, f"{path}.family")
        for key, value in teacher.config.items():
            parse_knob(fam.config, key, value, f"{path}.config.{key}")
            if isinstance(value, dict):
                raise SpaceError(f"{path}.config.{key}", "a teacher's knobs are fixed values", "give one value")
    return teacher


def _parse_teachers(raw: dict[str, Any]) -> tuple[TeacherConfig, ...]:
    """``teacher:`` (one) or ``teachers:`` (a list of the same forms), not both."""
    if "teachers" in raw:
        if "teacher" in raw:
            raise SpaceError("teachers", "both teacher and teachers are given", "keep one: teachers is a list of teachers")
        listed = raw["teachers"]
        if not isinstance(listed, list) or not listed:
            raise SpaceError("teachers", "expected a non-empty list of teachers", "write teachers: [{family: cnn}, ...]")
        return tuple(_parse_teacher(t, f"teachers[{i}]") for i, t in enumerate(listed))
    return (_parse_teacher(raw.get("teacher"), "teacher"),)


def parse_space(raw: Any, source: Optional[Path] = None, text: str = "") -> Space:
    """Validate a space already read from YAML."""
    if not isinstance(raw, dict):
        raise SpaceError("<space>", "the file is not a mapping", "start from spaces/digits.yaml")
    unknown = set(raw) - set(TOP_LEVEL)
    if unknown:
        raise SpaceError(sorted(unknown)[0], "unknown section", f"use only: {', '.join(TOP_LEVEL)}")
    data = _strict(DataConfig, raw.get("data"), "data")
    SOURCES.get(data.source, "data.source")  # a registered name, or a module:attr ref that imports
    teachers = _parse_teachers(raw)
    students = _parse_students(raw.get("students"))
    sections = {s: parse_section(m, _section_raw(raw, s), s) for s, m in SEARCHED_SECTIONS.items()}
    measure = _strict(MeasureConfig, raw.get("measure"), "measure")
    _check_quantize(measure, sections["compress"].get("quantize", Fixed("none")))
    weights = sections["distill"].get("teacher_weights")
    if weights is not None and isinstance(weights, Fixed) and weights.value is not None and len(weights.value) != len(teachers):
        raise SpaceError("distill.teacher_weights", f"{len(weights.value)} weights for {len(teachers)} teachers",
                         "give one weight per teacher")
    objectives = raw.get("objectives", {"val_acc": "max", "latency_ms": "min", "params": "min"})
    if isinstance(objectives, dict) and not objectives:
        raise SpaceError("objectives", "is empty", "name at least two, e.g. {val_acc: max, latency_ms: min}, or leave it out")
    if not isinstance(objectives, dict):
        raise SpaceError("objectives", "expected a mapping metric: max|min", "write e.g. {val_acc: max, params: min}")
    for metric, direction in objectives.items():
        if metric not in KNOWN_METRICS:
            raise SpaceError(f"objectives.{metric}", "unknown metric", f"use one of: {', '.join(KNOWN_METRICS)}")
        if direction not in ("max", "min"):
            raise SpaceError(f"objectives.{metric}", f"direction {direction!r}", "write max or min")
    constraints = raw.get("constraints") or {}
    if not isinstance(constraints, dict):
        raise SpaceError("constraints", "expected a mapping", "write e.g. {max_params: 100000}")
    for key, value in constraints.items():
        if key not in CONSTRAINT_KEYS:
            raise SpaceError(f"constraints.{key}", "unknown constraint", f"use one of: {', '.join(CONSTRAINT_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SpaceError(f"constraints.{key}", f"expected a positive number, got {value!r}", "give a number")
    reference = raw.get("reference_point")
    if reference is not None:
        if not isinstance(reference, dict) or set(reference) != set(objectives):
            raise SpaceError("reference_point", "needs one value per objective", f"give values for {', '.join(objectives)}")
        for metric, value in reference.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpaceError(f"reference_point.{metric}", f"expected a number, got {value!r}", "give a number")
    name = str(raw.get("name") or (source.stem if source else "space"))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):  # it names runs and folders
        raise SpaceError("name", f"{name!r} is not a plain name", "use letters, digits, '.', '_' and '-' only")
    return Space(name, data, teachers, students, sections, dict(objectives), dict(constraints),
                 {k: float(v) for k, v in reference.items()} if reference else None, source, text, measure)


def _check_quantize(measure: MeasureConfig, knob: Knob) -> None:
    """Every ``compress.quantize`` value the space can sample has a quantizer in ``measure.runtime``,
    and is ``none`` under ``measure.device: cuda`` (torch.ao's int8 kernels and ONNX Runtime's int8
    QDQ graphs run on the CPU)."""
    runtime = RUNTIMES.get(measure.runtime, "measure.runtime")
    values = knob.values if isinstance(knob, Choice) else (knob.value,) if isinstance(knob, Fixed) else ()
    for i, value in enumerate(values):
        where = f"compress.quantize.choice[{i}]" if isinstance(knob, Choice) else "compress.quantize"
        if not runtime.supports(value):
            raise SpaceError(where, f"{value!r} has no {measure.runtime} quantizer",
                             f"use one of: {', '.join(runtime.quantizer_names())}, or set measure.runtime: torch")
        if measure.device == "cuda" and value != "none":
            raise SpaceError(where, f"{value!r} is an int8 student whose kernels run on the CPU, not under "
                                    "measure.device: cuda", "use compress.quantize: none, or set measure.device: cpu")


def load_space(path_or_dict: str | Path | Mapping[str, Any] | None = None) -> Space:
    """Read and validate a space: a YAML file, a built-in space's name, a dict, or ``None`` (the digits space).

    A dict is validated like a file; its YAML dump is what the search logs as ``space.yaml``.

    >>> space = load_space({"teacher": {"family": "mlp"}, "students": {"mlp": {"width": {"choice": [8, 16]}}}})
    >>> space.knob("student.mlp.width")
    Choice(values=(8, 16))
    """
    if isinstance(path_or_dict, Mapping):
        raw = dict(path_or_dict)
        return parse_space(raw, None, yaml.safe_dump(raw, sort_keys=False))
    path = Path(path_or_dict) if path_or_dict is not None else DEFAULT_SPACE
    if not path.is_file() and (BUILTIN_DIR / f"{path}.yaml").is_file():
        path = BUILTIN_DIR / f"{path}.yaml"
    try:
        size = path.stat().st_size
        if size > MAX_SPACE_BYTES:
            raise SpaceError(str(path), f"the file is {size:,} bytes, over the {MAX_SPACE_BYTES:,}-byte limit of a space file",
                             "give a space file (a few kB of YAML)")
        data = path.read_bytes()
    except OSError as exc:
        raise SpaceError(str(path), f"cannot read the space file ({exc.strerror})", "check the path") from None
    text = read_text(data, str(path))
    return parse_space(read_yaml(text, str(path)), path, text)


#: a space file is a few kB; past this it is a mistake (or an attack), and is refused before parsing
MAX_SPACE_BYTES = 1 << 20
#: aliases a space file may use: each is expanded, so a few nested ones can blow up memory ("billion laughs")
MAX_ALIASES = 100


def read_text(data: bytes, where: str) -> str:
    """``data`` as UTF-8 text; a binary file is refused with one line."""
    if b"\x00" in data:
        raise SpaceError(where, "the file is binary, not YAML text", "give a YAML space file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpaceError(where, "the file is not UTF-8 text", "save the space file as UTF-8 YAML") from None


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (the last would silently win) and caps aliases."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.constructor.ConstructorError(None, None, f"more than {MAX_ALIASES} aliases", mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str, where: str) -> Any:
    """YAML by the safe loader, with duplicate keys and alias bombs refused in one line naming the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where_line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        fix = "keep one of them" if "duplicate key" in problem else \
            "write the values out" if "aliases" in problem else "fix the YAML syntax"
        raise SpaceError(where, f"{problem}{where_line}", fix) from None
