"""Deployable students: the data's preprocessing and the student as one module, and its model card.

A student is trained on standardised inputs (``(x / scale - mean) / std`` with the training
statistics the :class:`~kdsearch.trainers.data.DataBundle` records). What a user can deploy takes
*raw* inputs, as ``data.source`` gives them, and any batch size: :func:`deployable` puts
:class:`~kdsearch.trainers.data.Standardize` in front of the student. Every MLflow model the
search logs for its front and every file ``kdsearch export`` writes (bar ``student.pt``, the
trial's checkpoint as logged, which takes standardised inputs) is one of these.

MLflow models are named after their trial (``trial-003``) and carry the model card: in the
``MLmodel`` metadata (``kdsearch_model_card``) and as ``model_card.json`` among its extra files.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from kdsearch.trainers.deployable import deployable  # noqa: F401  (its home is trainers: a trial ships it too)
from kdsearch.trainers.quantize import quant_info

#: the batch of the example that exporters trace: above 1, so no exporter specialises the batch axis to 1
EXAMPLE_BATCH = 2
#: the MLmodel metadata key holding the model card
CARD_KEY = "kdsearch_model_card"
#: a front row's keys that are not metrics
ROW_IDS = frozenset({"config", "architecture", "trial", "trial_id", "run_id", "status"})


def quantized(model: nn.Module) -> bool:
    """Whether ``model`` (a student or a :func:`deployable`) holds an int8 student."""
    return any(quant_info(m) is not None for m in model.modules())


def raw_example(data: Any, n: int = EXAMPLE_BATCH) -> torch.Tensor:
    """The first ``n`` raw validation inputs (repeated if the set is smaller), as float32."""
    from kdsearch.trainers.data import batches

    _, x, _ = next(batches(data.raw_validation(), n, num_workers=0))
    x = x.float()
    while len(x) < n:
        x = torch.cat([x, x])[:n]
    return x


def mlflow_flavour(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, str]:
    """Float models go in as they are (MLflow ``torch.export``\\s them, batch axis dynamic when
    ``example`` has more than one row); int8 ones (which neither export nor pickle) as TorchScript
    traces, which MLflow stores with ``torch.jit.save`` (``serialization_format="pickle"``;
    loading needs ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true``). Traces take any batch size."""
    if not quantized(model):
        return model, "pt2"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(model, example, check_trace=False), "pickle"


def row_metrics(row: Mapping[str, Any]) -> dict[str, Any]:
    """A front row's figures (objectives, size, MACs, timings), without ids and config."""
    return {k: v for k, v in row.items() if k not in ROW_IDS and not isinstance(v, (dict, list))}


def card(data: Any, row: Mapping[str, Any], search: Optional[Mapping[str, Any]] = None,
         data_config: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """What a deployable model takes and gives, what preprocessing it applies, how well it did
    and which trial it came from (the part of a model card that needs no export)."""
    shape = list(data.input_shape)
    preprocessing = {
        **data.preprocessing(),
        "in_model": True,
        "note": ("feed raw inputs as data.source gives them (float32, channels first); the model applies the "
                 "preprocessing itself. student.pt (the trial's checkpoint) does not: it takes preprocessed inputs"),
    }
    return {
        "format": "kdsearch-model-card",
        "version": 2,
        "trial": row.get("trial"),
        "trial_id": row.get("trial_id"),
        "run_id": row.get("run_id"),
        "search": dict(search or {}),
        "input_shape": shape,
        "num_classes": data.num_classes,
        "io": {"input": {"name": "input", "dtype": "float32", "shape": ["batch", *shape], "batch": "any",
                         "takes": preprocessing["inputs"]},
               "output": {"name": "logits", "dtype": "float32", "shape": ["batch", data.num_classes]}},
        "preprocessing": preprocessing,
        "metrics": row_metrics(row),
        "data": {**dict(data_config or {"source": data.name}), "input_shape": shape, "num_classes": data.num_classes,
                 "fingerprint": getattr(data, "fingerprint", None)},
    }


def plain(value: Any) -> Any:
    """``value`` as JSON/YAML-safe plain data (numbers, strings, lists, dicts)."""
    return json.loads(json.dumps(value, default=str))


def describe(card_: Mapping[str, Any]) -> str:
    """A registered model version's description: one readable paragraph, then the card as JSON."""
    metrics = card_.get("metrics", {})
    figures = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("val_acc", "latency_ms", "params", "size_bytes")
                        if isinstance(metrics.get(k), (int, float)))
    io_ = card_.get("io", {}).get("input", {})
    pre = card_.get("preprocessing", {})
    search = card_.get("search", {})
    text = (f"kdsearch student {card_.get('trial')} (run {card_.get('run_id')}) of search "
            f"{search.get('run_name') or search.get('run_id') or '?'}: {figures}. "
            f"Input: {io_.get('dtype', 'float32')} {io_.get('shape')}, raw inputs as data.source gives them "
            f"(the model applies {pre.get('formula')} with scale {pre.get('scale')}, mean {pre.get('mean')}, "
            f"std {pre.get('std')}); output: logits over {card_.get('num_classes')} classes.")
    return f"{text}\n\n```json\n{json.dumps(plain(card_), indent=2)}\n```\n"


def log_model(run_id: str, student: nn.Module, data: Any, card_: Mapping[str, Any], name: str) -> str:
    """Log :func:`deployable` of ``student`` as an MLflow model named ``name`` in run ``run_id``
    (signature with a dynamic batch, a raw input example, the card); return its ``models:/`` URI."""
    import mlflow
    from mlflow.models import infer_signature

    model = deployable(student, data)
    example = raw_example(data)
    with torch.no_grad():
        output = model(example).numpy()
    logged, serialization = mlflow_flavour(model, example)
    requirements = [f"torch=={torch.__version__.split('+')[0]}"]
    content = plain(card_)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id), warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model_card.json"
        path.write_text(json.dumps(content, indent=2))
        info = mlflow.pytorch.log_model(logged, name=name, input_example=example.numpy(),
                                        serialization_format=serialization,
                                        signature=infer_signature(example.numpy(), output),
                                        pip_requirements=requirements, metadata={CARD_KEY: content},
                                        extra_files=[str(path)], tags={"kdsearch.trial": str(name)})
    return info.model_uri
