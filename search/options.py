"""The options of a search: one validated type, shared by :func:`kdsearch.run_search` and ``kdsearch run``.

The CLI builds its ``run`` flags from these fields (names, help and defaults), so a default
lives here and nowhere else. Bad values raise :class:`~kdsearch.spaces.errors.UserError`
with one line naming the option and the fix.

>>> from kdsearch.search.options import SearchOptions
>>> SearchOptions(num_samples=8).max_concurrent
2
>>> SearchOptions.parse({"num_samples": 0})
Traceback (most recent call last):
...
kdsearch.spaces.errors.UserError: num_samples (--num-samples): must be at least 1, got 0; fix: give a value like 24
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kdsearch.spaces.errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "kdsearch"
SEARCHERS = ("mf-gp", "nsga2", "tpe", "random")
SCHEDULERS = ("pareto-asha", "asha", "none")


class SearchOptions(BaseModel):
    """How to run a search (what to search is the space)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_samples: int = Field(24, ge=1, description="trials to run")
    max_concurrent: int = Field(2, ge=1, description="trials at a time")
    address: Optional[str] = Field(None, description="an existing Ray cluster (default: the Ray session of this process, "
                                                     "started if there is none)")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs per trial")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs per trial; fractions pack several students on one GPU")
    tracking_uri: str = Field(DEFAULT_TRACKING_URI, description="MLflow tracking store; artifacts go beside a sqlite "
                                                               "file, in DIR/mlartifacts")
    experiment: str = Field(DEFAULT_EXPERIMENT, min_length=1, description="MLflow experiment")
    storage: Optional[str] = Field(None, description="Ray Tune storage (default: ray_results beside a sqlite tracking "
                                                     "store, else ~/ray_results); shared on a cluster")
    seed: int = Field(0, description="seed of the sampler and of every trial")
    searcher: Literal[SEARCHERS] = Field("mf-gp", description="Optuna sampler (mf-gp: GP fitted on rung results too)")  # type: ignore[valid-type]
    scheduler: Literal[SCHEDULERS] = Field("pareto-asha", description="early stopping")  # type: ignore[valid-type]
    max_failures: int = Field(3, ge=0, description="retries of a trial whose worker died")
    epochs: Optional[int] = Field(None, ge=1, description="override the space's distillation epochs")
    # rungs at 1/6, 2/3, 8/3 and 32/3 epochs: a student stopped at the first costs a sixth of an
    # epoch (benchmarks/search_quality.py: 38% of random search's compute, 51% at 1/3 and eta 3)
    grace_period: float = Field(1 / 6, gt=0, description="epochs before a trial can be stopped (the first rung); "
                                                         "trials report inside epochs")
    reduction_factor: int = Field(4, ge=2, description="ASHA's eta: rungs eta times apart, 1/eta go on")
    name: Optional[str] = Field(None, description="the search's name (default: the space's name and the time)")
    budget_epochs: Optional[float] = Field(None, gt=0, description="stop once all trials together trained this many epochs")
    log_models: bool = Field(True, description="log each front student as an MLflow model")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names a folder)")
        return value

    @field_validator("tracking_uri")
    @classmethod
    def _store_folder_exists(cls, value: str) -> str:
        folder = store_folder(value)
        if folder is not None and not folder.is_dir():  # sqlite would make the file, Tune and MLflow the folders
            raise ValueError(f"its folder {folder} does not exist (create it, or pick a store in an existing folder)")
        return value

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> "SearchOptions":
        """Options from keyword values, with one-line errors that name the option."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = str(err["loc"][0]) if err["loc"] else "options"
            if key not in cls.model_fields:
                raise UserError(f"{key}: unknown option; fix: use one of {', '.join(cls.model_fields)}") from None
            field = cls.model_fields[key]
            ctx = err.get("ctx", {})
            problem = {"greater_than_equal": f"must be at least {ctx.get('ge')}",
                       "greater_than": f"must be above {ctx.get('gt')}"}.get(err["type"])
            problem = problem or (err["msg"][0].lower() + err["msg"][1:]).removeprefix("value error, ")
            choices = get_args(field.annotation) if err["type"] == "literal_error" else ()
            fix = (f"use one of {', '.join(choices)}" if choices else
                   f"give a value like {field.default!r}" if field.default is not None else "give a valid value")
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{key} ({flag}): {problem}, got {err.get('input')!r}; fix: {fix}") from None

def store_folder(tracking_uri: str) -> Optional[Path]:
    """The folder of a local sqlite tracking store (``sqlite:///DIR/mlflow.db`` -> DIR), else None."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    path = tracking_uri[len(prefix):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser().resolve().parent


def default_storage(tracking_uri: str) -> str:
    """Where Tune keeps a search: beside a local tracking store, else Ray's own default."""
    folder = store_folder(tracking_uri)
    return str(folder / "ray_results") if folder is not None else str(Path("~/ray_results").expanduser())
