"""Progress and cancel hooks shared by every long-running verb.

Every headless entry point (pre-label, check, train, export, benchmarks) takes
``on_progress`` and ``cancel``; the CLI, the tests and the GUI pass their own.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Optional

#: ``on_progress(done, total, message)``; ``total`` may be 0 when unknown.
ProgressFn = Callable[[int, int, str], None]


class Cancelled(Exception):
    """Raised inside a job when its :class:`CancelToken` was set."""


class CancelToken:
    """Thread-safe cooperative cancel flag."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by user")


def no_progress(done: int, total: int, message: str = "") -> None:
    """Default progress sink: ignore."""


def check_cancel(cancel: Optional[CancelToken]) -> None:
    if cancel is not None:
        cancel.raise_if_cancelled()


def os_error_line(exc: OSError) -> str:
    """``PATH: reason`` for an OSError with a file name (``[Errno 17] File exists: 'out'`` reads
    ``out: File exists``); its own message otherwise. The command line and the app word it alike."""
    if exc.strerror and exc.filename is not None:
        return f"{os.fsdecode(exc.filename)}: {exc.strerror}"
    return str(exc)
