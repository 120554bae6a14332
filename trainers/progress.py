"""Progress of long work (the teacher phase), shown only where the caller asks for it.

The library prints nothing: :func:`progress` is silent until an application (the CLI)
installs a reporter with :func:`show_progress`, such as :func:`tqdm_reporter`.

>>> with progress(10, "teacher pass") as advance:
...     advance(10)  # silent: no reporter installed
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

__all__ = ["progress", "show_progress", "tqdm_reporter"]

#: ``reporter(total, description)`` -> context manager yielding ``advance(n)``
Reporter = Callable[[int, str], "contextlib.AbstractContextManager[Callable[[int], None]]"]

_reporter: Optional[Reporter] = None


def show_progress(reporter: Optional[Reporter]) -> None:
    """Install ``reporter`` for this process (None: silent again)."""
    global _reporter
    _reporter = reporter


@contextlib.contextmanager
def progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """``advance(n)`` for ``n`` more of ``total`` units done; a no-op without a reporter."""
    if _reporter is None:
        yield lambda n: None
        return
    with _reporter(total, description) as advance:
        yield advance


@contextlib.contextmanager
def tqdm_reporter(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A tqdm bar on stderr, cleared when done."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=description, unit="sample", unit_scale=True, leave=False, dynamic_ncols=True) as bar:
        yield bar.update
