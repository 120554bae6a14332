"""``kdsearch export`` and ``kdsearch ui`` against a real MLflow store holding real trained students.

The store is laid out as a search logs it (a parent run tagged ``kdsearch.role=search`` with
``space.yaml`` and ``pareto_front.json``, nested trial runs with ``student/student.pt``), but
the trials are run directly with :func:`kdsearch.trainers.trial.run_trial` so their compression can be
forced (float, pruned + static int8, dynamic int8) and no Ray search is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import pytest
import torch

from conftest import ROOT
from kdsearch.search.cli import UserError, sample_params
from kdsearch.search.export import (TOLERANCE, ExportError, ExportResult, Limits, NoTrialFits, cmd_export, export_student,
                                    parse_formats, rebuild, select, violation, write_verified)
from kdsearch.search.report import architecture
from kdsearch.search.tracking import (PARENT_TAG, ROLE_TAG, TRIAL_TAG, client, log_json, log_metrics, read_artifact_json,
                                      ui_link)
from kdsearch.trainers.trial import prepare, run_trial

#: MLflow's SQLAlchemy and torch.jit.load announce their own deprecations
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CNN = {"student.family": "cnn", "student.cnn.stages": 2, "student.cnn.channels": 16, "student.cnn.blocks": 1,
       "student.cnn.kernel": 3, "student.cnn.residual": True, "distill.hint_stages": "none", "train.lr": 0.01,
       "train.batch_size": 64}
TRIALS = {
    "float": {**CNN, "compress.prune_ratio": 0.0, "compress.quantize": "none"},
    "int8": {**CNN, "compress.prune_ratio": 0.5, "compress.quantize": "static_int8", "compress.finetune_epochs": 2},
    "dynamic": {"student.family": "mlp", "student.mlp.depth": 2, "student.mlp.width": 64, "distill.hint_stages": "none",
                "train.lr": 0.01, "train.batch_size": 64, "compress.prune_ratio": 0.0, "compress.quantize": "dynamic_int8"},
}
#: training seeds: the int8 one gives a student far from its decision boundaries (~92 %), so the
#: few int8 rounding differences between runtimes flip no prediction
SEEDS = {"float": 0, "int8": 3, "dynamic": 2}
EXPERIMENT = "export-test"
KEEP = ("val_acc", "val_acc_distilled", "params", "macs", "size_bytes", "latency_ms", "latency_iqr_ms", "epoch",
        "family", "quant_backend", "teacher_val_acc", "runtime", "artifact", "artifact_sha256", "val_acc_checkpoint")


# --------------------------------------------------------------------------- the store


@pytest.fixture(scope="module")
def digits_space():
    """The built-in digits space with a smaller, 5-epoch teacher (~90 %) and every knob the
    trials pin made a fixed value or a choice of their values, so the pins stay inside the
    space whatever the built-in file's ranges become."""
    import yaml

    from kdsearch.spaces import DEFAULT_SPACE, parse_space

    raw = yaml.safe_load(DEFAULT_SPACE.read_text())
    raw["teacher"].update(epochs=5, config={**raw["teacher"]["config"], "stages": 2, "channels": 16})
    raw["measure"] = {"runtime": "torch"}  # the export's rebuilding paths (torch's int8 kinds included); onnxruntime: below
    for key in sorted({k for pinned in TRIALS.values() for k in pinned} - {"student.family"}):
        values = list(dict.fromkeys(p[key] for p in TRIALS.values() if key in p))
        *path, name = key.split(".")
        section = raw["students"][path[1]] if path[0] == "student" else raw[path[0]]
        section[name] = values[0] if len(values) == 1 else {"choice": values}
    return parse_space(raw, text=yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def digits_context(digits_space, teacher_cache):
    return prepare(digits_space)


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits_space, digits_context):
    """A sqlite store with three trained trials and four searches: one per trial (a one-row
    front, to export that student) and, latest, one whose front holds all three."""
    tmp = tmp_path_factory.mktemp("export-store")
    uri = f"sqlite:///{tmp}/mlflow.db"
    c = client(uri)
    exp_id = c.create_experiment(EXPERIMENT, artifact_location=(tmp / "artifacts").as_uri())
    clock = itertools.count(int(time.time() * 1000))

    def search(name: str, rows: list[dict]) -> str:
        parent = c.create_run(exp_id, run_name=name, tags={ROLE_TAG: "search"}, start_time=next(clock))
        (tmp / "space.yaml").write_text(digits_space.text)
        c.log_artifact(parent.info.run_id, str(tmp / "space.yaml"))
        log_json(c, parent.info.run_id, "pareto_front.json",
                 {"objectives": digits_space.objectives, "reference_point": {}, "hypervolume": 0.0, "front": rows})
        c.set_terminated(parent.info.run_id, "FINISHED")
        return parent.info.run_id

    parents: dict[str, str] = {}
    rows: dict[str, dict] = {}
    first = search("search-trials", [])
    for i, (key, pinned) in enumerate(TRIALS.items()):
        params = sample_params(digits_space, json.dumps(pinned), seed=SEEDS[key])
        folder = tmp / f"trial-{key}"
        result = run_trial(digits_space, params, context=digits_context, epochs=3, seed=SEEDS[key], artifact_dir=folder)
        run = c.create_run(exp_id, run_name=f"trial-00{i + 1}", tags={PARENT_TAG: first, TRIAL_TAG: f"t{i}"})
        log_metrics(c, run.info.run_id, result)
        c.log_artifact(run.info.run_id, str(folder / "student.pt"), "student")
        c.set_terminated(run.info.run_id, "FINISHED")
        rows[key] = {"trial": f"trial-00{i + 1}", "trial_id": f"t{i}", "run_id": run.info.run_id, "status": "complete",
                     **{k: result[k] for k in KEEP if k in result}, "config": result["config"],
                     "architecture": architecture(result["config"])}
    for key in TRIALS:
        parents[key] = search(f"search-{key}", [rows[key]])
    parents["all"] = search("search-all", list(rows.values()))
    return SimpleNamespace(uri=uri, client=c, experiment_id=exp_id, parents=parents, rows=rows, tmp=tmp)


