"""Words and colours the panels share, and the style sheet loader."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QApplication

STYLE_FILE = Path(__file__).resolve().parents[2] / "resources" / "style.qss"

#: image state -> what the person reads
STATE_NAMES = {
    "new": "new",
    "prelabelled": "to pre-check",
    "prechecked": "pre-checked",
    "flagged": "flagged",
    "accepted": "accepted",
    "good": "defect-free",
}
STATE_COLOURS = {
    "new": "#8a93a3",
    "prelabelled": "#2f6fce",
    "prechecked": "#7a5cc7",
    "flagged": "#d9534f",
    "accepted": "#2e9e5b",
    "good": "#5f7f6a",
}
ACCENT = "#2f6fce"
DONE = "#2e9e5b"
WARN = "#d9534f"


def apply_style(app: QApplication) -> None:
    app.setStyle("Fusion")
    try:
        app.setStyleSheet(STYLE_FILE.read_text(encoding="utf-8"))
    except OSError:
        pass
