"""The deployable artifact of a student: one file, loadable with ``weights_only=True``.

The file holds tensors and plain data only (no pickled classes or code), so loading an
artifact from a shared results folder cannot run code; that is the project's security rule.
The model is rebuilt from its config by the caller (``build``), then

1. resized to its pruned shapes (integer layer attributes and tensor shapes saved here),
2. quantized again with the same quantizer and backend, uncalibrated (the int8 structure),
3. filled with the saved state_dict (int8 weights, scales and zero points included),

which reproduces the saved model's outputs exactly. The file size is the ``size_bytes``
metric: what a deployment would ship.

Layout (a ``torch.save`` dict)::

    format, version         "kdsearch-student", 1
    meta                    the caller's JSON-able dict, stored as a JSON string
    quantize, backend       quantizer name ("none" for float) and its quantized engine
    example_shape           input shape the quantized model was traced with (or None)
    structure               None for an unpruned float model; else {"attrs": ..., "shapes": ...}
                            (see trainers.compress.capture_structure)
    state_dict              the model's state_dict with each tensor replaced by a reference
                            {"tensor": (dtype, offset, shape)} into ``buffers``; a quantized
                            tensor is stored as its integer values plus scales and zero points
                            ({"qtensor": "per_tensor" | "per_channel", "int_repr": ..., ...})
    buffers                 {dtype name: one flat tensor holding all tensors of that dtype}
    state_dict_versions     the state_dict's per-module ``_metadata`` (versions), as plain dicts

``torch.save`` writes a zip record (header plus 64-byte alignment) per storage and a rebuild
call per tensor (a per-channel int8 weight has three storages): for the small students of
a search that fixed overhead was 30-60 % of the file and hid most of int8's saving. Packed,
the file is the weight bytes plus about 100 bytes per tensor (names, references, module
versions, pruned layer sizes) and 1-2 KB fixed, so ``size_bytes`` ranks models by what
they really weigh.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kdsearch.trainers.compress import PRUNED_ATTR, apply_structure, capture_structure, is_pruned
from kdsearch.trainers.quantize import QuantInfo, get_quantizer, quant_info, quiet

__all__ = ["FORMAT", "VERSION", "load_student", "read_artifact", "save_student"]

FORMAT = "kdsearch-student"
VERSION = 1
_QTENSOR = "qtensor"
_REF = "tensor"


# --------------------------------------------------------------------------- encoding


def _encode(value: Any) -> Any:
    """Quantized tensors (anywhere in tuples/lists) as plain tensors and numbers."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if not value.is_quantized:
            return value
        if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            return {_QTENSOR: "per_tensor", "int_repr": value.int_repr(),
                    "scale": float(value.q_scale()), "zero_point": int(value.q_zero_point())}
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            return {_QTENSOR: "per_channel", "int_repr": value.int_repr(),
                    "scales": value.q_per_channel_scales(), "zero_points": value.q_per_channel_zero_points(),
                    "axis": int(value.q_per_channel_axis())}
        raise ValueError(f"cannot save a quantized tensor with qscheme {value.qscheme()}")
    if isinstance(value, (tuple, list)):
        return type(value)(_encode(v) for v in value)
    return value


def _decode(value: Any) -> Any:
    """The inverse of :func:`_encode`."""
    if isinstance(value, dict) and _QTENSOR in value:
        if value[_QTENSOR] == "per_tensor":
            return torch._make_per_tensor_quantized_tensor(value["int_repr"], value["scale"], value["zero_point"])
        return torch._make_per_channel_quantized_tensor(value["int_repr"], value["scales"], value["zero_points"],
                                                        value["axis"])
    if isinstance(value, (tuple, list)):
        return type(value)(_decode(v) for v in value)
    return value


