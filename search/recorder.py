"""A Ray Tune callback that records each trial's outcome, keeps the front current and logs to MLflow.

Its MLflow writes go through a :class:`~kdsearch.search.tracking.MlflowWriter`: Tune's loop
(which holds a trial at each report until the driver has handled it) never waits on the store.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ray import tune

from kdsearch.search.pareto import hypervolume_fraction, pareto_front
from kdsearch.search.tracking import (NAME_TAG, PARENT_TAG, RUNTIME_TAG, STATUS_TAG, STOP_REASON_TAG, TRIAL_TAG, MlflowWriter,
                                      RunRef, run_id_of, trial_runs)
from kdsearch.trainers.runtimes import student_files

log = logging.getLogger("kdsearch")

COMPLETE, PRUNED, FAILED = "complete", "pruned", "failed"
INTERRUPTED = "interrupted"  # in flight at SIGINT or SIGTERM: KILLED in MLflow, off the front, resumable
#: a run whose trial started after Tune last saved its state, then the driver died: Tune never
#: resumes it, so it is KILLED and kept apart (not a trial of the search)
LOST = "lost"
#: Tune's own result keys, not worth a metric history each
TUNE_BOOKKEEPING = ("time_this_iter_s", "time_total_s", "timestamp", "pid", "training_iteration", "iterations_since_restore")


def is_final(result: Optional[dict]) -> bool:
    """A trial's last result carries its measured size only when it ran its full budget."""
    return bool(result) and "size_bytes" in result  # type: ignore[operator]


