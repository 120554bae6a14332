"""Distillation losses as named, composable terms (torchdistill style).

A term is an ``nn.Module`` built from the trial's distillation config and the shapes of the
student's and teacher's stage outputs; it may own parameters (hint adapters), which then
train with the student. :class:`DistillLoss` sums the terms a config selects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdsearch.spaces import DistillConfig


@dataclass
class Outputs:
    """Logits and stage outputs of a model on one batch."""

    logits: torch.Tensor
    features: list[torch.Tensor] = field(default_factory=list)


TermFactory = Callable[[DistillConfig, list[torch.Size], list[torch.Size]], Optional[nn.Module]]
_TERMS: dict[str, TermFactory] = {}


def register_term(name: str) -> Callable[[TermFactory], TermFactory]:
    """Register ``factory(config, student_shapes, teacher_shapes) -> term | None`` (None: term off)."""

    def wrap(factory: TermFactory) -> TermFactory:
        _TERMS[name] = factory
        return factory

    return wrap


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """Hinton et al.: ``alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(s, y)``.

    T^2 keeps the soft-target gradients on the scale of the hard-label ones as T changes.
    """
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


class LogitKD(nn.Module):
    def __init__(self, temperature: float, alpha: float) -> None:
        super().__init__()
        self.temperature, self.alpha = temperature, alpha

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> torch.Tensor:
        return kd_loss(student.logits, teacher.logits, labels, self.temperature, self.alpha)


@register_term("kd")
def _kd(config: DistillConfig, student_shapes, teacher_shapes) -> nn.Module:
    return LogitKD(config.temperature, config.alpha)


def hinted_stages(spec: str, teacher_stages: int) -> list[int]:
    """Teacher stage indices a ``hint_stages`` value selects."""
    if spec == "none" or teacher_stages == 0:
        return []
    if spec == "last":
        return [teacher_stages - 1]
    if spec == "all":
        return list(range(teacher_stages))
    return sorted({min(int(p), teacher_stages - 1) for p in spec.split(",")})


def paired_student_stage(teacher_stage: int, teacher_stages: int, student_stages: int) -> int:
    """Match stages by relative depth, so a 2-stage student can learn from a 4-stage teacher."""
    if teacher_stages <= 1:
        return student_stages - 1
    return round(teacher_stage * (student_stages - 1) / (teacher_stages - 1))


def as_vector(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(2, x.ndim))) if x.ndim > 2 else x


class HintAdapter(nn.Module):
    """Maps a student stage output onto a teacher stage's shape (FitNets regressor)."""

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        super().__init__()
        self.spatial = len(student_shape) == 4 and len(teacher_shape) == 4
        self.size = tuple(teacher_shape[2:]) if self.spatial else None
        if self.spatial:
            self.proj: nn.Module = nn.Conv2d(student_shape[1], teacher_shape[1], 1)
        else:
            self.proj = nn.Linear(student_shape[1], teacher_shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial:
            x = self.proj(x)
            return x if tuple(x.shape[2:]) == self.size else F.adaptive_avg_pool2d(x, self.size)
        return self.proj(as_vector(x))


class FeatureHints(nn.Module):
    """Weighted mean of MSE between adapted student stages and chosen teacher stages."""

    def __init__(self, pairs: list[tuple[int, int]], student_shapes, teacher_shapes, weight: float) -> None:
        super().__init__()
        self.pairs, self.weight = pairs, weight
        self.adapters = nn.ModuleList(HintAdapter(student_shapes[s], teacher_shapes[t]) for t, s in pairs)

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> torch.Tensor:
        losses = []
        for (t, s), adapter in zip(self.pairs, self.adapters):
            target = teacher.features[t]
            if not adapter.spatial:
                target = as_vector(target)
            losses.append(F.mse_loss(adapter(student.features[s]), target))
        return self.weight * torch.stack(losses).mean()


@register_term("hint")
def _hint(config: DistillConfig, student_shapes, teacher_shapes) -> Optional[nn.Module]:
    stages = hinted_stages(config.hint_stages, len(teacher_shapes))
    if not stages or config.hint_weight <= 0 or not student_shapes:
        return None
    pairs = [(t, paired_student_stage(t, len(teacher_shapes), len(student_shapes))) for t in stages]
    return FeatureHints(pairs, student_shapes, teacher_shapes, config.hint_weight)


class DistillLoss(nn.Module):
    """The sum of the enabled terms; ``needs_features`` tells the loop whether to collect stages."""

    def __init__(self, terms: dict[str, nn.Module]) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(terms)

    @property
    def needs_features(self) -> bool:
        return "hint" in self.terms

    def forward(self, student: Outputs, teacher: Outputs, labels: torch.Tensor) -> torch.Tensor:
        return sum(term(student, teacher, labels) for term in self.terms.values())


def build_distill_loss(config: DistillConfig, student_shapes: list[torch.Size],
                       teacher_shapes: list[torch.Size], names: tuple[str, ...] = ("kd", "hint")) -> DistillLoss:
    """The composed loss for a trial; terms that a config switches off are left out."""
    terms = {}
    for name in names:
        term = _TERMS[name](config, student_shapes, teacher_shapes)
        if term is not None:
            terms[name] = term
    return DistillLoss(terms)
