"""kdsearch: search knowledge-distillation students with Ray Tune, Optuna and MLflow.

The public API, in one namespace (the heavy modules load on first use, so ``import kdsearch``
is cheap and starts nothing)::

    import kdsearch

    space = kdsearch.load_space()                      # the built-in digits space
    result = kdsearch.run_search(space, num_samples=8)  # Ray Tune + Optuna + MLflow
    result.front                                        # a pandas DataFrame, one row per student
    result.export(max_latency_ms=2, out="exports")      # the most accurate student under 2 ms

>>> import kdsearch
>>> kdsearch.load_space().name
'digits'
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "load_space": "kdsearch.spaces.schema",
    "parse_space": "kdsearch.spaces.schema",
    "Space": "kdsearch.spaces.schema",
    "Registry": "kdsearch.spaces.registry",
    "register_family": "kdsearch.spaces.families",
    "KdsearchError": "kdsearch.spaces.errors",
    "SpaceError": "kdsearch.spaces.errors",
    "UserError": "kdsearch.spaces.errors",
    "TrackingError": "kdsearch.spaces.errors",
    "ExportError": "kdsearch.spaces.errors",
    "TrialDiverged": "kdsearch.spaces.errors",
    "run_trial": "kdsearch.trainers.trial",
    "prepare": "kdsearch.trainers.trial",
    "probe_space": "kdsearch.trainers.probes",
    "SearchOptions": "kdsearch.search.options",
    "run_search": "kdsearch.search.driver",
    "resume_search": "kdsearch.search.driver",
    "SearchResult": "kdsearch.search.result",
    "export_student": "kdsearch.search.export",
    "ParetoASHA": "kdsearch.search.schedulers",
    "RungSampler": "kdsearch.search.samplers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kdsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
