"""What a search returns: its front and trials as pandas DataFrames, and where it was logged."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

if TYPE_CHECKING:
    import pandas as pd

    from kdsearch.search.export import ExportResult

#: the leading columns of ``trials`` and ``front``; objectives, other metrics and knobs follow
ID_COLUMNS = ("trial", "status", "run_id", "trial_id")


def rows_frame(rows: Sequence[Mapping[str, Any]], objectives: Mapping[str, str]) -> "pd.DataFrame":
    """One row per trial: ids and status, the objectives, the other figures, then every knob."""
    import pandas as pd

    from kdsearch.search.report import architecture

    records = []
    for row in rows:
        config = dict(row.get("config", {}))
        figures = {k: v for k, v in row.items() if k not in ID_COLUMNS and k not in ("config", "architecture")}
        records.append({**{k: row.get(k) for k in ID_COLUMNS}, **figures, "architecture": architecture(config), **config})
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        return pd.DataFrame(columns=[*ID_COLUMNS, *objectives])
    knobs = sorted({k for r in rows for k in r.get("config", {})})
    leading = [*ID_COLUMNS, *objectives]
    rest = [c for c in frame.columns if c not in leading and c not in knobs]
    for column in leading:
        if column not in frame:
            frame[column] = None
    return frame[leading + rest + knobs].reset_index(drop=True)


@dataclass
class SearchResult:
    """A finished (or interrupted) search.

    ``front`` and ``trials`` are DataFrames (one row per trial: status, objectives, figures
    and knobs); ``hypervolume`` is the front's share of the reference box, 0..1. The same
    figures are in MLflow under ``parent_run_id``.
    """

    experiment_id: str
    experiment: str
    parent_run_id: str
    tracking_uri: str
    objectives: dict[str, str]
    reference: dict[str, float]
    hypervolume: float
    front: "pd.DataFrame"
    trials: "pd.DataFrame"
    tune_path: str
    counts: dict[str, int] = field(default_factory=dict)
    teacher_passes: int = 0  # teacher forward passes (samples x teachers) the search made, preparing included
    interrupted: Optional[str] = None  # "SIGINT" or "SIGTERM" when the search stopped early: a partial front

    @property
    def partial(self) -> bool:
        """The search was interrupted: ``front`` is the front so far; ``kdsearch resume tune_path`` finishes it."""
        return self.interrupted is not None

    def export(self, *, max_latency_ms: Optional[float] = None, max_params: Optional[int] = None,
               max_size_bytes: Optional[int] = None, out: str | Path = "exports",
               formats: Sequence[str] = ("onnx", "pt2", "state_dict"), register: Optional[str] = None) -> "ExportResult":
        """The most accurate front student within the limits, written, parity-checked and described.

        See :func:`kdsearch.export_student`.
        """
        from kdsearch.search.export import export_student

        return export_student(self.parent_run_id, tracking_uri=self.tracking_uri, experiment=self.experiment,
                              max_latency_ms=max_latency_ms, max_params=max_params, max_size_bytes=max_size_bytes,
                              out=out, formats=formats, register=register)
