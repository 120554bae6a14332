"""One small registry type for every extension point (in the style of timm's model registry).

A :class:`Registry` maps a name to an entry: a student family, a loss term, a quantizer, a
prune criterion or a data source. A space file selects entries by name, so a name is checked
when the space is loaded (one line naming the field and the registered names), not an hour
into a search. Besides the names registered in this process, every registry takes a
``module:attr`` reference: registering in-process does not reach Ray workers (a fresh
process that only imports kdsearch), while a reference is imported wherever it is looked up.

The built-in entries live in the modules that implement them (``builtins``) and are
imported on the first lookup, so ``import kdsearch.spaces`` stays free of ``torch.ao``, Torch-Pruning
and the trainers.

>>> from kdsearch.spaces.registry import Registry
>>> colours = Registry("colour")
>>> @colours.register("red")
... def red():
...     '''The colour of fire.'''
...     return "#f00"
>>> green = colours.register("green", lambda: "#0f0")  # the direct form
>>> colours.names(), colours.get("red")(), colours.describe("red")
(['green', 'red'], '#f00', 'The colour of fire.')
>>> colours.get("blue", "paint.colour")
Traceback (most recent call last):
...
kdsearch.spaces.registry.UnknownEntry: paint.colour: unknown colour 'blue'; fix: use one of: green, red, or a module:attr ref
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar, overload

from kdsearch.spaces.errors import SpaceError

__all__ = ["AUGMENTATIONS", "FAMILIES", "LOSSES", "PRUNERS", "QUANTIZERS", "REGISTRIES", "RUNTIMES", "SOURCES",
           "TEACHER_MIXES",
           "Registry", "UnknownEntry",
           "import_ref", "is_ref"]

T = TypeVar("T")


def is_ref(name: str) -> bool:
    """Whether ``name`` is a ``module:attr`` reference rather than a registered name."""
    return ":" in name


def import_ref(ref: str, path: str) -> Any:
    """Import ``module:attr``: the only way user code enters kdsearch."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise SpaceError(path, f"{ref!r} is not a module:attr reference", "write it as 'package.module:name'")
    refuse = "point to a function of your own package: a space file's refs run code, trusted like Python you import"
    if _standard_library(module_name):
        raise SpaceError(path, f"{ref!r} is in the Python standard library", refuse)
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SpaceError(path, f"cannot import {ref!r} ({exc})", "check the module is on PYTHONPATH and the name exists") from None
    defined_in = getattr(obj, "__module__", None)
    if isinstance(defined_in, str) and _standard_library(defined_in):  # `from os import system` in a user module
        raise SpaceError(path, f"{ref!r} is {defined_in}.{getattr(obj, '__name__', attr)} of the standard library", refuse)
    return obj


def _standard_library(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names


class UnknownEntry(SpaceError, KeyError):
    """A name no registry entry has: a :class:`SpaceError`, and a ``KeyError`` for dict-style callers."""

    __str__ = BaseException.__str__  # KeyError's would quote the message

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.problem, self.fix)


class Registry(Generic[T]):
    """Names -> entries of one ``kind``; ``builtins`` (a dotted module) is imported on first use.

    Re-registering a name replaces its entry (the last registration wins), so a user can
    override a built-in. Lookups accept ``module:attr`` references as well as names.
    """

    def __init__(self, kind: str, builtins: Optional[str] = None) -> None:
        self.kind = kind
        self.builtins = builtins
        self._entries: dict[str, T] = {}
        self._loaded = builtins is None

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, builtins={self.builtins!r})"

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # first: the builtins module registers into this registry while it imports
        try:
            importlib.import_module(self.builtins)  # type: ignore[arg-type]
        except BaseException:
            self._loaded = False
            raise

    # ---- registering ---------------------------------------------------------------

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: Any = inspect.Parameter.empty) -> Any:
        """``@registry.register(name)`` decorates an entry; ``registry.register(name, obj)`` adds one."""
        if not isinstance(name, str) or not name or is_ref(name):
            raise ValueError(f"a {self.kind} name must be a non-empty string without ':', got {name!r}")
        self._load()  # the builtins first, so a user's entry of the same name replaces the built-in one

        def add(entry: T) -> T:
            self._entries[name] = entry
            return entry

        return add if obj is inspect.Parameter.empty else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test's own entry, say); an unknown name is ignored."""
        self._entries.pop(name, None)

    # ---- looking up ----------------------------------------------------------------

    def get(self, name: str, path: Optional[str] = None) -> T:
        """The entry registered as ``name``, or the object a ``module:attr`` reference names.

        ``path`` is the space-file field the name came from; errors are one-line
        :class:`SpaceError` naming it (an :class:`UnknownEntry` for an unknown name).
        """
        path = path or self.kind
        if not isinstance(name, str):
            raise SpaceError(path, f"expected a {self.kind} name, got {name!r}", f"use one of: {self._known()}")
        if is_ref(name):
            return import_ref(name, path)
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownEntry(path, f"unknown {self.kind} {name!r}", f"use one of: {self._known()}") from None

    def _known(self) -> str:
        names = self.names()
        return ", ".join([*names, "or a module:attr ref"]) if names else "a module:attr ref"

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs, sorted by name."""
        self._load()
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def describe(self, name: str) -> str:
        """A one-line description of an entry: its ``description``, else its docstring's first line."""
        obj = self.get(name)
        text = getattr(obj, "description", None)
        if not isinstance(text, str) or not text.strip():
            text = inspect.getdoc(obj) or ""
        lines = text.strip().splitlines()
        return lines[0].strip() if lines else ""


#: student families: name -> :class:`kdsearch.spaces.families.Family`
FAMILIES: Registry[Any] = Registry("student family", "kdsearch.spaces.families")
#: loss terms: name -> ``factory(distill_config, student_shapes, teacher_shapes) -> nn.Module | None``
LOSSES: Registry[Any] = Registry("loss term", "kdsearch.trainers.losses")
#: quantizers (``compress.quantize``): name -> a :class:`kdsearch.trainers.quantize.Quantizer` subclass
QUANTIZERS: Registry[Any] = Registry("quantization", "kdsearch.trainers.quantize")
#: prune importance criteria (``compress.prune_criterion``): name -> ``factory() -> torch_pruning importance``
PRUNERS: Registry[Any] = Registry("prune criterion", "kdsearch.trainers.compress")
#: data sources (``data.source``): name -> ``loader(data_config) -> DataBundle``
SOURCES: Registry[Any] = Registry("data source", "kdsearch.trainers.data")

#: batched augmentation ops (``train.augment``): name -> op
AUGMENTATIONS: Registry[Any] = Registry("augmentation", "kdsearch.trainers.augment")
#: teacher mixes (``distill.teacher_mix``): name -> ``mix(teacher_logits, targets, weights) -> (B, T) weights``
TEACHER_MIXES: Registry[Any] = Registry("teacher mix", "kdsearch.trainers.mixes")
#: deployment runtimes (``measure.runtime``): name -> a :class:`kdsearch.trainers.runtimes.Runtime` subclass
RUNTIMES: Registry[Any] = Registry("runtime", "kdsearch.trainers.runtimes")

#: the registries by the plural that ``kdsearch list`` takes
REGISTRIES: dict[str, Registry[Any]] = {
    "families": FAMILIES, "losses": LOSSES, "quantizers": QUANTIZERS, "pruners": PRUNERS, "sources": SOURCES,
    "augmentations": AUGMENTATIONS, "mixes": TEACHER_MIXES, "runtimes": RUNTIMES,
}
