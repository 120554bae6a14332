"""One real distillation trial on digits: it learns, reports, measures, caches its teacher and fails cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from kdsearch.spaces import DEFAULT_SPACE, PinnedSuggester, RandomSuggester, SpaceError, parse_space
from kdsearch.trainers import teachers
from kdsearch.trainers.measure import accuracy
from kdsearch.trainers.trial import TrialDiverged, prepare, run_trial

from conftest import ROOT, write_module

SMALL_CNN = {
    "student.family": "cnn", "student.cnn.stages": 2, "student.cnn.channels": 16, "student.cnn.blocks": 1,
    "student.cnn.kernel": 3, "student.cnn.residual": True, "distill.hint_stages": "none",
    "train.lr": 0.005, "train.batch_size": 32, "compress.prune_ratio": 0.0, "compress.quantize": "none",
}


def params(space, pinned, seed=0):
    return space.sample(PinnedSuggester(pinned, RandomSuggester(seed)))


def test_short_trial_learns_digits_and_measures_everything(digits_space, digits_context):
    reports = []
    config = params(digits_space, SMALL_CNN)
    untrained = digits_space.build_student(digits_space.resolve(config), (1, 8, 8), 10)
    result = run_trial(digits_space, config, lambda m, state=None: reports.append(m), context=digits_context, epochs=4)
    assert accuracy(untrained, digits_context.data.val) < 0.3
    assert result["val_acc"] >= 0.9
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4]
    # latency is the deployed structure's, known before training: every epoch carries the same figure
    assert len({r["latency_ms"] for r in reports}) == 1 and reports[0]["latency_ms"] == result["latency_ms"]
    assert all("size_bytes" not in r for r in reports[:-1]) and "size_bytes" in reports[-1]
    for key in ("params", "macs", "size_bytes", "latency_ms", "latency_iqr_ms", "train_seconds"):
        assert result[key] > 0, key
    assert result["latency_runs"] >= 30 and result["latency_threads"] == 1
    assert result["params"] == sum(p.numel() for p in untrained.parameters())


def test_reports_inside_epochs_come_at_the_asked_progress(digits_space, digits_context):
    reports = []
    config = params(digits_space, {**SMALL_CNN, "compress.prune_ratio": 0.5})  # then 3 fine-tune epochs
    # batch 32 over digits' 1437 training images: 45 steps an epoch, so 1/3 lands on step 15 exactly
    run_trial(digits_space, config, lambda m, state=None: reports.append(m), context=digits_context, epochs=2,
              report_at=(1 / 3, 1.5, 2.5))
    epochs = [r["epoch"] for r in reports]
    assert epochs == pytest.approx([1 / 3, 1, 1 + 23 / 45, 2, 2 + 23 / 45, 3, 4, 5])
    assert [r["phase"] for r in reports][:-1] == ["distill"] * 4 + ["finetune"] * 3
    # a third of an epoch already teaches something, and the student keeps learning after it
    assert 0.2 < reports[0]["val_acc"] < reports[-1]["val_acc"]
    assert all(r["latency_ms"] == reports[0]["latency_ms"] for r in reports)


def test_latency_is_measured_once_before_training_on_the_shipped_structure(digits_space, digits_context, tmp_path):
    import onnx

    measured, reports = [], []

    def shapes(path):
        return sorted((t.data_type, tuple(t.dims)) for t in onnx.load(str(path)).graph.initializer)

    def latency_fn(deployed, example, batch_size, device="cpu"):
        measured.append((len(reports), shapes(deployed.path)))
        return deployed.runtime.latency(deployed, example, batch_size, device=device)

    config = params(digits_space, {**SMALL_CNN, "compress.prune_ratio": 0.5, "compress.quantize": "static_int8"})
    result = run_trial(digits_space, config, lambda m, state=None: reports.append(m), context=digits_context, epochs=2,
                       artifact_dir=tmp_path, latency_fn=latency_fn)
    assert [when for when, _ in measured] == [0]  # once, before the first epoch
    # the untrained copy went through the same pruning, export and int8 as the shipped file: the same graph
    assert result["runtime"] == "onnxruntime" and result["artifact"] == "student.onnx"
    assert measured[0][1] == shapes(tmp_path / "student.onnx")


def count_validation_passes(monkeypatch) -> list[str]:
    """Record each validation pass of a trial: the float student's (trial's ``accuracy``) and each runtime's file."""
    from kdsearch.trainers import runtimes
    from kdsearch.trainers import trial as trial_module

    passes: list[str] = []

    def counted(what, function):
        def call(*args, **kwargs):
            passes.append(what)
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(trial_module, "accuracy", counted("student", trial_module.accuracy))
    for cls in (runtimes.OnnxRuntime, runtimes.TorchRuntime):
        monkeypatch.setattr(cls, "accuracy", counted("file", cls.accuracy))
    return passes