def export_args(store, out: Path, **overrides) -> argparse.Namespace:
    values = {"tracking_uri": store.uri, "experiment": EXPERIMENT, "run_id": None, "max_latency_ms": None,
              "max_params": None, "max_size_bytes": None, "out": str(out), "format": "onnx,pt2,state_dict",
              "register": None}
    values.update(overrides)
    return argparse.Namespace(**values)


def export(store, out: Path, key: str, **overrides) -> tuple[Path, dict]:
    assert cmd_export(export_args(store, out, run_id=store.parents[key], **overrides)) == 0
    folder = out / f"search-{key}" / store.rows[key]["trial"]
    return folder, json.loads((folder / "model_card.json").read_text())


def reference_model(store, digits_space, digits_context, key: str):
    row = store.rows[key]
    path = Path(store.client.download_artifacts(row["run_id"], "student/student.pt", str(store.tmp / f"dl-{key}")))
    return rebuild(digits_space, row["config"], path, digits_context.data)


def onnx_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def accuracy_of(logits: np.ndarray, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y.numpy()).mean())


# --------------------------------------------------------------------------- selection


FRONT = [
    {"trial": "trial-001", "status": "complete", "val_acc": 0.97, "latency_ms": 0.40, "params": 20_000, "size_bytes": 80_000},
    {"trial": "trial-002", "status": "complete", "val_acc": 0.95, "latency_ms": 0.20, "params": 9_000, "size_bytes": 20_000},
    {"trial": "trial-003", "status": "complete", "val_acc": 0.90, "latency_ms": 0.05, "params": 3_000, "size_bytes": 7_000},
    {"trial": "trial-004", "status": "complete", "val_acc": 0.80, "latency_ms": 0.04, "params": 2_000, "size_bytes": 6_000},
    {"trial": "trial-005", "status": "pruned", "val_acc": 0.99, "latency_ms": 0.01, "params": 100, "size_bytes": 100},
]


