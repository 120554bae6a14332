"""What a search shows a person: the front table, the trials CSV and the Pareto plots."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence


def architecture(config: Mapping[str, Any]) -> str:
    """A short description of a student: its family and knobs, e.g. ``cnn(stages=2,channels=16)``."""
    family = config.get("student.family", "?")
    prefix = f"student.{family}."
    knobs = ",".join(f"{k[len(prefix):]}={_short(v)}" for k, v in sorted(config.items()) if k.startswith(prefix))
    return f"{family}({knobs})"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def front_table(front: Sequence[Mapping[str, Any]], objectives: Mapping[str, str]) -> str:
    """A plain-text table of the front, one student a row."""
    headers = ["trial", *objectives, "size_bytes", "method", "T", "alpha", "views", "hints", "prune", "quant", "student"]
    rows = []
    for row in front:
        cfg = row["config"]
        rows.append([
            row["trial"], *(_short(row.get(m)) for m in objectives), str(row.get("size_bytes", "")),
            str(cfg.get("distill.method", "kd")) + ("+ls" if cfg.get("distill.logit_standardize") else ""),
            _short(cfg.get("distill.temperature", "")), _short(cfg.get("distill.alpha", "")),
            _views(cfg), str(cfg.get("distill.hint_stages", "")), _short(cfg.get("compress.prune_ratio", 0.0)),
            str(cfg.get("compress.quantize", "none")), architecture(cfg),
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _views(config: Mapping[str, Any]) -> str:
    """What the teacher saw: the clean data, each augmented batch (online) or K stored views."""
    augmented = any(config.get(k) for k in config if k.startswith("train.augment."))
    return str(config.get("distill.teacher_views", "online")) if augmented else "clean"


def write_trials_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Every trial, whatever its status, with its objectives and flattened config."""
    config_keys = sorted({k for r in rows for k in r.get("config", {})})
    metric_keys = sorted({k for r in rows for k, v in r.items() if k not in ("config",) and not isinstance(v, dict)})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(metric_keys + config_keys)
        for r in rows:
            writer.writerow([r.get(k, "") for k in metric_keys] + [r.get("config", {}).get(k, "") for k in config_keys])
    return path


#: metric -> (what it is, its unit or None)
METRIC_LABELS = {"val_acc": ("validation accuracy", None), "latency_ms": ("latency", "ms"), "params": ("parameters", None),
                 "macs": ("MACs", None), "size_bytes": ("size", "bytes")}
LOG_SCALE = ("params", "macs", "size_bytes")


def axis_label(metric: str, direction: str) -> str:
    """``latency (ms), lower is better``: what the axis is, its unit and which way is good."""
    what, unit = METRIC_LABELS.get(metric, (metric, None))
    return f"{what}{f' ({unit})' if unit else ''}, {'higher' if direction == 'max' else 'lower'} is better"


def hover_text(row: Mapping[str, Any], objectives: Mapping[str, str]) -> str:
    """Every objective and knob of a trial, for the interactive plot."""
    lines = [f"<b>{row['trial']}</b> {architecture(row.get('config', {}))}"]
    lines += [f"{m}: {_short(row.get(m))}" for m in objectives]
    lines += [f"{k}: {_short(v)}" for k, v in sorted(row.get("config", {}).items())]
    return "<br>".join(lines)


def _pairs(objectives: Mapping[str, str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(objectives, 2))


def write_plot_html(rows: Sequence[Mapping[str, Any]], front_ids: set[str], objectives: Mapping[str, str], path: Path,
                    teacher: Optional[Mapping[str, Any]] = None) -> Path:
    """An interactive plot per objective pair: every complete trial, the front highlighted, the teacher marked."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pairs = _pairs(objectives)
    fig = make_subplots(rows=1, cols=len(pairs), subplot_titles=[f"{a} vs {b}" for a, b in pairs])
    for col, (a, b) in enumerate(pairs, start=1):
        for on_front, name, color in ((False, "dominated", "#9aa5b1"), (True, "Pareto front", "#d62728")):
            sel = [r for r in rows if (r["trial"] in front_ids) == on_front]
            fig.add_trace(go.Scatter(
                x=[r.get(b) for r in sel], y=[r.get(a) for r in sel], mode="markers", name=name,
                marker={"color": color, "size": 9 if on_front else 7}, showlegend=col == 1,
                text=[hover_text(r, objectives) for r in sel], hoverinfo="text",
            ), row=1, col=col)
        if teacher and teacher.get(a) is not None and teacher.get(b) is not None:
            fig.add_trace(go.Scatter(x=[teacher[b]], y=[teacher[a]], mode="markers", name="teacher", showlegend=col == 1,
                                     marker={"color": "#1f77b4", "size": 13, "symbol": "star"},
                                     text=[f"<b>teacher</b> {teacher.get('description', '')}<br>" + "<br>".join(
                                         f"{m}: {_short(teacher.get(m))}" for m in objectives)], hoverinfo="text"),
                          row=1, col=col)
        fig.update_xaxes(title_text=axis_label(b, objectives[b]), type="log" if b in LOG_SCALE else "linear", row=1, col=col)
        fig.update_yaxes(title_text=axis_label(a, objectives[a]), row=1, col=col)
    fig.update_layout(title="kdsearch: Pareto front", height=480, width=460 * len(pairs))
    path.write_text(fig.to_html(include_plotlyjs=True, full_html=True))
    return path


def write_plot_png(rows: Sequence[Mapping[str, Any]], front_ids: set[str], objectives: Mapping[str, str], path: Path,
                   teacher: Optional[Mapping[str, Any]] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = _pairs(objectives)
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.8 * len(pairs), 4.2), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        rest = [r for r in rows if r["trial"] not in front_ids]
        front = sorted((r for r in rows if r["trial"] in front_ids), key=lambda r: r.get(b, 0))
        ax.scatter([r.get(b) for r in rest], [r.get(a) for r in rest], c="#9aa5b1", s=18, label="dominated")
        ax.scatter([r.get(b) for r in front], [r.get(a) for r in front], c="#d62728", s=30, label="Pareto front")
        if teacher and teacher.get(a) is not None and teacher.get(b) is not None:
            ax.scatter([teacher[b]], [teacher[a]], c="#1f77b4", marker="*", s=160, label="teacher")
        if b in LOG_SCALE:
            ax.set_xscale("log")
        ax.set_xlabel(axis_label(b, objectives[b]))
        ax.set_ylabel(axis_label(a, objectives[a]))
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