def _tensors(value: Any, out: list[torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, dict):
        for v in value.values():
            _tensors(v, out)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _tensors(v, out)


def _replace(value: Any, refs: dict[int, dict[str, Any]]) -> Any:
    if isinstance(value, torch.Tensor):
        return refs[id(value)]
    if isinstance(value, dict):
        return {k: _replace(v, refs) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_replace(v, refs) for v in value)
    return value


def _pack(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``state`` (encoded) with every tensor replaced by a reference into one flat buffer per
    dtype: ``({name: ..{_REF: (dtype, offset, shape)}..}, {dtype: buffer})``.

    A reference pickles to a few dozen bytes where a tensor takes a zip record and a rebuild
    call of a few hundred; and a view of a larger tensor can no longer drag its whole base
    storage into the file.
    """
    found: list[torch.Tensor] = []
    _tensors(state, found)
    tensors = list({id(t): t for t in found}.values())  # tied weights once
    refs: dict[int, dict[str, Any]] = {}
    buffers: dict[str, torch.Tensor] = {}
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        key = str(dtype).removeprefix("torch.")
        group = [t for t in tensors if t.dtype == dtype]
        buffers[key] = torch.cat([t.reshape(-1) for t in group])
        offset = 0
        for t in group:
            refs[id(t)] = {_REF: (key, offset, tuple(t.shape))}
            offset += t.numel()
    return {k: _replace(v, refs) for k, v in state.items()}, buffers


def _unpack(value: Any, buffers: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_pack` for one entry: references become views of the buffers."""
    if isinstance(value, dict) and _REF in value:
        key, offset, shape = value[_REF]
        return buffers[key][offset:offset + math.prod(shape)].view(shape)
    if isinstance(value, dict):
        return {k: _unpack(v, buffers) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_unpack(v, buffers) for v in value)
    return value


# --------------------------------------------------------------------------- save / load


def save_student(model: nn.Module, path: str | Path, meta: dict) -> int:
    """Write the deployable artifact of ``model`` to ``path``; return its size in bytes.

    ``model`` is a float student (pruned or not, see ``kdsearch.trainers.compress.prune_student``) or
    one returned by a ``kdsearch.trainers.quantize`` quantizer. ``meta`` must be JSON-able (the
    family config, input shape, classes, ...): it is what the loader needs to call ``build``.
    The write is atomic (a temporary file renamed over ``path``).
    """
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"student meta must be JSON-able: {exc}") from None
    info = quant_info(model)
    state_dict = model.state_dict()
    if info is not None:
        structure = info.structure
    elif is_pruned(model):
        structure = capture_structure(model, shapes=False)  # the shapes are those of state_dict
    else:
        structure = None
    packed, buffers = _pack({k: _encode(v) for k, v in state_dict.items()})
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "meta": meta_json,
        "quantize": info.name if info else "none",
        "backend": info.backend if info else None,
        "example_shape": info.example_shape if info else None,
        "structure": structure,
        "state_dict": packed,
        "buffers": buffers,
        "state_dict_versions": {k: dict(v) for k, v in getattr(state_dict, "_metadata", {}).items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def read_artifact(path: str | Path) -> dict[str, Any]:
    """The payload of an artifact, loaded with ``weights_only=True``: ``meta`` decoded from
    JSON, ``state_dict`` ready for ``load_state_dict`` (quantized tensors rebuilt)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a kdsearch student artifact")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: artifact version {payload.get('version')} is not supported (expected {VERSION})")
    with quiet():
        buffers = payload["buffers"]
        state_dict = OrderedDict((k, _decode(_unpack(v, buffers))) for k, v in payload["state_dict"].items())
    state_dict._metadata = OrderedDict(payload.get("state_dict_versions", {}))  # type: ignore[attr-defined]
    return {**payload, "meta": json.loads(payload["meta"]), "state_dict": state_dict}


def load_student(path: str | Path, build: Callable[[], nn.Module]) -> tuple[nn.Module, dict]:
    """Load an artifact written by :func:`save_student`: ``(model in eval mode, meta)``.

    ``build()`` must return the *unpruned float* student built from the same config (e.g.
    ``lambda: space.build_student(config, input_shape, num_classes)``). Its layers are
    resized to the saved pruned shapes and, for a quantized artifact, it is quantized again
    with the saved quantizer and backend before the saved weights are loaded (strictly), so
    the outputs equal the saved model's. Quantized students load on the CPU only.
    """
    payload = read_artifact(path)
    state_dict = payload["state_dict"]
    model = build()
    structure = payload["structure"]
    if structure is not None:
        shapes = structure.get("shapes") or {k: list(v.shape) for k, v in state_dict.items()
                                             if isinstance(v, torch.Tensor)}
        apply_structure(model, structure, shapes)
    model.eval()
    if payload["quantize"] != "none":
        info = QuantInfo(payload["quantize"], payload["backend"], list(payload["example_shape"]), structure)
        model = get_quantizer(info.name, backend=info.backend).rebuild(model, info)
    with quiet():
        model.load_state_dict(state_dict)
    if structure is not None and payload["quantize"] == "none":
        setattr(model, PRUNED_ATTR, True)
    return model.eval(), payload["meta"]
