"""Every error kdsearch raises on purpose, in one module that everything else imports down from.

A :class:`KdsearchError` is a mistake the user can fix: ``str()`` is one line naming what is
wrong and the fix, which the CLI prints as is (exit code 2, no traceback). The library raises
the same classes, so a script can catch them.

>>> from kdsearch.spaces.errors import KdsearchError, SpaceError
>>> try:
...     raise SpaceError("train.lr", "must be above 0, got -1", "give a value like 0.003")
... except KdsearchError as exc:
...     print(exc)
train.lr: must be above 0, got -1; fix: give a value like 0.003
"""

from __future__ import annotations

__all__ = ["ExportError", "KdsearchError", "SpaceError", "TrackingError", "TrialDiverged", "UserError"]


class KdsearchError(Exception):
    """A mistake the user can fix; ``str()`` is one line with the fix."""


class SpaceError(KdsearchError, ValueError):
    """A space (file, dict or pinned parameters) that cannot be used."""

    def __init__(self, path: str, problem: str, fix: str) -> None:
        self.path, self.problem, self.fix = path, problem, fix
        super().__init__(f"{path}: {problem}; fix: {fix}")


class UserError(KdsearchError):
    """A bad option or command-line value (the message names the option and the fix)."""


class TrackingError(KdsearchError):
    """The tracking store cannot be used (unreachable, unknown experiment or run)."""


class ExportError(UserError):
    """An export that cannot be written or does not match the in-process student."""


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial ends as failed, the search goes on."""
