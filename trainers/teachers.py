"""Teachers and their cached outputs.

A built-in teacher is trained on first use and cached on disk under a content hash of the
data, its architecture, its training settings and the seed, so later runs (and every trial
of a search) reuse it. A teacher may also come from a torch.export (``.pt2``) or TorchScript
file, or from a ``module:attr`` builder plus a state_dict loaded with ``weights_only=True``.

Teacher outputs on the un-augmented training set are computed once into a memory-mapped,
content-hashed store (:func:`compute_targets`), opened as :class:`TeacherTargets`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

import torch
from torch import nn

from kdsearch.spaces import SpaceError, TeacherConfig, TrainConfig, get_family, import_ref
from kdsearch.trainers.data import DataBundle, batches
from kdsearch.trainers.device import (gradient_scaler, place_data, setup_device, to_channels_last, to_contiguous,
                                      to_device)
from kdsearch.trainers.losses import Outputs
from kdsearch.trainers.loop import cosine_lr, make_optimizer, steps_per_epoch, train_epoch
from kdsearch.trainers.measure import accuracy, count_macs, count_params, measure_latency

log = logging.getLogger("kdsearch")

#: stage outputs over this many bytes (fp16, on disk) are not stored; hints recompute them per batch instead
FEATURE_STORE_LIMIT = 16 << 30
#: bumped when the targets store's layout changes, so old stores are not reused
TARGETS_VERSION = 1
#: activation memory a teacher pass may take: its batch is sized from the teacher's stage outputs to fit
TEACHER_PASS_BYTES = 256 << 20


def cache_dir() -> Path:
    """Where teachers are cached: ``$KDSEARCH_CACHE_DIR`` or ``~/.cache/kdsearch``."""
    return Path(os.environ.get("KDSEARCH_CACHE_DIR", Path.home() / ".cache" / "kdsearch"))


def teacher_key(config: TeacherConfig, data: DataBundle) -> str:
    """Content hash naming a built-in teacher: same data, architecture, settings, seed -> same file."""
    payload = json.dumps({"data": data.fingerprint, "teacher": config.model_dump(exclude={"device"}), "torch": torch.__version__.split("+")[0]},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def train_builtin_teacher(config: TeacherConfig, data: DataBundle, device: str = "cpu") -> nn.Module:
    """Cross-entropy training of the built-in teacher family, on ``teacher.augment``'s views when asked:
    a teacher that has not memorised the training images gives informative soft targets on them."""
    from kdsearch.trainers.augment import Augment

    family = get_family(config.family or "")
    torch.manual_seed(config.seed)
    model = family.build(family.config.model_validate(config.config), data.input_shape, data.num_classes).to(device)
    train = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, optimizer="adamw")
    setup_device(device)
    placed = place_data(data, device)  # on a GPU, the data moves there once when it fits
    to_channels_last(model)
    scaler = gradient_scaler(device, train.precision)
    optimizer = make_optimizer(model.parameters(), train)
    scheduler = cosine_lr(optimizer, train.epochs * steps_per_epoch(data.train, train.batch_size))
    augment = Augment(config.augment, data.input_shape, data.fill_value())
    generator = torch.Generator().manual_seed(config.seed)

    def step_loss(idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not augment.active:
            return nn.functional.cross_entropy(model(x), y)
        seen = augment.apply(x, augment.sample(len(x), generator), labels=y)
        return nn.functional.cross_entropy(model(seen.x), seen.targets(y, data.num_classes))

    from kdsearch.trainers.progress import progress

    from kdsearch.trainers.store import release_memory

    with progress(train.epochs * len(data.train), f"training the {config.family} teacher") as advance:
        for epoch in range(train.epochs):
            train_epoch(model, placed.train, train.batch_size, config.seed, optimizer,
                        scheduler, step_loss, epoch, device, on_step=advance, precision=train.precision, scaler=scaler)
    del optimizer, scheduler, placed
    release_memory()
    return to_contiguous(model.cpu()).eval()


def teacher_field(index: int, count: int) -> str:
    """The space-file field of teacher ``index`` of ``count``: ``teacher`` alone, else ``teachers[i]``."""
    return "teacher" if count == 1 else f"teachers[{index}]"


def load_teacher(config: TeacherConfig, data: DataBundle, field: str = "teacher", device: str = "cpu") -> nn.Module:
    """The teacher a space declares, in eval mode; a built-in one is trained once and cached.

    Every file goes through the safe readers below (:func:`read_exported`, :func:`read_torchscript`,
    :func:`read_state_dict`): a damaged or unsafe file is one :class:`SpaceError` naming ``field``.
    """
    if config.family:
        family = get_family(config.family)
        path = cache_dir() / "teachers" / f"{config.family}-{teacher_key(config, data)}.pt"
        model = family.build(family.config.model_validate(config.config), data.input_shape, data.num_classes)
        if path.is_file():
            model.load_state_dict(read_state_dict(path, f"{field}.family", f"delete {path} to train the teacher again"))
            return model.eval()
        log.info("training the %s teacher (%d epochs); cached at %s for later runs", config.family, config.epochs, path)
        model = train_builtin_teacher(config, data, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)  # atomic: concurrent trials never read half a file
        return model
    if config.path:
        return read_teacher_file(Path(config.path), f"{field}.path")
    return build_teacher_module(config, field)


def read_teacher_file(path: Path, field: str) -> nn.Module:
    """A ``teacher.path`` file: ``.pt2`` is a torch.export program, anything else TorchScript."""
    if not path.is_file():
        raise SpaceError(field, f"no file at {path}", "give the path of a .pt2 or TorchScript teacher")
    return read_exported(path, field) if path.suffix == ".pt2" else read_torchscript(path, field)


def build_teacher_module(config: TeacherConfig, field: str = "teacher") -> nn.Module:
    """``teacher.module`` called with no arguments, then ``teacher.state_dict`` loaded into it."""
    builder = import_ref(config.module or "", f"{field}.module")
    try:
        model = builder()
    except Exception as exc:  # the user's code: one line naming the ref, not its traceback
        raise SpaceError(f"{field}.module", f"{config.module}() failed ({type(exc).__name__}: {one_line(exc)})",
                         "make it build the teacher when called with no arguments") from None
    if not isinstance(model, nn.Module):
        raise SpaceError(f"{field}.module", f"{config.module}() returned a {type(model).__name__}, not a torch.nn.Module",
                         "return the teacher model")
    if config.state_dict:
        state = read_state_dict(Path(config.state_dict), f"{field}.state_dict")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:  # missing, unexpected or mis-shaped keys: torch lists them over many lines
            raise SpaceError(f"{field}.state_dict", f"{config.state_dict} does not fit {config.module}() ({one_line(exc)})",
                             "save the state_dict of this very architecture") from None
    return model.eval()


# --------------------------------------------------------------------------- safe readers


def one_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's message squeezed onto one line (torch's run over several), cut at ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _weights_only_everywhere() -> Iterator[None]:
    """Every ``torch.load`` inside is weights-only, even where the caller asked otherwise
    (``torch.export.load`` unpickles weights with ``weights_only=False``); torch's own
    "ran into an error" warning, a traceback in the log, is held back: the error is ours to report."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        export_log.setLevel(level)
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


