"""Entry point of the desktop app: ``main([project_folder]) -> exit code``.

Opens the project given, else the last one used; restores the window's size, docks and
the image the person was on (QSettings).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication

ORG, APP = "annotator", "annotator"


def create_app(argv: Sequence[str] = ()) -> QApplication:
    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "annotator", *argv])
    app.setOrganizationName(ORG)
    app.setApplicationName(APP)
    app.setApplicationDisplayName("annotator")
    # A waiting GUI thread gets the GIL back from a Python worker within 1 ms instead of
    # the default 5 ms: every paint and slot call needs it once or more.
    sys.setswitchinterval(0.001)
    from .theme import apply_style

    apply_style(app)
    return app


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the app. ``argv``: optional project folder (the CLI passes the demo project)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    app = create_app()
    from .main_window import MainWindow

    settings = QSettings(ORG, APP)
    window = MainWindow(settings)
    window.resize(1480, 920)
    window.restore_window()
    window.show()
    target = argv[0] if argv else settings.value("last_project", "")
    if target:
        window.open_project(target)
    window.warm_up()
    return app.exec()


if __name__ == "__main__":  # python -m annotator.gui.app [PROJECT]
    sys.exit(main())
