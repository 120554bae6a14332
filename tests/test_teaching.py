"""Consistent teaching: augmentation, online teachers, stored views, several teachers and their mix."""

from __future__ import annotations

import pytest
import torch

import kdsearch
from kdsearch.trainers import teaching as teaching_module
from kdsearch.trainers.mixes import confidence
from kdsearch.trainers.teaching import Teaching
from kdsearch.trainers.trial import prepare, run_trial

TEACHER = {"family": "cnn", "config": {"stages": 3, "channels": 16}, "epochs": 4}
AUGMENT = {"crop_padding": 1, "mixup_alpha": 0.4, "cutmix_alpha": 0.4, "mix_prob": 0.5, "noise_std": 0.05}


def space_with(views, teachers=(TEACHER,), mix="mean"):
    return kdsearch.load_space({
        "name": "teaching", "teachers": list(teachers), "students": {"cnn": {"stages": 2, "channels": 8}},
        "distill": {"teacher_views": views, "teacher_mix": mix}, "train": {"epochs": 1, "augment": AUGMENT},
    })


@pytest.fixture(scope="module")
def two_teachers():
    space = space_with(4, teachers=(TEACHER, {"family": "mlp", "config": {"width": 64}, "epochs": 4}))
    return space, prepare(space)


def batches_of(teaching: Teaching, context, epoch: int, count: int = 3):
    teaching.start_epoch(epoch)
    out = []
    for start in range(0, 64 * count, 64):
        idx = torch.arange(start, start + 64)
        x, teachers, targets = teaching.batch(idx, context.data.train.x[idx], context.data.train.y[idx], False)
        out.append((x, [t.logits for t in teachers.outputs], teachers.weights, targets))
    return out


def test_two_trials_with_the_same_seed_see_identical_views_and_targets(two_teachers, monkeypatch):
    space, context = two_teachers
    config = space.resolve(space.sample_random(0))
    first = Teaching(context, config, "cpu", seed=3)
    monkeypatch.setattr(teaching_module, "_STORES", {})  # the second reads the store back from disk
    second = Teaching(context, config, "cpu", seed=3)
    assert first.passes == 4 * len(context.data.train) * 2, "K x N x teachers passes build the store once"
    assert second.passes == 0, "a later trial reuses the store"
    for a, b in zip(batches_of(first, context, 0), batches_of(second, context, 0)):
        for u, v in zip(a, b):
            if isinstance(u, list):
                assert all(torch.equal(p, q) for p, q in zip(u, v))
            else:
                assert torch.equal(u, v)
    other_epoch = batches_of(first, context, 1)[0][0]
    assert not torch.equal(other_epoch, batches_of(second, context, 0)[0][0]), "each epoch draws other views"


def test_stored_targets_are_the_teachers_on_exactly_the_view_the_student_sees(two_teachers):
    space, context = two_teachers
    teaching = Teaching(context, space.resolve(space.sample_random(0)), "cpu", seed=0)
    x, stored, _, targets = batches_of(teaching, context, 2, count=1)[0]
    assert targets.ndim == 2 and not torch.equal(targets.max(1).values, torch.ones(len(x))), "some samples are mixed"
    with torch.no_grad():
        for logits, teacher in zip(stored, context.teachers):
            assert torch.allclose(logits, teacher.model(x), atol=2e-2, rtol=1e-2)  # fp16 in the store


def test_online_teachers_run_on_the_student_batch_and_count_their_passes():
    space = space_with("online")
    context = prepare(space)
    teaching = Teaching(context, space.resolve(space.sample_random(0)), "cpu", seed=0)
    x, logits, weights, _ = batches_of(teaching, context, 0, count=2)[1]
    clean = context.data.train.x[64:128]
    assert not torch.equal(x, clean)
    with torch.no_grad():
        assert torch.allclose(logits[0], context.teachers[0].model(x))
    assert teaching.passes == 128
    assert torch.allclose(weights, torch.ones(64, 1))


def test_confidence_mix_weighs_the_teacher_that_is_right():
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (32,))
    right = torch.nn.functional.one_hot(labels, 10).float() * 5 + torch.randn(32, 10) * 0.1
    wrong = torch.nn.functional.one_hot((labels + 1) % 10, 10).float() * 5 + torch.randn(32, 10) * 0.1
    weights = confidence([wrong, right], labels, None)
    assert torch.allclose(weights.sum(1), torch.ones(32))
    assert (weights[:, 1] > 0.9).all() and (weights[:, 0] < 0.1).all()
    soft = torch.nn.functional.one_hot(labels, 10).float()  # mixed-up targets (probabilities) work the same
    assert torch.allclose(confidence([wrong, right], soft, None), weights, atol=1e-6)