def test_select_picks_the_most_accurate_trial_under_the_limits():
    assert select(FRONT, Limits())["trial"] == "trial-001"  # pruned trial-005 is never chosen
    assert select(FRONT, Limits(max_latency_ms=0.3))["trial"] == "trial-002"
    assert select(FRONT, Limits(max_latency_ms=0.3, max_params=5_000))["trial"] == "trial-003"
    assert select(FRONT, Limits(max_size_bytes=6_000))["trial"] == "trial-004"
    assert select(FRONT, Limits(max_params=9_000))["trial"] == "trial-002"  # a bound is inclusive
    tie = [{**FRONT[0], "trial": "slow"}, {**FRONT[0], "trial": "fast", "latency_ms": 0.3}]
    assert select(tie, Limits())["trial"] == "fast"


def test_select_without_a_fit_lists_the_closest_trials_with_their_figures():
    limits = Limits(max_latency_ms=0.03, max_params=1_000)
    with pytest.raises(NoTrialFits) as caught:
        select(FRONT, limits)
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, UserError)
    assert [r["trial"] for r in caught.value.closest] == ["trial-004", "trial-003", "trial-002"]
    assert violation(caught.value.closest[0], limits) < violation(caught.value.closest[1], limits)
    assert "--max-latency-ms 0.03 --max-params 1000" in message and "trial-001" not in message
    assert "trial-004 val_acc 0.8 latency_ms 0.04 > 0.03 (+33%) params 2000 > 1000 (+100%)" in message
    assert "fix:" in message
    assert violation({"val_acc": 0.9}, Limits(max_params=10)) == math.inf  # an unknown figure never fits
    with pytest.raises(NoTrialFits, match="no complete trial"):
        select([FRONT[4]], Limits())


def test_bad_limits_and_formats_are_one_line_errors():
    with pytest.raises(UserError, match=r"--max-params 0: .*fix:"):
        Limits(max_params=0).validate()
    with pytest.raises(UserError, match=r"--format onnx,tflite: unknown tflite; fix:"):
        parse_formats("onnx,tflite")
    assert parse_formats("state_dict, onnx") == ["onnx", "state_dict"]


# --------------------------------------------------------------------------- export and parity


