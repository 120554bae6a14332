"""How several teachers are mixed: per-sample weights over the teachers (``distill.teacher_mix``).

A mix is ``mix(teacher_logits, targets, weights) -> (B, T)`` weights whose rows sum to 1;
every logit loss then weighs each teacher's per-sample divergence by them
(:class:`kdsearch.trainers.losses.Teachers`). ``targets`` are class indices (B,) or, for
mixed-up samples, class probabilities (B, C).

- ``mean``: every teacher alike.
- ``weighted``: the fixed ``distill.teacher_weights``, normalised.
- ``confidence``: CA-MKD (Zhang et al., ICASSP 2022): per sample, ``w_k = (1 - softmax_k(CE_k)) / (K - 1)``
  from each teacher's cross-entropy on the label, so the teacher that is right about this sample leads.

>>> import torch
>>> right, wrong = torch.tensor([[4.0, 0.0]]), torch.tensor([[0.0, 4.0]])
>>> confidence([right, wrong], torch.tensor([0]), None)
tensor([[0.9820, 0.0180]])
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from kdsearch.spaces.registry import TEACHER_MIXES


@TEACHER_MIXES.register("mean")
def mean(teacher_logits: Sequence[torch.Tensor], targets: torch.Tensor, weights: Optional[Sequence[float]]) -> torch.Tensor:
    """Every teacher weighs the same."""
    batch, count = len(teacher_logits[0]), len(teacher_logits)
    return torch.full((batch, count), 1.0 / count, device=teacher_logits[0].device)


@TEACHER_MIXES.register("weighted")
def weighted(teacher_logits: Sequence[torch.Tensor], targets: torch.Tensor, weights: Optional[Sequence[float]]) -> torch.Tensor:
    """The fixed ``distill.teacher_weights``, normalised to sum to 1."""
    if weights is None or len(weights) != len(teacher_logits):
        raise ValueError(f"teacher_mix weighted needs one weight per teacher ({len(teacher_logits)})")
    w = torch.tensor([float(v) for v in weights], device=teacher_logits[0].device)
    return (w / w.sum()).expand(len(teacher_logits[0]), -1)


@TEACHER_MIXES.register("confidence")
def confidence(teacher_logits: Sequence[torch.Tensor], targets: torch.Tensor, weights: Optional[Sequence[float]]) -> torch.Tensor:
    """CA-MKD: a teacher with a lower cross-entropy on the sample's label gets more weight."""
    count = len(teacher_logits)
    if count == 1:
        return torch.ones(len(teacher_logits[0]), 1, device=teacher_logits[0].device)
    ce = torch.stack([F.cross_entropy(t.float(), targets, reduction="none") for t in teacher_logits], dim=1)  # (B, T)
    return (1.0 - ce.softmax(dim=1)) / (count - 1)
