"""Arrays written once and memory-mapped by every reader: the teacher-output store's disk layout.

A store is a folder of ``.npy`` files under a content hash (:func:`open_store`), written by one
process (under a file lock, into a temporary folder renamed into place, so a reader never sees
half a store) and opened read-only with ``numpy`` memory maps by every trial. Nothing is
pickled into each worker: :func:`shared_tensor` wraps a map without a copy, and a pickled
:class:`TensorData` or teacher target travels as numpy arrays, which Ray's object store hands
every worker of a node zero-copy.

Where it lives, on a cluster: the store is written beside the teacher cache
(``$KDSEARCH_CACHE_DIR``) on the driver's node, and its arrays reach the workers through the
search's shared context, a numpy payload that Ray places once per node in the object store
(zero-copy in each worker). So no node needs a shared file system, and a node holds one copy
however many trials it runs. Later searches with the same data and teacher reopen the folder.

>>> import tempfile, numpy as np
>>> root = Path(tempfile.mkdtemp())
>>> def fill(writer):
...     writer.put("logits", np.ones((4, 3), np.float16))
>>> store = open_store(root, "k1", fill)
>>> store.built, store.array("logits").shape
(True, (4, 3))
>>> open_store(root, "k1", fill).built  # reopened, not built again
False
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

__all__ = ["ArrayStore", "StoreWriter", "open_store", "release_memory", "shared_tensor"]

#: rows written per chunk: the writer streams to disk, memory stays flat whatever the store's size
WRITE_CHUNK_ROWS = 4096


def shared_tensor(array: np.ndarray) -> torch.Tensor:
    """``array`` as a tensor without a copy (a read-only memory map or object-store buffer included).

    torch warns that it cannot mark the tensor read-only; nothing writes into shared inputs
    (every batch is an indexed copy), so the warning is held back here, in one place.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def release_memory() -> None:
    """Hand memory freed by a finished phase (a teacher's training) back to the OS before the next one.

    glibc keeps freed mid-sized blocks in its heap (its mmap threshold grows as large blocks are
    freed), so without this the teacher pass would stack its batches on top of training's high
    water mark. Elsewhere than glibc it does nothing.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class StoreWriter:
    """Writes the arrays of a store being built: whole (:meth:`put`) or row chunks (:meth:`open_rows`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.meta: dict[str, Any] = {}

    def put(self, name: str, array: np.ndarray | torch.Tensor) -> None:
        array = array.numpy() if isinstance(array, torch.Tensor) else array
        np.save(self.folder / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)

    def open_rows(self, name: str, shape: tuple[int, ...], dtype: Any) -> "RowWriter":
        """A file of ``shape`` filled in row order by :meth:`RowWriter.write` (plain writes: no dirty map in this process)."""
        return RowWriter(self.folder / f"{name}.npy", tuple(int(n) for n in shape), np.dtype(dtype))


class RowWriter:
    """An ``.npy`` file written front to back, chunk by chunk."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.shape, self.dtype, self.rows = path, shape, dtype, 0
        self.file = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.file, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                          "fortran_order": False, "shape": shape})

    def write(self, rows: np.ndarray | torch.Tensor) -> None:
        rows = rows.numpy() if isinstance(rows, torch.Tensor) else rows
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.path.name}: rows of shape {rows.shape[1:]}, expected {self.shape[1:]}")
        self.file.write(memoryview(rows).cast("B"))
        self.rows += len(rows)

    def close(self) -> None:
        self.file.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path.name}: {self.rows} rows written of {self.shape[0]}")

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.file.close()


class ArrayStore:
    """A finished store: its arrays memory-mapped read-only, and the metadata it was written with."""

    def __init__(self, folder: Path, built: bool = False) -> None:
        self.folder, self.built = folder, built
        self.meta: dict[str, Any] = json.loads((folder / "meta.json").read_text())

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.npy"))

    def array(self, name: str) -> np.ndarray:
        return np.load(self.folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)

    def tensor(self, name: str) -> torch.Tensor:
        return shared_tensor(self.array(name))

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.npy"))


def open_store(root: Path, key: str, build: Callable[[StoreWriter], None], meta: Optional[dict[str, Any]] = None) -> ArrayStore:
    """The store ``root/key``: opened when it exists, else built by ``build(writer)`` once.

    Concurrent callers (the trials of one search) wait on a lock and the first builds; the
    folder appears complete or not at all.
    """
    from filelock import FileLock

    folder = root / key
    if (folder / "meta.json").is_file():
        return ArrayStore(folder)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if (folder / "meta.json").is_file():
            return ArrayStore(folder)
        tmp = root / f".{key}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            writer = StoreWriter(tmp)
            build(writer)
            (tmp / "meta.json").write_text(json.dumps({**(meta or {}), **writer.meta}, sort_keys=True))
            tmp.replace(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return ArrayStore(folder, built=True)