def test_float_student_exports_to_onnx_and_pt2_with_parity_and_registers(store, tmp_path, digits_space, digits_context):
    folder, card = export(store, tmp_path, "float", register="kdsearch-test-student")
    assert sorted(p.name for p in folder.iterdir()) == ["model_card.json", "student.onnx", "student.pt", "student.pt2"]
    files = {f["format"]: f for f in card["files"]}
    for fmt in ("onnx", "pt2", "state_dict"):
        parity = files[fmt]["parity"]
        assert parity["ok"] and parity["max_abs_diff"] <= 1e-4 and parity["acc_diff_points"] <= 0.1
        assert files[fmt]["bytes"] == (folder / files[fmt]["file"]).stat().st_size
    row = store.rows["float"]
    assert card["trial"] == row["trial"] and card["run_id"] == row["run_id"]
    assert card["config"] == row["config"] and card["metrics"]["val_acc"] == row["val_acc"]
    assert card["teacher"]["family"] == digits_space.teacher.family and card["data"]["source"] == "digits"
    assert card["rule"]["limits"] == {} and card["versions"]["onnxruntime"] != "not installed"
    assert (folder / "student.pt").read_bytes() == Path(store.client.download_artifacts(
        row["run_id"], "student/student.pt", str(tmp_path / "dl"))).read_bytes()
    # measure.runtime torch ships student.pt: the export copies it (the onnx and pt2 are built from it)
    assert files["state_dict"]["shipped"] and files["state_dict"]["sha256"] == row["artifact_sha256"]
    assert not files["onnx"]["shipped"] and card["runtime"]["name"] == "torch"

    # independently of the card: the files, fed raw inputs, against the rebuilt student fed standardised ones
    model = reference_model(store, digits_space, digits_context, "float")
    val, raw = digits_context.data.val, digits_context.data.raw_validation()
    assert not torch.allclose(raw.x, val.x)  # digits pixels are 0..16: the files standardise them themselves
    with torch.inference_mode():
        expected = model(val.x).numpy()
        program = torch.export.load(str(folder / "student.pt2")).module()
        from_pt2 = program(raw.x).numpy()
        from_pt2_one = program(raw.x[:1]).numpy()
    from_onnx = onnx_logits(folder / "student.onnx", raw.x)
    assert np.abs(from_onnx - expected).max() <= 1e-4 and np.abs(from_pt2 - expected).max() <= 1e-4
    assert np.abs(from_pt2_one - expected[:1]).max() <= 1e-4  # the batch axis is dynamic, 1 included
    assert abs(accuracy_of(from_onnx, val.y) - row["val_acc"]) <= 0.001
    assert abs(accuracy_of(from_pt2, val.y) - row["val_acc"]) <= 0.001

    registered = card["registered"]
    assert registered["name"] == "kdsearch-test-student" and registered["version"] == "1"
    versions = store.client.search_model_versions("name = 'kdsearch-test-student'")
    assert [str(v.version) for v in versions] == ["1"]
    assert row["trial"] in versions[0].description and '"preprocessing"' in versions[0].description
    # the store's search logged no model: the export logged one, deployable, named after the trial (a float
    # student: MLflow's torch.export program, whose batch axis must stay dynamic)
    import mlflow

    models = store.client.search_logged_models(experiment_ids=[store.experiment_id],
                                               filter_string=f"source_run_id = '{row['run_id']}'")
    assert [m.name for m in models] == [row["trial"]] and registered["source"] == f"models:/{models[0].model_id}"
    logged = mlflow.pytorch.load_model(registered["source"])
    with torch.inference_mode():
        from_mlflow = np.concatenate([logged(raw.x[i:i + 7]).numpy() for i in range(0, len(raw), 7)])
    assert np.abs(from_mlflow - expected).max() <= 1e-4


