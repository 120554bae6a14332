"""kdsearch as a library: one namespace, a Python API that prints nothing and leaves the caller's state alone."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import pytest

import kdsearch

from conftest import ROOT


def test_public_api_is_reexported_from_kdsearch():
    for name in ("run_search", "load_space", "export_student", "ParetoASHA", "run_trial", "SearchOptions",
                 "SearchResult", "SpaceError", "UserError", "KdsearchError", "Registry"):
        assert getattr(kdsearch, name) is not None, name
    assert issubclass(kdsearch.SpaceError, kdsearch.KdsearchError)
    from ray.tune.schedulers import TrialScheduler

    assert issubclass(kdsearch.ParetoASHA, TrialScheduler)
    with pytest.raises(AttributeError):
        kdsearch.no_such_name  # noqa: B018


BARE = re.compile(r"(from|import) (spaces|trainers|search)(\.|\s|$)")


def test_no_module_imports_the_folders_bare():
    bare = []
    for folder in ("spaces", "trainers", "search", "tests", "benchmarks"):
        for path in (ROOT / folder).glob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                stripped = line.strip()
                if BARE.match(stripped):
                    bare.append(f"{path.relative_to(ROOT)}:{number}: {stripped}")
    assert not bare, bare


def test_wheel_has_one_top_level_package(tmp_path):
    source = tmp_path / "src"  # a copy: setuptools builds in the source tree and would leave build/ in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "__init__.py"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("spaces", "trainers", "search"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("kdsearch-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"kdsearch"}, top
    for module in ("kdsearch/__init__.py", "kdsearch/spaces/schema.py", "kdsearch/spaces/digits.yaml",
                   "kdsearch/trainers/trial.py", "kdsearch/search/driver.py"):
        assert module in names
    assert not any(n.startswith("kdsearch/tests/") or n.startswith("kdsearch/benchmarks/") for n in names)


def test_load_space_takes_a_dict_and_validates_it():
    space = kdsearch.load_space()
    assert space.name == "digits"
    raw = {"name": "tiny", "teacher": {"family": "mlp", "epochs": 1}, "students": {"mlp": {"width": {"choice": [8, 16]}}}}
    assert set(kdsearch.load_space(raw).students) == {"mlp"}
    with pytest.raises(kdsearch.SpaceError, match="students.nope"):
        kdsearch.load_space({**raw, "students": {"nope": {}}})


def test_bad_option_is_one_line_naming_it():
    with pytest.raises(kdsearch.UserError, match=r"^num_samples \(--num-samples\): must be at least 1"):
        kdsearch.run_search(num_samples=0)
    with pytest.raises(kdsearch.UserError, match="searcher"):
        kdsearch.run_search(num_samples=2, searcher="grid")


def test_two_searches_in_one_process_print_nothing_and_write_only_beside_the_store(tmp_path, monkeypatch, capfd):
    import ray

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    store = tmp_path / "store"
    store.mkdir()  # a sqlite store's folder must exist: a typo'd path is refused rather than created
    uri = f"sqlite:///{store}/mlflow.db"
    space = kdsearch.load_space()

    first = kdsearch.run_search(space, num_samples=2, epochs=1, tracking_uri=uri, experiment="api", seed=0)
    assert not ray.is_initialized(), "a Ray session the search started is stopped after it"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)  # the caller's own session
    try:
        second = kdsearch.run_search(space, num_samples=2, epochs=1, tracking_uri=uri, experiment="api", seed=1,
                                     log_models=False)
        assert ray.is_initialized(), "the caller's Ray session is left running"
    finally:
        ray.shutdown()

    out = capfd.readouterr().out
    assert out == "", f"the library printed to stdout: {out[:500]!r}"
    assert list(work.iterdir()) == [], "nothing is written to the current folder"
    for result in (first, second):
        assert result.parent_run_id and result.experiment_id
        assert {"trial", "status", "val_acc", "latency_ms", "params"} <= set(result.front.columns)
        assert len(result.front) >= 1 and (result.front.status == "complete").all()
        assert len(result.trials) == 2 and "student.family" in result.trials.columns
        assert 0.0 < result.hypervolume <= 1.0
    assert first.parent_run_id != second.parent_run_id

    from kdsearch.search.tracking import client

    c = client(uri)
    experiment = c.get_experiment(first.experiment_id)
    assert experiment.artifact_location == (store / "mlartifacts" / "api").as_uri()
    stored = [p for p in (store / "mlartifacts").rglob("*") if p.is_file()]
    assert any(p.name == "pareto_front.json" for p in stored)
    assert any(p.name == "student.pt" for p in stored)
    assert any(p.name == "MLmodel" for p in stored), "front models are logged beside the store too"


@pytest.mark.parametrize("option, needle", [({"gpus_per_trial": 1}, "gpus_per_trial (--gpus-per-trial): 1 but"),
                                            ({"cpus_per_trial": 512}, "cpus_per_trial (--cpus-per-trial): 512 but")])
def test_resources_this_machine_lacks_fail_at_once_and_create_nothing(tmp_path, monkeypatch, option, needle):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(kdsearch.UserError) as caught:
        kdsearch.run_search(num_samples=2, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", **option)
    assert needle in str(caught.value) and "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []
