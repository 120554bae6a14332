"""One distillation trial: distil -> [prune -> KD fine-tune -> quantize] -> deployed file -> measure it.

:func:`run_trial` knows nothing of Ray Tune or MLflow: it receives a ``report`` callable,
so a trial runs the same in a test, in ``kdsearch trial`` and inside a Tune worker. The
expensive shared inputs (data, teacher outputs) come in a :class:`TrialContext` that the
driver builds once and shares across trials.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from torch import nn

from kdsearch.spaces import Choice, Fixed, Space, SpaceError, TrialConfig
from kdsearch.trainers.checkpoint import save_student
from kdsearch.trainers.compress import ShapeOnlyImportance, prune_student, recalibrate_batchnorm
from kdsearch.trainers.data import DataBundle, batches, load_data
from kdsearch.trainers.device import (gradient_scaler, place_data, place_teachers, setup_device, to_channels_last,
                                      to_contiguous)
from kdsearch.trainers.loop import OnFraction, TrialDiverged, cosine_lr, make_optimizer, steps_per_epoch, train_epoch
from kdsearch.trainers.losses import DistillLoss, Outputs, Teachers, build_distill_loss
from kdsearch.trainers.measure import Latency, accuracy, count_macs, count_params
from kdsearch.trainers.runtimes import CHECKPOINT, Deployed, Runtime, get_runtime
from kdsearch.trainers.teachers import TeacherTargets, compute_targets, load_teacher, teacher_field
from kdsearch.trainers.teaching import Teaching

log = logging.getLogger("kdsearch")

__all__ = ["STUDENT_LIMITS", "TrialContext", "TrialDiverged", "bound_violation", "check_student_size", "constraint_violation",
           "device_of", "expected_footprint", "footprint_of", "over_limits", "prepare", "run_trial", "size_bounds"]


class Report(Protocol):
    def __call__(self, metrics: dict[str, Any], state: Optional[dict[str, Any]] = None) -> None: ...


#: ``latency_fn(deployed, example, batch_size, device)``: the deployed file lets a remote measurer run it again
LatencyFn = Callable[[Deployed, torch.Tensor, int, str], Latency]


def local_latency(deployed: Deployed, example: torch.Tensor, batch_size: int, device: str = "cpu") -> Latency:
    return deployed.runtime.latency(deployed, example, batch_size, device=device)


@dataclass
class TrialContext:
    """What every trial of a search shares: the data, the teachers and their outputs on the clean data."""

    data: DataBundle
    teachers: list[TeacherTargets]
    view_seed: int = 0  # stored views are drawn from it (the data's seed: searches with other seeds share them)
    teacher_passes: int = 0  # teacher forward passes (samples x teachers) spent preparing

    @property
    def targets(self) -> TeacherTargets:
        """The first teacher's: what students are compared with (footprint, reference point)."""
        return self.teachers[0]

    @property
    def example(self) -> torch.Tensor:
        return self.data.train[0][0].unsqueeze(0)


def hints_possible(space: Space) -> bool:
    """Whether any point of the space asks for feature hints (so stage outputs must be cached)."""
    return any(v != "none" for v in knob_values(space, "distill.hint_stages", "none"))


def knob_values(space: Space, name: str, default: Any) -> tuple[Any, ...]:
    """Every value a fixed or choice knob can take (its default where the space leaves it out)."""
    section, _, key = name.rpartition(".")
    knob = space.sections.get(section, {}).get(key, Fixed(default))
    return knob.values if isinstance(knob, Choice) else (knob.value,) if isinstance(knob, Fixed) else ()


def hint_teachers(space: Space) -> set[int]:
    """The teachers feature hints may come from (``distill.hint_teacher``'s values), each checked to exist."""
    indices = set(knob_values(space, "distill.hint_teacher", 0)) if hints_possible(space) else set()
    for index in indices:
        if not isinstance(index, int) or index >= len(space.teachers):
            raise SpaceError("distill.hint_teacher", f"{index!r} but the space has {len(space.teachers)} teachers",
                             f"use 0..{len(space.teachers) - 1}")
    return indices


