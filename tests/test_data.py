"""Data sources: each loader on small files written here, their splits, standardisation and errors."""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from kdsearch.spaces import DataConfig, SpaceError
from kdsearch.trainers import data
from kdsearch.trainers.data import DataBundle, ImageFolderData, TensorData, batches, load_data

# --------------------------------------------------------------------------- helpers


def space_error(config: DataConfig, field: str) -> SpaceError:
    """The SpaceError ``load_data(config)`` raises, checked to name ``field`` in one line."""
    with pytest.raises(SpaceError) as info:
        load_data(config)
    assert info.value.path == field
    assert "\n" not in str(info.value) and "fix:" in str(info.value)
    return info.value


def assert_labels_match_colour(x: torch.Tensor, y: torch.Tensor, channel: int = 0, increasing: bool = True) -> None:
    """Each class was written as one constant colour: every sample of a class has the same value,
    constant over the image, and that value is monotonic in the class index."""
    values = x[:, channel].reshape(len(x), -1)
    assert torch.allclose(values, values[:, :1].expand_as(values), atol=1e-5), "images are not constant"
    by_class = {}
    for value, label in zip(values[:, 0].tolist(), y.tolist()):
        by_class.setdefault(label, set()).add(round(value, 4))
    assert all(len(v) == 1 for v in by_class.values()), by_class
    ordered = [next(iter(by_class[k])) for k in sorted(by_class)]
    assert ordered == sorted(ordered, reverse=not increasing) and len(set(ordered)) == len(ordered)


def assert_standardised(ds: TensorData) -> None:
    dims = [0] + list(range(2, ds.x.ndim))
    assert torch.allclose(ds.x.mean(dim=dims), torch.zeros(ds.x.shape[1]), atol=1e-4)