def torch_runtime_space():
    raw = yaml.safe_load(DEFAULT_SPACE.read_text())
    raw["measure"] = {"runtime": "torch"}
    return parse_space(raw)


def test_an_onnx_trial_validates_once_per_report_plus_file_and_checkpoint(digits_space, digits_context, monkeypatch,
                                                                          tmp_path):
    """Epochs + report_at points + 1: the last epoch's pass is the float checkpoint's, plus the ONNX file's."""
    from kdsearch.trainers.checkpoint import load_student

    passes, reports = count_validation_passes(monkeypatch), []
    config = params(digits_space, SMALL_CNN)
    result = run_trial(digits_space, config, lambda m, state=None: reports.append(m), context=digits_context,
                       epochs=2, report_at=(0.5,), artifact_dir=tmp_path)
    assert len(passes) == 2 + 1 + 1 and passes.count("file") == 1  # before: 2 + 1 + 3
    assert [r["epoch"] for r in reports] == pytest.approx([23 / 45, 1, 2])  # 45 steps an epoch
    assert all("val_acc" in r for r in reports)
    # every metric keeps its meaning: val_acc the ONNX file's, the checkpoint's that of student.pt in torch,
    # and unpruned, the distilled student is that float student
    data = digits_context.data
    checkpoint, _ = load_student(tmp_path / "student.pt",
                                 lambda: digits_space.build_student(digits_space.resolve(config), (1, 8, 8), 10))
    assert result["val_acc_checkpoint"] == accuracy(checkpoint, data.val) == result["val_acc_distilled"]
    assert result["val_acc"] == pytest.approx(result["val_acc_checkpoint"], abs=0.003)
    assert result["train_loss"] > 0 and result["phase"] == "distill"


def test_a_torch_float_trial_reuses_the_file_pass_for_the_float_metrics(digits_context, monkeypatch):
    """Shipping student.pt unquantized, the file is the float student: epochs + report_at points, no more."""
    space = torch_runtime_space()
    passes = count_validation_passes(monkeypatch)
    result = run_trial(space, params(space, SMALL_CNN), context=digits_context, epochs=2, report_at=(0.5,))
    assert len(passes) == 2 + 1 and passes.count("file") == 1  # before: 2 + 1 + 2
    assert result["artifact"] == "student.pt"
    assert result["val_acc"] == result["val_acc_checkpoint"] == result["val_acc_distilled"]


def test_a_pruned_trial_takes_val_acc_distilled_from_the_distillation_report(digits_context, monkeypatch):
    """Pruned and int8 in torch: the distillation's last epoch report is val_acc_distilled; epochs + report_at."""
    space = torch_runtime_space()
    passes, reports = count_validation_passes(monkeypatch), []
    config = params(space, {**SMALL_CNN, "compress.prune_ratio": 0.5, "compress.quantize": "static_int8"})
    config["compress.finetune_epochs"] = 1  # fixed here, whatever the built-in space says
    result = run_trial(space, config, lambda m, state=None: reports.append(m), context=digits_context, epochs=1,
                       report_at=(1.5,))
    assert [r["epoch"] for r in reports] == pytest.approx([1, 1 + 23 / 45, 2])
    assert len(passes) == 2 + 1 and passes.count("file") == 1  # before: 2 + 1 + 2
    assert result["val_acc_distilled"] == reports[0]["val_acc"] and reports[0]["phase"] == "distill"
    assert result["val_acc_checkpoint"] == result["val_acc"] and result["quant_backend"] != "none"


def test_feature_hints_train_with_adapters(digits_space, digits_context):
    config = params(digits_space, {**SMALL_CNN, "distill.hint_stages": "all", "distill.hint_weight": 0.5})
    result = run_trial(digits_space, config, context=digits_context, epochs=2)
    assert result["val_acc"] > 0.5


