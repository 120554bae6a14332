"""Distillation losses as named, composable terms (torchdistill style).

A term is an ``nn.Module`` built by a factory ``factory(config, student_shapes, teacher_shapes)``
from the trial's :class:`~kdsearch.spaces.DistillConfig` and the shapes of the student's and
the hint teacher's stage outputs (a factory returns ``None`` when the config switches its term
off). A term may own parameters (hint adapters), which then train with the student. Every
term is called as ``term(student: Outputs, teachers: Teachers, labels) -> scalar loss``, and
:class:`DistillLoss` sums the terms a trial uses: the logit term that ``distill.method``
names plus, when hints are on, the feature term that ``distill.feature`` names.

Terms have a ``kind``, declared when they are registered and shown by ``kdsearch list losses``:

* ``logit`` terms are the distillation methods ``distill.method`` selects: ``kd`` (Hinton),
  ``dkd`` (decoupled KD), ``mlkd`` (multi-level logit KD) and ``none`` (labels only, the
  baseline). ``distill.alpha`` weighs the distillation part and ``1 - alpha`` the label
  cross-entropy, for every method; ``distill.logit_standardize`` z-scores the logits first
  (kd, dkd, mlkd). With several teachers a logit term computes a per-sample divergence per
  teacher and combines them as ``(teachers.weights * per_sample).sum(1).mean()``.
* ``feature`` terms are what ``distill.feature`` selects: ``fitnets`` (also under its old
  name ``hint``) and ``at`` (attention transfer). They are on when ``hint_stages`` is not
  ``none`` and ``hint_weight > 0``, combine with any method, and read the stage outputs of
  one teacher, ``teachers.outputs[distill.hint_teacher]``.

A method of your own is one registered factory. The easiest is a :class:`LogitTerm` that
defines the per-sample divergence (the teacher weighting and the ``alpha`` mix come with it)::

    from kdsearch.trainers.losses import LogitTerm, register_term

    class MyKD(LogitTerm):
        def divergence(self, student_logits, teacher_logits, labels):  # -> shape (B,)
            return (student_logits - teacher_logits).pow(2).mean(1)

    @register_term("mykd", kind="logit")
    def mykd(config, student_shapes, teacher_shapes):
        '''Squared logit distance (the first docstring line is what `kdsearch list losses` shows).'''
        return MyKD(config)

A space then says ``distill: {method: mykd}`` (or ``{method: {choice: [kd, mykd]}}``). Any
``nn.Module`` with the term signature works as well. Registering in-process does not reach
Ray workers; a ``module:attr`` ref (``method: mypkg.losses:mykd``) is imported wherever it is
looked up, and a factory without a ``kind`` attribute is taken as a logit method there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from kdsearch.spaces import DistillConfig, SpaceError
from kdsearch.spaces.registry import LOSSES

#: the kinds a term may declare; ``None`` is an extra term, only used when named in ``build_distill_loss(names=...)``
TERM_KINDS = ("logit", "feature")


@dataclass
class Outputs:
    """Logits and stage outputs of a model on one batch."""

    logits: torch.Tensor
    features: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Teachers:
    """The outputs of ``T`` teachers on one batch and per-sample teacher weights.

    ``weights`` has shape ``(B, T)`` and its rows sum to 1 (not checked: it is the data
    path's to guarantee); column ``t`` weighs ``outputs[t]``.
    """

    outputs: list[Outputs]
    weights: torch.Tensor

    def __post_init__(self) -> None:
        if not self.outputs:
            raise ValueError("Teachers needs at least one teacher's outputs")
        if self.weights.ndim != 2 or self.weights.shape[1] != len(self.outputs):
            raise ValueError(f"weights must have shape (batch, {len(self.outputs)}), got {tuple(self.weights.shape)}")

    @classmethod
    def single(cls, outputs: Outputs) -> "Teachers":
        """One teacher, weight 1 for every sample."""
        return cls([outputs], outputs.logits.new_ones(outputs.logits.shape[0], 1))

    def combine(self, per_sample: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(weights * per_sample).sum(1).mean()`` for one ``(B,)`` tensor per teacher."""
        stacked = torch.stack(list(per_sample), dim=1)
        return (self.weights.to(stacked) * stacked).sum(1).mean()

    def batch_weights(self) -> torch.Tensor:
        """Each teacher's mean weight over the batch: ``(T,)``, for terms that are not per-sample."""
        return self.weights.mean(0)


TermFactory = Callable[[DistillConfig, list[torch.Size], list[torch.Size]], Optional[nn.Module]]


def register_term(name: str, kind: Optional[str] = None) -> Callable[[TermFactory], TermFactory]:
    """Register ``factory(config, student_shapes, teacher_shapes) -> term | None`` (None: term off) in :data:`LOSSES`.

    ``kind="logit"`` makes it a ``distill.method``, ``kind="feature"`` a ``distill.feature``;
    the kind is set as the factory's ``kind`` attribute. A term is called as
    ``term(student: Outputs, teachers: Teachers, labels) -> scalar``.
    """
    if kind is not None and kind not in TERM_KINDS:
        raise ValueError(f"a loss term's kind is one of {TERM_KINDS} or None, got {kind!r}")

    def add(factory: TermFactory) -> TermFactory:
        if kind is not None:
            factory.kind = kind  # type: ignore[attr-defined]
        return LOSSES.register(name, factory)

    return add


def term_kind(factory: object) -> Optional[str]:
    """The kind a factory declares (``None`` when it declares none)."""
    kind = getattr(factory, "kind", None)
    return kind if isinstance(kind, str) else None


# --------------------------------------------------------------------------- logit terms


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Z-score each sample's logits (Sun et al. 2024), as their code: ``(z - mean) / (1e-7 + std)``."""
    return (logits - logits.mean(dim=-1, keepdim=True)) / (1e-7 + logits.std(dim=-1, keepdim=True))


def kl_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_t^T || p_s^T)`` for each sample: shape ``(B,)``."""
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return temperature**2 * (log_t.exp() * (log_t - log_s)).sum(-1)


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


class LogitTerm(nn.Module):
    """A logit method: ``alpha * sum_t w_t * divergence_t + (1 - alpha) * CE(student, labels)``, batch-averaged.

    Subclasses define :meth:`divergence` (per sample, on the raw logits: apply
    :meth:`prepare` for ``logit_standardize``); :meth:`batch_divergence` adds a part that is
    not per-sample, weighted by each teacher's mean weight over the batch.
    """

    needs_features = False

    def __init__(self, config: DistillConfig) -> None:
        super().__init__()
        self.temperature, self.alpha = config.temperature, config.alpha
        self.logit_standardize = config.logit_standardize

    def prepare(self, logits: torch.Tensor) -> torch.Tensor:
        return standardize(logits) if self.logit_standardize else logits

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def forward(self, student: Outputs, teachers: Teachers, labels: torch.Tensor) -> torch.Tensor:
        s = student.logits
        distill = teachers.combine([self.divergence(s, t.logits, labels) for t in teachers.outputs])
        extra = [self.batch_divergence(s, t.logits) for t in teachers.outputs]
        if all(e is not None for e in extra):
            distill = distill + (teachers.batch_weights().to(s) * torch.stack(extra)).sum()  # type: ignore[arg-type]
        return self.alpha * distill + (1.0 - self.alpha) * F.cross_entropy(s, labels)


class LogitKD(LogitTerm):
    """Hinton KD: ``T^2 * KL(p_t^T || p_s^T)`` per sample."""

    def divergence(self, student_logits, teacher_logits, labels):
        return kl_per_sample(self.prepare(student_logits), self.prepare(teacher_logits), self.temperature)


class DecoupledKD(LogitTerm):
    """DKD (Zhao et al. 2022): ``T^2 * (dkd_alpha * TCKD + dkd_beta * NCKD)`` per sample.

    TCKD is the KL between the binary (target, all others) probabilities of teacher and
    student; NCKD the KL between their distributions over the non-target classes alone.
    As in mdistiller, without its warm-up of the DKD weight.
    """

    def __init__(self, config: DistillConfig) -> None:
        super().__init__(config)
        self.tckd_weight, self.nckd_weight = config.dkd_alpha, config.dkd_beta

    def divergence(self, student_logits, teacher_logits, labels):
        s = self.prepare(student_logits) / self.temperature
        t = self.prepare(teacher_logits) / self.temperature
        batch, classes = s.shape
        # mixed-up samples carry class probabilities: their target class is the larger share
        target = F.one_hot(labels.argmax(-1) if labels.ndim == 2 else labels, classes).bool()
        log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
        # binary: log p(target) and log p(not target), in log space so a confident model gives no log(0)
        bin_s = torch.stack([log_s[target], log_s[~target].view(batch, classes - 1).logsumexp(-1)], -1)
        bin_t = torch.stack([log_t[target], log_t[~target].view(batch, classes - 1).logsumexp(-1)], -1)
        tckd = (bin_t.exp() * (bin_t - bin_s)).sum(-1)
        nt_s = F.log_softmax(s[~target].view(batch, classes - 1), -1)
        nt_t = F.log_softmax(t[~target].view(batch, classes - 1), -1)
        nckd = (nt_t.exp() * (nt_t - nt_s)).sum(-1)
        return self.temperature**2 * (self.tckd_weight * tckd + self.nckd_weight * nckd)


class MultiLevelKD(LogitTerm):
    """MLKD (Jin et al. 2023), as in their code, at distill.temperature and 2, 3, 5, 6.

    Per temperature ``tau``: instance level ``tau^2 * KL`` per sample; batch level, the
    squared difference of the B x B prediction Gram matrices ``P P^T`` (row ``i`` is sample
    ``i``'s part, the batch mean of the row sums equals the code's ``sum / B``); class
    level, that of the C x C matrices ``P^T P`` over ``C``. The class level is not per
    sample: with several teachers it is weighted by each teacher's mean weight.
    ``logit_standardize`` applies to the instance level only, as in the LS authors' code.

    Their confidence masks and weak/strong prediction augmentation are left out: the
    trial's own data augmentation plays that role, and one view is distilled.
    """

    EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)

    @property
    def temperatures(self) -> tuple[float, ...]:
        return (self.temperature, *self.EXTRA_TEMPERATURES)

    def divergence(self, student_logits, teacher_logits, labels):
        s_std, t_std = self.prepare(student_logits), self.prepare(teacher_logits)
        total = student_logits.new_zeros(student_logits.shape[0])
        for tau in self.temperatures:
            total = total + kl_per_sample(s_std, t_std, tau)
            p_s, p_t = F.softmax(student_logits / tau, -1), F.softmax(teacher_logits / tau, -1)
            total = total + (p_t @ p_t.T - p_s @ p_s.T).pow(2).sum(-1)
        return total

    def batch_divergence(self, student_logits, teacher_logits):
        total = student_logits.new_zeros(())
        for tau in self.temperatures:
            p_s, p_t = F.softmax(student_logits / tau, -1), F.softmax(teacher_logits / tau, -1)
            total = total + (p_t.T @ p_t - p_s.T @ p_s).pow(2).sum() / student_logits.shape[1]
        return total


class LabelsOnly(nn.Module):
    """Cross-entropy with the labels; no teacher."""

    needs_features = False

    def forward(self, student: Outputs, teachers: Teachers, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student.logits, labels)


@register_term("kd", kind="logit")
def _kd(config: DistillConfig, student_shapes, teacher_shapes) -> nn.Module:
    """Hinton logit distillation at distill.temperature, mixed with label CE by distill.alpha."""
    return LogitKD(config)


@register_term("dkd", kind="logit")
def _dkd(config: DistillConfig, student_shapes, teacher_shapes) -> nn.Module:
    """Decoupled KD (Zhao et al. 2022): target/non-target KL weighted by distill.dkd_alpha and dkd_beta."""
    return DecoupledKD(config)


@register_term("mlkd", kind="logit")
def _mlkd(config: DistillConfig, student_shapes, teacher_shapes) -> nn.Module:
    """Multi-level logit KD (Jin et al. 2023): instance, batch and class alignment at five temperatures."""
    return MultiLevelKD(config)


@register_term("none", kind="logit")
def _none(config: DistillConfig, student_shapes, teacher_shapes) -> nn.Module:
    """Labels only (cross-entropy, no teacher): the baseline; distill.alpha is unused."""
    return LabelsOnly()


# --------------------------------------------------------------------------- feature terms


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


def hint_pairs(config: DistillConfig, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size]) -> list[tuple[int, int]]:
    """``(teacher stage, student stage)`` pairs the config hints; empty when hints are off."""
    stages = hinted_stages(config.hint_stages, len(teacher_shapes))
    if not stages or config.hint_weight <= 0 or not student_shapes:
        return []
    return [(t, paired_student_stage(t, len(teacher_shapes), len(student_shapes))) for t in stages]


def hint_teacher(teachers: Teachers, index: int) -> Outputs:
    """The teacher hints come from (``distill.hint_teacher``)."""
    if not 0 <= index < len(teachers.outputs):
        raise SpaceError("distill.hint_teacher", f"teacher {index} does not exist ({len(teachers.outputs)} teachers)",
                         f"give an index below {len(teachers.outputs)}")
    return teachers.outputs[index]


def as_vector(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(2, x.ndim))) if x.ndim > 2 else x


class HintAdapter(nn.Module):
    """Maps a student stage output onto a teacher stage's shape (FitNets regressor).

    Spatially it is a 1x1 conv (``proj``) and adaptive average pooling to the teacher's size,
    which commute exactly: the conv is one affine map at every pixel, and a pooled cell is a
    convex combination of pixels (weights summing to 1, so the bias passes through). So it
    pools first when that leaves fewer pixels (a student stage larger than the teacher's) and
    projects first otherwise: the same loss and gradients, the conv on the smaller grid. This
    holds only while nothing nonlinear (an activation, a BatchNorm in training) follows the conv.
    """

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        super().__init__()
        self.spatial = len(student_shape) == 4 and len(teacher_shape) == 4
        self.size = tuple(teacher_shape[2:]) if self.spatial else None
        if self.spatial:
            self.proj: nn.Module = nn.Conv2d(student_shape[1], teacher_shape[1], 1)
        else:
            self.proj = nn.Linear(student_shape[1], teacher_shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spatial:
            return self.proj(as_vector(x))
        if tuple(x.shape[2:]) == self.size:
            return self.proj(x)
        if self.pools_first(x):
            return self.proj(F.adaptive_avg_pool2d(x, self.size))
        return F.adaptive_avg_pool2d(self.proj(x), self.size)

    def pools_first(self, x: torch.Tensor) -> bool:
        """Whether pooling ``x`` to the teacher's size leaves fewer pixels to project (then it pools first)."""
        assert self.size is not None
        return self.size[0] * self.size[1] < x.shape[2] * x.shape[3]


class FeatureHints(nn.Module):
    """Weighted mean of MSE between adapted student stages and chosen stages of the hint teacher."""

    needs_features = True

    def __init__(self, pairs: list[tuple[int, int]], student_shapes, teacher_shapes, weight: float,
                 teacher: int = 0) -> None:
        super().__init__()
        self.pairs, self.weight, self.teacher = pairs, weight, teacher
        self.adapters = nn.ModuleList(HintAdapter(student_shapes[s], teacher_shapes[t]) for t, s in pairs)

    def forward(self, student: Outputs, teachers: Teachers, labels: torch.Tensor) -> torch.Tensor:
        teacher = hint_teacher(teachers, self.teacher)
        losses = []
        for (t, s), adapter in zip(self.pairs, self.adapters):
            target = teacher.features[t]
            if not adapter.spatial:
                target = as_vector(target)
            losses.append(F.mse_loss(adapter(student.features[s]), target))
        return self.weight * torch.stack(losses).mean()


def attention_map(feature: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mean over channels of ``|f|^2``, average-pooled to ``size``, flattened and L2-normalised per sample."""
    energy = feature.pow(2).mean(1, keepdim=True)
    if tuple(energy.shape[2:]) != size:
        energy = F.adaptive_avg_pool2d(energy, size)
    return F.normalize(energy.flatten(1), dim=1)


class AttentionTransfer(nn.Module):
    """Weighted mean over stage pairs of the mean squared distance between attention maps.

    The larger map is pooled to the smaller one's spatial size; no parameters.
    """

    needs_features = True

    def __init__(self, pairs: list[tuple[int, int]], weight: float, teacher: int = 0) -> None:
        super().__init__()
        self.pairs, self.weight, self.teacher = pairs, weight, teacher

    def forward(self, student: Outputs, teachers: Teachers, labels: torch.Tensor) -> torch.Tensor:
        teacher = hint_teacher(teachers, self.teacher)
        losses = []
        for t, s in self.pairs:
            f_s, f_t = student.features[s], teacher.features[t]
            size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
            losses.append((attention_map(f_s, size) - attention_map(f_t, size)).pow(2).mean())
        return self.weight * torch.stack(losses).mean()


@register_term("fitnets", kind="feature")
def _fitnets(config: DistillConfig, student_shapes, teacher_shapes) -> Optional[nn.Module]:
    """FitNets feature hints: MSE from adapted student stages to distill.hint_stages of the hint teacher."""
    pairs = hint_pairs(config, student_shapes, teacher_shapes)
    if not pairs:
        return None
    return FeatureHints(pairs, student_shapes, teacher_shapes, config.hint_weight, config.hint_teacher)


@register_term("hint", kind="feature")
def _hint(config: DistillConfig, student_shapes, teacher_shapes) -> Optional[nn.Module]:
    """FitNets feature hints (the older name of fitnets)."""
    return _fitnets(config, student_shapes, teacher_shapes)


@register_term("at", kind="feature")
def _at(config: DistillConfig, student_shapes, teacher_shapes) -> Optional[nn.Module]:
    """Attention transfer (Zagoruyko & Komodakis 2017) on the spatial (4-D) stage pairs of distill.hint_stages.

    AT needs spatial maps: a pair where either stage output is 2-D (a vector, as from an
    MLP stage) is skipped, and with no spatial pair left the term is off.
    """
    pairs = [(t, s) for t, s in hint_pairs(config, student_shapes, teacher_shapes)
             if len(student_shapes[s]) == 4 and len(teacher_shapes[t]) == 4]
    if not pairs:
        return None
    return AttentionTransfer(pairs, config.hint_weight, config.hint_teacher)


# --------------------------------------------------------------------------- the composed loss


class DistillLoss(nn.Module):
    """The sum of the enabled terms; ``needs_features`` tells the loop whether to collect stages."""

    def __init__(self, terms: dict[str, nn.Module]) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(terms)

    @property
    def needs_features(self) -> bool:
        """Whether a term reads stage outputs: ``hint``/``fitnets``, or any term with ``needs_features = True``."""
        return any(name in ("hint", "fitnets") or getattr(term, "needs_features", False)
                   for name, term in self.terms.items())

    def forward(self, student: Outputs, teachers: Union[Teachers, Outputs], labels: torch.Tensor) -> torch.Tensor:
        """The summed loss; a bare :class:`Outputs` is taken as one teacher (``Teachers.single``)."""
        if isinstance(teachers, Outputs):
            teachers = Teachers.single(teachers)
        return sum(term(student, teachers, labels) for term in self.terms.values())


def build_distill_loss(config: DistillConfig, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size],
                       names: Optional[tuple[str, ...]] = None) -> DistillLoss:
    """The composed loss for a trial: ``distill.method``'s logit term, plus ``distill.feature``'s when hints are on.

    ``teacher_shapes`` are the hint teacher's stage shapes. ``names`` replaces that choice
    with these :data:`LOSSES` names or ``module:attr`` refs to term factories (terms a config
    switches off are left out either way).
    """
    if names is None:
        chosen = [(config.method, "distill.method"), (config.feature, "distill.feature")]
    else:
        chosen = [(name, "distill.losses") for name in names]
    terms = {}
    for name, path in chosen:
        term = LOSSES.get(name, path)(config, student_shapes, teacher_shapes)
        if term is not None:
            terms[name.replace(".", "_")] = term  # a module:attr ref's dots cannot name a submodule
    return DistillLoss(terms)
