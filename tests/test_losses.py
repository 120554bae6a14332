"""Distillation terms: KD matches the textbook formula; hint adapters learn."""

from __future__ import annotations

import math

import torch

from kdsearch.spaces import DistillConfig
from kdsearch.trainers.losses import FeatureHints, Outputs, build_distill_loss, hinted_stages, kd_loss, paired_student_stage


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([1, 2])
    T, alpha = 2.0, 0.7

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    kl = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        ps, pt = softmax([v / T for v in srow]), softmax([v / T for v in trow])
        kl += sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps))
    kl /= 2
    ce = sum(-math.log(softmax(row)[label]) for row, label in zip(s.tolist(), y.tolist())) / 2
    expected = alpha * T * T * kl + (1 - alpha) * ce
    assert math.isclose(kd_loss(s, t, y, T, alpha).item(), expected, rel_tol=1e-5)


def test_kd_alpha_zero_is_cross_entropy_and_teacher_equal_student_has_no_kl():
    s = torch.randn(4, 10)
    y = torch.randint(0, 10, (4,))
    assert torch.allclose(kd_loss(s, torch.randn(4, 10), y, 4.0, 0.0), torch.nn.functional.cross_entropy(s, y))
    assert kd_loss(s, s.clone(), y, 4.0, 1.0).abs().item() < 1e-6


def test_stage_selection_and_pairing():
    assert hinted_stages("none", 3) == []
    assert hinted_stages("last", 3) == [2]
    assert hinted_stages("all", 3) == [0, 1, 2]
    assert hinted_stages("0,2", 3) == [0, 2]
    assert [paired_student_stage(t, 4, 2) for t in range(4)] == [0, 0, 1, 1]
    assert paired_student_stage(0, 1, 3) == 2


def test_hint_adapters_get_gradients_and_reduce_the_hint_loss():
    torch.manual_seed(0)
    student_shapes = [torch.Size([1, 8, 8, 8]), torch.Size([1, 16, 4, 4]), torch.Size([1, 32])]
    teacher_shapes = [torch.Size([1, 64, 8, 8]), torch.Size([1, 128, 4, 4])]
    config = DistillConfig(hint_stages="all", hint_weight=0.5)
    loss = build_distill_loss(config, student_shapes, teacher_shapes)
    assert set(loss.terms) == {"kd", "hint"} and loss.needs_features
    hint = loss.terms["hint"]
    assert isinstance(hint, FeatureHints)
    student = Outputs(torch.randn(4, 10), [torch.randn(4, *s[1:]) for s in student_shapes])
    teacher = Outputs(torch.randn(4, 10), [torch.randn(4, *s[1:]) for s in teacher_shapes])
    labels = torch.randint(0, 10, (4,))
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.05)
    first = None
    for _ in range(30):
        value = hint(student, teacher, labels)
        first = first if first is not None else value.item()
        optimizer.zero_grad()
        value.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hint.parameters())
        optimizer.step()
    assert value.item() < first


def test_hints_off_leaves_only_kd():
    loss = build_distill_loss(DistillConfig(hint_stages="none", hint_weight=1.0), [torch.Size([1, 8])], [torch.Size([1, 8])])
    assert set(loss.terms) == {"kd"} and not loss.needs_features
    loss = build_distill_loss(DistillConfig(hint_stages="all", hint_weight=0.0), [torch.Size([1, 8])], [torch.Size([1, 8])])
    assert set(loss.terms) == {"kd"}