#: in a .pt2 archive, constants unpickled as arbitrary Python objects (torch's loader runs pickle.loads on them)
_PT2_PICKLED_OBJECTS = ("data/constants/opaque_obj_", "data/constants/custom_obj_")


def read_exported(path: Path, field: str) -> nn.Module:
    """A ``torch.export.save`` program as a module, read so that it cannot run code.

    ``torch.export.load`` unpickles some payloads in full; here every ``torch.load`` it makes
    is forced weights-only, and archives holding pickled Python objects are refused before
    loading. Not a zip (garbage, truncated), not an export, refused: one line each.
    """
    fix = "export the teacher with torch.export.save(torch.export.export(model, (example,)), 'teacher.pt2')"
    names = _zip_names(path)
    if names is None:
        raise SpaceError(field, f"cannot load {path} as a torch.export program (not a zip archive: damaged, truncated "
                                "or another format)", fix)
    pickled = [n for n in names if any(marker in n for marker in _PT2_PICKLED_OBJECTS)]
    if pickled:
        raise SpaceError(field, f"{path} refused as unsafe: it holds pickled Python objects ({pickled[0]}) that loading "
                                "would run", "export a teacher whose constants are tensors only")
    try:
        with _weights_only_everywhere(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
        return program.module()
    except pickle.UnpicklingError as exc:
        raise SpaceError(field, f"{path} refused as unsafe: {_unsafe_reason(exc)}", fix) from None
    except Exception as exc:  # torch raises RuntimeError, KeyError, zipfile and JSON errors alike on bad archives
        raise SpaceError(field, f"cannot load {path} as a torch.export program ({type(exc).__name__}: {one_line(exc)})",
                         fix) from None


def read_torchscript(path: Path, field: str) -> nn.Module:
    """A ``torch.jit.save`` file as a module on the CPU, in eval mode.

    TorchScript runs its own compiled code, not Python (its unpickler builds tensors and
    TorchScript classes only). A ``torch.save`` file (a state_dict) is recognised and pointed
    at ``teacher.module`` + ``teacher.state_dict``.
    """
    fix = "save the teacher with torch.jit.save(torch.jit.script(model), path), or give a .pt2 export"
    names = _zip_names(path)
    if names is not None and not any(n.endswith("constants.pkl") for n in names) and any(n.endswith("data.pkl") for n in names):
        raise SpaceError(field, f"{path} is a torch.save file (a state_dict or pickled model), not TorchScript",
                         "give its architecture as teacher.module and the file as teacher.state_dict")
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise SpaceError(field, f"cannot load {path} as TorchScript ({type(exc).__name__}: {one_line(exc)})", fix) from None


def read_state_dict(path: Path, field: str, fix: str = "") -> dict[str, torch.Tensor]:
    """A state_dict from ``torch.save`` (read with ``weights_only=True``) or a ``.safetensors`` file.

    A pickle that names anything but tensors and plain containers (``os.system``, a model
    class) is refused as unsafe, in one line, rather than run.
    """
    fix = fix or "save the weights alone: torch.save(model.state_dict(), path) or safetensors.torch.save_file"
    if not path.is_file():
        raise SpaceError(field, f"no file at {path}", "give the path of a saved state_dict")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "received a TorchScript archive": answered below
                state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):
            raise SpaceError(field, f"{path} refused as unsafe: {_unsafe_reason(exc)}", fix) from None
        raise SpaceError(field, f"cannot read {path} as a state_dict (not a torch.save file, or damaged)", fix) from None
    except Exception as exc:  # truncated zips, TorchScript archives, safetensors header errors
        raise SpaceError(field, f"cannot read {path} as a state_dict ({type(exc).__name__}: {one_line(exc)})", fix) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpaceError(field, f"{path} holds a {type(state).__name__}, not a state_dict of tensors", fix)
    return state


