"""Regression: PySide6 6.12.0 aborts Python 3.11 after a few hundred signal emits
(``bool_dealloc`` refcount abort). We pin PySide6-Essentials<6.12; this guards the pin.
Runs in a subprocess because the failure is a hard abort of the interpreter."""
import subprocess
import sys
import textwrap

CODE = textwrap.dedent(
    """
    import os
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QCoreApplication, QObject, Signal

    class Emitter(QObject):
        progressed = Signal(int, int, str)
        finished = Signal(bool)

    app = QCoreApplication([])
    seen = []
    e = Emitter()
    e.progressed.connect(lambda d, t, m: seen.append(d))
    e.finished.connect(lambda ok: seen.append(ok))
    for i in range(5000):
        e.progressed.emit(i, 5000, "step")
        e.finished.emit(i % 2 == 0)
    assert len(seen) == 10000, len(seen)
    print("ok", len(seen))
    """
)


def test_5000_signal_emits_do_not_crash_the_interpreter():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok 10000"


def test_pyside6_version_is_below_the_crashing_release():
    import PySide6

    major, minor = (int(x) for x in PySide6.__version__.split(".")[:2])
    assert (6, 8) <= (major, minor) < (6, 12)