def check_hint_stages(space: Space, index: int, stages: Optional[int]) -> None:
    """Every ``distill.hint_stages`` value names stages teacher ``index`` has (None: it exposes none)."""
    if stages is None or stages == 0:
        raise SpaceError("distill.hint_stages", f"teacher {index} exposes no stage outputs (no forward_stages)",
                         "set hint_stages: none, or give a teacher module with forward_stages")
    for spec in knob_values(space, "distill.hint_stages", "none"):
        wrong = [p for p in str(spec).split(",") if p.strip().isdigit() and int(p) >= stages]
        if wrong:
            raise SpaceError("distill.hint_stages", f"{spec!r} names stage {wrong[0]} but teacher {index} has "
                             f"{stages} stages", f"use indices 0..{stages - 1}, last or all")


def prepare(space: Space) -> TrialContext:
    """Load the data, load (or train and cache) each teacher, and open its output store (one pass to build it).

    Only the stages ``distill.hint_stages`` can ask for are stored. The teacher phase runs on
    ``teacher.device``. The checks are the probe's (:mod:`kdsearch.trainers.probes`), made on
    the real data and teachers.
    """
    from kdsearch.trainers.teachers import resolve_device

    data = load_data(space.data)
    hinted = hint_teachers(space)
    teachers = []
    for index, config in enumerate(space.teachers):
        field = teacher_field(index, len(space.teachers))
        device = resolve_device(config.device, f"{field}.device")
        described = config.family or config.path or config.module or ""
        teacher = load_teacher(config, data, field, device)
        specs = [str(v) for v in knob_values(space, "distill.hint_stages", "none")] if index in hinted else []
        targets = compute_targets(teacher, data, specs, described, field, device)
        if index in hinted:
            check_hint_stages(space, index, len(targets.feature_shapes))
        teachers.append(targets)
    return TrialContext(data, teachers, view_seed=space.data.seed, teacher_passes=sum(t.passes for t in teachers))


# --------------------------------------------------------------------------- footprints, without building

#: the largest student a trial builds. Past these a point of the space is a mistake: 2e9 float32
#: parameters are 8 GB before gradients and optimiser state, 1e12 MACs a sample never finish an epoch
STUDENT_LIMITS = {"params": 2_000_000_000, "macs": 1_000_000_000_000}


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device: every tensor has a shape and no storage, so any size costs nothing.

    A builder that needs real values (it loads weights, or calls ``.item()``) cannot build
    there; it is built for real instead, as before (only user builders do this).
    """
    try:
        with torch.device("meta"):
            return build()
    except Exception as exc:
        log.debug("building on the meta device failed (%s); building for real", exc)
        return build()


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s tensors live (the meta device for :func:`build_on_meta`); the CPU for a model without any."""
    return next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))


def _structure(space: Space, config: TrialConfig, input_shape: tuple[int, ...], num_classes: int) -> tuple[nn.Module, torch.Tensor]:
    """The student of ``config`` built on the meta device, and an example input beside it."""
    model = build_on_meta(lambda: space.build_student(config, input_shape, num_classes))
    return model, torch.zeros(1, *input_shape, device=device_of(model))


