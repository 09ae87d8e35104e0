"""The one background-job recipe of the app (the only place threads start).

A job runs ``fn(on_progress, cancel)`` — the signature of every headless verb — in a
worker ``QObject`` moved to its own ``QThread``. The GUI talks only to the :class:`Job`,
which lives in the GUI thread and re-emits the worker's signals there:

* ``progress(done, total, message)``, throttled in the worker (at most every
  ``min_interval_s``; the first and the last update always pass), with ``eta_s`` kept
  up to date by :class:`EtaEstimator`;
* exactly one of ``succeeded(result)``, ``failed(message)``, ``cancelled()``, then
  ``ended()``.

Cancel is cooperative: :meth:`Job.cancel` sets the thread-safe
:class:`~annotator.core.jobs.CancelToken`; the verb raises ``Cancelled`` at its next
check. Results are applied by the GUI in the slots connected to ``succeeded``, i.e. on
the GUI thread. :class:`JobManager` keeps every running job so that closing the window
can cancel them all and wait until each has ended.

Rule kept here (design.md): nothing connected to the worker's signals lives in the
worker thread, so no lambda is connected to them; the worker is created, moved and
connected in :meth:`Job.start` only.
"""
from __future__ import annotations

import errno
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from PySide6.QtCore import QObject, QThread, Signal, Slot

from annotator.core.jobs import CancelToken, Cancelled, ProgressFn, os_error_line

JobFn = Callable[[ProgressFn, CancelToken], Any]


def readable_error(exc: BaseException) -> str:
    """One line a person can act on: the exception's own message (our errors are written
    for people), the disk-full and out-of-memory cases spelled out, and the type named
    for a programming error."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"The disk is full: {exc.filename or 'a file'} could not be written. Free some space and try again."
    if isinstance(exc, MemoryError):
        return "Not enough memory to finish this job. Close other programs or use fewer images."
    text = (os_error_line(exc) if isinstance(exc, OSError) else str(exc)).strip() or type(exc).__name__
    if type(exc).__module__ == "builtins" and not isinstance(exc, (OSError, ValueError)):
        return f"{type(exc).__name__}: {text}"
    return text


@dataclass
class EtaEstimator:
    """Time left from progress updates: the rate over a sliding window of recent updates,
    restarted whenever the message (the phase: loading, training, predicting…) or the
    total changes. None until there is enough to go on."""

    window: int = 20
    _phase: tuple = field(default=(), repr=False)
    _points: list = field(default_factory=list, repr=False)

    def update(self, done: int, total: int, message: str, now: Optional[float] = None) -> Optional[float]:
        now = time.monotonic() if now is None else now
        phase = (message.split(":")[0], total)
        if phase != self._phase:
            self._phase, self._points = phase, []
        self._points.append((now, done))
        del self._points[:-self.window]
        if total <= 0 or len(self._points) < 2:
            return None
        (t0, d0), (t1, d1) = self._points[0], self._points[-1]
        if d1 <= d0 or t1 <= t0:
            return None
        return max(0.0, (total - d1) * (t1 - t0) / (d1 - d0))


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "estimating…"
    s = int(round(seconds))
    if s < 60:
        return f"about {max(s, 1)} s left"
    if s < 3600:
        return f"about {s // 60} min {s % 60:02d} s left"
    return f"about {s // 3600} h {s % 3600 // 60:02d} min left"


class _Worker(QObject):
    """Lives in the job's thread; runs the function once and reports."""

    progressed = Signal(int, int, str)
    finished = Signal(str, object)  # outcome ("succeeded" | "failed" | "cancelled"), result or message

    def __init__(self, fn: JobFn, token: CancelToken, min_interval_s: float) -> None:
        super().__init__()
        self._fn, self._token, self._interval = fn, token, min_interval_s
        self._last = 0.0

    def _report(self, done: int, total: int, message: str = "") -> None:
        now = time.monotonic()
        if done == 0 or (total and done >= total) or now - self._last >= self._interval:
            self._last = now
            self.progressed.emit(int(done), int(total), str(message))

    @Slot()
    def run(self) -> None:
        try:
            result = self._fn(self._report, self._token)
        except Cancelled:
            self.finished.emit("cancelled", None)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the person
            traceback.print_exc()
            self.finished.emit("failed", readable_error(exc))
        else:
            self.finished.emit("succeeded", result)
        finally:
            self.thread().quit()  # the thread ends now; Job.wait() needs no GUI round trip


