"""SIGINT and SIGTERM: a search stops the way Ray Tune stops on Ctrl-C, whichever arrived.

Ray Tune catches SIGINT inside ``Tuner.fit``: it ends its loop, saves the experiment state
and returns, so a resume can continue the trials in flight. SIGTERM (what ``kill``, a job
scheduler or a container runtime sends) would kill the driver outright; here it takes the
same path. Outside ``fit`` either signal raises :class:`Interrupted`, a ``KeyboardInterrupt``
that remembers its signal, so the command line exits 130 or 143 as shells expect.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM, as an exception; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code(exc: BaseException) -> int:
    """130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


class Signals:
    """Which stop signal arrived while a search ran (None: none)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None

    @property
    def name(self) -> Optional[str]:
        return signal.Signals(self.received).name if self.received else None


@contextlib.contextmanager
def sigterm_as_sigint() -> Iterator[Signals]:
    """While inside: SIGTERM does what SIGINT does now (inside ``fit``: Tune's graceful stop).

    Only the main thread can set signal handlers; elsewhere this does nothing.
    """
    signals = Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return

    def on_sigterm(signum: int, frame) -> None:
        signals.received = signum
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)  # Ray Tune's: stop the loop, keep the state
        else:
            raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield signals
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise(signum: int, frame) -> None:
    raise Interrupted(signum)


def install_cli_handlers() -> None:
    """For the command line: SIGTERM raises :class:`Interrupted` as Ctrl-C raises KeyboardInterrupt."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)
