"""The docstring examples of the public modules run as written (doctest)."""

from __future__ import annotations

import doctest
import importlib

import pytest

DOCUMENTED = ["kdsearch", "kdsearch.spaces.errors", "kdsearch.spaces.registry", "kdsearch.spaces.schema",
              "kdsearch.search.options", "kdsearch.search.pareto", "kdsearch.trainers.augment",
              "kdsearch.trainers.mixes"]


@pytest.mark.parametrize("name", DOCUMENTED)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
