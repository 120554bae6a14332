"""Structured pruning of a student: channels and hidden units are removed, not masked.

Masking (``torch.nn.utils.prune``) zeroes weights but keeps every tensor at full size, so
the file, the MACs and the latency do not move. Here Torch-Pruning's dependency graph finds
every layer coupled to a channel (the next layer's inputs, BatchNorm, residual adds,
depthwise convolutions) and all of them are cut together, so the pruned student is a
smaller dense network: fewer parameters, fewer MACs, fewer bytes, lower latency.

Pruning is *per layer* (every prunable group loses the same fraction of its channels), so
the pruned size depends only on the architecture and the ratio, never on the weights: the
driver can predict a trial's footprint before training it (see
``kdsearch.trainers.trial.expected_footprint``).

A pruned model has layer shapes its config no longer describes. :func:`capture_structure`
and :func:`apply_structure` record and re-apply them as plain ints and lists, which is what
lets ``kdsearch.trainers.checkpoint`` reload a pruned student with ``torch.load(weights_only=True)``
(Torch-Pruning's own ``tp.state_dict`` pickles whole module ``__dict__``s and cannot be
loaded that way).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
import torch_pruning as tp
from torch import nn

from kdsearch.spaces.registry import PRUNERS

__all__ = [
    "CRITERIA",
    "apply_structure",
    "capture_structure",
    "find_classifier",
    "is_pruned",
    "prune_student",
    "recalibrate_batchnorm",
    "register_criterion",
    "ShapeOnlyImportance",
]


def register_criterion(name: str, *, needs_gradients: bool = False) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Register ``factory() -> Torch-Pruning importance`` in :data:`PRUNERS` (a ``compress.prune_criterion``).

    ``needs_gradients``: the importance reads ``.grad`` (like Taylor), so :func:`prune_student`
    runs one backward pass of ``loss_fn`` before ranking. A factory can also carry the flag
    itself (``factory.needs_gradients = True``), which is how a ``module:attr`` ref says so.
    """

    def wrap(factory: Callable[[], Any]) -> Callable[[], Any]:
        if needs_gradients:
            factory.needs_gradients = True  # type: ignore[attr-defined]
        return PRUNERS.register(name, factory)

    return wrap


@register_criterion("l1")
def _l1() -> Any:
    """Channel L1 weight magnitude."""
    return tp.importance.MagnitudeImportance(p=1)


@register_criterion("l2")
def _l2() -> Any:
    """Channel L2 weight magnitude."""
    return tp.importance.MagnitudeImportance(p=2)


@register_criterion("taylor", needs_gradients=True)
def _taylor() -> Any:
    """First-order Taylor |weight x gradient| on one KD batch."""
    return tp.importance.TaylorImportance()


class ShapeOnlyImportance(tp.importance.MagnitudeImportance):
    """Ranks channels by position, for models on the meta device (shapes, no values): L1 picks the
    groups, and per-layer pruning removes the same number of channels whatever the ranking, so
    the pruned structure is the one any criterion gives a real copy (``expected_footprint``)."""

    def __call__(self, group: Any) -> Optional[torch.Tensor]:
        scores = super().__call__(group)  # meta scores: the group's channel count, or None to skip it
        return None if scores is None else torch.arange(len(scores), 0, -1, dtype=torch.float32)


def _needs_gradients(factory: Any, importance: Any) -> bool:
    return bool(getattr(factory, "needs_gradients", False) or getattr(importance, "needs_gradients", False)
                or isinstance(importance, tp.importance.TaylorImportance))


#: the prune criteria (kept for callers of the old name-to-factory dict)
CRITERIA = PRUNERS

#: attribute set on a model by :func:`prune_student`: its layer shapes differ from its config's
PRUNED_ATTR = "kdsearch_pruned"

LossFn = Callable[[nn.Module], torch.Tensor]


def is_pruned(model: nn.Module) -> bool:
    """Whether ``model`` went through :func:`prune_student` with a ratio above 0."""
    return bool(getattr(model, PRUNED_ATTR, False))