def footprint_of(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Params and MACs of ``model`` on ``example`` (the keys of :data:`STUDENT_LIMITS` and of the constraints)."""
    return {"params": count_params(model), "macs": count_macs(model, example)}


def pruned_structure(model: nn.Module, config: TrialConfig, example: torch.Tensor) -> nn.Module:
    """``model`` pruned as the trial will prune it: the same channel counts whatever the weights.

    On the meta device (no values to rank) the channels are ranked by position: pruning is per
    layer, so the structure is the same as L1 on real weights gives, or any criterion.
    """
    if config.compress.prune_ratio > 0:
        criterion = ShapeOnlyImportance if example.is_meta else "l1"
        return prune_student(model, config.compress.prune_ratio, criterion, example)
    return model


def expected_footprint(space: Space, config: TrialConfig, input_shape: tuple[int, ...], num_classes: int) -> dict[str, int]:
    """Params and MACs of the student after pruning, known from the architecture before training.

    The student is built and pruned on the meta device, so this allocates nothing whatever its
    size: the driver checks constraints with it before launch. Pruning removes the same number
    of channels per layer whatever the weights, so it is the trained student's footprint.
    """
    model, example = _structure(space, config, input_shape, num_classes)
    return footprint_of(pruned_structure(model, config, example), example)


def over_limits(footprint: dict[str, int]) -> Optional[str]:
    """Which of :data:`STUDENT_LIMITS` ``footprint`` breaks, in words (None: none)."""
    for metric, limit in STUDENT_LIMITS.items():
        if footprint[metric] > limit:
            return f"{footprint[metric]:,} {metric}, over the {limit:,} {metric} a trial can build"
    return None


def constraint_violation(space: Space, config: TrialConfig, input_shape: tuple[int, ...], num_classes: int) -> Optional[str]:
    """Why ``config``'s student may not take a worker, or None: over :data:`STUDENT_LIMITS` as built,
    or over the space's ``max_params`` / ``max_macs`` once pruned. All on the meta device."""
    model, example = _structure(space, config, input_shape, num_classes)
    built = footprint_of(model, example)
    reason = over_limits(built)
    if reason:
        return reason
    bounds = size_bounds(space)
    if bound_violation(built, bounds) is None:
        return None  # pruning only removes: no need to prune to know
    return bound_violation(footprint_of(pruned_structure(model, config, example), example), bounds)


def size_bounds(space: Space) -> dict[str, float]:
    """The space's ``max_params`` / ``max_macs`` by metric: the constraints known before training."""
    from kdsearch.spaces.schema import CONSTRAINT_KEYS

    return {CONSTRAINT_KEYS[k]: v for k, v in space.constraints.items() if CONSTRAINT_KEYS[k] in ("params", "macs")}


def bound_violation(footprint: dict[str, int], bounds: dict[str, float]) -> Optional[str]:
    """Which of ``bounds`` (:func:`size_bounds`) ``footprint`` breaks, in words (None: none)."""
    for metric, bound in bounds.items():
        if footprint[metric] > bound:
            return f"{metric} {footprint[metric]:,} > max_{metric} {bound:,.0f}"
    return None


def check_student_size(space: Space, config: TrialConfig, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Refuse, before a real build, a student over :data:`STUDENT_LIMITS`, naming the knob that makes it so."""
    model, example = _structure(space, config, input_shape, num_classes)
    reason = over_limits(footprint_of(model, example))
    if reason is None:
        return
    knob = _size_knob(space, config, input_shape, num_classes)
    field, value = (f"students.{config.family}.{knob}", config.student[knob]) if knob else (f"students.{config.family}", None)
    shown = f"{value!r} makes" if knob else "makes"
    raise SpaceError(field, f"{shown} a student of {reason}", "lower it (or the family's other size knobs)")


def _size_knob(space: Space, config: TrialConfig, input_shape: tuple[int, ...], num_classes: int) -> Optional[str]:
    """The numeric family knob whose halving shrinks the student most: the one an error should name."""
    best, smallest = None, None
    for knob, value in config.student.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 1:
            continue
        halved = dataclasses.replace(config, student={**config.student, knob: value // 2 if isinstance(value, int) else value / 2})
        try:
            params = count_params(_structure(space, halved, input_shape, num_classes)[0])
        except Exception:  # outside the family's bounds (a kernel of 3 halves to 1): not this one
            continue
        if smallest is None or params < smallest:
            best, smallest = knob, params
    return best


def deployed_footprint(student: nn.Module, config: TrialConfig, data: DataBundle, calib: list[torch.Tensor],
                       meta: dict[str, Any], runtime: Runtime, batch_size: int, device: str,
                       latency_fn: LatencyFn) -> tuple[dict[str, Any], Latency]:
    """Params, MACs and latency of the student as it will ship (pruned, quantized, written as
    ``runtime``'s file and run by it), from an untrained copy.

    They depend on the compressed architecture, not on the weights, so they are known
    before training: every epoch's report carries the real latency, and the scheduler ranks
    on it instead of a MACs proxy. The trained student has the same structure.
    """
    example = data.train[0][0].unsqueeze(0)
    model = pruned_structure(copy.deepcopy(student).cpu().eval(), config, example)
    footprint: dict[str, Any] = {**footprint_of(model, example), "runtime": runtime.name}
    with tempfile.TemporaryDirectory() as tmp:
        deployed = runtime.deploy(model, config.compress.quantize, calib, data, Path(tmp), meta)
        return footprint, latency_fn(deployed, runtime.example(data), batch_size, device)


class _Distiller:
    """Student + loss + optimiser for one phase (distillation, or fine-tuning after pruning)."""

    def __init__(self, student: nn.Module, config: TrialConfig, context: TrialContext, epochs: int, device: str,
                 teaching: Teaching):
        self.student, self.context, self.config, self.device, self.teaching = student, context, config, device, teaching
        self.loss = self._loss()
        self.optimizer = make_optimizer(list(student.parameters()) + list(self.loss.parameters()), config.train)
        self.scaler = gradient_scaler(device, config.train.precision)
        self.scheduler = cosine_lr(self.optimizer, epochs * steps_per_epoch(context.data.train, config.train.batch_size))

    def _loss(self) -> DistillLoss:
        example = self.context.example.to(self.device)
        with torch.no_grad():
            was = self.student.training
            _, features = self.student.eval().forward_stages(example)
            self.student.train(was)
        hint = self.context.teachers[self.config.distill.hint_teacher]  # in range: Teaching checked it
        return build_distill_loss(self.config.distill, [f.shape for f in features], hint.feature_shapes).to(self.device)

    def step_loss(self, idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hints = self.loss.needs_features
        x, teachers, targets = self.teaching.batch(idx, x, y, hints)
        if hints:
            logits, features = self.student.forward_stages(x)
            student = Outputs(logits, features)
        else:
            student = Outputs(self.student(x))
        return self.loss(student, teachers, targets)

    def epoch(self, epoch: int, seed: int, fractions: Sequence[float] = (), on_fraction: Optional[OnFraction] = None) -> float:
        self.teaching.start_epoch(epoch)
        modules = nn.ModuleList([self.student, self.loss])
        return train_epoch(modules, self.context.data.train, self.config.train.batch_size, seed,
                           self.optimizer, self.scheduler, self.step_loss, epoch, self.device, fractions, on_fraction,
                           grad_clip=self.config.train.grad_clip, precision=self.config.train.precision,
                           scaler=self.scaler)

    def state(self, epoch: int) -> dict[str, Any]:
        """A snapshot (copied: the live tensors keep training after it is reported)."""
        state = {"epoch": epoch, "student": self.student.state_dict(), "loss": self.loss.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return copy.deepcopy(state)

    def load(self, state: dict[str, Any]) -> int:
        self.student.load_state_dict(state["student"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        return int(state["epoch"])


def run_trial(space: Space, params: dict[str, Any], report: Optional[Report] = None, *,
              context: Optional[TrialContext] = None, seed: int = 0, epochs: Optional[int] = None,
              device: str = "cpu", artifact_dir: Optional[str | Path] = None,
              latency_fn: LatencyFn = local_latency, checkpoint_state: bool = False,
              resume: Optional[dict[str, Any]] = None, report_at: Sequence[float] = ()) -> dict[str, Any]:
    """Distil, compress and measure one student; return its final metrics.

    ``report(metrics)`` is called after every epoch with ``val_acc`` and ``epoch``, plus the
    deployed student's ``params``, ``macs`` and latency, known before training; the last call
    also carries its size on disk. ``report_at`` adds reports inside epochs, at these points
    of progress counted in epochs (say 1/3): early-stopping rungs shorter than an epoch, so a
    hopeless student costs a third of an epoch instead of a whole one. Their ``epoch`` is the
    progress really trained, a float. With ``checkpoint_state`` each distillation epoch's
    report also gets ``state=`` (a dict of tensors) that ``resume=`` accepts to continue a
    trial where it stopped.

    The student ships as ``measure.runtime``'s file (:mod:`kdsearch.trainers.runtimes`):
    ``student.onnx`` for onnxruntime, beside the float checkpoint ``student.pt``; ``student.pt``
    for torch. Its latency (every report), final ``val_acc`` and ``size_bytes`` are that file's,
    in that runtime; ``runtime``, ``artifact`` and ``artifact_sha256`` name it. ``artifact_dir``
    keeps the files.

    Validation passes: one per report before the last, one of the deployed file, and one of the
    float student on the CPU where no other pass measured it (``val_acc_checkpoint`` beside an
    ONNX file; ``val_acc_distilled`` of an unpruned student shipped quantized). The last epoch
    takes no pass of its own: the final report's ``val_acc`` is the deployed file's.
    """
    started = time.perf_counter()
    config = space.resolve(params)
    context = context or prepare(space)
    data = context.data
    emit = report or (lambda metrics, state=None: None)
    check_student_size(space, config, data.input_shape, data.num_classes)  # on the meta device, before a real build
    torch.manual_seed(seed)
    setup_device(device)
    student = space.build_student(config, data.input_shape, data.num_classes).to(device)
    example = context.example
    calib = [x for _, (_, x, _) in zip(range(config.compress.calib_batches),
                                       batches(data.train, config.train.batch_size, shuffle=True, seed=seed))]
    meta = {"params": config.params, "family": config.family, "input_shape": list(data.input_shape),
            "num_classes": data.num_classes}
    runtime = get_runtime(space.measure.runtime)
    footprint, latency = deployed_footprint(student, config, data, calib, meta, runtime, space.measure.batch_size,
                                            space.measure.device, latency_fn)
    footprint.update(latency.as_metrics())
    distil_epochs = epochs or config.train.epochs
    prune = config.compress.prune_ratio > 0
    finetune_epochs = config.compress.finetune_epochs if prune else 0
    last_epoch = distil_epochs + finetune_epochs
    pending: dict[str, Any] = {}
    distilled_acc: Optional[float] = None  # the float student's, after distillation (before pruning)

    def progress(epoch: float, loss: float, phase: str, validate: bool = True) -> dict[str, Any]:
        """A report's metrics; ``validate``: with ``val_acc``, one validation pass of the student as it is now."""
        val = {"val_acc": accuracy(student, placed.data.val, device=device)} if validate else {}
        return {"epoch": epoch, **val, "train_loss": loss, "phase": phase, "teacher_passes": teaching.passes,
                **footprint}

    def epoch_done(epoch: int, loss: float, phase: str, state: Optional[dict] = None) -> None:
        nonlocal pending, distilled_acc
        if epoch == last_epoch:
            # reported with the final measurement, whose val_acc is the deployed file's: no pass here
            pending = progress(epoch, loss, phase, validate=False)
            return
        metrics = progress(epoch, loss, phase)
        if phase == "distill" and epoch == distil_epochs:
            distilled_acc = metrics["val_acc"]  # val_acc_distilled: no second pass after the loop
        if checkpoint_state and state is not None:
            emit(metrics, state=state)
        else:
            emit(metrics)

    def inside(epoch: int, phase: str) -> tuple[list[float], OnFraction]:
        """The report points inside epoch ``epoch`` (0-based) as fractions of it, and what reports them."""
        def report_fraction(fraction: float, loss: float) -> None:
            emit(progress(epoch + fraction, loss, phase))
        return [point - epoch for point in report_at if epoch < point < epoch + 1], report_fraction

    # on a GPU the data and the teachers' outputs move there once (when they fit); the CPU copies
    # stay for what runs on the host: calibration, the deployed file, its accuracy
    placed = dataclasses.replace(context, data=place_data(data, device), teachers=place_teachers(context.teachers, device))
    to_channels_last(student)
    teaching = Teaching(placed, config, device, seed)
    distiller = _Distiller(student, config, placed, distil_epochs, device, teaching)
    start_epoch = distiller.load(resume) if resume else 0
    for epoch in range(start_epoch, distil_epochs):
        loss = distiller.epoch(epoch, seed, *inside(epoch, "distill"))
        epoch_done(epoch + 1, loss, "distill", distiller.state(epoch + 1) if checkpoint_state else None)
    if prune and distilled_acc is None:  # resumed past distillation, or no fine-tuning: not measured yet
        distilled_acc = accuracy(student, placed.data.val, device=device)

    example = example.to(device)
    if prune:
        targets = context.targets
        to_contiguous(student)  # Torch-Pruning slices tensors in the default layout
        student = prune_student(student, config.compress.prune_ratio, config.compress.prune_criterion, example,
                                loss_fn=lambda m: _batch_loss(m, data, targets, config, device))
        recalibrate_batchnorm(student, [x.to(device) for x in calib])  # pruning leaves BatchNorm statistics stale
        tuner = _Distiller(student, config, placed, finetune_epochs, device, teaching)
        for epoch in range(finetune_epochs):
            loss = tuner.epoch(distil_epochs + epoch, seed, *inside(distil_epochs + epoch, "finetune"))
            epoch_done(distil_epochs + epoch + 1, loss, "finetune")

    student = to_contiguous(student.cpu()).eval()  # safetensors and ONNX export take the default layout
    example = example.cpu()
    float_metrics = {"params": count_params(student), "macs": count_macs(student, example)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(artifact_dir or tmp)
        deployed = runtime.deploy(student, config.compress.quantize, calib, data, folder, meta)
        final_acc = runtime.accuracy(deployed, data)  # of the shipped file, in its runtime
        ships_checkpoint = deployed.path.name == CHECKPOINT
        if not ships_checkpoint:  # the float student, which the other export formats are built from
            save_student(student, folder / CHECKPOINT, meta=meta)
    float_acc: Optional[float] = None  # measured only when a metric needs it
    if not ships_checkpoint or distilled_acc is None:
        float_acc = float_accuracy(student, deployed, final_acc, data)
    checkpoint_acc = final_acc if ships_checkpoint else float_acc
    if distilled_acc is None:
        distilled_acc = float_acc  # unpruned: the distilled student is the float student
    final = {
        **pending,
        "epoch": last_epoch,
        "val_acc": final_acc,
        "val_acc_distilled": distilled_acc,
        "teacher_val_acc": context.targets.val_acc,
        "teacher_passes": teaching.passes,
        **float_metrics,
        "size_bytes": deployed.size_bytes,  # of the shipped file
        **latency.as_metrics(),
        "runtime": runtime.name,
        "artifact": deployed.path.name,
        "artifact_sha256": deployed.sha256,
        "val_acc_checkpoint": checkpoint_acc,  # of student.pt in torch: what the rebuilt export formats must match
        "quant_backend": deployed.quant_backend,
        "train_seconds": time.perf_counter() - started,
        "family": config.family,
    }
    emit(final)
    return {**final, "config": dict(config.params)}


def float_accuracy(student: nn.Module, deployed: Deployed, deployed_acc: float, data: DataBundle) -> float:
    """The float student's validation accuracy on the CPU, as ``student.pt`` runs in torch.

    One pass, unless the deployed file is this very model (torch, no quantization): then it is
    the deployed file's figure, already measured.
    """
    if deployed.path.name == CHECKPOINT and deployed.handle is student:
        return deployed_acc
    return accuracy(student, data.val)


def _batch_loss(model: nn.Module, data: DataBundle, targets: TeacherTargets, config: TrialConfig, device: str) -> torch.Tensor:
    """The trial's logit loss (distill.method) on one training batch: the gradient signal Taylor importance needs."""
    idx, x, y = next(batches(data.train, config.train.batch_size, shuffle=True))
    x, y = x.to(device), y.to(device)
    loss = build_distill_loss(config.distill, [], []).to(device)  # no stage shapes: the logit term alone
    return loss(Outputs(model(x)), Teachers.single(Outputs(targets.logits[idx].to(device))), y)
