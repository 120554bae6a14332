"""Shared fixtures: one teacher cache per test session, and the digits context built once."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run only where torch sees CUDA (a lent GPU); CI has none and skips them."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA: torch sees no GPU here")
        for item in gpu_tests:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def teacher_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Teachers train once per session into a private cache, never into the user's."""
    path = tmp_path_factory.mktemp("kdsearch-cache")
    os.environ["KDSEARCH_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def digits_space():
    from kdsearch.spaces import load_space

    return load_space()


@pytest.fixture(scope="session")
def digits_context(digits_space, teacher_cache):
    from kdsearch.trainers.trial import prepare

    return prepare(digits_space)


def dominates(a, b, objectives) -> bool:
    """Brute force, independent of search.pareto: a is no worse everywhere and better somewhere."""
    better = worse = False
    for metric, direction in objectives.items():
        x, y = (a[metric], b[metric]) if direction == "max" else (-a[metric], -b[metric])
        better |= x > y
        worse |= x < y
    return better and not worse


def cluster_env(state: Path) -> dict:
    """The environment for cluster/local.sh: a private state dir, no inherited Ray client settings."""
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(var, None)
    env["KDSEARCH_CLUSTER_DIR"] = str(state)
    ray_bin = Path(sys.executable).parent / "ray"
    if ray_bin.exists():
        env["KDSEARCH_RAY"] = str(ray_bin)
    # the GCS declares a killed node dead in ~2 s instead of ~15 s
    env["RAY_health_check_initial_delay_ms"] = "1000"
    env["RAY_health_check_period_ms"] = "500"
    env["RAY_health_check_timeout_ms"] = "1000"
    env["RAY_health_check_failure_threshold"] = "3"
    return env


def write_module(tmp_path: Path, name: str, source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Write a user module the space file can reference as ``name:attr``."""
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)


class LogLines(logging.Handler):
    """The ``kdsearch`` logger's messages, kept (the library prints nothing; its progress is logged)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="session")
def digits_search(tmp_path_factory: pytest.TempPathFactory, teacher_cache):
    """One real search (Ray Tune + Optuna + MLflow) of six short trials, shared by the tests that read it."""
    from kdsearch.search.options import SearchOptions
    from kdsearch.search.driver import run_search

    folder = tmp_path_factory.mktemp("search")
    options = SearchOptions(num_samples=6, max_concurrent=2, epochs=3, grace_period=1, scheduler="asha",
                            tracking_uri=f"sqlite:///{folder}/mlflow.db", experiment="e2e", storage=str(folder / "ray"),
                            seed=0)
    logger, handler = logging.getLogger("kdsearch"), LogLines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = run_search(options=options)
    finally:
        logger.removeHandler(handler)
    return {"options": options, "result": result, "messages": handler.lines, "folder": folder}
