"""Trials on an accelerator: data and teacher outputs placed there, precision, layouts, the hint recompute path.

The tests marked ``gpu`` run only where torch sees CUDA (conftest skips them elsewhere: CI has
no GPU); the others check on the CPU that the accelerator paths leave a CPU trial as it was.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from kdsearch.spaces import DEFAULT_SPACE, PinnedSuggester, RandomSuggester, TrainConfig, parse_space
from kdsearch.trainers import teachers
from kdsearch.trainers.data import TensorData
from kdsearch.trainers.device import (autocast_dtype, gradient_scaler, place_data, place_teachers, to_channels_last,
                                      to_device)
from kdsearch.trainers.loop import cosine_lr, make_optimizer, train_epoch
from kdsearch.trainers.trial import prepare, run_trial

CNN = {
    "student.family": "cnn", "student.cnn.stages": 2, "student.cnn.channels": 16, "student.cnn.blocks": 1,
    "student.cnn.kernel": 3, "student.cnn.residual": True, "distill.method": "kd", "distill.hint_stages": "none",
    "distill.logit_standardize": False, "train.lr": 0.005, "train.batch_size": 32, "train.augment.noise_std": 0.0,
    "train.augment.mixup_alpha": 0.0, "compress.prune_ratio": 0.0, "compress.quantize": "none",
}


def params(space, pinned, seed=0):
    return space.sample(PinnedSuggester(pinned, RandomSuggester(seed)))


@pytest.fixture(scope="module")
def precision_space():
    """The built-in space with train.precision searched."""
    raw = yaml.safe_load(DEFAULT_SPACE.read_text())
    raw["train"]["precision"] = {"choice": ["fp32", "bf16", "fp16"]}
    return parse_space(raw)


def _epoch_losses(precision: str, device: str = "cpu") -> list[float]:
    torch.manual_seed(0)
    x, y = torch.randn(256, 1, 8, 8), torch.randint(0, 10, (256,))
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10)).to(device)
    to_channels_last(model)
    config = TrainConfig(lr=0.01, batch_size=32, precision=precision)
    optimizer = make_optimizer(model.parameters(), config)
    scheduler = cosine_lr(optimizer, 16)
    scaler = gradient_scaler(device, precision)
    loss_fn = lambda idx, xb, yb: nn.functional.cross_entropy(model(xb), yb)  # noqa: E731
    return [train_epoch(model, TensorData(x, y), 32, 0, optimizer, scheduler, loss_fn, epoch, device,
                        precision=precision, scaler=scaler) for epoch in range(2)]


def test_on_a_cpu_every_precision_trains_the_same_fp32_step():
    """train.precision applies on a GPU; a CPU trial is bitwise the fp32 one whatever it says."""
    assert autocast_dtype("cpu", "bf16") is None and gradient_scaler("cpu", "fp16") is None
    reference = _epoch_losses("fp32")
    assert _epoch_losses("bf16") == reference and _epoch_losses("fp16") == reference
    assert reference[1] < reference[0]


def test_on_a_cpu_nothing_is_moved():
    x = torch.randn(4, 3)
    assert to_device(x, "cpu") is x
    data = TensorData(x, torch.zeros(4, dtype=torch.long))
    bundle = type("Bundle", (), {"train": data, "val": data})()
    assert place_data(bundle, "cpu") is bundle
    assert place_teachers(["anything"], "cpu") == ["anything"]


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_data_teacher_outputs_and_teacher_move_to_the_gpu(digits_context):
    data = place_data(digits_context.data, "cuda")
    assert data.train.x.is_cuda and data.val.y.is_cuda
    assert not digits_context.data.train.x.is_cuda  # the shared host copy stays where it was
    placed = place_teachers(digits_context.teachers, "cuda")
    assert placed[0].logits.is_cuda
    assert all(f is None or f.is_cuda for f in placed[0].features)
    assert next(placed[0].model.parameters()).is_cuda
    digits_context.teachers[0].model.cpu()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_trial_on_cuda_learns_as_on_the_cpu(precision_space, digits_context, precision):
    config = params(precision_space, {**CNN, "train.precision": precision})
    assert precision_space.resolve(config).train.precision == precision
    on_cpu = run_trial(precision_space, config, context=digits_context, epochs=4)
    on_gpu = run_trial(precision_space, config, context=digits_context, epochs=4, device="cuda")
    assert on_gpu["val_acc"] >= 0.9, on_gpu["val_acc"]
    assert abs(on_gpu["val_acc"] - on_cpu["val_acc"]) <= 0.05
    assert on_gpu["size_bytes"] == pytest.approx(on_cpu["size_bytes"], rel=0.01)  # the same student ships


@pytest.mark.gpu
def test_hints_recomputed_by_the_teacher_on_cuda(digits_space, tmp_path, monkeypatch):
    """Stage outputs too big to store: the hint teacher runs on each batch, on the trial's GPU."""
    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(teachers, "FEATURE_STORE_LIMIT", 0)
    context = prepare(digits_space)
    assert not context.targets.stored([len(context.targets.feature_shapes) - 1])
    config = params(digits_space, {**CNN, "distill.hint_stages": "last", "distill.hint_weight": 0.1})
    result = run_trial(digits_space, config, context=context, epochs=3, device="cuda")
    assert result["val_acc"] >= 0.85, result["val_acc"]
    assert result["teacher_passes"] >= 3 * len(context.data.train)  # the teacher ran on every hinted batch


@pytest.mark.gpu
def test_online_teaching_with_augmentation_on_cuda(digits_space, digits_context):
    config = params(digits_space, {**CNN, "train.augment.mixup_alpha": 0.2, "distill.teacher_views": "online"})
    result = run_trial(digits_space, config, context=digits_context, epochs=3, device="cuda")
    assert result["val_acc"] >= 0.85 and result["teacher_passes"] >= 3 * len(digits_context.data.train)


@pytest.mark.gpu
def test_stored_views_on_cuda_match_the_cpu_targets(digits_space, digits_context):
    config = params(digits_space, {**CNN, "train.augment.noise_std": 0.3, "distill.teacher_views": 8})
    result = run_trial(digits_space, config, context=digits_context, epochs=2, device="cuda")
    assert result["val_acc"] >= 0.8