def _unsafe_reason(exc: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused, e.g. ``it names posix.system, not only tensors``."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    what = found.group(1) if found else "Python objects"
    return f"it names {what}, not only tensors, and loading it in full could run code"


def _zip_names(path: Path) -> Optional[list[str]]:
    """The member names of the zip archive at ``path``; None when it is not one."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None


def teacher_outputs(teacher: nn.Module, x: torch.Tensor, with_features: bool) -> Outputs:
    if with_features and hasattr(teacher, "forward_stages"):
        logits, features = teacher.forward_stages(x)
        return Outputs(logits, list(features))
    return Outputs(teacher(x))


@dataclass
class TeacherTargets:
    """A teacher's outputs on every clean training sample, read from its :class:`~kdsearch.trainers.store.ArrayStore`:
    fp16 logits, and the stage outputs of the stages hints may ask for (None at the others).

    The tensors are memory maps; pickled (into Ray's object store) they travel as numpy arrays,
    which every worker of a node reads zero-copy.
    """

    logits: torch.Tensor
    features: list[Optional[torch.Tensor]] = field(default_factory=list)
    feature_shapes: list[torch.Size] = field(default_factory=list)
    val_acc: float = 0.0
    description: str = ""
    footprint: dict[str, float] = field(default_factory=dict)  # the teacher's params, macs, size_bytes, latency_ms
    model: Optional[nn.Module] = None  # for online teaching, stored views, and stages not stored
    key: str = ""  # the store's content hash
    passes: int = 0  # teacher forward passes spent building the store here (0: it was reused)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["logits"] = self.logits.numpy()
        state["features"] = [None if f is None else f.numpy() for f in self.features]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        from kdsearch.trainers.store import shared_tensor

        state["logits"] = shared_tensor(state["logits"])
        state["features"] = [None if f is None else shared_tensor(f) for f in state["features"]]
        self.__dict__.update(state)

    def stored(self, stages: Sequence[int]) -> bool:
        """Whether every one of teacher ``stages`` is served from the store."""
        return bool(self.features) and all(self.features[t] is not None for t in stages)

    def batch(self, idx: torch.Tensor, x: torch.Tensor, with_features: bool, stages: Sequence[int] = ()) -> Outputs:
        """The stored outputs on clean training samples ``idx``; stage outputs recomputed when ``stages`` are not stored."""
        logits = self.logits[idx].to(x.device).float()
        if not with_features:
            return Outputs(logits)
        if not self.stored(stages) and self.model is not None:
            with torch.no_grad():
                return teacher_outputs(self.model.to(x.device), x, True)
        return Outputs(logits, [None if f is None else f[idx].to(x.device).float() for f in self.features])


@torch.no_grad()
def check_outputs(teacher: nn.Module, example: torch.Tensor, num_classes: int, want_features: bool,
                  field: str = "teacher") -> Outputs:
    """One forward pass on ``example`` (a batch of one): it must run and give ``(1, num_classes)`` logits."""
    try:
        out = teacher_outputs(teacher, example, want_features)
    except Exception as exc:  # a teacher for other inputs fails inside its own layers
        raise SpaceError(field, f"running it on one input of shape {tuple(example.shape[1:])} failed "
                                f"({type(exc).__name__}: {one_line(exc)})",
                         "give a teacher that takes the data's inputs, exported with a dynamic batch size") from None
    logits = out.logits
    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else f"a {type(logits).__name__}"
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[-1] != num_classes:
        raise SpaceError(field, f"outputs shape {shape} but the data has {num_classes} classes",
                         "use a teacher trained for these classes, returning a (batch, classes) tensor")
    return out


def weights_digest(model: nn.Module) -> str:
    """A teacher's identity without running it: its type and every tensor of its state_dict."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()[:20]


def resolve_device(device: str, field: str = "teacher.device") -> str:
    """``auto`` -> cuda where this process sees one, else cpu; ``cuda`` without one is one line."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpaceError(field, f"{device} but this process sees no CUDA device", "use auto or cpu")
    return device


@torch.no_grad()
def compute_targets(teacher: nn.Module, data: DataBundle, stages: bool | Sequence[str], description: str = "",
                    field: str = "teacher", device: str = "cpu") -> TeacherTargets:
    """The teacher's outputs on the clean training set, from its store: built now (one pass) or reopened.

    ``stages``: the ``distill.hint_stages`` values hints may use (True: all stages, False: none); the
    stages they select are stored, in fp16, and only while they fit :data:`FEATURE_STORE_LIMIT`. The store
    is named by the data's fingerprint, the teacher's weights and the stages, so a later search
    with the same data and teacher runs no teacher pass at all.
    """
    from kdsearch.trainers.losses import hinted_stages
    from kdsearch.trainers.store import open_store

    example = data.train[0][0].unsqueeze(0)
    specs = ["all"] if stages is True else [] if stages is False else [s for s in stages if s != "none"]
    staged = hasattr(teacher, "forward_stages")
    probe = check_outputs(teacher, example, data.num_classes, staged, field)
    shapes = [f.shape for f in probe.features] if staged else []
    chosen = sorted({t for spec in specs for t in hinted_stages(spec, len(shapes))})
    n = len(data.train)
    per_sample = sum(torch.Size(shapes[t][1:]).numel() for t in chosen) * 2
    if per_sample * n > FEATURE_STORE_LIMIT:  # type: ignore[operator]
        log.info("teacher stage outputs (%.1f GB) over the store's limit: hints run the teacher per batch",
                 per_sample * n / 1e9)
        chosen = []
    # a few live tensors the size of the stage outputs per sample: the pass stays within TEACHER_PASS_BYTES
    activations = 4 * 4 * max(sum(torch.Size(s[1:]).numel() for s in shapes), example.numel())
    pass_batch = int(min(1024, max(16, TEACHER_PASS_BYTES // activations)))
    key = hashlib.sha256(json.dumps({"data": data.fingerprint, "teacher": weights_digest(teacher), "stages": chosen,
                                     "version": TARGETS_VERSION}).encode()).hexdigest()[:20]

    def build(writer: Any) -> None:
        from kdsearch.trainers.progress import progress

        model = teacher.to(device)
        logits = writer.open_rows("logits", (n, data.num_classes), np.float16)
        outputs = {t: writer.open_rows(f"stage{t}", (n, *shapes[t][1:]), np.float16) for t in chosen}
        with progress(n, "teacher pass") as advance:
            for _, x, _ in batches(data.train, pass_batch):
                out = teacher_outputs(model, to_device(x, device), bool(chosen))
                logits.write(out.logits.float().cpu().half())
                for t, rows in outputs.items():
                    rows.write(out.features[t].float().cpu().half())
                advance(len(x))
        for rows in (logits, *outputs.values()):
            rows.close()
        writer.meta.update({"val_acc": accuracy(model, data.val, pass_batch, device), "footprint": footprint(teacher.cpu(), example),
                            "stages": chosen, "shapes": [list(s) for s in shapes], "samples": n})

    store = open_store(cache_dir() / "targets", key, build)
    teacher.cpu()
    features: list[Optional[torch.Tensor]] = [store.tensor(f"stage{t}") if t in chosen else None for t in range(len(shapes))]
    return TeacherTargets(store.tensor("logits"), features if chosen else [], shapes, store.meta["val_acc"], description,
                          store.meta["footprint"], model=teacher, key=key, passes=n if store.built else 0)


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