def find_classifier(model: nn.Module) -> nn.Module:
    """The layer producing the class scores: its outputs must never be pruned.

    For a ``StagedNet`` it is the last Linear (or Conv) of ``head``; for any other model
    the last Linear in module order.
    """
    head = getattr(model, "head", None)
    scopes = [head] if isinstance(head, nn.Module) else []
    scopes.append(model)
    for scope in scopes:
        layers = [m for m in scope.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
        if scope is model:
            layers = [m for m in layers if isinstance(m, nn.Linear)] or layers
        if layers:
            return layers[-1]
    raise ValueError("the model has no Linear or Conv layer to keep as its classifier")


def _out_width(module: nn.Module) -> Optional[int]:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return None


def _clamped_ratios(model: nn.Module, ratio: float, ignored: nn.Module) -> dict[nn.Module, float]:
    """Per-layer ratios that keep at least one channel in every layer.

    Torch-Pruning keeps ``int(C * (1 - ratio))`` channels; when that is 0 it silently skips
    the layer, so a high ratio on a narrow layer would prune *less* than a lower one. With
    ``1 - 1.5 / C`` as the cap, exactly one channel is kept instead.
    """
    ratios = {}
    for module in model.modules():
        width = _out_width(module)
        if module is ignored or width is None or width < 2:
            continue
        if int(width * (1.0 - ratio)) < 1:
            ratios[module] = 1.0 - 1.5 / width
    return ratios


def prune_student(model: nn.Module, ratio: float, criterion: str | Callable[[], Any], example: torch.Tensor,
                  loss_fn: Optional[LossFn] = None) -> nn.Module:
    """Remove ``ratio`` of the channels (conv) or hidden units (MLP) of every prunable layer.

    ``model`` is pruned in place and returned (ratio 0 returns it untouched). Coupled layers
    (BatchNorm, the next layer's inputs, both sides of a residual add, depthwise convs and
    their expand convs) are cut together by Torch-Pruning's dependency graph, traced with
    ``example`` (one batch on the model's device). The classifier's outputs (the classes)
    are kept.

    ``criterion`` ranks channels, a :data:`PRUNERS` name or ``module:attr`` ref: ``l1``/``l2``
    weight magnitude, or ``taylor`` (|weight x gradient|), which (like any criterion that
    needs gradients) needs ``loss_fn(model) -> loss`` on a batch; it is called once with the
    model in eval mode and the gradients it leaves are cleared afterwards. An importance
    factory itself is taken too (:class:`ShapeOnlyImportance` for a model on the meta device).

    The parameters are new tensors afterwards: build optimisers after pruning. The model's
    train/eval mode is preserved (Torch-Pruning's tracing leaves models in eval mode).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
    factory = criterion if callable(criterion) else PRUNERS.get(criterion, "compress.prune_criterion")
    if ratio == 0.0:
        return model
    importance = factory()
    needs_gradients = _needs_gradients(factory, importance)
    if needs_gradients and loss_fn is None:
        raise ValueError(f"the {criterion} criterion needs loss_fn(model) -> loss to compute gradients")

    classifier = find_classifier(model)
    was_training = model.training
    try:
        with torch.enable_grad():
            model.eval()  # tracing must not update BatchNorm statistics (and batch-1 BN fails in train mode)
            pruner = tp.pruner.BasePruner(
                model,
                example_inputs=example,
                importance=importance,
                global_pruning=False,
                pruning_ratio=ratio,
                pruning_ratio_dict=_clamped_ratios(model, ratio, classifier) or None,
                ignored_layers=[classifier],
            )
            if needs_gradients:
                assert loss_fn is not None
                model.zero_grad(set_to_none=True)
                loss_fn(model).backward()
            pruner.step()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    setattr(model, PRUNED_ATTR, True)
    return model


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Recompute every BatchNorm's running statistics from ``batches`` (no weight changes).

    After pruning, each layer sums over fewer inputs, so the BatchNorm statistics recorded
    before are stale; on digits CNNs this alone takes accuracy to near chance. A few forward
    passes in train mode (cumulative average, no gradients) restore much of it before any
    fine-tuning (ratio 0.1: 0.62 -> 0.94; 0.25: 0.10 -> 0.73 on a 16-channel CNN). The
    model's train/eval mode is preserved; ``batches`` must be on the model's device.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the given batches
    model.train()
    try:
        for x in batches:
            model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return model


# --------------------------------------------------------------------------- pruned structure


def _int_like(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def capture_structure(model: nn.Module, *, shapes: bool = True) -> dict[str, Any]:
    """The layer sizes of ``model`` as plain data (safe for ``torch.load(weights_only=True)``).

    ``attrs``: for each module, its integer attributes (``in_channels``, ``out_features``,
    ``groups``, ``num_features``, ...); ``shapes``: every parameter's and buffer's shape. The
    shapes can be left out when the state_dict saved beside them has the same keys (a float
    model): they are read from it.
    """
    attrs: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        values = {k: v for k, v in vars(module).items() if not k.startswith("_") and _int_like(v)}
        if values:
            attrs[name] = values
    structure: dict[str, Any] = {"attrs": attrs}
    if shapes:
        structure["shapes"] = {
            name: list(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]
        }
    return structure


def apply_structure(model: nn.Module, structure: dict[str, Any],
                    shapes: Optional[dict[str, Any]] = None) -> nn.Module:
    """Resize the layers of an unpruned ``model`` (built from the same config) to ``structure``.

    Attributes are set back and every parameter/buffer whose shape differs is replaced by a
    zero tensor of the recorded shape: load the weights afterwards. ``shapes``
    overrides ``structure["shapes"]``. Raises ``ValueError`` when the structure names a
    module the model does not have (the artifact was made from another config).
    """
    shapes = dict(shapes if shapes is not None else structure.get("shapes", {}))
    attrs: dict[str, dict[str, Any]] = structure.get("attrs", {})
    modules = dict(model.named_modules())
    missing = sorted(set(attrs) - set(modules))
    if missing:
        raise ValueError(f"the pruned structure names modules the built model lacks: {missing[:5]}")
    for name, module in modules.items():
        for attr, value in attrs.get(name, {}).items():
            setattr(module, attr, value)
        prefix = f"{name}." if name else ""
        for pname, param in list(module._parameters.items()):
            shape = shapes.get(prefix + pname)
            if param is not None and shape is not None and list(param.shape) != list(shape):
                module._parameters[pname] = nn.Parameter(param.new_zeros(shape), requires_grad=param.requires_grad)
        for bname, buf in list(module._buffers.items()):
            shape = shapes.get(prefix + bname)
            if buf is not None and shape is not None and list(buf.shape) != list(shape):
                module._buffers[bname] = buf.new_zeros(shape)
    setattr(model, PRUNED_ATTR, True)
    return model
