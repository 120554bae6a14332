"""``measure.runtime``: a trial ships its student as the runtime's file and measures that very file.

The default runtime is ONNX Runtime: the trial's ``student.onnx`` (raw inputs, standardisation
inside) is what its latency, accuracy and size are of, and ONNX Runtime's own static QDQ
quantization is its int8. The export side (the exported file is the logged one, same sha256) is
tested on the session's real search in ``test_export.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from kdsearch.spaces import DEFAULT_SPACE, PinnedSuggester, RandomSuggester, SpaceError, parse_space
from kdsearch.trainers.checkpoint import load_student
from kdsearch.trainers.data import batches
from kdsearch.trainers.runtimes import file_sha256, get_runtime
from kdsearch.trainers.trial import run_trial

CNN = {"student.family": "cnn", "student.cnn.stages": 2, "student.cnn.channels": 16, "student.cnn.blocks": 1,
       "student.cnn.kernel": 3, "student.cnn.residual": True, "distill.hint_stages": "none", "train.lr": 0.01,
       "train.batch_size": 64, "compress.prune_ratio": 0.0, "compress.quantize": "none"}


def raw_space(**measure) -> dict:
    raw = yaml.safe_load(DEFAULT_SPACE.read_text())
    if measure:
        raw["measure"] = measure
    return raw


def onnx_accuracy(path: Path, data) -> float:
    """The file's accuracy on the raw validation set, in a plain ONNX Runtime session (not kdsearch's)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    raw = data.raw_validation()
    logits = session.run(None, {"input": raw.x.numpy()})[0]
    return float((logits.argmax(-1) == raw.y.numpy()).mean())


@pytest.fixture(scope="module")
def trial(digits_space, digits_context, tmp_path_factory):
    """One short float CNN trial in the default runtime, its folder kept."""
    folder = tmp_path_factory.mktemp("ort-trial")
    params = digits_space.sample(PinnedSuggester(CNN, RandomSuggester(0)))
    reports: list[dict] = []
    result = run_trial(digits_space, params, lambda m, state=None: reports.append(m), context=digits_context, epochs=2,
                       artifact_dir=folder)
    return SimpleNamespace(result=result, reports=reports, folder=folder, params=params)


# --------------------------------------------------------------------------- the space


def test_measure_defaults_to_onnxruntime_at_batch_1_and_is_described():
    space = parse_space(raw_space())
    assert space.measure.runtime == "onnxruntime" and space.measure.batch_size == 1
    assert parse_space({k: v for k, v in raw_space().items() if k != "measure"}).measure == space.measure
    assert space.describe()["measure"] == {"runtime": "onnxruntime", "batch_size": 1, "device": "cpu"}


@pytest.mark.parametrize("measure, field, words", [
    ({"runtime": "tensorrt"}, "measure.runtime", "unknown runtime 'tensorrt'; fix: use one of: onnxruntime, torch"),
    ({"batch_size": 0}, "measure.batch_size", "greater than or equal to 1"),
    ({"batch_size": "8"}, "measure.batch_size", "valid integer"),
    ({"threads": 4}, "measure.threads", "extra inputs"),
])
def test_bad_measure_values_are_one_line_naming_the_field(measure, field, words):
    with pytest.raises(SpaceError) as caught:
        parse_space(raw_space(**measure))
    message = str(caught.value)
    assert message.startswith(f"{field}: ") and words in message and "fix:" in message and "\n" not in message


def test_a_quantizer_the_runtime_lacks_is_refused_with_the_fix():
    raw = raw_space()
    raw["compress"]["quantize"] = {"choice": ["none", "dynamic_int8"]}
    with pytest.raises(SpaceError, match=r"^compress\.quantize\.choice\[1\]: 'dynamic_int8' has no onnxruntime "
                                         r"quantizer; fix: use one of: none, static_int8, or set measure.runtime: torch$"):
        parse_space(raw)
    raw["measure"] = {"runtime": "torch"}  # torch's own dynamic int8 is still there
    assert parse_space(raw).measure.runtime == "torch"


# --------------------------------------------------------------------------- the protocol


def test_onnxruntime_latency_follows_the_protocol(digits_space, digits_context, tmp_path):
    data = digits_context.data
    runtime = get_runtime("onnxruntime")
    config = digits_space.resolve(digits_space.sample(PinnedSuggester(CNN, RandomSuggester(0))))
    student = digits_space.build_student(config, data.input_shape, data.num_classes).eval()
    calib = [x for _, (_, x, _) in zip(range(2), batches(data.train, 64))]
    deployed = runtime.deploy(student, "none", calib, data, tmp_path)
    options = deployed.handle.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert str(options.execution_mode).endswith("ORT_SEQUENTIAL")
    one = runtime.latency(deployed, runtime.example(data))
    assert one.runs >= 30 and one.threads == 1 and one.batch_size == 1 and one.median_ms > 0 and one.iqr_ms >= 0
    assert runtime.latency(deployed, runtime.example(data), batch_size=4).batch_size == 4
    # the file takes raw inputs: it standardises them itself, as the student's training data was
    with torch.inference_mode():
        expected = student(data.val.x[:7]).numpy()
    assert np.abs(deployed.predict(data.raw_validation().x[:7]) - expected).max() < 1e-4


# --------------------------------------------------------------------------- a trial


def test_a_trial_reports_the_runtime_and_the_accuracy_of_its_onnx_file(trial, digits_context):
    result, folder = trial.result, trial.folder
    assert result["runtime"] == "onnxruntime" and result["artifact"] == "student.onnx"
    assert all(r["runtime"] == "onnxruntime" for r in trial.reports)  # every report: the recorder tags the run
    shipped = folder / "student.onnx"
    assert result["val_acc"] == onnx_accuracy(shipped, digits_context.data) and result["val_acc"] > 0.5
    assert result["size_bytes"] == shipped.stat().st_size and result["artifact_sha256"] == file_sha256(shipped)
    assert result["latency_runs"] >= 30 and result["latency_threads"] == 1 and result["latency_batch_size"] == 1
    assert (folder / "student.pt").is_file()  # the float checkpoint the export rebuilds its other formats from
    assert result["val_acc_checkpoint"] == pytest.approx(result["val_acc"], abs=0.003)


def test_static_int8_qdq_is_smaller_and_about_as_accurate(trial, digits_space, digits_context, tmp_path):
    import onnx

    data = digits_context.data
    config = digits_space.resolve(trial.params)
    student, _ = load_student(trial.folder / "student.pt",
                              lambda: digits_space.build_student(config, data.input_shape, data.num_classes))
    calib = [x for _, (_, x, _) in zip(range(8), batches(data.train, 64, shuffle=True, seed=0))]
    runtime = get_runtime("onnxruntime")
    int8 = runtime.deploy(student, "static_int8", calib, data, tmp_path)
    ops = {n.op_type for n in onnx.load(str(int8.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and int8.quant_backend == "onnxruntime-qdq"
    assert int8.size_bytes < 0.6 * trial.result["size_bytes"]
    accuracy = runtime.accuracy(int8, data)
    assert accuracy == onnx_accuracy(int8.path, data)
    assert abs(accuracy - trial.result["val_acc"]) <= 0.02
