"""Data sources: one registry from a source name to a loader of a :class:`DataBundle`.

Small sets live in memory as tensors and are batched by index (no per-sample DataLoader
overhead, which dominates for 8x8 images); large ones stream through a DataLoader with
workers. Both paths yield ``(indices, x, y)`` so cached teacher outputs can be looked up
by sample index.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from spaces import DataConfig, SpaceError, import_ref


class TensorData(Dataset):
    """An in-memory dataset: float inputs ``x`` (N, *shape) and int64 labels ``y`` (N,)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


@dataclass
class DataBundle:
    """Train and validation sets plus what a model builder needs to know about them."""

    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    fingerprint: str
    name: str = ""


Loader = Callable[[DataConfig], DataBundle]
_SOURCES: dict[str, Loader] = {}


def register_source(name: str) -> Callable[[Loader], Loader]:
    """Register ``loader(config) -> DataBundle`` under ``name``."""

    def wrap(loader: Loader) -> Loader:
        _SOURCES[name] = loader
        return loader

    return wrap


def source_names() -> list[str]:
    return sorted(_SOURCES)


def load_data(config: DataConfig) -> DataBundle:
    """The bundle a space's ``data`` section declares (a registered name or ``module:attr``)."""
    if ":" in config.source:
        loader = import_ref(config.source, "data.source")
    elif config.source in _SOURCES:
        loader = _SOURCES[config.source]
    else:
        raise SpaceError("data.source", f"unknown source {config.source!r}", f"use one of {source_names()} or module:attr")
    return loader(config)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded, deterministic train/validation split of ``range(n)``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    return order[n_val:], order[:n_val]


def hash_arrays(*arrays: np.ndarray | torch.Tensor) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        a = a.numpy() if isinstance(a, torch.Tensor) else a
        digest.update(str(a.shape).encode() + str(a.dtype).encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:16]


def in_memory_bundle(x: np.ndarray, y: np.ndarray, config: DataConfig, name: str,
                     val: Optional[tuple[np.ndarray, np.ndarray]] = None) -> DataBundle:
    """Standardise per channel with training statistics and split (unless ``val`` is given)."""
    x_all = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    y_all = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    if x_all.ndim == 3:  # (N, H, W) grey images get a channel axis
        x_all = x_all.unsqueeze(1)
    if val is None:
        train_idx, val_idx = split_indices(len(y_all), config.val_fraction, config.seed)
        x_tr, y_tr, x_va, y_va = x_all[train_idx], y_all[train_idx], x_all[val_idx], y_all[val_idx]
    else:
        x_tr, y_tr = x_all, y_all
        x_va = torch.as_tensor(np.asarray(val[0]), dtype=torch.float32)
        y_va = torch.as_tensor(np.asarray(val[1]), dtype=torch.int64)
        if x_va.ndim == 3:
            x_va = x_va.unsqueeze(1)
    dims = [0] + list(range(2, x_tr.ndim)) if x_tr.ndim > 2 else [0]
    mean = x_tr.mean(dim=dims, keepdim=True)
    std = x_tr.std(dim=dims, keepdim=True).clamp_min(1e-6)
    x_tr, x_va = (x_tr - mean) / std, (x_va - mean) / std
    num_classes = int(max(y_tr.max(), y_va.max()).item()) + 1
    return DataBundle(
        TensorData(x_tr.contiguous(), y_tr), TensorData(x_va.contiguous(), y_va), num_classes,
        tuple(x_tr.shape[1:]), hash_arrays(x_tr, y_tr, x_va, y_va), name,
    )


@register_source("digits")
def load_digits(config: DataConfig) -> DataBundle:
    """scikit-learn's bundled 8x8 digits: 1797 images, 10 classes, no download."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    return in_memory_bundle(digits.images.astype(np.float32), digits.target, config, "digits")


class _Indexed(Dataset):
    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return i, x, y


def batches(dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
            num_workers: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, x, y)`` batches: index slicing in memory, a DataLoader otherwise."""
    if isinstance(dataset, TensorData):
        n = len(dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield idx, dataset.x[idx], dataset.y[idx]
        return
    loader = DataLoader(
        _Indexed(dataset), batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed), persistent_workers=False,
    )
    for idx, x, y in loader:
        yield idx, x.float(), torch.as_tensor(y, dtype=torch.int64)
