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
