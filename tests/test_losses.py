"""Distillation terms: every registered loss matches an independent computation; methods are space knobs."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from kdsearch.spaces import DistillConfig, PinnedSuggester, RandomSuggester, SpaceError, load_space
from kdsearch.spaces.registry import LOSSES
from kdsearch.trainers.losses import (FeatureHints, HintAdapter, LogitTerm, Outputs, Teachers, build_distill_loss,
                                      hinted_stages, kd_loss, paired_student_stage, register_term)

# a fixed batch: 3 samples, 4 classes
S = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.5], [2.0, 2.0, -2.0, 1.0]])
T1 = torch.tensor([[2.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.5, -0.5], [3.0, 1.0, 0.0, 0.0]])
T2 = torch.tensor([[0.0, 3.0, -1.0, 1.0], [-1.0, 0.5, 2.0, 2.0], [1.0, 0.0, 1.0, -3.0]])
Y = torch.tensor([1, 2, 0])
W = torch.tensor([[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]])


def softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return sum(-math.log(softmax(row)[y]) for row, y in zip(logits.tolist(), labels.tolist())) / len(labels)


def kd_ref(s_row: list[float], t_row: list[float], T: float) -> float:
    """Hinton's per-sample term: T^2 KL(softmax(t/T) || softmax(s/T))."""
    return T * T * kl(softmax([v / T for v in t_row]), softmax([v / T for v in s_row]))


def dkd_ref(s_row: list[float], t_row: list[float], y: int, T: float, a: float, b: float) -> float:
    """Zhao et al. eq. (binary target/non-target KL + KL over the non-target classes), T^2-scaled."""
    ps, pt = softmax([v / T for v in s_row]), softmax([v / T for v in t_row])
    tckd = kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
    others = [c for c in range(len(s_row)) if c != y]
    hat_s = [ps[c] / (1 - ps[y]) for c in others]
    hat_t = [pt[c] / (1 - pt[y]) for c in others]
    return T * T * (a * tckd + b * kl(hat_t, hat_s))


def loss_of(config: DistillConfig, teachers, features=(), shapes=((), ())) -> float:
    loss = build_distill_loss(config, list(shapes[0]), list(shapes[1]))
    return loss(Outputs(S, list(features)), teachers, Y).item()


def one(t: torch.Tensor) -> Teachers:
    return Teachers.single(Outputs(t))


# --------------------------------------------------------------------------- logit methods


def test_kd_loss_matches_hand_computation():
    T, alpha = 2.0, 0.7
    per_sample = [kd_ref(s, t, T) for s, t in zip(S.tolist(), T1.tolist())]
    expected = alpha * sum(per_sample) / 3 + (1 - alpha) * ce(S, Y)
    assert math.isclose(kd_loss(S, T1, Y, T, alpha).item(), expected, rel_tol=1e-5)
    assert math.isclose(loss_of(DistillConfig(method="kd", temperature=T, alpha=alpha), one(T1)), expected, rel_tol=1e-5)


def test_kd_alpha_zero_is_cross_entropy_and_teacher_equal_student_has_no_kl():
    s = torch.randn(4, 10)
    y = torch.randint(0, 10, (4,))
    assert torch.allclose(kd_loss(s, torch.randn(4, 10), y, 4.0, 0.0), F.cross_entropy(s, y))
    assert kd_loss(s, s.clone(), y, 4.0, 1.0).abs().item() < 1e-6


def test_dkd_matches_the_papers_formulas():
    T, alpha, a, b = 3.0, 0.6, 1.5, 4.0
    per_sample = [dkd_ref(s, t, y, T, a, b) for s, t, y in zip(S.tolist(), T1.tolist(), Y.tolist())]
    expected = alpha * sum(per_sample) / 3 + (1 - alpha) * ce(S, Y)
    config = DistillConfig(method="dkd", temperature=T, alpha=alpha, dkd_alpha=a, dkd_beta=b)
    assert math.isclose(loss_of(config, one(T1)), expected, rel_tol=1e-5)


def test_dkd_vanishes_when_the_teacher_is_the_student():
    config = DistillConfig(method="dkd", alpha=1.0)
    assert abs(loss_of(config, one(S.clone()))) < 1e-6


