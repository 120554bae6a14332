"""After the trials: quiet-phase latency, the final front and its artifacts in MLflow."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any


from kdsearch.search.latency import artifact_latency, load_trial_student, runtime_example, structure_key
from kdsearch.search.pareto import hypervolume_fraction, pareto_front
from kdsearch.search.recorder import SearchRecorder
from kdsearch.search.report import architecture, write_plot_html, write_plot_png, write_trials_csv
from kdsearch.search.tracking import log_json, log_metrics
from kdsearch.spaces import Space
from kdsearch.trainers.measure import Latency

log = logging.getLogger("kdsearch")


def remeasure_latency(space: Space, context: Any, recorder: SearchRecorder, mlflow_client) -> None:
    """Measure every complete student again with no training running; keep the in-search figure.

    In this process, on ``measure.device``: under ``cuda`` on the driver's GPU (the probes refused
    a driver where torch sees none before the search began)."""
    rows = recorder.complete_rows()
    if not rows:
        return
    log.info(f"measuring latency of {len(rows)} complete students in a quiet phase...")
    cache: dict[str, Latency] = {}
    data = context.data
    for row in rows:
        path = recorder.checkpoints.get(row["trial_id"])
        if path is None or not path.is_file():
            continue
        key = structure_key(row["config"])
        if key not in cache:
            cache[key] = artifact_latency(space, row["config"], path.parent, runtime_example(space, data), data.input_shape,
                                          data.num_classes)  # the logged deployed file, in its runtime
        row["latency_ms_search"] = row.get("latency_ms")
        row["latency_ms"] = cache[key].median_ms
        row["latency_iqr_ms"] = cache[key].iqr_ms
        # at the trial's last step, so MLflow shows the quiet figure as the latest value
        log_metrics(mlflow_client, row["run_id"], {"latency_ms": row["latency_ms"], "latency_iqr_ms": row["latency_iqr_ms"],
                                                  "latency_ms_search": row["latency_ms_search"] or 0.0},
                    step=int(row.get("training_iteration", 0)))


def log_front_models(space: Space, context: Any, recorder: SearchRecorder, front: list[dict[str, Any]]) -> None:
    """Each front student as a deployable MLflow model named after its trial (``trial-003``): it
    takes raw inputs (the data's standardisation is in the model) and any batch size, and carries
    its model card (:mod:`kdsearch.search.deploy`)."""
    from kdsearch.search.deploy import card, log_model

    search = {"run_id": recorder.parent_run_id, "experiment_id": recorder.experiment_id, "objectives": space.objectives}
    try:
        search["run_name"] = recorder.client.get_run(recorder.parent_run_id).info.run_name
    except Exception:  # the name is a nicety of the card
        pass
    for row in front:
        path = recorder.checkpoints.get(row["trial_id"])
        if path is None:
            continue
        model = load_trial_student(space, row["config"], path, context.data.input_shape, context.data.num_classes)
        log_model(row["run_id"], model, context.data, card(context.data, row, search, space.data.model_dump()),
                  name=str(row["trial"]))


def finish(space: Space, context: Any, recorder: SearchRecorder, mlflow_client, parent_id: str,
           log_models: bool = True, partial: bool = False) -> dict[str, Any]:
    """Final front, hypervolume and artifacts (pareto_front.json, pareto.html, pareto.png, trials.csv).

    ``hypervolume`` is the front's share of the reference box (0..1) after the quiet-phase
    latency; the in-search figure is ``hypervolume_search``, one step per complete trial.
    A ``partial`` front (the search was interrupted) is the front so far, marked so, with the
    in-search latency and no models: the user is waiting for the prompt, and a resume
    finishes it properly.
    """
    if not partial:
        remeasure_latency(space, context, recorder, mlflow_client)
    rows = recorder.complete_rows()
    objectives = space.objectives
    reference = recorder.reference
    front = pareto_front(rows, objectives)
    volume = hypervolume_fraction(rows, objectives, reference)
    mlflow_client.log_metric(parent_id, "hypervolume", volume, step=len(rows))
    log_metrics(mlflow_client, parent_id, {f"trials_{k}": float(v) for k, v in recorder.counts().items() if k != "running"})
    # samples x teachers: preparing the clean outputs, then every trial's online passes and view stores it built
    passes = context.teacher_passes + sum(int(r.get("teacher_passes", 0)) for r in recorder.rows.values())
    mlflow_client.log_metric(parent_id, "teacher_passes", passes)
    mlflow_client.log_param(parent_id, "reference_point", str(reference))
    front_ids = {r["trial"] for r in front}
    teacher = {**context.targets.footprint, "val_acc": context.targets.val_acc,
               "description": context.targets.description}
    payload = {
        "partial": partial,
        "objectives": objectives,
        "reference_point": reference,
        "hypervolume": volume,
        "hypervolume_of": "the reference box (1.0: a perfect student, accuracy 1 at zero cost)",
        "teacher": teacher,
        "front": [{**r, "architecture": architecture(r["config"])} for r in front],
    }
    log_json(mlflow_client, parent_id, "pareto_front.json", payload)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        all_rows = list(recorder.rows.values())
        for path in (write_trials_csv(all_rows, folder / "trials.csv"),
                     *([write_plot_html(rows, front_ids, objectives, folder / "pareto.html", teacher),
                        write_plot_png(rows, front_ids, objectives, folder / "pareto.png", teacher)]
                       if rows and len(objectives) > 1 else [])):
            mlflow_client.log_artifact(parent_id, str(path))
    if front and log_models and not partial:
        log.info(f"logging {len(front)} front students as MLflow models...")
        log_front_models(space, context, recorder, front)
    log.info(f"Pareto front{' so far' if partial else ''}: {len(front)} of {len(rows)} complete trials; "
             f"hypervolume {volume:.4f} of the reference box")
    return {"front": payload["front"], "rows": rows, "hypervolume": volume, "reference": reference, "teacher_passes": passes}