def test_augmentation_knobs_are_searchable_and_checked():
    space = space_with({"choice": ["online", 8]})
    assert space.knob("train.augment.crop_padding").describe() == 1
    assert space.knob("distill.teacher_views").describe() == {"choice": ["online", 8]}
    with pytest.raises(kdsearch.SpaceError, match=r"train\.augment\.flip"):
        kdsearch.load_space({"teacher": TEACHER, "students": {"mlp": {}}, "train": {"augment": {"flip": "sometimes"}}})
    with pytest.raises(kdsearch.SpaceError, match=r"distill\.teacher_weights"):
        kdsearch.load_space({"teachers": [TEACHER, TEACHER], "students": {"mlp": {}},
                             "distill": {"teacher_mix": "weighted", "teacher_weights": [1.0]}})


def test_crop_on_feature_vectors_is_refused_with_the_field():
    import numpy as np

    from kdsearch.spaces.schema import AugmentConfig
    from kdsearch.trainers.augment import Augment

    with pytest.raises(kdsearch.SpaceError, match=r"train\.augment\.crop_padding: needs image data"):
        Augment(AugmentConfig(crop_padding=2), (int(np.prod((8, 8))),))


def test_a_search_with_two_teachers_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(tmp_path / "cache"))  # both teachers' stores are built by this search
    space = kdsearch.load_space({
        "name": "two-teachers", "teachers": [TEACHER, {"family": "mlp", "config": {"width": 64}, "epochs": 4}],
        "students": {"mlp": {"width": {"choice": [16, 32]}}},
        "distill": {"teacher_mix": "confidence", "method": {"choice": ["kd", "dkd"]}},
        "train": {"epochs": 2, "augment": {"noise_std": 0.1}},
    })
    result = kdsearch.run_search(space, num_samples=2, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                                 scheduler="none", log_models=False)
    assert len(result.front) >= 1 and (result.trials.status == "complete").all()
    online = result.trials.teacher_passes.sum()
    assert online == 2 * 2 * len(prepare(space).data.train) * 2, "epochs x trials x samples x teachers"
    assert result.teacher_passes == online + 2 * len(prepare(space).data.train), "+ one clean pass per teacher"


def test_trial_reports_teacher_passes(digits_context, digits_space):
    params = {**digits_space.sample_random(1), "train.augment.noise_std": 0.0, "train.augment.mixup_alpha": 0.0,
              "compress.prune_ratio": 0.0}
    result = run_trial(digits_space, params, context=digits_context, epochs=1)
    assert result["teacher_passes"] == 0, "without augmentation the cached clean outputs are used"
    params.update({"train.augment.noise_std": 0.3, "distill.teacher_views": "online", "distill.hint_stages": "none"})
    result = run_trial(digits_space, params, context=digits_context, epochs=1)
    assert result["teacher_passes"] == len(digits_context.data.train), "online: one pass per sample and epoch"


def test_mnist_space_is_real_mnist_with_students_below_the_teacher():
    from kdsearch.trainers.data import load_data

    space = kdsearch.load_space("mnist")
    data = load_data(space.data)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10 and len(data.train) + len(data.val) == 5000
    assert space.knob("train.augment.crop_padding").describe() == {"choice": [0, 2]}
    assert space.knob("distill.method").describe() == {"choice": ["kd", "dkd", "mlkd"]}
    assert space.constraints["max_params"] < 103_466, "every student is smaller than the teacher"


def test_a_built_in_teacher_can_train_on_augmented_views(tmp_path, monkeypatch):
    from kdsearch.trainers.teachers import load_teacher, teacher_key

    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(tmp_path))
    plain = kdsearch.load_space({"teacher": {"family": "mlp", "epochs": 1}, "students": {"mlp": {}}})
    noisy = kdsearch.load_space({"teacher": {"family": "mlp", "epochs": 1, "augment": {"noise_std": 0.5}},
                                 "students": {"mlp": {}}})
    context = prepare(plain)
    assert teacher_key(plain.teacher, context.data) != teacher_key(noisy.teacher, context.data)
    a, b = load_teacher(plain.teacher, context.data), load_teacher(noisy.teacher, context.data)
    assert not torch.equal(a(context.data.val.x), b(context.data.val.x))