def test_mlkd_matches_their_code():
    T, alpha = 4.0, 0.8
    expected = 0.0
    for tau in (4.0, 3.0, 5.0, 2.0, 6.0):  # mdistiller's MLKD: the configured temperature, then 3, 5, 2, 6
        ps, pt = F.softmax(S / tau, 1), F.softmax(T1 / tau, 1)
        instance = (pt * (pt.log() - ps.log())).sum() / 3 * tau**2
        class_level = ((pt.t() @ pt - ps.t() @ ps) ** 2).sum() / 4  # C x C, divided by C
        batch_level = ((pt @ pt.t() - ps @ ps.t()) ** 2).sum() / 3  # B x B, divided by B
        expected += (instance + class_level + batch_level).item()
    expected = alpha * expected + (1 - alpha) * ce(S, Y)
    assert math.isclose(loss_of(DistillConfig(method="mlkd", temperature=T, alpha=alpha), one(T1)), expected, rel_tol=1e-5)


def test_logit_standardization_on_kd():
    T, alpha = 2.0, 0.5

    def z(row):
        mean, std = statistics.fmean(row), statistics.stdev(row)
        return [(v - mean) / (std + 1e-7) for v in row]

    per_sample = [kd_ref(z(s), z(t), T) for s, t in zip(S.tolist(), T1.tolist())]
    expected = alpha * sum(per_sample) / 3 + (1 - alpha) * ce(S, Y)  # the label CE keeps the raw logits
    config = DistillConfig(method="kd", temperature=T, alpha=alpha, logit_standardize=True)
    assert math.isclose(loss_of(config, one(T1)), expected, rel_tol=1e-5)
    # standardized, a teacher that is a scaled, shifted student has nothing left to teach
    assert abs(loss_of(config.model_copy(update={"alpha": 1.0}), one(3 * S + 1))) < 1e-6


@pytest.mark.parametrize("method", ["dkd", "mlkd"])
def test_logit_standardization_changes_dkd_and_mlkd(method):
    plain = loss_of(DistillConfig(method=method), one(T1))
    assert not math.isclose(plain, loss_of(DistillConfig(method=method, logit_standardize=True), one(T1)))


def test_none_is_cross_entropy_whatever_the_teacher():
    for alpha in (0.0, 0.7, 1.0):
        assert math.isclose(loss_of(DistillConfig(method="none", alpha=alpha), one(T1)), ce(S, Y), rel_tol=1e-6)


@pytest.mark.parametrize("method", ["kd", "dkd"])
def test_two_teachers_combine_per_sample(method):
    T, alpha = 2.0, 0.7
    config = DistillConfig(method=method, temperature=T, alpha=alpha)
    if method == "kd":
        ref = lambda s, t, y: kd_ref(s, t, T)  # noqa: E731
    else:
        ref = lambda s, t, y: dkd_ref(s, t, y, T, 1.0, 8.0)  # noqa: E731
    per_sample = [w[0] * ref(s, t1, y) + w[1] * ref(s, t2, y)
                  for s, t1, t2, y, w in zip(S.tolist(), T1.tolist(), T2.tolist(), Y.tolist(), W.tolist())]
    expected = alpha * sum(per_sample) / 3 + (1 - alpha) * ce(S, Y)
    teachers = Teachers([Outputs(T1), Outputs(T2)], W)
    assert math.isclose(loss_of(config, teachers), expected, rel_tol=1e-5)


def test_mlkd_with_all_weight_on_one_teacher_is_that_teacher():
    config = DistillConfig(method="mlkd")
    both = Teachers([Outputs(T2), Outputs(T1)], torch.tensor([[0.0, 1.0]] * 3))
    assert math.isclose(loss_of(config, both), loss_of(config, one(T1)), rel_tol=1e-6)


def test_teachers_checks_the_weight_shape():
    assert Teachers.single(Outputs(T1)).weights.tolist() == [[1.0]] * 3
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        Teachers([Outputs(T1), Outputs(T2)], torch.ones(3, 1))


# --------------------------------------------------------------------------- feature terms


def test_stage_selection_and_pairing():
    assert hinted_stages("none", 3) == []
    assert hinted_stages("last", 3) == [2]
    assert hinted_stages("all", 3) == [0, 1, 2]
    assert hinted_stages("0,2", 3) == [0, 2]
    assert [paired_student_stage(t, 4, 2) for t in range(4)] == [0, 0, 1, 1]
    assert paired_student_stage(0, 1, 3) == 2