def all_batches(ds, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    parts = list(batches(ds, 5, **kwargs))
    return tuple(torch.cat([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]


# --------------------------------------------------------------------------- digits and registry


def test_digits() -> None:
    bundle = load_data(DataConfig())
    assert len(bundle.train) + len(bundle.val) == 1797
    assert bundle.num_classes == 10 and bundle.input_shape == (1, 8, 8)
    assert_standardised(bundle.train)


def test_registry_and_unknown_source() -> None:
    assert {"digits", "npz", "cifar10", "image_folder"} <= set(data.source_names())
    space_error(DataConfig(source="nope"), "data.source")


# --------------------------------------------------------------------------- npz


def write_npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def colour_images(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 images whose every pixel is ``30 * label + 20``."""
    return np.broadcast_to((30 * labels + 20).astype(np.uint8).reshape(-1, *[1] * len(shape)), (len(labels), *shape)).copy()


def test_npz_nhwc_uint8_with_val(tmp_path: Path) -> None:
    y, y_val = np.arange(40) % 4, np.arange(12) % 4
    path = write_npz(tmp_path / "d.npz", x_train=colour_images(y, (6, 6, 3)), y_train=y,
                     x_val=colour_images(y_val, (6, 6, 3)), y_val=y_val)
    bundle = load_data(DataConfig(source="npz", path=path))
    assert bundle.input_shape == (3, 6, 6) and bundle.num_classes == 4
    assert (len(bundle.train), len(bundle.val)) == (40, 12)
    assert_standardised(bundle.train)
    assert torch.equal(bundle.val.y, torch.as_tensor(y_val))
    for ds in (bundle.train, bundle.val):
        assert_labels_match_colour(ds.x, ds.y)


@pytest.mark.parametrize("layout", ["nhwc uint8", "nchw float32", "grey uint8"])
def test_npz_read_through_a_memory_map_equals_the_arrays_in_memory(tmp_path: Path, layout: str) -> None:
    """An uncompressed npz is mapped, not read whole (the loader's peak is the float arrays it builds):
    the bundle is bitwise the one built from the same arrays in memory, with or without x_val, owns
    its memory (nothing still maps the file), and a compressed npz (read whole) gives the same."""
    y, y_val = np.arange(48) % 4, np.arange(12) % 4
    shape = {"nhwc uint8": (6, 6, 3), "nchw float32": (3, 6, 6), "grey uint8": (6, 6)}[layout]
    x, x_val = colour_images(y, shape), colour_images(y_val, shape)
    if "float" in layout:
        x, x_val = x.astype(np.float32) / 255, x_val.astype(np.float32) / 255
    config = DataConfig(source="npz", path="unused")
    for arrays in ({"x_train": x, "y_train": y}, {"x_train": x, "y_train": y, "x_val": x_val, "y_val": y_val}):
        keys = ("x_train", "y_train", "x_val", "y_val")
        val = (arrays["x_val"], arrays["y_val"]) if "x_val" in arrays else None
        expected = data._arrays_bundle((x, y), val, config, "npz", keys)
        stored = write_npz(tmp_path / "stored.npz", **arrays)
        compressed = tmp_path / "compressed.npz"
        np.savez_compressed(compressed, **arrays)
        headers = data.npz_headers(Path(stored))
        assert data._map_npz_member(Path(stored), headers["x_train"]) is not None  # the mapped path is the one taken
        assert data._map_npz_member(compressed, data.npz_headers(compressed)["x_train"]) is None
        for path in (stored, compressed):
            bundle = load_data(DataConfig(source="npz", path=str(path)))
            assert bundle.fingerprint == expected.fingerprint
            for got, want in ((bundle.train, expected.train), (bundle.val, expected.val), (bundle.raw_val, expected.raw_val)):
                assert torch.equal(got.x, want.x) and torch.equal(got.y, want.y)
                assert data._mapping_of(got.x.numpy()) is None and got.x.numpy().flags.writeable


def _peak_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_rows_of_a_mapped_npz_are_gathered_in_file_order_without_mapping_the_file(tmp_path: Path, monkeypatch) -> None:
    """A random subset of a mapped file's rows (the validation split) equals fancy indexing, chunk
    boundaries and repeated rows included, and costs about its own size, not the file's: the
    kernel maps files in large folios, so rows taken in request order would map nearly all of it."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12_000, 64, 64), dtype=np.uint8)  # 47 MB
    path = Path(write_npz(tmp_path / "big.npz", x_train=x, y_train=np.zeros(len(x), np.int64)))
    mapped = data._map_npz_member(path, data.npz_headers(path)["x_train"])
    assert data._mapping_of(mapped) is not None
    index = np.concatenate([rng.permutation(len(x))[:2_400], [5, 5, 11_999]])
    with monkeypatch.context() as patch:
        patch.setattr(data, "CONVERT_CHUNK_BYTES", 3 * 64 * 64 * 4)  # 3 rows a chunk: many boundaries
        assert np.array_equal(data._take_rows(mapped[:40], index[index < 40]), x[index[index < 40]])
    data._drop_pages(data._mapping_of(mapped))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _peak_mb()
    taken = data._take_rows(mapped, index)
    floats, broken = data._float_rows(mapped, index, 255.0)
    grown = _peak_mb() - before
    own = (taken.nbytes + floats.nbytes) / 2**20
    assert grown < own + 16, f"peak grew {grown:.0f} MB for {own:.0f} MB of rows from a {x.nbytes / 2**20:.0f} MB file"
    assert np.array_equal(taken, x[index]) and broken == 0
    assert np.array_equal(floats, x[index] / np.float32(255))


def test_npz_layouts(tmp_path: Path) -> None:
    y = np.arange(20) % 2
    grey = load_data(DataConfig(source="npz", path=write_npz(tmp_path / "g.npz", x_train=colour_images(y, (5, 7)), y_train=y)))
    assert grey.input_shape == (1, 5, 7)
    nchw = colour_images(y, (3, 5, 7)).astype(np.float32) / 255
    chw = load_data(DataConfig(source="npz", path=write_npz(tmp_path / "c.npz", x_train=nchw, y_train=y.reshape(-1, 1))))
    assert chw.input_shape == (3, 5, 7)
    assert_labels_match_colour(chw.train.x, chw.train.y)
    feats = load_data(DataConfig(source="npz", path=write_npz(tmp_path / "f.npz", x_train=np.random.rand(20, 9), y_train=y)))
    assert feats.input_shape == (9,) and feats.num_classes == 2
    assert_standardised(feats.train)


def test_npz_matches_digits(tmp_path: Path) -> None:
    """The same arrays through npz and through the digits source give the same content."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = write_npz(tmp_path / "digits.npz", x_train=digits.images.astype(np.float32), y_train=digits.target)
    assert load_data(DataConfig(source="npz", path=path)).fingerprint == load_data(DataConfig()).fingerprint


def test_npz_seeded_split(tmp_path: Path) -> None:
    x = np.arange(50, dtype=np.float32).reshape(50, 1) * np.ones((1, 3), np.float32)
    path = write_npz(tmp_path / "s.npz", x_train=x, y_train=np.arange(50) % 5)
    a, b = (load_data(DataConfig(source="npz", path=path, seed=1, val_fraction=0.2)) for _ in range(2))
    c = load_data(DataConfig(source="npz", path=path, seed=2, val_fraction=0.2))
    assert (len(a.train), len(a.val)) == (40, 10)
    assert torch.equal(a.train.x, b.train.x) and a.fingerprint == b.fingerprint
    assert not torch.equal(a.val.y, c.val.y) and a.fingerprint != c.fingerprint


def test_npz_errors(tmp_path: Path) -> None:
    space_error(DataConfig(source="npz"), "data.path")
    space_error(DataConfig(source="npz", path=str(tmp_path / "missing.npz")), "data.path")
    space_error(DataConfig(source="npz", path=write_npz(tmp_path / "k.npz", x=np.zeros((4, 2)), y=np.zeros(4))), "data.path")
    err = space_error(DataConfig(source="npz", path=write_npz(tmp_path / "l.npz", x_train=np.zeros((4, 2)), y_train=np.zeros(3))), "data.path")
    assert "4 rows" in err.problem
    half = write_npz(tmp_path / "h.npz", x_train=np.zeros((4, 2)), y_train=np.zeros(4), x_val=np.zeros((2, 2)))
    space_error(DataConfig(source="npz", path=half), "data.path")
    (tmp_path / "junk.npz").write_text("not a zip")
    space_error(DataConfig(source="npz", path=str(tmp_path / "junk.npz")), "data.path")


# --------------------------------------------------------------------------- cifar10


def cifar_batch(labels: np.ndarray) -> dict:
    """A python-format batch: red encodes the label, green is constant, blue decreases with it."""
    img = np.zeros((len(labels), 3, 32, 32), np.uint8)
    img[:, 0] = (20 * labels + 10)[:, None, None]
    img[:, 1] = 128
    img[:, 2] = (240 - 20 * labels)[:, None, None]
    return {b"batch_label": b"fake", b"labels": labels.tolist(), b"data": img.reshape(len(labels), -1)}


def write_cifar(root: Path) -> Path:
    root.mkdir(parents=True)
    for i in range(1, 6):
        with open(root / f"data_batch_{i}", "wb") as f:
            pickle.dump(cifar_batch((np.arange(4) + 4 * i) % 10), f)
    with open(root / "test_batch", "wb") as f:
        pickle.dump(cifar_batch(np.arange(20) % 10), f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return root


def test_cifar10(tmp_path: Path) -> None:
    root = write_cifar(tmp_path / "cifar-10-batches-py")
    bundle = load_data(DataConfig(source="cifar10", path=str(root)))
    assert bundle.input_shape == (3, 32, 32) and bundle.num_classes == 10
    assert (len(bundle.train), len(bundle.val)) == (20, 20)
    assert torch.equal(bundle.val.y, torch.arange(20) % 10)
    assert_standardised(bundle.train)
    for ds in (bundle.train, bundle.val):
        assert_labels_match_colour(ds.x, ds.y, channel=0)
        assert_labels_match_colour(ds.x, ds.y, channel=2, increasing=False)
        assert torch.all(ds.x[:, 1] == 0)  # the constant channel stayed in place
    parent = load_data(DataConfig(source="cifar10", path=str(tmp_path)))
    assert parent.fingerprint == bundle.fingerprint


def test_cifar10_errors(tmp_path: Path) -> None:
    space_error(DataConfig(source="cifar10", path=str(tmp_path / "none")), "data.path")
    root = write_cifar(tmp_path / "c")
    (root / "test_batch").unlink()
    assert "test_batch" in space_error(DataConfig(source="cifar10", path=str(root)), "data.path").problem
    (root / "test_batch").write_bytes(b"garbage")
    space_error(DataConfig(source="cifar10", path=str(root)), "data.path")


# --------------------------------------------------------------------------- image folder

CLASS_COLOURS = {"cat": (40, 200, 10), "ant": (10, 100, 50), "dog": (90, 30, 250)}  # sorted: ant, cat, dog


def write_folder(root: Path, per_class: int = 6, grey: bool = False) -> Path:
    """Three classes of constant-colour PNGs, half 8x8 and half 10x6, plus a stray text file."""
    for name, colour in CLASS_COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (8, 8) if i % 2 else (10, 6)
            img = Image.new("L", size, colour[0]) if grey else Image.new("RGB", size, colour)
            img.save(root / name / f"{i:02d}.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_in_memory(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "imgs")
    bundle = load_data(DataConfig(source="image_folder", path=str(root), image_size=8, val_fraction=0.25))
    assert isinstance(bundle.train, TensorData)
    assert bundle.input_shape == (3, 8, 8) and bundle.num_classes == 3
    assert (len(bundle.train), len(bundle.val)) == (14, 4)
    assert_standardised(bundle.train)
    for ds in (bundle.train, bundle.val):  # red in class order ant < cat < dog
        assert_labels_match_colour(ds.x, ds.y, channel=0)
    grey = load_data(DataConfig(source="image_folder", path=str(write_folder(tmp_path / "g", grey=True)), image_size=8))
    assert grey.input_shape == (1, 8, 8)
    assert_labels_match_colour(grey.train.x, grey.train.y)


def test_image_folder_lazy_matches_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_folder(tmp_path / "imgs")
    config = DataConfig(source="image_folder", path=str(root), image_size=8, seed=3)
    memory = load_data(config)
    monkeypatch.setattr(data, "IN_MEMORY_MAX_IMAGES", 0)
    lazy = load_data(config)
    assert isinstance(lazy.train, ImageFolderData) and isinstance(lazy.val, ImageFolderData)
    assert (lazy.input_shape, lazy.num_classes) == (memory.input_shape, memory.num_classes)
    for mem_ds, lazy_ds in ((memory.train, lazy.train), (memory.val, lazy.val)):
        idx, x, y = all_batches(lazy_ds)  # through the DataLoader, two workers
        m_idx, m_x, m_y = all_batches(mem_ds)
        assert torch.equal(idx, m_idx) and torch.equal(y, m_y)
        assert torch.allclose(x, m_x, atol=1e-5)
        s_idx, s_x, s_y = all_batches(lazy_ds, shuffle=True, seed=1, num_workers=0)
        assert sorted(s_idx.tolist()) == list(range(len(lazy_ds)))
        assert torch.allclose(s_x, mem_ds.x[s_idx], atol=1e-5) and torch.equal(s_y, mem_ds.y[s_idx])
    assert load_data(config).fingerprint == lazy.fingerprint
    os.utime(root / "ant" / "00.png", ns=(1, 1))
    assert load_data(config).fingerprint != lazy.fingerprint


def test_image_folder_decodes_each_image_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first pass fills the decoded-image cache (from loader processes); later passes never open an image file."""
    monkeypatch.setenv("KDSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "IN_MEMORY_MAX_IMAGES", 0)
    root = write_folder(tmp_path / "imgs")
    config = DataConfig(source="image_folder", path=str(root), image_size=8, seed=3, num_workers=2)
    lazy = load_data(config)
    assert lazy.train.num_workers == 2
    first = all_batches(lazy.train)  # two loader processes write the cache
    reloaded = load_data(config)  # a new dataset object: the cache is on disk
    opened: list[str] = []
    monkeypatch.setattr(data, "read_image", lambda *args: opened.append(args[0]))
    again = all_batches(reloaded.train, num_workers=0)
    assert opened == [] and all(torch.equal(a, b) for a, b in zip(first, again))


def test_image_folder_lazy_samples_stats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_folder(tmp_path / "imgs", per_class=10)
    monkeypatch.setattr(data, "IN_MEMORY_MAX_IMAGES", 0)
    monkeypatch.setattr(data, "STATS_SAMPLE_SIZE", 6)
    bundle = load_data(DataConfig(source="image_folder", path=str(root), image_size=8))
    x, y = bundle.train[0]
    assert x.shape == (3, 8, 8) and isinstance(y, int)
    assert torch.all(bundle.train.std > 0)


def test_image_folder_errors(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "imgs")
    err = space_error(DataConfig(source="image_folder", path=str(root)), "data.image_size")
    assert "data.image_size" in err.fix
    space_error(DataConfig(source="image_folder", path=str(tmp_path / "nowhere")), "data.path")
    space_error(DataConfig(source="image_folder"), "data.path")
    (tmp_path / "empty").mkdir()
    space_error(DataConfig(source="image_folder", path=str(tmp_path / "empty")), "data.path")
    (root / "zebra").mkdir()
    assert "zebra" in space_error(DataConfig(source="image_folder", path=str(root), image_size=8), "data.path").problem
    (root / "zebra" / "bad.png").write_bytes(b"not a png")
    space_error(DataConfig(source="image_folder", path=str(root), image_size=8), "data.path")


def test_image_folder_same_size_needs_no_image_size(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for k, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (5, 7), (50 * k, 0, 0)).save(root / name / f"{i}.png")
    bundle = load_data(DataConfig(source="image_folder", path=str(root)))
    assert bundle.input_shape == (3, 7, 5) and bundle.num_classes == 2


# --------------------------------------------------------------------------- module:attr

USER_MODULE = '''
import numpy as np
import torch
from torch.utils.data import Dataset

from kdsearch.trainers.data import in_memory_bundle


class Lazy(Dataset):
    def __init__(self, n, classes):
        self.n, self.classes_ = n, classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((2, 4, 4), float(i % self.classes_)), i % self.classes_


class Tagged(Lazy):
    num_classes = 7


def arrays(n=30):
    y = np.arange(n) % 3
    x = np.repeat(y[:, None, None].astype(np.uint8) * 50, 16, axis=1).reshape(n, 4, 4)
    return (x, y), (x[:9], y[:9])


def datasets(n=12):
    return Lazy(n, 4), Lazy(6, 4)


def tagged():
    return Tagged(5, 2), Tagged(5, 2)


def tensors():
    x = torch.randn(10, 6)
    return (x, torch.arange(10) % 5), (x[:4], torch.arange(4))


def bundle(config_seed=0):
    from kdsearch.spaces import DataConfig
    y = np.arange(20) % 2
    return in_memory_bundle(np.random.rand(20, 3), y, DataConfig(seed=config_seed), "mine")


def bad():
    return 42
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A small data module on sys.path, dropped from sys.modules before and after each test."""
    name = "kd_user_data"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    importlib.invalidate_caches()
    yield name
    sys.modules.pop(name, None)


def test_user_arrays(user_module: str) -> None:
    bundle = load_data(DataConfig(source=f"{user_module}:arrays", options={"n": 24}))
    assert bundle.input_shape == (1, 4, 4) and bundle.num_classes == 3
    assert (len(bundle.train), len(bundle.val)) == (24, 9)
    assert_standardised(bundle.train)
    assert_labels_match_colour(bundle.train.x, bundle.train.y)
    assert bundle.fingerprint != load_data(DataConfig(source=f"{user_module}:arrays")).fingerprint


def test_user_datasets(user_module: str) -> None:
    config = DataConfig(source=f"{user_module}:datasets", options={"n": 10})
    bundle = load_data(config)
    assert bundle.input_shape == (2, 4, 4) and bundle.num_classes == 4
    assert load_data(config).fingerprint == bundle.fingerprint
    assert load_data(DataConfig(source=f"{user_module}:datasets")).fingerprint != bundle.fingerprint
    idx, x, y = all_batches(bundle.train, num_workers=0)
    assert torch.equal(idx, torch.arange(10)) and torch.equal(y, torch.arange(10) % 4)
    assert torch.equal(x[:, 0, 0, 0], (torch.arange(10) % 4).float())
    assert load_data(DataConfig(source=f"{user_module}:tagged")).num_classes == 7


def test_user_tensors_and_bundle(user_module: str) -> None:
    tensors = load_data(DataConfig(source=f"{user_module}:tensors"))
    assert tensors.input_shape == (6,) and tensors.num_classes == 5
    mine = load_data(DataConfig(source=f"{user_module}:bundle"))
    assert isinstance(mine, DataBundle) and mine.name == "mine" and mine.num_classes == 2


def test_user_errors(user_module: str) -> None:
    space_error(DataConfig(source=f"{user_module}:bad"), "data.source")
    space_error(DataConfig(source=f"{user_module}:missing"), "data.source")
    space_error(DataConfig(source=f"{user_module}:arrays", options={"size": 3}), "data.options")


# --------------------------------------------------------------------------- recorded preprocessing


def assert_preprocessing_is_recorded(bundle: DataBundle, raw_values: torch.Tensor | None = None) -> None:
    """``bundle.standardize()`` of the raw validation inputs is (bitwise) what the models see, and
    the raw inputs are ``raw_values`` (the source's own values, as float32) when given."""
    _, raw, y = all_batches(bundle.raw_validation(), num_workers=0)
    _, seen, seen_y = all_batches(bundle.val, num_workers=0)
    assert torch.equal(y, seen_y)
    with torch.no_grad():
        assert torch.equal(bundle.standardize()(raw), seen)
    if raw_values is not None:
        assert torch.equal(raw, raw_values.float())
    if bundle.mean is not None:
        assert bundle.mean.shape == bundle.std.shape
        assert bundle.mean.dim() == len(bundle.input_shape) and bundle.mean.shape[0] == bundle.input_shape[0]
        assert torch.broadcast_shapes(bundle.mean.shape, bundle.input_shape) == bundle.input_shape
    card = bundle.preprocessing()
    assert card["inputs"] == data.RAW_INPUTS and card["scale"] == bundle.scale


def test_every_source_records_its_preprocessing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_module: str) -> None:
    from sklearn.datasets import load_digits

    config = DataConfig()
    digits = load_data(config)
    _, val_idx = data.split_indices(1797, config.val_fraction, config.seed)
    assert digits.scale == 1.0 and digits.mean.shape == (1, 1, 1)
    assert_preprocessing_is_recorded(digits, torch.as_tensor(load_digits().images[val_idx.numpy()])[:, None])

    y, y_val = np.arange(40) % 4, np.arange(12) % 4
    x_val = colour_images(y_val, (6, 6, 3))
    path = write_npz(tmp_path / "d.npz", x_train=colour_images(y, (6, 6, 3)), y_train=y, x_val=x_val, y_val=y_val)
    npz = load_data(DataConfig(source="npz", path=path))
    assert npz.scale == 255.0 and npz.mean.shape == (3, 1, 1)  # uint8 pixels as stored, channels first
    assert_preprocessing_is_recorded(npz, torch.as_tensor(x_val).permute(0, 3, 1, 2))
    feats = load_data(DataConfig(source="npz", path=write_npz(tmp_path / "f.npz", x_train=np.random.rand(20, 9), y_train=y[:20])))
    assert feats.scale == 1.0 and feats.mean.shape == (9,) and feats.preprocessing()["per"] == "feature"
    assert_preprocessing_is_recorded(feats)

    root = write_cifar(tmp_path / "cifar-10-batches-py")
    cifar = load_data(DataConfig(source="cifar10", path=str(root)))
    test_batch = cifar_batch(np.arange(20) % 10)[b"data"].reshape(-1, 3, 32, 32)
    assert cifar.scale == 255.0
    assert_preprocessing_is_recorded(cifar, torch.as_tensor(test_batch))

    folder = DataConfig(source="image_folder", path=str(write_folder(tmp_path / "imgs")), image_size=8, seed=3)
    memory = load_data(folder)
    assert memory.scale == 255.0
    assert_preprocessing_is_recorded(memory)
    _, raw, _ = all_batches(memory.raw_validation())
    assert torch.equal(raw, raw.round()) and raw.max() > 1  # pixel values 0..255
    monkeypatch.setattr(data, "IN_MEMORY_MAX_IMAGES", 0)
    lazy = load_data(folder)
    assert isinstance(lazy.raw_validation(), ImageFolderData) and lazy.scale == 255.0
    assert_preprocessing_is_recorded(lazy, raw)

    arrays = load_data(DataConfig(source=f"{user_module}:arrays"))
    assert arrays.scale == 255.0
    assert_preprocessing_is_recorded(arrays)
    tensors = load_data(DataConfig(source=f"{user_module}:tensors"))  # tensor pairs: standardised like arrays
    assert tensors.scale == 1.0 and tensors.mean.shape == (6,)
    assert_preprocessing_is_recorded(tensors)
    datasets = load_data(DataConfig(source=f"{user_module}:datasets"))  # used as given: nothing to undo
    assert not datasets.preprocessed and datasets.mean is None and datasets.raw_validation() is datasets.val
    assert datasets.preprocessing()["mean"] is None
    assert_preprocessing_is_recorded(datasets)


def test_digits_read_from_sklearns_file_equal_its_loader() -> None:
    """The digits source reads scikit-learn's bundled file itself (no 2 s import): the same arrays."""
    from sklearn.datasets import load_digits as sk_digits

    images, target = data.digits_arrays()
    digits = sk_digits()
    assert images.dtype == np.float32 and np.array_equal(images, digits.images.astype(np.float32))
    assert np.array_equal(target, digits.target)
