"""MLflow, owned by the driver: one parent run per search, one nested run per trial.

Every MLflow write of a search happens in the driver process (trials only report to Tune),
so a trial that is retried on another node continues its one run instead of opening a
second, and no worker needs to reach the tracking store. During the trials those writes go
through :class:`MlflowWriter`, a queue drained by one thread, so Tune's loop never waits on the store.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

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
STOP_REASON_TAG = "kdsearch.stop_reason"  # why a trial stopped early when no scheduler stopped it (the epoch budget)
LATENCY_TAG = "kdsearch.latency_measured_in"  # on a search: "trial" (each its own file) or "measurer" (one actor)


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


def now_ms() -> int:
    return int(time.time() * 1000)


def log_metrics(c, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
    """The numeric entries of ``metrics`` in one batch."""
    from mlflow.entities import Metric

    now = now_ms()
    c.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in flat_metrics(metrics).items()])


# --------------------------------------------------------------------------- the search's writer

#: a run as the writer knows it: its id, or the id a queued ``create_run`` will give
RunRef = Union[str, "Future[str]"]


def run_id_of(run: RunRef) -> str:
    """The id of ``run`` (waits for its ``create_run`` if still queued; raises if that failed)."""
    return run if isinstance(run, str) else run.result()


def _key(run: Optional[RunRef]) -> Any:
    """One key per run, whichever form it comes in (in the writer, a run's create_run has been done)."""
    if run is None or isinstance(run, str):
        return run
    return run.result() if run.done() and run.exception() is None else id(run)


@dataclass
class _Batch:
    """One run's metrics, params and tags, written with one ``log_batch``."""

    run: RunRef
    metrics: list = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # a tag set twice keeps its last value, as in order


@dataclass
class _Call:
    """Any other write (create, terminate, artifact, update): run in its turn, after the run's batch."""

    run: Optional[RunRef]
    call: Callable[[], Any]
    what: str
    result: Optional["Future[str]"] = None  # a create_run's run id


class MlflowWriter:
    """A search's MLflow writes, off the Tune loop: queued, drained by one thread, in order.

    The driver's Tune callbacks enqueue and return; the writer thread takes whatever is queued
    and writes it, merging each run's consecutive metrics, params and tags into one
    ``MlflowClient.log_batch`` (which splits at MLflow's batch limits). One thread and one
    queue keep every run's writes in the order they were made; a run created here is a
    :data:`RunRef` until the store gives its id. :meth:`flush` waits until everything queued
    is written and raises :class:`TrackingError` for any write that failed (the others are
    written regardless). The thread also drains the queue when the main thread exits, so an
    interrupt that skips :meth:`close` loses nothing.
    """

    def __init__(self, client) -> None:
        self.client = client
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._errors: list[str] = []
        self._closed = False
        self.calls = 0  # writes made to the store (for tests and benchmarks)
        self._thread = threading.Thread(target=self._loop, name="kdsearch-mlflow-writer")
        self._thread.start()

    # ---- what the driver calls (never waits on the store) -------------------------

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> "Future[str]":
        """A run, created in its turn; start time now (not when it is written)."""
        created: "Future[str]" = Future()
        start, tags = now_ms(), dict(tags)

        def create() -> str:
            return self.client.create_run(experiment_id, start_time=start, tags=tags, run_name=run_name).info.run_id

        self._put(_Call(None, create, f"create run {run_name}", created))
        return created

    def log(self, run: RunRef, metrics: Optional[Mapping[str, Any]] = None, step: int = 0,
            params: Optional[Mapping[str, Any]] = None, tags: Optional[Mapping[str, Any]] = None) -> None:
        """Numeric finite ``metrics`` at ``step`` (timestamped now), ``params`` and ``tags`` of ``run``."""
        from mlflow.entities import Metric

        now = now_ms()
        batch = _Batch(run, [Metric(k, v, now, step) for k, v in flat_metrics(metrics or {}).items()],
                       {k: str(v) for k, v in (params or {}).items()}, {k: str(v) for k, v in (tags or {}).items()})
        if batch.metrics or batch.params or batch.tags:
            self._put(batch)

    def terminate(self, run: RunRef, status: str) -> None:
        """``set_terminated`` with the end time now."""
        end = now_ms()
        self._put(_Call(run, lambda: self.client.set_terminated(run_id_of(run), status, end_time=end), f"end run ({status})"))

    def update(self, run: RunRef, status: Optional[str] = None, name: Optional[str] = None) -> None:
        self._put(_Call(run, lambda: self.client.update_run(run_id_of(run), status=status, name=name), "update run"))

    def artifact(self, run: RunRef, local_path: str, artifact_path: Optional[str] = None) -> None:
        """Log a file; it must stay in place until :meth:`flush` returns."""
        self._put(_Call(run, lambda: self.client.log_artifact(run_id_of(run), local_path, artifact_path),
                        f"artifact {Path(local_path).name}"))

    def flush(self) -> None:
        """Wait until everything queued so far is in the store; raise if any write failed."""
        self._queue.join()
        if self._errors:
            errors, self._errors = self._errors, []
            raise TrackingError(f"{len(errors)} MLflow writes failed, the first: {errors[0]}; "
                                "fix: check the tracking store (disk, server) and resume the search")

    def close(self) -> None:
        """Flush, then end the thread."""
        self._closed = True
        try:
            self.flush()
        finally:
            self._queue.put(None)
            self._thread.join()

    def _put(self, item: Any) -> None:
        if self._closed and not self._thread.is_alive():
            raise RuntimeError("MlflowWriter: closed")
        self._queue.put(item)

    # ---- the writer thread ---------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                items = [self._queue.get(timeout=0.5)]
            except queue.Empty:
                if not threading.main_thread().is_alive():
                    return  # the process is exiting and everything is written
                continue
            while True:  # whatever else is queued goes in the same round
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in items
            try:
                self._write([i for i in items if i is not None])
            except Exception as exc:  # never expected; the writer goes on and flush() reports it
                self._errors.append(f"writer: {type(exc).__name__}: {exc}")
            finally:
                for _ in items:
                    self._queue.task_done()
            if stop:
                return

    def _write(self, items: list[Any]) -> None:
        """Write ``items`` in order, each run's consecutive batches merged into one."""
        pending: dict[Any, _Batch] = {}  # run -> its merged batch
        for item in items:
            key = _key(item.run)
            if isinstance(item, _Batch):
                merged = pending.get(key)
                if merged is not None and set(merged.params) & set(item.params):
                    self._send(pending.pop(key))  # a param twice: MLflow judges it, in order
                    merged = None
                if merged is None:
                    pending[key] = _Batch(item.run, list(item.metrics), dict(item.params), dict(item.tags))
                else:
                    merged.metrics += item.metrics
                    merged.params.update(item.params)
                    merged.tags.update(item.tags)
                continue
            if key in pending:
                self._send(pending.pop(key))
            self._attempt(item.what, item.call, item.result)
        for batch in pending.values():
            self._send(batch)

    def _send(self, batch: _Batch) -> None:
        from mlflow.entities import Param, RunTag

        self._attempt("log_batch", lambda: self.client.log_batch(
            run_id_of(batch.run), metrics=batch.metrics, params=[Param(k, v) for k, v in batch.params.items()],
            tags=[RunTag(k, v) for k, v in batch.tags.items()]))

    def _attempt(self, what: str, call: Callable[[], Any], result: Optional["Future[str]"] = None) -> None:
        try:
            value = call()
            self.calls += 1
        except Exception as exc:  # kept for flush(); the other writes go on
            message = f"{what}: {type(exc).__name__}: {str(exc).strip()[:200]}"
            log.warning(f"MLflow write failed ({message})")
            self._errors.append(message)
            if result is not None:
                result.set_exception(exc)
            return
        if result is not None:
            result.set_result(value)


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