def test_fitnets_matches_a_direct_computation():
    torch.manual_seed(0)
    student_shapes = [torch.Size([1, 4, 8, 8]), torch.Size([1, 6])]
    teacher_shapes = [torch.Size([1, 5, 4, 4]), torch.Size([1, 3])]
    config = DistillConfig(method="none", hint_stages="all", hint_weight=0.3)
    loss = build_distill_loss(config, student_shapes, teacher_shapes)
    assert set(loss.terms) == {"none", "fitnets"} and loss.needs_features
    fs = [torch.randn(2, *s[1:]) for s in student_shapes]
    ft = [torch.randn(2, *s[1:]) for s in teacher_shapes]
    conv, linear = loss.terms["fitnets"].adapters[0].proj, loss.terms["fitnets"].adapters[1].proj
    # stage 0: a 1x1 conv (C_s -> C_t), then 8x8 averaged down to 4x4 in 2x2 blocks
    projected = torch.einsum("bchw,oc->bohw", fs[0], conv.weight[:, :, 0, 0]) + conv.bias[None, :, None, None]
    pooled = projected.reshape(2, 5, 4, 2, 4, 2).mean(dim=(3, 5))
    mse0 = ((pooled - ft[0]) ** 2).mean()
    mse1 = ((fs[1] @ linear.weight.t() + linear.bias - ft[1]) ** 2).mean()
    labels = torch.tensor([0, 1])
    logits = torch.randn(2, 3)
    expected = F.cross_entropy(logits, labels) + 0.3 * (mse0 + mse1) / 2
    value = loss(Outputs(logits, fs), Teachers.single(Outputs(torch.randn(2, 3), ft)), labels)
    assert torch.allclose(value, expected, rtol=1e-5)


def test_hint_adapters_get_gradients_and_reduce_the_hint_loss():
    torch.manual_seed(0)
    student_shapes = [torch.Size([1, 8, 8, 8]), torch.Size([1, 16, 4, 4]), torch.Size([1, 32])]
    teacher_shapes = [torch.Size([1, 64, 8, 8]), torch.Size([1, 128, 4, 4])]
    config = DistillConfig(hint_stages="all", hint_weight=0.5)
    loss = build_distill_loss(config, student_shapes, teacher_shapes)
    assert set(loss.terms) == {"kd", "fitnets"} and loss.needs_features
    hint = loss.terms["fitnets"]
    assert isinstance(hint, FeatureHints)
    student = Outputs(torch.randn(4, 10), [torch.randn(4, *s[1:]) for s in student_shapes])
    teachers = Teachers.single(Outputs(torch.randn(4, 10), [torch.randn(4, *s[1:]) for s in teacher_shapes]))
    labels = torch.randint(0, 10, (4,))
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.05)
    first = None
    for _ in range(30):
        value = hint(student, teachers, labels)
        first = first if first is not None else value.item()
        optimizer.zero_grad()
        value.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hint.parameters())
        optimizer.step()
    assert value.item() < first


def conv_then_pool(adapter: HintAdapter, x: torch.Tensor) -> torch.Tensor:
    """The adapter's old order: the 1x1 conv at the student's resolution, then pooling to the teacher's."""
    y = adapter.proj(x)
    return y if tuple(y.shape[2:]) == adapter.size else F.adaptive_avg_pool2d(y, adapter.size)


@pytest.mark.parametrize("student_hw, teacher_hw, pools_first", [
    ((8, 8), (4, 4), True),    # a larger student stage: pooled first
    ((7, 9), (3, 4), True),    # sizes that do not divide: overlapping pooling windows
    ((4, 4), (4, 4), False),   # equal sizes: no pooling
    ((2, 2), (4, 4), False),   # a smaller student stage: projected first, then pooled up
])
def test_hint_adapter_order_keeps_the_loss_and_gradients(student_hw, teacher_hw, pools_first):
    """Pooling before the 1x1 projection gives the old order's loss and gradients on a fixed batch."""
    torch.manual_seed(0)
    adapter = HintAdapter(torch.Size([1, 6, *student_hw]), torch.Size([1, 10, *teacher_hw]))
    assert adapter.pools_first(torch.empty(1, 6, *student_hw)) == pools_first
    x, target = torch.randn(4, 6, *student_hw), torch.randn(4, 10, *teacher_hw)
    results = []
    for forward in (adapter, lambda f: conv_then_pool(adapter, f)):
        adapter.zero_grad()
        features = x.clone().requires_grad_()
        loss = F.mse_loss(forward(features), target)
        loss.backward()
        results.append((loss.detach(), features.grad, [p.grad.clone() for p in adapter.parameters()]))
    (new_loss, new_dx, new_dp), (old_loss, old_dx, old_dp) = results
    assert torch.allclose(new_loss, old_loss, rtol=1e-5, atol=1e-7)
    assert torch.allclose(new_dx, old_dx, rtol=1e-4, atol=1e-7)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(new_dp, old_dp))


