"""Teachers and their cached outputs.

A built-in teacher is trained on first use and cached on disk under a content hash of the
data, its architecture, its training settings and the seed, so later runs (and every trial
of a search) reuse it. A teacher may also come from a torch.export (``.pt2``) or TorchScript
file, or from a ``module:attr`` builder plus a state_dict loaded with ``weights_only=True``.

Teacher outputs on the un-augmented training set are computed once into
:class:`TeacherTargets`, plain tensors that the driver can put in the Ray object store.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from kdsearch.spaces import SpaceError, TeacherConfig, TrainConfig, get_family, import_ref
from kdsearch.trainers.data import DataBundle, batches
from kdsearch.trainers.losses import Outputs
from kdsearch.trainers.loop import cosine_lr, make_optimizer, steps_per_epoch, train_epoch
from kdsearch.trainers.measure import accuracy, count_macs, count_params, measure_latency

log = logging.getLogger("kdsearch")

#: stage features above this many bytes are not cached; they are recomputed per batch instead
FEATURE_CACHE_LIMIT = 2 << 30


def cache_dir() -> Path:
    """Where teachers are cached: ``$KDSEARCH_CACHE_DIR`` or ``~/.cache/kdsearch``."""
    return Path(os.environ.get("KDSEARCH_CACHE_DIR", Path.home() / ".cache" / "kdsearch"))


def teacher_key(config: TeacherConfig, data: DataBundle) -> str:
    """Content hash naming a built-in teacher: same data, architecture, settings, seed -> same file."""
    payload = json.dumps({"data": data.fingerprint, "teacher": config.model_dump(), "torch": torch.__version__.split("+")[0]},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def train_builtin_teacher(config: TeacherConfig, data: DataBundle) -> nn.Module:
    """Cross-entropy training of the built-in teacher family, on ``teacher.augment``'s views when asked:
    a teacher that has not memorised the training images gives informative soft targets on them."""
    from kdsearch.trainers.augment import Augment

    family = get_family(config.family or "")
    torch.manual_seed(config.seed)
    model = family.build(family.config.model_validate(config.config), data.input_shape, data.num_classes)
    train = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, optimizer="adamw")
    optimizer = make_optimizer(model.parameters(), train)
    scheduler = cosine_lr(optimizer, train.epochs * steps_per_epoch(data.train, train.batch_size))
    augment = Augment(config.augment, data.input_shape, data.fill_value())
    generator = torch.Generator().manual_seed(config.seed)

    def step_loss(idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not augment.active:
            return nn.functional.cross_entropy(model(x), y)
        seen = augment.apply(x, augment.sample(len(x), generator), labels=y)
        return nn.functional.cross_entropy(model(seen.x), seen.targets(y, data.num_classes))

    for epoch in range(train.epochs):
        train_epoch(model, data.train, train.batch_size, config.seed, optimizer, scheduler, step_loss, epoch)
    return model.eval()


def load_teacher(config: TeacherConfig, data: DataBundle) -> nn.Module:
    """The teacher a space declares, in eval mode; a built-in one is trained once and cached."""
    if config.family:
        family = get_family(config.family)
        path = cache_dir() / "teachers" / f"{config.family}-{teacher_key(config, data)}.pt"
        model = family.build(family.config.model_validate(config.config), data.input_shape, data.num_classes)
        if path.is_file():
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        log.info("training the %s teacher (%d epochs); cached at %s for later runs", config.family, config.epochs, path)
        model = train_builtin_teacher(config, data)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)  # atomic: concurrent trials never read half a file
        return model
    if config.path:
        path = Path(config.path)
        if not path.is_file():
            raise SpaceError("teacher.path", f"no file at {path}", "give the path of a .pt2 or TorchScript teacher")
        if path.suffix == ".pt2":
            return torch.export.load(str(path)).module()
        return torch.jit.load(str(path), map_location="cpu").eval()
    builder = import_ref(config.module or "", "teacher.module")
    model = builder()
    if config.state_dict:
        try:
            state = torch.load(config.state_dict, weights_only=True, map_location="cpu")
        except FileNotFoundError:
            raise SpaceError("teacher.state_dict", f"no file at {config.state_dict}", "give the path of a saved state_dict") from None
        model.load_state_dict(state)
    return model.eval()


def teacher_outputs(teacher: nn.Module, x: torch.Tensor, with_features: bool) -> Outputs:
    if with_features and hasattr(teacher, "forward_stages"):
        logits, features = teacher.forward_stages(x)
        return Outputs(logits, list(features))
    return Outputs(teacher(x))


@dataclass
class TeacherTargets:
    """Teacher logits (and stage outputs, when hints may use them) for every training sample."""

    logits: torch.Tensor
    features: list[torch.Tensor] = field(default_factory=list)
    feature_shapes: list[torch.Size] = field(default_factory=list)
    val_acc: float = 0.0
    description: str = ""
    footprint: dict[str, float] = field(default_factory=dict)  # the teacher's params, macs, size_bytes, latency_ms
    model: Optional[nn.Module] = None  # for online teaching, stored views, and features too large to cache

    def batch(self, idx: torch.Tensor, x: torch.Tensor, with_features: bool) -> Outputs:
        """The cached outputs on clean training samples ``idx`` (stage outputs recomputed when not cached)."""
        if with_features and not self.features and self.model is not None:
            with torch.no_grad():
                return teacher_outputs(self.model.to(x.device), x, True)
        return Outputs(self.logits[idx].to(x.device), [f[idx].to(x.device) for f in self.features] if with_features else [])


@torch.no_grad()
def compute_targets(teacher: nn.Module, data: DataBundle, want_features: bool, description: str = "") -> TeacherTargets:
    """Run the teacher once over the training set; check it predicts the data's classes."""
    example = data.train[0][0].unsqueeze(0)
    probe = teacher_outputs(teacher, example, want_features)
    if probe.logits.ndim != 2 or probe.logits.shape[-1] != data.num_classes:
        raise SpaceError("teacher", f"outputs shape {tuple(probe.logits.shape)} but the data has {data.num_classes} classes",
                         "use a teacher trained for these classes")
    shapes = [f.shape for f in probe.features]
    if want_features and not hasattr(teacher, "forward_stages"):
        shapes = []
    per_sample = sum(torch.Size(s[1:]).numel() for s in shapes) * 4
    cache_features = want_features and per_sample * len(data.train) <= FEATURE_CACHE_LIMIT  # type: ignore[arg-type]
    logits, features = [], [[] for _ in shapes]
    for _, x, _ in batches(data.train, 512):
        out = teacher_outputs(teacher, x, cache_features)
        logits.append(out.logits.float())
        for store, f in zip(features, out.features):
            store.append(f.float())
    return TeacherTargets(
        torch.cat(logits), [torch.cat(f) for f in features] if cache_features else [], shapes,
        accuracy(teacher, data.val), description, footprint(teacher, example),
        model=teacher,
    )


def footprint(model: nn.Module, example: torch.Tensor) -> dict[str, float]:
    """Params, MACs, bytes and latency of a float model: what a student is compared against."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    try:
        macs = count_macs(model, example)
    except Exception:  # an exported or scripted teacher may not trace under the counter
        macs = 0
    return {"params": count_params(model), "macs": macs, "size_bytes": buffer.getbuffer().nbytes,
            "latency_ms": measure_latency(model, example).median_ms}
