"""What the teachers say about each training batch: consistent teaching, online or from stored views.

Distillation gains come mostly from *consistent* teaching (Beyer et al., CVPR 2022): the
teacher sees exactly the augmented view the student sees. A trial's :class:`Teaching` gives,
for a batch of sample indices, the student's input, the teachers' outputs on that same input,
per-sample teacher weights (``distill.teacher_mix``) and the loss's targets:

- no augmentation: the clean batch and the teachers' outputs cached once per search;
- ``distill.teacher_views: online``: a fresh augmented view of the batch, and every teacher run on it;
- ``distill.teacher_views: K``: each epoch a sample is shown one of K stored views: view ``k`` of
  sample ``j`` is replayed from per-sample parameters drawn once from ``data.seed``, and the
  teachers' logits on it come from a :class:`ViewStore` computed once (K x N teacher passes) and
  kept on disk under a content hash of the data, the teachers' outputs, the augmentation and K,
  so every trial of a search and later searches reuse it. Feature hints still run the hint
  teacher on the view (stage outputs of K views are too large to keep).

``passes`` counts the teacher forward passes (samples x teachers) a trial made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from kdsearch.spaces.errors import SpaceError
from kdsearch.spaces.registry import TEACHER_MIXES
from kdsearch.spaces.schema import TrialConfig
from kdsearch.trainers.augment import NO_PARTNER, Augment, Augmented, ViewParams
from kdsearch.trainers.data import DataBundle, TensorData
from kdsearch.trainers.device import fits_on
from kdsearch.trainers.losses import Outputs, Teachers

log = logging.getLogger("kdsearch")

#: bumped when a store's layout or the view replay changes, so old stores are not reused
STORE_VERSION = 1


@dataclass
class ViewStore:
    """K stored views of every training sample: their parameters and each teacher's logits on them (memory-mapped)."""

    params: dict[str, torch.Tensor]  # field -> (K, N, ...)
    logits: torch.Tensor             # (T, K, N, C), float16
    passes: int                      # teacher passes this process spent building it (0: reopened)

    @property
    def views(self) -> int:
        return int(self.logits.shape[1])

    def rows(self, view: torch.Tensor, index: torch.Tensor) -> ViewParams:
        """The parameters of view ``view[i]`` of sample ``index[i]``."""
        return ViewParams.from_tensors({k: v[view, index] for k, v in self.params.items()})


_STORES: dict[str, ViewStore] = {}  # one map per process: trials on a reused actor share it


def store_key(data: DataBundle, teacher_keys: list[str], augment: Augment, views: int, seed: int) -> str:
    """Content hash of what a store depends on: the data, the teachers (their targets stores' keys), the augmentation, K, the seed."""
    return hashlib.sha256(json.dumps({"data": data.fingerprint, "teachers": teacher_keys, "augment": augment.config.model_dump(),
                                      "views": views, "seed": seed, "version": STORE_VERSION},
                                     sort_keys=True).encode()).hexdigest()[:20]


def view_store(data: DataBundle, teachers: list[nn.Module], teacher_keys: list[str], augment: Augment,
               views: int, seed: int, device: str = "cpu") -> ViewStore:
    """The store for these teachers, augmentation and K: from this process, from disk, or built (and saved) now."""
    from kdsearch.trainers.store import open_store
    from kdsearch.trainers.teachers import cache_dir

    key = store_key(data, teacher_keys, augment, views, seed)
    if key in _STORES:
        return ViewStore(_STORES[key].params, _STORES[key].logits, 0)
    built: list[int] = []

    def build(writer: Any) -> None:
        built.append(write_view_store(writer, data, teachers, augment, views, seed, device))

    store = open_store(cache_dir() / "views", key, build)
    params = {name[len("params."):]: store.tensor(name) for name in store.names() if name.startswith("params.")}
    _STORES[key] = ViewStore(params, store.tensor("logits"), 0)
    return ViewStore(params, _STORES[key].logits, built[0] if built else 0)


@torch.no_grad()
def write_view_store(writer: Any, data: DataBundle, teachers: list[nn.Module], augment: Augment, views: int, seed: int,
                     device: str = "cpu") -> int:
    """Draw K views' parameters for every training sample, run every teacher on each view once, write
    both; returns the teacher passes made."""
    train = data.train
    if not isinstance(train, TensorData):
        raise SpaceError("distill.teacher_views", "stored views need in-memory data", "use teacher_views: online")
    n = len(train)
    log.info("computing the teachers' outputs on %d views of %d samples (once; kept for later trials)", views, n)
    params: list[ViewParams] = []
    logits = torch.empty(len(teachers), views, n, data.num_classes, dtype=torch.float16)
    models = [t.to(device) for t in teachers]
    for view in range(views):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + view)
        params.append(augment.sample(n, generator, partners=torch.randperm(n, generator=generator)))
        for start in range(0, n, 512):
            index = torch.arange(start, min(n, start + 512))
            seen = replay(augment, train, params[-1].rows, index)
            for t, model in enumerate(models):
                logits[t, view, start:start + len(index)] = model(seen.x.to(device)).float().cpu().half()
    for teacher in teachers:
        teacher.cpu()
    for name in params[0].tensors():
        writer.put(f"params.{name}", torch.stack([p.tensors()[name] for p in params]))
    writer.put("logits", logits)
    return views * n * len(teachers)