def test_hint_adapter_projects_the_pooled_map():
    """A larger student stage reaches the 1x1 conv already at the teacher's resolution (the cheap order)."""
    adapter = HintAdapter(torch.Size([1, 4, 16, 16]), torch.Size([1, 8, 4, 4]))
    seen = []
    adapter.proj.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    assert adapter(torch.randn(2, 4, 16, 16)).shape == (2, 8, 4, 4)
    assert seen == [(2, 4, 4, 4)]


def test_attention_transfer_matches_a_direct_computation():
    torch.manual_seed(1)
    student_shapes = [torch.Size([1, 3, 8, 8]), torch.Size([1, 4, 2, 2])]
    teacher_shapes = [torch.Size([1, 7, 4, 4]), torch.Size([1, 2, 4, 4])]
    config = DistillConfig(method="none", feature="at", hint_stages="all", hint_weight=2.0)
    loss = build_distill_loss(config, student_shapes, teacher_shapes)
    assert set(loss.terms) == {"none", "at"} and loss.needs_features and not list(loss.parameters())
    fs = [torch.randn(2, *s[1:]) for s in student_shapes]
    ft = [torch.randn(2, *s[1:]) for s in teacher_shapes]

    def att(f, block):  # mean over channels of f^2, averaged in block x block cells, flattened, unit L2 norm
        a = (f * f).mean(1)
        b, h, w = a.shape
        a = a.reshape(b, h // block, block, w // block, block).mean(dim=(2, 4)).reshape(b, -1)
        return a / a.norm(dim=1, keepdim=True)

    pair0 = ((att(fs[0], 2) - att(ft[0], 1)) ** 2).mean()  # student 8x8 pooled to the teacher's 4x4
    pair1 = ((att(fs[1], 1) - att(ft[1], 2)) ** 2).mean()  # teacher 4x4 pooled to the student's 2x2
    labels, logits = torch.tensor([1, 0]), torch.randn(2, 3)
    expected = F.cross_entropy(logits, labels) + 2.0 * (pair0 + pair1) / 2
    value = loss(Outputs(logits, fs), Teachers.single(Outputs(torch.randn(2, 3), ft)), labels)
    assert torch.allclose(value, expected, rtol=1e-5)


def test_attention_transfer_is_off_for_vector_stages():
    config = DistillConfig(feature="at", hint_stages="all", hint_weight=1.0)
    vectors = [torch.Size([1, 8]), torch.Size([1, 8])]
    loss = build_distill_loss(config, vectors, vectors)
    assert set(loss.terms) == {"kd"} and not loss.needs_features
    mixed = build_distill_loss(config, [torch.Size([1, 4, 4, 4]), torch.Size([1, 8])],
                               [torch.Size([1, 4, 4, 4]), torch.Size([1, 8])])
    assert mixed.terms["at"].pairs == [(0, 0)]


def test_hints_come_from_the_hint_teacher():
    shapes = [torch.Size([1, 2, 4, 4])]
    f_s, f_a, f_b = (torch.randn(3, 2, 4, 4) for _ in range(3))
    teachers = Teachers([Outputs(T1, [f_a]), Outputs(T2, [f_b])], W)
    for index, target in ((0, f_a), (1, f_b)):
        config = DistillConfig(method="none", feature="at", hint_stages="last", hint_weight=1.0, hint_teacher=index)
        only_target = Teachers.single(Outputs(T1, [target]))
        assert math.isclose(loss_of(config, teachers, [f_s], (shapes, shapes)),
                            loss_of(config.model_copy(update={"hint_teacher": 0}), only_target, [f_s], (shapes, shapes)),
                            rel_tol=1e-6)
    config = DistillConfig(feature="at", hint_stages="last", hint_weight=1.0, hint_teacher=2)
    with pytest.raises(SpaceError, match="^distill.hint_teacher: teacher 2 does not exist"):
        build_distill_loss(config, shapes, shapes)(Outputs(S, [f_s]), teachers, Y)


def test_defaults_keep_todays_loss_and_hint_is_an_alias():
    loss = build_distill_loss(DistillConfig(hint_stages="none", hint_weight=1.0), [torch.Size([1, 8])], [torch.Size([1, 8])])
    assert set(loss.terms) == {"kd"} and not loss.needs_features
    loss = build_distill_loss(DistillConfig(hint_stages="all", hint_weight=0.0), [torch.Size([1, 8])], [torch.Size([1, 8])])
    assert set(loss.terms) == {"kd"}
    old = build_distill_loss(DistillConfig(feature="hint", hint_stages="all", hint_weight=0.5),
                             [torch.Size([1, 8])], [torch.Size([1, 8])])
    assert set(old.terms) == {"kd", "hint"} and old.needs_features
    assert {LOSSES.get(n).kind for n in ("kd", "dkd", "mlkd", "none")} == {"logit"}
    assert {LOSSES.get(n).kind for n in ("fitnets", "hint", "at")} == {"feature"}


# --------------------------------------------------------------------------- a method of one's own


class Mine(LogitTerm):
    calls = 0

    def divergence(self, student_logits, teacher_logits, labels):
        type(self).calls += 1
        return (student_logits - teacher_logits).pow(2).mean(1)


def mine(config, student_shapes, teacher_shapes):
    """Squared logit distance (a test method)."""
    return Mine(config)


@pytest.fixture
def mine_registered():
    register_term("mine", kind="logit")(mine)
    Mine.calls = 0
    yield
    LOSSES.unregister("mine")


def tiny_space(method) -> dict:
    return {
        "data": {"source": "digits"},
        "teacher": {"family": "mlp", "config": {"depth": 1, "width": 32}, "epochs": 2},
        "students": {"mlp": {"depth": 1, "width": 16}},
        "distill": {"method": method, "alpha": 0.5},
        "train": {"epochs": 1, "batch_size": 128},
        "compress": {"prune_ratio": 0.0, "quantize": "none"},
    }


def test_a_registered_method_is_selectable_and_trains(mine_registered):
    from kdsearch.trainers.trial import run_trial

    space = load_space(tiny_space({"choice": ["kd", "mine"]}))
    params = space.sample(PinnedSuggester({"distill.method": "mine"}, RandomSuggester(0)))
    assert space.resolve(params).distill.method == "mine"
    result = run_trial(space, params, epochs=1)
    assert Mine.calls > 0 and 0.0 <= result["val_acc"] <= 1.0
    # a teacher equal to the student: only the label part is left
    term = build_distill_loss(DistillConfig(method="mine", alpha=0.25), [], [])
    assert math.isclose(term(Outputs(S), one(S.clone()), Y).item(), 0.75 * ce(S, Y), rel_tol=1e-6)


def test_a_wrong_method_is_one_line_naming_the_methods(mine_registered):
    with pytest.raises(SpaceError) as info:
        load_space(tiny_space("mien"))
    message = str(info.value)
    assert message.startswith("distill.method: unknown distillation method 'mien'") and "\n" not in message
    assert "dkd, kd, mine, mlkd, none" in message and "fitnets" not in message
    with pytest.raises(SpaceError, match=r"^distill.method.choice\[1\]: 'at' is a feature loss term"):
        load_space(tiny_space({"choice": ["kd", "at"]}))
    with pytest.raises(SpaceError, match=r"^distill.feature: unknown feature loss 'fitnet'; fix: use one of: at, fitnets"):
        load_space({**tiny_space("kd"), "distill": {"feature": "fitnet"}})


def test_method_is_a_searchable_knob():
    space = load_space(tiny_space({"choice": ["kd", "dkd", "mlkd", "none"]}))
    seen = set()
    for seed in range(40):
        config = space.resolve(space.sample_random(seed)).distill
        seen.add(config.method)
        loss = build_distill_loss(config, [], [])
        assert math.isfinite(loss(Outputs(S), one(T1), Y).item())
    assert seen == {"kd", "dkd", "mlkd", "none"}