def test_pruned_static_int8_student_exports_as_qdq_onnx_and_torchscript(store, tmp_path, digits_space, digits_context):
    import onnx

    folder, card = export(store, tmp_path, "int8")
    assert sorted(p.name for p in folder.iterdir()) == ["model_card.json", "student.onnx", "student.pt", "student.ts"]
    assert card["compression"] == {"prune_ratio": 0.5, "quantize": "static_int8", "backend": card["compression"]["backend"]}
    ops = {n.op_type for n in onnx.load(str(folder / "student.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    for f in card["files"]:
        assert f["parity"]["ok"] and f["parity"]["acc_diff_points"] <= 0.5

    model = reference_model(store, digits_space, digits_context, "int8")
    val, raw = digits_context.data.val, digits_context.data.raw_validation()
    with torch.inference_mode():
        expected = model(val.x).numpy()
        traced = torch.jit.load(str(folder / "student.ts")).eval()
        from_ts = traced(raw.x).numpy()
        from_ts_seven = traced(raw.x[:7]).numpy()  # a trace keeps the batch size symbolic
    from_onnx = onnx_logits(folder / "student.onnx", raw.x)
    assert np.abs(from_ts_seven - expected[:7]).max() <= 1e-5
    reference_acc = accuracy_of(expected, val.y)
    assert reference_acc == pytest.approx(store.rows["int8"]["val_acc"])
    assert abs(accuracy_of(from_onnx, val.y) - reference_acc) <= 0.005
    assert np.abs(from_ts - expected).max() <= 1e-5
    print(f"static int8: onnx max|diff| {np.abs(from_onnx - expected).max():.3g}, "
          f"val_acc {accuracy_of(from_onnx, val.y):.4f} vs {reference_acc:.4f}")


def test_dynamic_int8_student_keeps_int8_weights_in_onnx(store, tmp_path, digits_space, digits_context):
    import onnx

    folder, card = export(store, tmp_path, "dynamic", format="onnx")
    model = onnx.load(str(folder / "student.onnx"))
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8) == 3 and "DequantizeLinear" in {n.op_type for n in model.graph.node}
    parity = card["files"][0]["parity"]
    assert parity["ok"] and parity["max_abs_diff"] < 1e-3 and parity["acc_diff_points"] <= 0.5


def test_a_file_that_does_not_match_is_an_error_and_leaves_nothing(store, tmp_path, monkeypatch):
    import kdsearch.search.export as export_module

    real = export_module.onnx_predict

    def noisy(path):
        predict, runtime = real(path)
        return (lambda x: predict(x) + np.random.default_rng(0).normal(0, 5, (len(x), 10)).astype(np.float32)), runtime

    monkeypatch.setattr(export_module, "onnx_predict", noisy)
    with pytest.raises(ExportError, match=r"^onnx: student.onnx does not match the in-process student .*fix:") as caught:
        cmd_export(export_args(store, tmp_path, run_id=store.parents["float"]))
    assert "\n" not in str(caught.value)
    assert not any(tmp_path.iterdir())  # no half-verified export, no staging folder, no empty folders


def test_write_verified_works_without_mlflow(store, tmp_path, digits_space, digits_context):
    row = store.rows["float"]
    checkpoint = Path(store.client.download_artifacts(row["run_id"], "student/student.pt", str(tmp_path / "dl")))
    files, reference, _ = write_verified(digits_space, row["config"], checkpoint, tmp_path / "out", ["state_dict"],
                                         digits_context.data, logged_val_acc=row["val_acc"])
    assert [f.file for f in files] == ["student.pt"] and files[0].parity.max_abs_diff == 0.0
    assert files[0].inputs == files[0].parity.inputs == "preprocessed"  # the checkpoint as logged: the student alone
    assert reference.val_acc == pytest.approx(row["val_acc"])
    # an accuracy the rebuilt student cannot reproduce (other data than the search's) is an error, not a warning
    with pytest.raises(ExportError, match=r"the rebuilt student scores val_acc .* the search logged 0\.5000 .*fix:"):
        write_verified(digits_space, row["config"], checkpoint, tmp_path / "out2", ["state_dict"], digits_context.data,
                       logged_val_acc=0.5)


# --------------------------------------------------------------------------- deployable models of a real search


@contextlib.contextmanager
def all_output() -> Iterator[list[str]]:
    """Everything written meanwhile to stdout and stderr, Python-level and file-descriptor-level
    (C++ exporters, onnxruntime), as one string appended to the yielded list."""
    saved = [os.dup(1), os.dup(2)]
    text, buffer = [], io.StringIO()
    with tempfile.TemporaryFile() as f:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                yield text
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            f.seek(0)
            text.append(buffer.getvalue() + f.read().decode(errors="replace"))


@pytest.fixture(scope="module")
def searched(digits_search, tmp_path_factory):
    """The library export of the session's real search (its most accurate front student), registered."""
    from kdsearch.spaces import load_space
    from kdsearch.trainers.data import load_data

    uri = digits_search["options"].tracking_uri
    out = tmp_path_factory.mktemp("exports")
    with all_output() as printed:
        result = export_student(digits_search["result"].parent_run_id, tracking_uri=uri, experiment="e2e", out=out,
                                register="kdsearch-e2e")
    c = client(uri)
    front = {r["trial"]: r for r in read_artifact_json(c, result.card["search"]["run_id"], "pareto_front.json")["front"]}
    return SimpleNamespace(result=result, printed=printed[0], client=c, front=front, out=out,
                           data=load_data(load_space().data))


def batched_accuracy(predict, raw, batch: int = 7) -> float:
    """Accuracy over ``raw`` (a TensorData of raw inputs) fed in batches of ``batch``; every
    prediction must have the batch's rows."""
    correct = 0
    for start in range(0, len(raw), batch):
        x, y = raw.x[start:start + batch], raw.y[start:start + batch]
        logits = np.asarray(predict(x))
        assert logits.shape == (len(x), 10)
        correct += int((logits.argmax(-1) == y.numpy()).sum())
    return correct / len(raw)


def test_export_student_is_a_library_call_that_prints_nothing(searched, digits_search):
    result = searched.result
    assert searched.printed == "", searched.printed
    assert isinstance(result, ExportResult) and result.folder.is_dir()
    assert result.trial == result.card["trial"] and result.trial in searched.front
    assert result.run_id == result.card["run_id"] == searched.front[result.trial]["run_id"]
    assert result.card["search"]["run_id"] == digits_search["result"].parent_run_id
    assert [f.format for f in result.files] == ["onnx", "pt2", "state_dict"]
    assert sorted(p.name for p in result.folder.iterdir()) == sorted(["model_card.json", *(f.file for f in result.files)])
    assert json.loads((result.folder / "model_card.json").read_text()) == json.loads(json.dumps(result.card, default=str))
    import kdsearch

    assert kdsearch.export_student is export_student


def test_exported_files_take_raw_inputs_in_any_batch_and_score_the_logged_accuracy(searched):
    result, raw = searched.result, searched.data.raw_validation()
    row = searched.front[result.trial]
    logged, logged_checkpoint = row["val_acc"], row["val_acc_checkpoint"]
    quantized = result.card["compression"]["quantize"] != "none"
    limit = TOLERANCE["int8" if quantized else "float"]["acc_points"] / 100 + 1e-9
    import onnxruntime as ort

    session = ort.InferenceSession(str(result.folder / "student.onnx"), providers=["CPUExecutionProvider"])
    from_onnx = lambda x: session.run(None, {"input": x.numpy()})[0]  # noqa: E731
    # the built-in space ships ONNX (measure.runtime onnxruntime): pt2 and student.pt are the float checkpoint's
    program_file = result.folder / "student.pt2"
    program = torch.export.load(str(program_file)).module()
    from_program = lambda x: program(x).detach().numpy()  # noqa: E731
    for predict, expected in ((from_onnx, logged), (from_program, logged_checkpoint)):
        assert abs(batched_accuracy(predict, raw, 7) - expected) <= limit
        one, seven = predict(raw.x[:1]), predict(raw.x[:7])
        assert one.shape == (1, 10)
        assert np.abs(one - seven[:1]).max() <= 1e-4  # static scales: a sample's logits do not depend on its batch
    files = {f.format: f for f in result.files}
    for fmt, expected in (("onnx", logged), ("pt2", logged_checkpoint)):
        parity = files[fmt].parity
        assert files[fmt].inputs == parity.inputs == "raw" and set(parity.max_abs_diff_by_batch) == {"1", "7", "64"}
        assert parity.logged_val_acc == expected and parity.logged_diff_points <= limit * 100
    assert files["state_dict"].inputs == "preprocessed"  # the trial's checkpoint: the student alone


def test_the_exported_onnx_is_the_file_the_trial_measured(searched, digits_search, tmp_path):
    """What you measure is what you ship: every complete trial of an onnxruntime search logs its
    student.onnx and its runtime; the export copies the chosen one byte for byte, and that file
    scores on the validation data exactly the accuracy the trial logged."""
    from kdsearch.search.tracking import RUNTIME_TAG
    from kdsearch.search.tracking import STATUS_TAG, trial_runs
    from kdsearch.trainers.runtimes import file_sha256, get_runtime

    result, c = searched.result, searched.client
    row = searched.front[result.trial]
    logged = Path(c.download_artifacts(row["run_id"], "student/student.onnx", str(tmp_path)))
    exported = result.folder / "student.onnx"
    assert file_sha256(exported) == file_sha256(logged) == row["artifact_sha256"]
    onnx_entry = next(f for f in result.card["files"] if f["format"] == "onnx")
    assert onnx_entry["shipped"] and onnx_entry["sha256"] == onnx_entry["logged_sha256"] == row["artifact_sha256"]
    assert result.card["runtime"]["name"] == "onnxruntime" and result.card["runtime"]["shipped"]["sha256"] == row["artifact_sha256"]
    runtime = get_runtime("onnxruntime")
    assert runtime.accuracy(runtime.load(exported), searched.data) == row["val_acc"]
    assert row["size_bytes"] == exported.stat().st_size and row["runtime"] == "onnxruntime"
    runs = trial_runs(c, c.get_run(digits_search["result"].parent_run_id))
    assert runs and all(r.data.tags.get(RUNTIME_TAG) == "onnxruntime" for r in runs)
    for run in runs:
        if run.data.tags.get(STATUS_TAG) == "complete":
            assert {a.path for a in c.list_artifacts(run.info.run_id, "student")} == {"student/student.onnx",
                                                                                      "student/student.pt"}


@pytest.mark.filterwarnings("ignore:.*looks like a TorchScript archive")  # how MLflow loads an int8 (traced) student
def test_front_models_are_named_after_their_trial_and_take_raw_batches(searched, monkeypatch):
    import mlflow

    from kdsearch.search.deploy import CARD_KEY
    from kdsearch.search.export import logged_model_uri

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # int8 students are TorchScript traces
    c, raw = searched.client, searched.data.raw_validation()
    experiment_id = c.get_run(searched.result.card["search"]["run_id"]).info.experiment_id
    for trial, row in searched.front.items():
        models = c.search_logged_models(experiment_ids=[experiment_id], filter_string=f"source_run_id = '{row['run_id']}'")
        assert [m.name for m in models] == [trial]
        uri = logged_model_uri(c, experiment_id, row["run_id"], trial)
        assert uri == f"models:/{models[0].model_id}"
        model = mlflow.pytorch.load_model(uri)
        with torch.inference_mode():
            assert model(raw.x[:7]).shape == (7, 10) and model(raw.x[:1]).shape == (1, 10)
            acc = batched_accuracy(lambda x: model(x).numpy(), raw, 7)
        quantized = row["config"]["compress.quantize"] != "none"
        # the front's MLflow models are the torch checkpoint (float under onnxruntime, whose int8 is its own)
        expected = row.get("val_acc_checkpoint", row["val_acc"])
        assert abs(acc - expected) <= TOLERANCE["int8" if quantized else "float"]["acc_points"] / 100 + 1e-9
        info = mlflow.models.get_model_info(uri)
        assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 8, 8)
        card = info.metadata[CARD_KEY]
        assert card["trial"] == trial and card["run_id"] == row["run_id"]
        assert card["preprocessing"]["in_model"] and card["io"]["input"]["shape"] == ["batch", 1, 8, 8]


def test_model_card_says_what_the_model_takes_and_where_it_came_from(searched):
    from kdsearch.trainers.data import RAW_INPUTS

    card, data = searched.result.card, searched.data
    assert card["io"]["input"] == {"name": "input", "dtype": "float32", "shape": ["batch", 1, 8, 8], "batch": "any",
                                   "takes": RAW_INPUTS}
    assert card["input_shape"] == [1, 8, 8] and card["num_classes"] == 10 == card["io"]["output"]["shape"][1]
    pre = card["preprocessing"]
    assert pre["inputs"] == RAW_INPUTS and pre["in_model"] and pre["scale"] == 1.0
    assert pre["mean"] == pytest.approx(data.mean.flatten().tolist()) and pre["std"] == pytest.approx(data.std.flatten().tolist())
    assert pre["stats_shape"] == [1, 1, 1] and pre["formula"] == "(x / scale - mean) / std"
    row = searched.front[card["trial"]]
    assert card["metrics"]["val_acc"] == row["val_acc"] and card["trial_id"] == row["trial_id"]
    assert card["search"]["run_name"] and card["data"]["source"] == "digits"
    # registered: the search's own (trial-named) model, the card as the version's description
    registered = card["registered"]
    assert registered["name"] == "kdsearch-e2e" and registered["source"].startswith("models:/")
    version = searched.client.get_model_version("kdsearch-e2e", registered["version"])
    description = version.description
    assert card["trial"] in description and RAW_INPUTS in description
    described = json.loads(description.split("```json", 1)[1].rsplit("```", 1)[0])
    assert described["trial"] == card["trial"] and described["preprocessing"]["mean"] == pre["mean"]


# --------------------------------------------------------------------------- the command line

#: the ``kdsearch`` entry point (``kdsearch.search.cli:main``). Not ``python -m search.cli``: run as
#: ``__main__``, cli.py's ``UserError`` is another class than the ``kdsearch.search.cli.UserError`` that
#: search.export raises, so its one-line handler would miss it.
KDSEARCH = (sys.executable, "-c", "import sys; from kdsearch.search.cli import main; sys.exit(main(sys.argv[1:]))")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    return subprocess.run([*KDSEARCH, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("kdsearch: error: "), result.stderr
    return lines[0]


def test_cli_unknown_experiment_is_one_line(store, tmp_path):
    line = error_line(cli("export", "--tracking-uri", store.uri, "--experiment", "nope", "--out", str(tmp_path)))
    assert "--experiment nope" in line and "fix:" in line


def test_cli_unreachable_tracking_server_fails_fast(tmp_path):
    started = time.monotonic()
    line = error_line(cli("export", "--tracking-uri", "http://127.0.0.1:9", "--out", str(tmp_path)))
    assert "--tracking-uri http://127.0.0.1:9" in line and "fix:" in line
    assert time.monotonic() - started < 60


def test_cli_no_trial_under_the_limits_lists_the_closest(store, tmp_path):
    line = error_line(cli("export", "--tracking-uri", store.uri, "--experiment", EXPERIMENT, "--max-params", "10",
                          "--out", str(tmp_path)))
    assert "no front trial meets --max-params 10 (3 on the front); closest: " in line
    assert all(row["trial"] in line for row in store.rows.values())
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------- kdsearch ui


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except OSError:
        return 0


def test_ui_serves_the_store_and_stops_on_ctrl_c(store, tmp_path):
    port = free_port()
    proc = subprocess.Popen([*KDSEARCH, "ui", "--tracking-uri", store.uri, "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while http_status(f"{base}/health") != 200:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the UI did not come up in 120 s"
            time.sleep(0.5)
        assert http_status(f"{base}/") == 200
        search = f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}"
        assert http_status(search) == 200
        # the link is printed once the UI has seen /health answer too; Ctrl-C only after that
        link = proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert link == ui_link(base, store.experiment_id)
    assert "Uvicorn" not in err and "INFO" not in err  # the server's banner stays out of sight
    assert http_status(f"{base}/health") == 0


def test_a_missing_sqlite_store_is_refused_not_created(tmp_path):
    from kdsearch.search.ui import cmd_ui

    uri = f"sqlite:///{tmp_path}/nothing.db"
    with pytest.raises(UserError, match=r"^--tracking-uri sqlite:///.*nothing.db: no such database .*fix:"):
        cmd_export(export_args(SimpleNamespace(uri=uri), tmp_path))
    with pytest.raises(UserError, match=r"no such database"):
        cmd_ui(argparse.Namespace(tracking_uri=uri, port=free_port(), verbose=False))
    assert not any(tmp_path.iterdir())


def test_ui_on_a_busy_port_is_one_line(tmp_path):
    from kdsearch.search.ui import cmd_ui

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=rf"^--port {port}: 127.0.0.1:{port} is already in use; fix: "):
            cmd_ui(argparse.Namespace(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", port=port, verbose=False))