class Job(QObject):
    """A background job seen from the GUI thread. Create, connect, :meth:`start`."""

    progress = Signal(int, int, str)
    succeeded = Signal(object)
    failed = Signal(str)
    cancelled = Signal()
    ended = Signal()  # after exactly one of the three above

    def __init__(self, name: str, fn: JobFn, *, kind: str = "pipeline", min_interval_s: float = 0.1,
                 parent: Optional[QObject] = None) -> None:
        super().__init__(parent)
        self.name, self.kind = name, kind
        self.token = CancelToken()
        self.eta_s: Optional[float] = None
        self.last_progress: tuple[int, int, str] = (0, 0, "")
        self.outcome: Optional[str] = None
        self._fn, self._interval = fn, min_interval_s
        self._eta = EtaEstimator()
        self._thread: Optional[QThread] = None
        self._worker: Optional[_Worker] = None

    # ---- lifecycle

    def start(self) -> "Job":
        if self._thread is not None:
            raise RuntimeError(f"job {self.name!r} was already started")
        self._thread = QThread()
        self._thread.setObjectName(f"job:{self.name}")
        self._worker = _Worker(self._fn, self.token, self._interval)
        self._worker.moveToThread(self._thread)
        self._thread.started.connect(self._worker.run)
        self._worker.progressed.connect(self._on_progress)  # queued: the job lives in the GUI thread
        self._worker.finished.connect(self._on_finished)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self.outcome is None

    def cancel(self) -> None:
        """Ask the job to stop at its next check; ``cancelled`` follows (or, when it
        finished meanwhile, ``succeeded``)."""
        self.token.cancel()

    def wait(self, timeout_ms: int = -1) -> bool:
        """Block until the thread has ended (used on shutdown only)."""
        if self._thread is None:
            return True
        return self._thread.wait() if timeout_ms < 0 else self._thread.wait(timeout_ms)

    # ---- slots (GUI thread)

    @Slot(int, int, str)
    def _on_progress(self, done: int, total: int, message: str) -> None:
        if self.outcome is not None:
            return
        self.last_progress = (done, total, message)
        self.eta_s = self._eta.update(done, total, message)
        self.progress.emit(done, total, message)

    @Slot(str, object)
    def _on_finished(self, outcome: str, payload: object) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        if self._thread is not None:
            self._thread.quit()
            self._thread.wait()
        self._worker = None
        if outcome == "succeeded":
            self.succeeded.emit(payload)
        elif outcome == "cancelled":
            self.cancelled.emit()
        else:
            self.failed.emit(str(payload))
        self.ended.emit()


class JobManager(QObject):
    """Every running job of a window, so it can show them and stop them all on close."""

    job_started = Signal(object)  # Job
    job_ended = Signal(object)
    all_ended = Signal()

    def __init__(self, parent: Optional[QObject] = None) -> None:
        super().__init__(parent)
        self._jobs: list[Job] = []

    def start(self, job: Job) -> Job:
        if job.kind == "pipeline" and self.busy("pipeline"):
            raise RuntimeError(f"{self.running('pipeline')[0].name} is still running")
        self._jobs.append(job)
        job.setParent(self)
        job.ended.connect(self._on_ended)
        job.start()
        self.job_started.emit(job)
        return job

    def running(self, kind: Optional[str] = None) -> list[Job]:
        return [j for j in self._jobs if kind is None or j.kind == kind]

    def busy(self, kind: Optional[str] = None) -> bool:
        return bool(self.running(kind))

    def cancel_all(self) -> None:
        for job in list(self._jobs):
            job.cancel()

    def wait_all(self, timeout_ms: int = -1) -> bool:
        """Block until every job's thread has ended (their signals still arrive later)."""
        return all(job.wait(timeout_ms) for job in list(self._jobs))

    @Slot()
    def _on_ended(self) -> None:
        job = self.sender()
        if job in self._jobs:
            self._jobs.remove(job)
            self.job_ended.emit(job)
            job.deleteLater()
        if not self._jobs:
            self.all_ended.emit()
