"""Teachers and their cached outputs.

A built-in teacher is trained on first use and cached on disk under a content hash of the
data, its architecture, its training settings and the seed, so later runs (and every trial
of a search) reuse it. A teacher may also come from a torch.export (``.pt2``) or TorchScript
file, or from a ``module:attr`` builder plus a state_dict loaded with ``weights_only=True``.

Teacher outputs on the un-augmented training set are computed once into
:class:`TeacherTargets`, plain tensors that the driver can put in the Ray object store.
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
from typing import Any, Iterator, Optional

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


def teacher_field(index: int, count: int) -> str:
    """The space-file field of teacher ``index`` of ``count``: ``teacher`` alone, else ``teachers[i]``."""
    return "teacher" if count == 1 else f"teachers[{index}]"


def load_teacher(config: TeacherConfig, data: DataBundle, field: str = "teacher") -> nn.Module:
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
        model = train_builtin_teacher(config, data)
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


@torch.no_grad()
def compute_targets(teacher: nn.Module, data: DataBundle, want_features: bool, description: str = "",
                    field: str = "teacher") -> TeacherTargets:
    """Run the teacher once over the training set; check it predicts the data's classes."""
    example = data.train[0][0].unsqueeze(0)
    probe = check_outputs(teacher, example, data.num_classes, want_features, field)
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