def test_teacher_is_cached_not_retrained(digits_space, digits_context, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the cached teacher was retrained")

    monkeypatch.setattr(teachers, "train_builtin_teacher", no_training)
    again = prepare(digits_space)
    assert torch.equal(again.targets.logits, digits_context.targets.logits)
    assert again.targets.val_acc >= 0.95
    other = digits_space.teacher.model_copy(update={"seed": 1})
    assert teachers.teacher_key(other, again.data) != teachers.teacher_key(digits_space.teacher, again.data)


def test_resume_continues_from_the_reported_state(digits_space, digits_context):
    config = params(digits_space, SMALL_CNN)
    states = []

    def keep(metrics, state=None):
        if state is not None:
            states.append(state)

    run_trial(digits_space, config, keep, context=digits_context, epochs=3, checkpoint_state=True)
    assert [s["epoch"] for s in states] == [1, 2]
    epochs = []
    result = run_trial(digits_space, config, lambda m, state=None: epochs.append(m["epoch"]), context=digits_context,
                       epochs=3, resume=states[0])
    assert epochs == [2, 3] and result["val_acc"] > 0.8


NAN_FAMILY = textwrap.dedent("""
    import torch
    from torch import nn
    from kdsearch.spaces import StagedNet

    class Poison(nn.Module):
        def forward(self, x):
            return x * float("nan")

    def build(config, input_shape, num_classes):
        return StagedNet(nn.Flatten(), [nn.Sequential(nn.Linear(64, 8), Poison())], nn.Linear(8, num_classes))
""")


def nan_space(tmp_path, monkeypatch):
    write_module(tmp_path, "nan_family", NAN_FAMILY, monkeypatch)
    raw = yaml.safe_load(DEFAULT_SPACE.read_text())
    raw["students"] = {"poison": {"builder": "nan_family:build"}}
    raw["distill"]["hint_stages"] = "none"
    raw["compress"] = {"prune_ratio": 0.0, "quantize": "none"}
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_nan_loss_ends_the_trial_as_diverged(tmp_path, monkeypatch, digits_context):
    space = parse_space(yaml.safe_load(nan_space(tmp_path, monkeypatch).read_text()))
    with pytest.raises(TrialDiverged, match="diverged"):
        run_trial(space, space.sample_random(0), context=digits_context, epochs=2)


def test_teacher_with_wrong_classes_is_refused_before_training(tmp_path, monkeypatch):
    write_module(tmp_path, "bad_teacher", "from torch import nn\n"
                 "def build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 7))\n", monkeypatch)
    raw = yaml.safe_load(DEFAULT_SPACE.read_text())
    raw["teacher"] = {"module": "bad_teacher:build"}
    raw["distill"]["hint_stages"] = "none"
    with pytest.raises(SpaceError) as err:
        prepare(parse_space(raw))
    assert err.value.path == "teacher" and "10 classes" in str(err.value)


def test_trial_cli_prints_summary_and_json_last_line(digits_context):
    proc = subprocess.run([sys.executable, "-m", "kdsearch.search.cli", "trial", "--seed", "0", "--epochs", "2",
                           "--params", json.dumps({"student.family": "mlp", "compress.quantize": "static_int8"})],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("val_acc", "params", "macs", "size_bytes", "latency_ms", "latency_iqr_ms", "train_seconds", "config"):
        assert key in last
    assert last["config"]["student.family"] == "mlp" and last["quant_backend"] == "onnxruntime-qdq"
    assert last["runtime"] == "onnxruntime" and last["artifact"] == "student.onnx"
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr


def test_trial_cli_bad_params_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "kdsearch.search.cli", "trial", "--params", '{"student.cnn.kernel": 9}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "student.cnn.kernel" in proc.stderr


def test_grad_clip_bounds_each_step():
    """``train.grad_clip``: with SGD at lr 1 a step moves the weights by at most the clip norm."""
    from torch import nn

    from kdsearch.spaces import TrainConfig
    from kdsearch.trainers.data import TensorData
    from kdsearch.trainers.loop import make_optimizer, train_epoch

    data = TensorData(torch.randn(16, 4) * 100, torch.zeros(16, dtype=torch.int64))
    for clip, bounded in ((0.5, True), (0.0, False)):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        optimizer = make_optimizer(model.parameters(), TrainConfig(optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        train_epoch(model, data, 16, 0, optimizer, scheduler, lambda i, x, y: nn.functional.cross_entropy(model(x), y), 0,
                    grad_clip=clip)
        moved = (torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm().item()
        assert (moved <= 0.5 + 1e-5) == bounded, (clip, moved)
