"""The background-job recipe: exactly one terminal signal, throttled progress, ETA,
cancel, errors as readable messages, and no thread left behind (the autouse fixture in
tests/conftest.py fails a test that leaves one running)."""
from __future__ import annotations

import errno
import threading

import pytest
from PySide6.QtCore import QThread

from annotator.core.jobs import Cancelled
from annotator.gui.jobs import EtaEstimator, Job, JobManager, format_eta, readable_error


def outcomes(job: Job) -> list:
    seen = []
    job.succeeded.connect(lambda r: seen.append(("succeeded", r)))
    job.failed.connect(lambda m: seen.append(("failed", m)))
    job.cancelled.connect(lambda: seen.append(("cancelled", None)))
    return seen


def test_success_delivers_the_result_on_the_gui_thread(qtbot):
    where = {}

    def work(on_progress, cancel):
        where["worker"] = threading.get_ident()
        for k in range(5):
            on_progress(k + 1, 5, "step")
        return 42

    job = Job("answer", work)
    seen = outcomes(job)
    job.succeeded.connect(lambda r: where.setdefault("result", threading.get_ident()))
    with qtbot.waitSignal(job.ended, timeout=10_000):
        job.start()
    assert seen == [("succeeded", 42)]
    assert where["worker"] != threading.get_ident() and where["result"] == threading.get_ident()
    assert job.last_progress == (5, 5, "step") and not job.running


def test_failure_becomes_one_readable_message(qtbot):
    def work(on_progress, cancel):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/masks/1.png")

    job = Job("save", work)
    seen = outcomes(job)
    with qtbot.waitSignal(job.ended, timeout=10_000):
        job.start()
    assert len(seen) == 1 and seen[0][0] == "failed"
    assert "disk is full" in seen[0][1] and "/data/masks/1.png" in seen[0][1]


def test_cancel_stops_a_running_job_with_exactly_one_cancelled(qtbot):
    started = threading.Event()

    def work(on_progress, cancel):
        started.set()
        while True:  # a verb checks its token between steps
            cancel.raise_if_cancelled()
            on_progress(0, 0, "spinning")
            threading.Event().wait(0.005)

    job = Job("endless", work)
    seen = outcomes(job)
    job.start()
    assert started.wait(10)
    with qtbot.waitSignal(job.ended, timeout=10_000):
        job.cancel()
    assert seen == [("cancelled", None)]


def test_progress_is_throttled(qtbot):
    def work(on_progress, cancel):
        for k in range(20_000):
            on_progress(k + 1, 20_000, "fast")
        return "done"

    job = Job("chatty", work, min_interval_s=0.05)
    updates = []
    job.progress.connect(lambda d, t, m: updates.append(d))
    with qtbot.waitSignal(job.ended, timeout=10_000):
        job.start()
    assert updates[-1] == 20_000 and len(updates) < 200


def test_manager_cancels_all_and_waits(qtbot):
    manager = JobManager()
    gate = threading.Event()

    def work(on_progress, cancel):
        gate.set()
        while not cancel.cancelled:
            threading.Event().wait(0.005)
        raise Cancelled()

    a = manager.start(Job("a", work, kind="pipeline"))
    b = manager.start(Job("b", work, kind="thumbnails"))
    assert gate.wait(10) and manager.busy("pipeline") and manager.busy()
    with pytest.raises(RuntimeError):
        manager.start(Job("another pipeline job", work, kind="pipeline"))
    with qtbot.waitSignal(manager.all_ended, timeout=10_000):
        manager.cancel_all()
        assert manager.wait_all(10_000)
    assert not manager.busy() and a.outcome == b.outcome == "cancelled"


def test_eta_follows_the_rate_and_restarts_on_a_new_phase():
    eta = EtaEstimator()
    assert eta.update(0, 100, "training: step 0", now=0.0) is None
    assert eta.update(10, 100, "training: step 10", now=1.0) == pytest.approx(9.0)
    assert eta.update(50, 100, "training: step 50", now=5.0) == pytest.approx(5.0)
    assert eta.update(1, 10, "predicting", now=6.0) is None  # new phase: no rate yet
    assert format_eta(None) == "estimating…" and format_eta(75) == "about 1 min 15 s left"


def test_readable_error_keeps_the_message():
    assert readable_error(ValueError("bad threshold")) == "bad threshold"
    assert "KeyError" in readable_error(KeyError("x"))
    # a file error names the path first, as the command line does
    assert readable_error(FileExistsError(17, "File exists", "/data/out")) == "/data/out: File exists"
    assert readable_error(FileExistsError("/data/out: the export folder must be empty")).startswith("/data/out: the")


def test_no_qthread_is_left_after_a_job(qtbot):
    job = Job("quick", lambda p, c: None)
    with qtbot.waitSignal(job.ended, timeout=10_000):
        job.start()
    assert job._thread is not None and job._thread.isFinished() and isinstance(job._thread, QThread)
