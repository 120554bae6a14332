"""One distillation trial: distil -> [prune -> KD fine-tune -> quantize] -> measure.

:func:`run_trial` knows nothing of Ray Tune or MLflow: it receives a ``report`` callable,
so a trial runs the same in a test, in ``kdsearch trial`` and inside a Tune worker. The
expensive shared inputs (data, teacher outputs) come in a :class:`TrialContext` that the
driver builds once and shares across trials.
"""

from __future__ import annotations

import copy
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
from kdsearch.trainers.compress import prune_student, recalibrate_batchnorm
from kdsearch.trainers.data import DataBundle, batches, load_data
from kdsearch.trainers.loop import OnFraction, TrialDiverged, cosine_lr, make_optimizer, steps_per_epoch, train_epoch
from kdsearch.trainers.losses import DistillLoss, Outputs, Teachers, build_distill_loss
from kdsearch.trainers.measure import Latency, accuracy, count_macs, count_params, measure_latency
from kdsearch.trainers.quantize import get_quantizer
from kdsearch.trainers.teachers import TeacherTargets, compute_targets, load_teacher
from kdsearch.trainers.teaching import Teaching

log = logging.getLogger("kdsearch")

__all__ = ["TrialContext", "TrialDiverged", "prepare", "run_trial", "expected_footprint"]


class Report(Protocol):
    def __call__(self, metrics: dict[str, Any], state: Optional[dict[str, Any]] = None) -> None: ...


#: ``latency_fn(model, example, artifact)``: the artifact file lets a remote measurer rebuild the model
LatencyFn = Callable[[nn.Module, torch.Tensor, Path], Latency]


def local_latency(model: nn.Module, example: torch.Tensor, artifact: Path) -> Latency:
    return measure_latency(model, example)


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


def prepare(space: Space) -> TrialContext:
    """Load the data, load (or train and cache) each teacher, and run it once over the clean data."""
    data = load_data(space.data)
    hint_teachers = set(knob_values(space, "distill.hint_teacher", 0)) if hints_possible(space) else set()
    for index in hint_teachers:
        if not isinstance(index, int) or index >= len(space.teachers):
            raise SpaceError("distill.hint_teacher", f"{index!r} but the space has {len(space.teachers)} teachers",
                             f"use 0..{len(space.teachers) - 1}")
    teachers = []
    for index, config in enumerate(space.teachers):
        described = config.family or config.path or config.module or ""
        targets = compute_targets(load_teacher(config, data), data, index in hint_teachers, described)
        if index in hint_teachers and not targets.feature_shapes:
            raise SpaceError("distill.hint_stages", f"teacher {index} exposes no stage outputs (no forward_stages)",
                             "set hint_stages: none, or give a teacher module with forward_stages")
        if index in hint_teachers:
            stages = len(targets.feature_shapes)
            for spec in knob_values(space, "distill.hint_stages", "none"):
                wrong = [p for p in str(spec).split(",") if p.strip().isdigit() and int(p) >= stages]
                if wrong:
                    raise SpaceError("distill.hint_stages", f"{spec!r} names stage {wrong[0]} but teacher {index} has "
                                     f"{stages} stages", f"use indices 0..{stages - 1}, last or all")
        teachers.append(targets)
    return TrialContext(data, teachers, view_seed=space.data.seed, teacher_passes=len(data.train) * len(teachers))


def pruned_structure(model: nn.Module, config: TrialConfig, example: torch.Tensor) -> nn.Module:
    """``model`` pruned as the trial will prune it: the same channel counts whatever the weights."""
    if config.compress.prune_ratio > 0:
        return prune_student(model, config.compress.prune_ratio, "l1", example)
    return model


def expected_footprint(space: Space, config: TrialConfig, input_shape: tuple[int, ...], num_classes: int) -> dict[str, int]:
    """Params and MACs of the student after pruning, known from the architecture before training.

    Pruning removes the same number of channels per layer whatever the weights, so pruning a
    freshly built copy gives the trained student's footprint: the driver checks constraints
    with it before launch.
    """
    example = torch.zeros(1, *input_shape)
    model = pruned_structure(space.build_student(config, input_shape, num_classes), config, example)
    return {"params": count_params(model), "macs": count_macs(model, example)}


def deployed_footprint(student: nn.Module, config: TrialConfig, example: torch.Tensor, calib: list[torch.Tensor],
                       meta: dict[str, Any], latency_fn: LatencyFn) -> tuple[dict[str, int], Latency]:
    """Params, MACs and latency of the student as it will ship (pruned, quantized), from an untrained copy.

    They depend on the compressed architecture, not on the weights, so they are known
    before training: every epoch's report carries the real latency, and the scheduler ranks
    on it instead of a MACs proxy. The trained student has the same structure.
    """
    model = pruned_structure(copy.deepcopy(student).cpu().eval(), config, example)
    footprint = {"params": count_params(model), "macs": count_macs(model, example)}
    model = get_quantizer(config.compress.quantize).quantize(model, calib, example)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "student.pt"
        save_student(model, artifact, meta=meta)
        return footprint, latency_fn(model, example, artifact)


