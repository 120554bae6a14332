"""MLflow, owned by the driver: one parent run per search, one nested run per trial.

Every MLflow write of a search happens in the driver process (trials only report to Tune),
so a trial that is retried on another node continues its one run instead of opening a
second, and no worker needs to reach the tracking store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from kdsearch.search.options import DEFAULT_EXPERIMENT, DEFAULT_TRACKING_URI, store_folder  # noqa: F401
from kdsearch.spaces.errors import TrackingError

log = logging.getLogger("kdsearch")

ROLE_TAG = "kdsearch.role"
TRIAL_TAG = "kdsearch.trial_id"
STATUS_TAG = "kdsearch.status"
NAME_TAG = "kdsearch.trial"  # the trial's name without the status the run name may carry
PARENT_TAG = "mlflow.parentRunId"
PARTIAL_TAG = "kdsearch.partial"  # "true" on a search that was interrupted: its front is the front so far
SPACE_TAG = "kdsearch.space_sha256"  # the space file's hash: a search repeated with the same seed is told so
RUNTIME_TAG = "kdsearch.runtime"  # the runtime a trial's latency, accuracy and size were measured in


def quiet_mlflow() -> None:
    """MLflow logs migrations and emoji run links at INFO; a search shows its own progress."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for name in ("mlflow", "alembic", "mlflow.store", "mlflow.tracking", "mlflow.pytorch", "mlflow.models"):
        logging.getLogger(name).setLevel(logging.ERROR)


def client(tracking_uri: str):
    """An MlflowClient for ``tracking_uri``, checked to answer."""
    quiet_mlflow()
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    c = MlflowClient(tracking_uri)
    try:
        with _fail_fast():
            c.search_experiments(max_results=1)
    except Exception as exc:  # MLflow raises many kinds here: connection, SQL, REST
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"--tracking-uri {tracking_uri}: cannot reach the tracking store ({first}); "
                            "fix: start the server or pass a reachable URI such as sqlite:///mlflow.db") from None
    return c


@contextlib.contextmanager
def _fail_fast():
    """One quick try when checking a server: MLflow's default retries take minutes to give up."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def experiment_id(c, name: str, create: bool) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        raise TrackingError(f"--experiment {name}: no such experiment in {c.tracking_uri}; "
                            "fix: run `kdsearch run --experiment NAME` first or pick an existing one")
    return c.create_experiment(name, artifact_location=artifact_location(c.tracking_uri, name))


def artifact_location(tracking_uri: str, experiment: str) -> Optional[str]:
    """Artifacts beside a local sqlite store (``sqlite:///DIR/mlflow.db`` -> ``DIR/mlartifacts/<experiment>``),
    never in the current folder; other stores (a server, a file store) keep their own default."""
    folder = store_folder(tracking_uri)
    if folder is None:
        return None
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in experiment).strip("._") or "experiment"
    return (folder / "mlartifacts" / safe).as_uri()


def flat_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of a result: what MLflow can store as metrics."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def log_metrics(c, run_id: str, metrics: Mapping[str, Any], step: int = 0, synchronous: bool = True) -> None:
    """The numeric entries of ``metrics`` in one batch; ``synchronous=False`` queues it on MLflow's
    own background writer (see :func:`flush`), so a search's driver loop does not wait on the store."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in flat_metrics(metrics).items()],
                synchronous=synchronous)


def flush(c) -> None:
    """Wait until everything logged with ``synchronous=False`` through ``c`` is in the store."""
    c._tracking_client.store.flush_async_logging()  # MlflowClient has no public flush; its store does


def log_json(c, run_id: str, name: str, payload: Any) -> None:
    c.log_text(run_id, json.dumps(payload, indent=2, default=str), name)


def latest_search_run(c, experiment: str, run_id: Optional[str] = None, finished: bool = False):
    """The given search (parent) run, or the latest one of ``experiment``; with ``finished``, the
    latest that ran to its end (an interrupted or running search is skipped, and the log says so)."""
    if run_id:
        try:
            run = c.get_run(run_id)
        except Exception:
            raise TrackingError(f"--run-id {run_id}: no such run; fix: copy a run id from `kdsearch pareto`") from None
        if finished and is_partial(run):
            log.warning(f"search {run.info.run_name} was interrupted: its front is the front so far "
                        f"(finish it with: kdsearch resume {run.data.tags.get('kdsearch.tune_path', 'TUNE_FOLDER')})")
        return run
    exp_id = experiment_id(c, experiment, create=False)
    runs = c.search_runs([exp_id], filter_string=f"tags.`{ROLE_TAG}` = 'search'", order_by=["attributes.start_time DESC"],
                         max_results=100 if finished else 1)
    if not runs:
        raise TrackingError(f"--experiment {experiment}: no search has been logged there; fix: run `kdsearch run` first")
    for run in runs if finished else runs[:1]:
        if not finished or (run.info.status == "FINISHED" and not is_partial(run)):
            return run
        log.info(f"skipping search {run.info.run_name}: "
                 f"{'interrupted' if run.data.tags.get(PARTIAL_TAG) == 'true' else run.info.status.lower()}")
    raise TrackingError(f"--experiment {experiment}: no search there ran to its end (the latest, {runs[0].info.run_name}, "
                        f"is {runs[0].info.status.lower()}); fix: kdsearch resume "
                        f"{runs[0].data.tags.get('kdsearch.tune_path', 'TUNE_FOLDER')}, or pass --run-id to use its front so far")


def is_partial(run) -> bool:
    """A search interrupted before its end (its front is the front so far)."""
    return run.data.tags.get(PARTIAL_TAG) == "true" or run.info.status in ("KILLED", "RUNNING")


def trial_runs(c, parent) -> Iterable[Any]:
    return c.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
                         max_results=10_000)


def read_artifact_json(c, run_id: str, name: str) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = c.download_artifacts(run_id, name, tmp)
        except Exception:
            raise TrackingError(f"run {run_id} has no {name}; fix: wait for the search to finish or pick another run") from None
        return json.loads(Path(path).read_text())


def ui_link(base_url: str, experiment_id_: str) -> str:
    """The experiment's runs in MLflow's classic (not GenAI) view."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id_}/runs?workflowType=machine_learning"