def replay(augment: Augment, train: TensorData, params_of: Callable[[torch.Tensor], ViewParams],
           index: torch.Tensor) -> Augmented:
    """The view of training samples ``index`` whose parameters ``params_of(index)`` gives; a mixed
    sample's partner is itself replayed with ``params_of`` at the partner's index (same view)."""
    rows = params_of(index)
    if rows.partner is None:
        return augment.apply(train.x[index], rows)
    partner = torch.where(rows.partner != NO_PARTNER, rows.partner, index)
    return augment.apply(train.x[index], rows, partner_x=train.x[partner], partner_params=params_of(partner),
                         partner_labels=train.y[partner])


class Teaching:
    """One trial's teachers, augmentation and mix: :meth:`batch` gives what a training step needs."""

    def __init__(self, context: Any, config: TrialConfig, device: str, seed: int) -> None:
        self.context, self.config, self.device, self.seed = context, config, device, seed
        self.data: DataBundle = context.data
        self.targets = context.teachers  # list of TeacherTargets, one per teacher
        self.augment = Augment(config.augment, self.data.input_shape, self.data.fill_value())
        self.mix = TEACHER_MIXES.get(config.distill.teacher_mix, "distill.teacher_mix")
        self.weights = config.distill.teacher_weights
        hint = config.distill.hint_teacher
        if hint >= len(self.targets):
            raise SpaceError("distill.hint_teacher", f"{hint} but the space has {len(self.targets)} teachers",
                             f"use 0..{len(self.targets) - 1}")
        from kdsearch.trainers.losses import hinted_stages

        self.hint_stages = hinted_stages(config.distill.hint_stages, len(self.targets[hint].feature_shapes))
        self.passes = 0
        self.hint_batches = self.hint_batches_stored = 0  # batches with hints, and those served from the store
        self.generator = torch.Generator().manual_seed(seed)
        self.store: Optional[ViewStore] = None
        self.view_of: Optional[torch.Tensor] = None
        views = config.distill.teacher_views
        if self.augment.active and views != "online":
            self.store = view_store(self.data, [t.model for t in self.targets], [t.key for t in self.targets],
                                    self.augment, int(views), context.view_seed, device)
            self.passes += self.store.passes
            if fits_on(device, self.store.logits):
                # this trial's copy on the GPU: a step gathers its targets there (the map is shared on the host)
                self.store = dataclasses.replace(self.store, logits=self.store.logits.to(device))

    def start_epoch(self, epoch: int) -> None:
        """Each epoch every sample is shown one of the stored views, drawn with the trial's seed."""
        if self.store is not None:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self.view_of = torch.randint(0, self.store.views, (len(self.data.train),), generator=generator)

    def _run(self, x: torch.Tensor, which: list[int], features: int) -> list[Outputs]:
        """Teachers ``which`` on ``x`` (the one at ``features`` with its stage outputs); counts the passes."""
        from kdsearch.trainers.teachers import teacher_outputs

        out = []
        with torch.no_grad():
            for t in which:
                model = self.targets[t].model.to(x.device)
                out.append(teacher_outputs(model, x, t == features))
        self.passes += len(x) * len(which)
        return out

    def batch(self, idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              with_features: bool) -> tuple[torch.Tensor, Teachers, torch.Tensor]:
        """``(student input, teachers, loss targets)`` for the training samples ``idx`` (inputs ``x``, labels ``y``)."""
        hint = self.config.distill.hint_teacher if with_features else -1
        count = len(self.targets)
        if hint >= 0:
            self.hint_batches += 1
        if not self.augment.active:
            if hint >= 0 and self.targets[hint].stored(self.hint_stages):
                self.hint_batches_stored += 1
            elif hint >= 0:
                self.passes += len(x)  # the hint teacher recomputes its stages on this batch
            outputs = [self.targets[t].batch(idx, x, t == hint, self.hint_stages) for t in range(count)]
            targets = y
        elif self.store is None:  # online: every teacher on the student's own augmented batch
            seen = self.augment.apply(x, self.augment.sample(len(x), self.generator), labels=y)
            x, targets = seen.x, seen.targets(y, self.data.num_classes)
            outputs = self._run(x, list(range(count)), hint)
        else:
            assert self.view_of is not None, "start_epoch() first"
            view = self.view_of[idx]
            seen = replay(self.augment, self.data.train, lambda index: self.store.rows(view, index), idx)
            # the labels where the replayed view is (the data's device: on a GPU when the data was placed there)
            x, targets = seen.x.to(x.device), seen.targets(y.to(seen.x.device), self.data.num_classes).to(x.device)
            stored = self.store.logits[:, view, idx].to(x.device).float()  # (T, B, C)
            outputs = [Outputs(stored[t]) for t in range(count)]
            if hint >= 0:  # stage outputs are not stored: the hint teacher sees the view now
                outputs[hint] = self._run(x, [hint], hint)[0]
        weights = self.mix([o.logits for o in outputs], targets, self.weights)
        return x, Teachers(outputs, weights), targets