class _Distiller:
    """Student + loss + optimiser for one phase (distillation, or fine-tuning after pruning)."""

    def __init__(self, student: nn.Module, config: TrialConfig, context: TrialContext, epochs: int, device: str,
                 teaching: Teaching):
        self.student, self.context, self.config, self.device, self.teaching = student, context, config, device, teaching
        self.loss = self._loss()
        self.optimizer = make_optimizer(list(student.parameters()) + list(self.loss.parameters()), config.train)
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
                           grad_clip=self.config.train.grad_clip)

    def state(self, epoch: int) -> dict[str, Any]:
        """A snapshot (copied: the live tensors keep training after it is reported)."""
        return copy.deepcopy({"epoch": epoch, "student": self.student.state_dict(), "loss": self.loss.state_dict(),
                              "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()})

    def load(self, state: dict[str, Any]) -> int:
        self.student.load_state_dict(state["student"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
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
    """
    started = time.perf_counter()
    config = space.resolve(params)
    context = context or prepare(space)
    data = context.data
    emit = report or (lambda metrics, state=None: None)
    torch.manual_seed(seed)
    student = space.build_student(config, data.input_shape, data.num_classes).to(device)
    example = context.example
    calib = [x for _, (_, x, _) in zip(range(config.compress.calib_batches),
                                       batches(data.train, config.train.batch_size, shuffle=True, seed=seed))]
    meta = {"params": config.params, "family": config.family, "input_shape": list(data.input_shape),
            "num_classes": data.num_classes}
    footprint, latency = deployed_footprint(student, config, example, calib, meta, latency_fn)
    footprint.update(latency.as_metrics())
    distil_epochs = epochs or config.train.epochs
    prune = config.compress.prune_ratio > 0
    finetune_epochs = config.compress.finetune_epochs if prune else 0
    last_epoch = distil_epochs + finetune_epochs
    pending: dict[str, Any] = {}

    def epoch_done(epoch: int, loss: float, phase: str, state: Optional[dict] = None) -> None:
        nonlocal pending
        pending = {"epoch": epoch, "val_acc": accuracy(student, data.val, device=device), "train_loss": loss,
                   "phase": phase, "teacher_passes": teaching.passes, **footprint}
        if epoch == last_epoch:
            return  # the last epoch is reported with the final measurement
        if checkpoint_state and state is not None:
            emit(pending, state=state)
        else:
            emit(pending)
        pending = {}

    def inside(epoch: int, phase: str) -> tuple[list[float], OnFraction]:
        """The report points inside epoch ``epoch`` (0-based) as fractions of it, and what reports them."""
        def report_fraction(fraction: float, loss: float) -> None:
            emit({"epoch": epoch + fraction, "val_acc": accuracy(student, data.val, device=device), "train_loss": loss,
                  "phase": phase, "teacher_passes": teaching.passes, **footprint})
        return [point - epoch for point in report_at if epoch < point < epoch + 1], report_fraction

    teaching = Teaching(context, config, device, seed)
    distiller = _Distiller(student, config, context, distil_epochs, device, teaching)
    start_epoch = distiller.load(resume) if resume else 0
    for epoch in range(start_epoch, distil_epochs):
        loss = distiller.epoch(epoch, seed, *inside(epoch, "distill"))
        epoch_done(epoch + 1, loss, "distill", distiller.state(epoch + 1) if checkpoint_state else None)
    distilled_acc = accuracy(student, data.val, device=device)

    example = example.to(device)
    if prune:
        targets = context.targets
        student = prune_student(student, config.compress.prune_ratio, config.compress.prune_criterion, example,
                                loss_fn=lambda m: _batch_loss(m, data, targets, config, device))
        recalibrate_batchnorm(student, [x.to(device) for x in calib])  # pruning leaves BatchNorm statistics stale
        tuner = _Distiller(student, config, context, finetune_epochs, device, teaching)
        for epoch in range(finetune_epochs):
            loss = tuner.epoch(distil_epochs + epoch, seed, *inside(distil_epochs + epoch, "finetune"))
            epoch_done(distil_epochs + epoch + 1, loss, "finetune")

    student = student.cpu().eval()
    example = example.cpu()
    float_metrics = {"params": count_params(student), "macs": count_macs(student, example)}
    quantizer = get_quantizer(config.compress.quantize)
    student = quantizer.quantize(student, calib, example)
    final_acc = accuracy(student, data.val)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(artifact_dir or tmp) / "student.pt"
        artifact.parent.mkdir(parents=True, exist_ok=True)
        size_bytes = save_student(student, artifact, meta=meta)
    final = {
        **pending,
        "epoch": last_epoch,
        "val_acc": final_acc,
        "val_acc_distilled": distilled_acc,
        "teacher_val_acc": context.targets.val_acc,
        "teacher_passes": teaching.passes,
        **float_metrics,
        "size_bytes": size_bytes,
        **latency.as_metrics(),
        "quant_backend": quantizer.backend,
        "train_seconds": time.perf_counter() - started,
        "family": config.family,
    }
    emit(final)
    return {**final, "config": dict(config.params)}


def _batch_loss(model: nn.Module, data: DataBundle, targets: TeacherTargets, config: TrialConfig, device: str) -> torch.Tensor:
    """The trial's logit loss (distill.method) on one training batch: the gradient signal Taylor importance needs."""
    idx, x, y = next(batches(data.train, config.train.batch_size, shuffle=True))
    x, y = x.to(device), y.to(device)
    loss = build_distill_loss(config.distill, [], []).to(device)  # no stage shapes: the logit term alone
    return loss(Outputs(model(x)), Teachers.single(Outputs(targets.logits[idx].to(device))), y)
