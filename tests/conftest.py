"""Shared fixtures: one teacher cache per test session, and the digits context built once."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def teacher_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Teachers train once per session into a private cache, never into the user's."""
    path = tmp_path_factory.mktemp("kdsearch-cache")
    os.environ["KDSEARCH_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def digits_space():
    from spaces import load_space

    return load_space()


@pytest.fixture(scope="session")
def digits_context(digits_space, teacher_cache):
    from trainers.trial import prepare

    return prepare(digits_space)


def write_module(tmp_path: Path, name: str, source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Write a user module the space file can reference as ``name:attr``."""
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)


@pytest.fixture(scope="session")
def digits_search(tmp_path_factory: pytest.TempPathFactory, teacher_cache):
    """One real search (Ray Tune + Optuna + MLflow) of six short trials, shared by the tests that read it."""
    from search.driver import SearchOptions, run_search

    folder = tmp_path_factory.mktemp("search")
    options = SearchOptions(num_samples=6, max_concurrent=2, epochs=3, grace_period=1, scheduler="asha",
                            tracking_uri=f"sqlite:///{folder}/mlflow.db", experiment="e2e", storage=str(folder / "ray"),
                            seed=0)
    messages: list[str] = []
    result = run_search(options, echo=messages.append)
    return {"options": options, "result": result, "messages": messages, "folder": folder}
