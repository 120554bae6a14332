"""``measure.device: cuda``: latency for GPU deployment, timed by CUDA events, serialized where trials share a GPU.

The CPU tests (CI) cover the space's and the probes' refusals, the rule that picks where latency
is timed, and the CPU protocol left as it was. The tests marked ``gpu`` need CUDA (conftest skips
them where torch sees no GPU): a small student timed on the GPU, and a trial's deployed file timed
there by :func:`~kdsearch.search.latency.artifact_latency`, as the quiet phase does.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from kdsearch.search import latency as latency_mod
from kdsearch.search.cli import main
from kdsearch.search.latency import MEASURER_GPUS, artifact_latency, latency_measurer, local_latency_fn, trials_share_gpu
from kdsearch.spaces import DEFAULT_SPACE, PinnedSuggester, RandomSuggester, SpaceError, parse_space
from kdsearch.trainers.measure import (MIN_RUNS, RUNS, THREADS, CudaEvents, Latency, WallClock, device_name,
                                       measure_latency, time_calls)
from kdsearch.trainers.probes import probe_measure

CNN = {"student.family": "cnn", "student.cnn.stages": 2, "student.cnn.channels": 16, "student.cnn.blocks": 1,
       "student.cnn.kernel": 3, "student.cnn.residual": True, "distill.hint_stages": "none", "train.lr": 0.01,
       "train.batch_size": 64, "compress.prune_ratio": 0.0, "compress.quantize": "none"}


def raw_space(quantize="none", **measure) -> dict:
    """The digits space with ``compress.quantize`` and ``measure`` as given."""
    raw = yaml.safe_load(DEFAULT_SPACE.read_text())
    raw["compress"]["quantize"] = quantize
    raw["measure"] = {**raw.get("measure", {}), **measure}
    return raw


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and "fix:" in message, message
    return message


# --------------------------------------------------------------------------- the space


def test_measure_device_defaults_to_cpu_and_is_described():
    space = parse_space(raw_space())
    assert space.measure.device == "cpu"
    assert space.describe()["measure"]["device"] == "cpu"
    assert parse_space(raw_space(device="cuda")).measure.device == "cuda"  # float students: fine on a GPU


def test_an_unknown_device_is_one_line_naming_the_field():
    with pytest.raises(SpaceError) as caught:
        parse_space(raw_space(device="tpu"))
    assert one_line(caught.value).startswith("measure.device: ")


@pytest.mark.parametrize("quantize, runtime, field", [
    ("static_int8", "onnxruntime", "compress.quantize"),
    ("dynamic_int8", "torch", "compress.quantize"),
    ({"choice": ["none", "static_int8"]}, "onnxruntime", "compress.quantize.choice[1]"),
    ({"choice": ["none", "dynamic_int8", "static_int8"]}, "torch", "compress.quantize.choice[1]"),
])
def test_cuda_refuses_int8_students_naming_the_quantize_value(quantize, runtime, field):
    with pytest.raises(SpaceError) as caught:
        parse_space(raw_space(quantize, runtime=runtime, device="cuda"))
    message = one_line(caught.value)
    assert message.startswith(f"{field}: ") and "int8" in message and "measure.device: cuda" in message
    assert message.endswith("fix: use compress.quantize: none, or set measure.device: cpu")
    assert parse_space(raw_space(quantize, runtime=runtime)).measure.device == "cpu"  # on the CPU it stands


# --------------------------------------------------------------------------- the probes


def test_the_probe_refuses_cuda_where_torch_sees_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for runtime in ("torch", "onnxruntime"):
        with pytest.raises(SpaceError) as caught:
            probe_measure(parse_space(raw_space(runtime=runtime, device="cuda")))
        message = one_line(caught.value)
        assert message.startswith("measure.device: cuda but torch sees no GPU")
        assert message.endswith("fix: set measure.device: cpu, or run where a GPU is")
    probe_measure(parse_space(raw_space()))  # cpu: nothing to check


def test_the_probe_refuses_onnxruntime_on_cuda_without_its_cuda_provider(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(SpaceError) as caught:
        probe_measure(parse_space(raw_space(runtime="onnxruntime", device="cuda")))
    message = one_line(caught.value)
    assert message.startswith("measure.runtime: ") and "CUDAExecutionProvider" in message
    assert message.endswith("fix: set measure.runtime: torch, or install onnxruntime-gpu")
    probe_measure(parse_space(raw_space(runtime="torch", device="cuda")))  # torch needs no provider
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    probe_measure(parse_space(raw_space(runtime="onnxruntime", device="cuda")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_validate_refuses_cuda_here_in_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text("teacher: {family: mlp, epochs: 1}\nstudents:\n  mlp: {width: 16}\n"
                                         "measure: {runtime: torch, device: cuda}\n")
    before = set(os.listdir(tmp_path))
    code = main(["validate", "space.yaml"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("kdsearch: error: measure.device: ") and "fix: set measure.device: cpu" in err[0]
    assert set(os.listdir(tmp_path)) == before


# --------------------------------------------------------------------------- where latency is timed


@pytest.mark.parametrize("max_concurrent, gpus_per_trial, shared", [
    (1, 0.25, False),   # one trial at a time: nobody to share with
    (1, 1, False),
    (4, 1, False),      # whole GPUs each
    (4, 2, False),
    (2, 0.5, True),     # two halves on one GPU
    (8, 0.125, True),
    (4, 0.99, True),
    (4, 0, True),       # no GPU asked: whatever GPU they see is shared
])
def test_trials_share_gpu_truth_table(max_concurrent, gpus_per_trial, shared):
    assert trials_share_gpu(max_concurrent, gpus_per_trial) is shared


@pytest.fixture
def measurer_calls(monkeypatch):
    """``LatencyMeasurer`` replaced by a recorder: the options it is started with, no Ray needed."""
    calls: list[dict] = []

    class FakeMeasurer:
        @staticmethod
        def options(**options):
            calls.append(options)
            return SimpleNamespace(remote=lambda *args: "measurer")

    monkeypatch.setattr(latency_mod, "LatencyMeasurer", FakeMeasurer)
    monkeypatch.setattr(latency_mod.ray, "cluster_resources", lambda: {})
    monkeypatch.setattr(latency_mod, "node_cpus", lambda: [16.0, 16.0])
    return calls


@pytest.mark.parametrize("max_concurrent, gpus_per_trial, measurer", [
    (4, 1, False), (1, 0.5, False), (4, 0.25, True), (1, 0, True), (4, 0, True),
])
def test_on_cuda_the_measurer_sits_on_a_gpu_where_trials_share_one_or_hold_none(measurer_calls, max_concurrent,
                                                                                gpus_per_trial, measurer):
    space = parse_space(raw_space(runtime="torch", device="cuda"))
    got = latency_measurer(space, (1, 8, 8), 10, max_concurrent, 1.0, gpus_per_trial)
    assert (got == "measurer") is measurer
    assert measurer_calls == ([{"num_gpus": MEASURER_GPUS}] if measurer else [])


def test_on_cpu_the_rule_is_the_cores_one_whatever_the_gpus(measurer_calls):
    space = parse_space(raw_space())
    assert latency_measurer(space, (1, 8, 8), 10, 2, 4.0, 0.25) is None  # 2 x 4 cores fit one 16-core node
    assert latency_measurer(space, (1, 8, 8), 10, 8, 4.0, 1.0) == "measurer"  # 8 x 4 cores span two
    assert measurer_calls == [{}]  # no GPU asked for a CPU measurement


def test_a_trial_times_its_own_file_on_the_spaces_device():
    calls = []
    deployed = SimpleNamespace(runtime=SimpleNamespace(
        latency=lambda deployed, example, batch_size, device: calls.append((batch_size, device)) or
        Latency(1.0, 0.0, RUNS, 1, "gpu", "cuda sm_90", batch_size)))
    for device in ("cpu", "cuda"):
        space = parse_space(raw_space(runtime="torch", device=device))
        fn = local_latency_fn(space, {**CNN, "test.device": device})
        assert fn(deployed, torch.zeros(1, 1, 8, 8), 2).batch_size == 2
        fn(deployed, torch.zeros(1, 1, 8, 8), 2)  # cached by structure
    assert calls == [(2, "cpu"), (2, "cuda")]


# --------------------------------------------------------------------------- the CPU protocol, as it was


def small_student() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 8 * 8, 10))


def test_cpu_latency_is_the_protocol_it_was():
    model, example = small_student(), torch.randn(1, 1, 8, 8)
    default, cpu = measure_latency(model, example), measure_latency(model, example, device="cpu", batch_size=4)
    for latency, batch in ((default, 1), (cpu, 4)):
        assert latency.runs == RUNS >= MIN_RUNS and latency.threads == THREADS == 1 and latency.batch_size == batch
        assert latency.median_ms > 0 and latency.iqr_ms >= 0
        assert latency.device == device_name() and latency.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert next(model.parameters()).device.type == "cpu" and model.training  # timed on a copy
    with pytest.raises(ValueError, match="at least 30"):
        measure_latency(model, example, runs=MIN_RUNS - 1)


def test_time_calls_takes_a_timer_and_settles_after_the_warmup():
    events: list[str] = []

    class Fixed(WallClock):
        def settle(self) -> None:
            events.append("settle")

        def __call__(self, call) -> float:
            call()
            return 2.0

    median, iqr = time_calls(lambda: events.append("call"), runs=MIN_RUNS, warmup=3, timer=Fixed())
    assert (median, iqr) == (2.0, 0.0)
    assert events == ["call"] * 3 + ["settle"] + ["call"] * MIN_RUNS
    assert time_calls(lambda: sum(range(100)), runs=MIN_RUNS)[0] > 0  # the default: the host clock


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_latency_without_a_gpu_says_so():
    with pytest.raises(RuntimeError, match="torch sees no GPU"):
        measure_latency(small_student(), torch.randn(1, 1, 8, 8), device="cuda")


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_cuda_events_time_gpu_work():
    x = torch.randn(1024, 1024, device="cuda")
    median, iqr = time_calls(lambda: x @ x, runs=MIN_RUNS, warmup=3, timer=CudaEvents())
    assert median > 0 and iqr >= 0


@pytest.mark.gpu
def test_a_small_student_is_timed_on_the_gpu_with_its_name():
    torch.manual_seed(0)
    model, example = small_student(), torch.randn(1, 1, 8, 8)
    latency = measure_latency(model, example, device="cuda", batch_size=8)
    assert latency.runs >= 30 and latency.median_ms > 0 and latency.iqr_ms >= 0
    assert latency.device == torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    assert latency.cpu_capability == f"cuda sm_{major}{minor}"
    assert latency.threads == THREADS and latency.batch_size == 8
    assert next(model.parameters()).device.type == "cpu"  # the caller's model stays where it was
    metrics = latency.as_metrics()
    assert metrics["latency_device"] == torch.cuda.get_device_name() and metrics["latency_ms"] == latency.median_ms


@pytest.fixture(scope="module")
def torch_trial_folder(tmp_path_factory):
    """A float digits CNN deployed by the torch runtime into a folder, as a trial leaves it (no training)."""
    from kdsearch.trainers.data import batches, load_data
    from kdsearch.trainers.runtimes import get_runtime

    space = parse_space(raw_space(runtime="torch", device="cuda"))
    data = load_data(space.data)
    params = space.sample(PinnedSuggester(CNN, RandomSuggester(0)))
    config = space.resolve(params)
    torch.manual_seed(0)
    student = space.build_student(config, data.input_shape, data.num_classes).eval()
    runtime = get_runtime("torch")
    calib = [x for _, (_, x, _) in zip(range(2), batches(data.train, 64))]
    folder = tmp_path_factory.mktemp("cuda-trial")
    runtime.deploy(student, "none", calib, data, folder)
    return SimpleNamespace(space=space, data=data, params=params, folder=Path(folder), runtime=runtime)


@pytest.mark.gpu
def test_a_trials_torch_file_is_timed_on_the_gpu_as_the_quiet_phase_does(torch_trial_folder):
    t = torch_trial_folder
    assert (t.folder / t.runtime.artifact).is_file()
    latency = artifact_latency(t.space, t.params, t.folder, t.runtime.example(t.data), t.data.input_shape,
                               t.data.num_classes)
    assert latency.runs >= 30 and latency.median_ms > 0
    assert latency.device == torch.cuda.get_device_name() and latency.cpu_capability.startswith("cuda sm_")
    assert latency.batch_size == t.space.measure.batch_size == 1


@pytest.mark.gpu
def test_a_trials_onnx_file_is_timed_on_the_cuda_provider_where_there_is_one(tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (onnxruntime-gpu not installed)")
    from kdsearch.trainers.data import batches, load_data
    from kdsearch.trainers.runtimes import get_runtime

    space = parse_space(raw_space(runtime="onnxruntime", device="cuda"))
    data = load_data(space.data)
    params = space.sample(PinnedSuggester(CNN, RandomSuggester(0)))
    student = space.build_student(space.resolve(params), data.input_shape, data.num_classes).eval()
    runtime = get_runtime("onnxruntime")
    runtime.deploy(student, "none", [x for _, (_, x, _) in zip(range(2), batches(data.train, 64))], data, tmp_path)
    latency = artifact_latency(space, params, tmp_path, runtime.example(data), data.input_shape, data.num_classes)
    assert latency.runs >= 30 and latency.median_ms > 0 and latency.device == torch.cuda.get_device_name()
