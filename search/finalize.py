"""After the trials: quiet-phase latency, the final front and its artifacts in MLflow."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from kdsearch.search.latency import load_trial_student, structure_key
from kdsearch.search.pareto import hypervolume, pareto_front
from kdsearch.search.recorder import SearchRecorder
from kdsearch.search.report import architecture, front_table, write_plot_html, write_plot_png, write_trials_csv
from kdsearch.search.tracking import log_json, log_metrics
from kdsearch.spaces import Space
from kdsearch.trainers.measure import Latency, measure_latency
from kdsearch.trainers.quantize import quant_info


def remeasure_latency(space: Space, context: Any, recorder: SearchRecorder, mlflow_client, echo: Callable[[str], None]) -> None:
    """Measure every complete student again with no training running; keep the in-search figure."""
    rows = recorder.complete_rows()
    if not rows:
        return
    echo(f"measuring latency of {len(rows)} complete students in a quiet phase...")
    cache: dict[str, Latency] = {}
    data = context.data
    for row in rows:
        path = recorder.checkpoints.get(row["trial_id"])
        if path is None or not path.is_file():
            continue
        key = structure_key(row["config"])
        if key not in cache:
            model = load_trial_student(space, row["config"], path, data.input_shape, data.num_classes)
            cache[key] = measure_latency(model, context.example)
        row["latency_ms_search"] = row.get("latency_ms")
        row["latency_ms"] = cache[key].median_ms
        row["latency_iqr_ms"] = cache[key].iqr_ms
        # at the trial's last step, so MLflow shows the quiet figure as the latest value
        log_metrics(mlflow_client, row["run_id"], {"latency_ms": row["latency_ms"], "latency_iqr_ms": row["latency_iqr_ms"],
                                                  "latency_ms_search": row["latency_ms_search"] or 0.0},
                    step=int(row.get("training_iteration", 0)))


def log_front_models(space: Space, context: Any, recorder: SearchRecorder, front: list[dict[str, Any]]) -> None:
    """Each front student as an MLflow model with an input example and signature."""
    import mlflow
    from mlflow.models import infer_signature

    example = context.example
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    for row in front:
        path = recorder.checkpoints.get(row["trial_id"])
        if path is None:
            continue
        model = load_trial_student(space, row["config"], path, context.data.input_shape, context.data.num_classes)
        with torch.no_grad():
            output = model(example).numpy()
        with mlflow.start_run(run_id=row["run_id"]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logged, serialization = mlflow_flavour(model, example)
            mlflow.pytorch.log_model(logged, name="model", input_example=example.numpy(), serialization_format=serialization,
                                     signature=infer_signature(example.numpy(), output), pip_requirements=requirements)


def mlflow_flavour(model: torch.nn.Module, example: torch.Tensor) -> tuple[torch.nn.Module, str]:
    """Float students go in as torch.export programs; int8 ones (which neither export nor
    pickle) as TorchScript traces, which MLflow stores with ``torch.jit.save``."""
    if quant_info(model) is None:
        return model, "pt2"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.trace(model, example), "pickle"


def finish(space: Space, context: Any, recorder: SearchRecorder, mlflow_client, parent_id: str,
           echo: Callable[[str], None], log_models: bool = True) -> dict[str, Any]:
    """Final front, hypervolume and artifacts (pareto_front.json, pareto.html, pareto.png, trials.csv)."""
    remeasure_latency(space, context, recorder, mlflow_client, echo)
    rows = recorder.complete_rows()
    objectives = space.objectives
    reference = recorder.reference
    front = pareto_front(rows, objectives)
    volume = hypervolume(rows, objectives, reference)
    mlflow_client.log_metric(parent_id, "hypervolume", volume, step=len(rows))
    log_metrics(mlflow_client, parent_id, {f"trials_{k}": float(v) for k, v in recorder.counts().items() if k != "running"})
    mlflow_client.log_param(parent_id, "reference_point", str(reference))
    front_ids = {r["trial"] for r in front}
    payload = {
        "objectives": objectives,
        "reference_point": reference,
        "hypervolume": volume,
        "front": [{**r, "architecture": architecture(r["config"])} for r in front],
    }
    log_json(mlflow_client, parent_id, "pareto_front.json", payload)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        all_rows = list(recorder.rows.values())
        for path in (write_trials_csv(all_rows, folder / "trials.csv"),
                     *([write_plot_html(rows, front_ids, objectives, folder / "pareto.html"),
                        write_plot_png(rows, front_ids, objectives, folder / "pareto.png")] if rows else [])):
            mlflow_client.log_artifact(parent_id, str(path))
    if front and log_models:
        echo(f"logging {len(front)} front students as MLflow models...")
        log_front_models(space, context, recorder, front)
    echo("")
    echo(f"Pareto front ({len(front)} of {len(rows)} complete trials; hypervolume {volume:.4g}):")
    print(front_table(front, objectives), flush=True)
    return {"front": payload["front"], "rows": rows, "hypervolume": volume, "reference": reference}