class SearchRecorder(tune.Callback):
    """Trial outcomes, the live front and hypervolume, MLflow runs and the progress line."""

    def __init__(self, mlflow_client, experiment_id: str, parent_run_id: str, objectives: dict[str, str],
                 reference: dict[str, float], total: int):
        self.client, self.experiment_id, self.parent_run_id = mlflow_client, experiment_id, parent_run_id
        self.objectives, self.reference, self.total = objectives, reference, total
        self.rows: dict[str, dict[str, Any]] = {}  # trial_id -> outcome row
        self.run_ids: dict[str, RunRef] = {}  # a new trial's run id comes when the writer has created it
        self.writer: Optional[MlflowWriter] = None  # started by the first write (Tune pickles the recorder before)
        self.names: dict[str, str] = {}  # trial_id -> trial-001, in order of first sight
        self.running: set[str] = set()
        self.checkpoints: dict[str, Path] = {}
        self.runtime_tagged: set[str] = set()  # trials whose run carries the RUNTIME_TAG
        self.students_dir = tempfile.mkdtemp(prefix="kdsearch-students-")
        self.hypervolume = 0.0
        self.started = time.monotonic()
        self.rejected: Callable[[], int] = lambda: 0  # configurations refused before launch (constraints, repeats)
        self.unfinished: set[str] = set()  # a resumed search's runs that were in flight when it stopped
        runs = sorted(trial_runs(mlflow_client, mlflow_client.get_run(parent_run_id)), key=lambda r: r.info.start_time)
        for run in runs:  # a resumed search: its trials keep their runs and names, new ones count on
            trial_id = run.data.tags.get(TRIAL_TAG)
            if trial_id:
                self.run_ids[trial_id] = run.info.run_id
                self.names[trial_id] = run.data.tags.get(NAME_TAG, run.info.run_name)
                if run.info.status in ("RUNNING", "KILLED"):
                    self.unfinished.add(trial_id)

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks into the experiment (a resume brings its own recorder): no
        writer thread, no run still being created."""
        state = dict(self.__dict__)
        state["writer"] = None
        state["run_ids"] = {k: v for k, v in self.run_ids.items() if isinstance(v, str)}
        state["rows"] = {k: r for k, r in self.rows.items() if isinstance(r["run_id"], str)}
        return state

    # ---- MLflow runs --------------------------------------------------------------

    def name(self, trial_id: str) -> str:
        return self.names.setdefault(trial_id, f"trial-{len(self.names) + 1:03d}")

    @property
    def write(self) -> MlflowWriter:
        """The writer all of this recorder's MLflow writes go through, in order."""
        if self.writer is None:
            self.writer = MlflowWriter(self.client)
        return self.writer

    def _run_for(self, trial_id: str, config: dict[str, Any]) -> RunRef:
        if trial_id not in self.run_ids:
            self.run_ids[trial_id] = run = self.write.create_run(self.experiment_id, self.name(trial_id), tags={
                PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial_id, NAME_TAG: self.name(trial_id), STATUS_TAG: "running"})
            self.write.log(run, params={k: str(v)[:500] for k, v in config.items()})
        return self.run_ids[trial_id]

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        run = self._run_for(trial.trial_id, trial.config)
        log.debug(f"{self.name(trial.trial_id)} started")
        if trial.trial_id in self.unfinished:  # interrupted before: the same run goes on
            self.unfinished.discard(trial.trial_id)
            self.write.update(run, status="RUNNING", name=self.name(trial.trial_id))
            self.write.log(run, tags={STATUS_TAG: "running"})
        self.running.add(trial.trial_id)

    def interrupt(self) -> list[str]:
        """The trials in flight when the search stopped on a signal: KILLED, tagged interrupted, never
        on the front; ``kdsearch resume`` continues each in its own run. Returns their names."""
        names = self._kill(self.running, INTERRUPTED)
        self.running.clear()
        return names

    def stop_in_flight(self, results, reason: str) -> list[str]:
        """The trials in flight when the search ended on its own (its epoch budget spent): stopped
        early, so PRUNED, tagged with ``reason``, never on the front. Returns their names."""
        by_id = {(result.metrics or {}).get("trial_id"): result for result in results}
        names = []
        for trial_id in sorted(self.running, key=self.name):
            result = by_id.get(trial_id)
            metrics = dict(result.metrics or {}) if result is not None else {}
            config = result.config if result is not None and result.config is not None else {}
            self.write.log(self._run_for(trial_id, config), tags={STOP_REASON_TAG: reason})
            self._finish(trial_id, config, None, PRUNED, metrics, quiet=True)
            names.append(self.name(trial_id))
        return names

    def close_lost(self) -> list[str]:
        """At the end of a resumed search: the runs of trials Tune's saved state did not know (started
        just before the driver died), which no resume can continue. KILLED, tagged lost; their names."""
        names = self._kill(self.unfinished - set(self.rows) - self.running, LOST)
        self.unfinished.clear()
        return names

    def _kill(self, trial_ids: set[str], status: str) -> list[str]:
        names = []
        for trial_id in sorted(trial_ids, key=self.name):
            run = self.run_ids[trial_id]
            self.write.log(run, tags={STATUS_TAG: status, "mlflow.runName": f"{self.name(trial_id)} ({status})"})
            self.write.terminate(run, "KILLED")
            names.append(self.name(trial_id))
        return names

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self.running.discard(trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        run = self._run_for(trial.trial_id, trial.config)
        # MLflow steps are integers: the report's number; `epoch` (fractional inside an epoch) is logged beside it
        step = int(result.get("training_iteration", 0))
        tags = {}
        if "runtime" in result and trial.trial_id not in self.runtime_tagged:  # every report carries it
            tags[RUNTIME_TAG] = str(result["runtime"])
            self.runtime_tagged.add(trial.trial_id)
        self.write.log(run, {k: v for k, v in result.items() if k not in TUNE_BOOKKEEPING and not k.startswith("time_since")},
                       step, tags=tags)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        status = FAILED if result.get("diverged") else COMPLETE if is_final(result) else PRUNED
        self._finish(trial.trial_id, trial.config, trial.checkpoint, status, result, error=str(result.get("error", "")))

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trial.trial_id, trial.config, None, FAILED, trial.last_result or {},
                     error=str(getattr(trial, "error_file", "") or ""))

    def adopt(self, results) -> None:
        """Record trials from a Tune ResultGrid that ended before this recorder saw them (a resume)."""
        for result in results:
            trial_id = (result.metrics or {}).get("trial_id")
            if not trial_id or trial_id in self.rows or trial_id in self.running or result.config is None:
                continue  # seen already, in flight at an interrupt, or created but never started (a budget stop)
            status = FAILED if result.error or (result.metrics or {}).get("diverged") else COMPLETE if is_final(result.metrics) else PRUNED
            self._finish(trial_id, result.config, result.checkpoint, status, result.metrics or {},
                         error=str(result.error or ""), quiet=True)

    # ---- outcomes -----------------------------------------------------------------

    def _finish(self, trial_id: str, config: dict[str, Any], checkpoint, status: str, result: dict,
                error: str = "", quiet: bool = False) -> None:
        run = self._run_for(trial_id, config)
        self.running.discard(trial_id)
        row = {"trial": self.name(trial_id), "trial_id": trial_id, "run_id": run, "status": status,
               **{k: v for k, v in result.items() if k in self.objectives or k in KEEP},
               "config": dict(config)}
        self.rows[trial_id] = row
        tags = {STATUS_TAG: status}
        if status != COMPLETE:  # the runs list shows names: an early-stopped trial must not pass for a complete one
            tags["mlflow.runName"] = f"{self.name(trial_id)} ({status})"
        if error:
            tags["kdsearch.error"] = error[:500]
        self.write.log(run, tags=tags)
        if status == COMPLETE and checkpoint is not None:
            self._keep_artifact(trial_id, checkpoint, run)
        self.write.terminate(run, "FAILED" if status == FAILED else "FINISHED")
        if status == COMPLETE:
            self._update_front()
        if not quiet:
            self._progress()

    def _keep_artifact(self, trial_id: str, checkpoint, run: RunRef) -> None:
        """Log the trial's files to its run under ``student/``: the checkpoint ``student.pt`` and the
        deployed file its runtime measured (``student.onnx`` for onnxruntime: what the export copies).
        They are copied here first (local even when storage is remote), and logged from the copy."""
        with checkpoint.as_directory() as folder:
            for name in student_files():
                student = Path(folder) / name
                if not student.is_file():
                    continue
                keep = Path(self.students_dir) / trial_id / name
                keep.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(student, keep)
                self.write.artifact(run, str(keep), "student")
                if name == "student.pt":
                    self.checkpoints[trial_id] = keep

    def flush(self) -> None:
        """Everything written so far is in the store (before the front is read or the search ends);
        the rows then hold their runs' ids. Raises TrackingError if a write failed."""
        if self.writer is not None:
            try:
                self.writer.flush()
            finally:
                for row in self.rows.values():
                    with contextlib.suppress(Exception):  # a run whose creation failed keeps its reference
                        row["run_id"] = run_id_of(row["run_id"])

    def close(self) -> None:
        """Flush, then stop the writer's thread."""
        if self.writer is not None:
            try:
                self.flush()
            finally:
                self.writer.close()
                self.writer = None

    def complete_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows.values() if r["status"] == COMPLETE]

    def _update_front(self) -> None:
        rows = self.complete_rows()
        self.hypervolume = hypervolume_fraction(rows, self.objectives, self.reference)
        # in-search latency; the final `hypervolume` (quiet-phase latency) is logged once at the end
        self.write.log(self.parent_run_id, {"hypervolume_search": self.hypervolume}, step=len(rows))

    def front(self) -> list[dict[str, Any]]:
        return list(pareto_front(self.complete_rows(), self.objectives))

    def counts(self) -> dict[str, int]:
        statuses = [r["status"] for r in self.rows.values()]
        return {"running": len(self.running), COMPLETE: statuses.count(COMPLETE), PRUNED: statuses.count(PRUNED),
                FAILED: statuses.count(FAILED), "rejected": self.rejected()}

    def _progress(self) -> None:
        c = self.counts()
        done = c[COMPLETE] + c[PRUNED] + c[FAILED]
        elapsed = time.monotonic() - self.started
        log.info(f"[{done:>3}/{self.total}] running {c['running']}  complete {c[COMPLETE]}  pruned {c[PRUNED]}  "
                  f"failed {c[FAILED]}  rejected {c['rejected']}  front {len(self.front())}  hypervolume {self.hypervolume:.4f}  ({elapsed:.0f} s)")


#: result keys kept in a trial's row besides the objectives
KEEP = ("val_acc", "val_acc_distilled", "params", "macs", "size_bytes", "latency_ms", "latency_iqr_ms", "epoch",
        "train_seconds", "family", "quant_backend", "teacher_val_acc", "training_iteration", "teacher_passes",
        "runtime", "artifact", "artifact_sha256", "val_acc_checkpoint", "latency_batch_size")