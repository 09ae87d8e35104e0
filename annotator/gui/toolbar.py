"""The tool bar above the canvas: tools, brush size, fill tolerance, mask opacity and the
overlay toggles. Built from the window's actions (ids from :mod:`annotator.gui.actions`);
the number fields talk to the canvas through the window."""
from __future__ import annotations

from typing import Mapping

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QAction, QActionGroup
from PySide6.QtWidgets import QLabel, QSlider, QSpinBox, QToolBar, QWidget

from .actions import TOOL_IDS


class CanvasToolBar(QToolBar):
    brush_size_changed = Signal(int)
    tolerance_changed = Signal(int)
    opacity_changed = Signal(float)

    def __init__(self, actions: Mapping[str, QAction], parent: QWidget | None = None) -> None:
        super().__init__("Tools", parent)
        self.setObjectName("canvasTools")
        self.setMovable(False)
        self.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonIconOnly)
        self.tools = QActionGroup(self)
        self.tools.setExclusive(True)
        for ident in TOOL_IDS:
            self.tools.addAction(actions[ident])
            self.addAction(actions[ident])
        self.addSeparator()
        self.brush = self._spin("Brush", 1, 400, 15, " px", "Brush and eraser diameter (Ctrl+wheel on the image)")
        self.brush.valueChanged.connect(self.brush_size_changed)
        self.tolerance = self._spin("Fill", 0, 255, 24, "", "Flood fill tolerance: grey levels from the clicked pixel")
        self.tolerance.valueChanged.connect(self.tolerance_changed)
        self.addWidget(QLabel(" Mask ", self))
        self.opacity = QSlider(Qt.Orientation.Horizontal, self)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(50)
        self.opacity.setFixedWidth(80)
        self.opacity.setToolTip("Mask overlay opacity")
        self.opacity.valueChanged.connect(lambda v: self.opacity_changed.emit(v / 100))
        self.addWidget(self.opacity)
        self.addSeparator()
        self.addAction(actions["view.fit"])

    def _spin(self, label: str, lo: int, hi: int, value: int, suffix: str, tip: str) -> QSpinBox:
        self.addWidget(QLabel(f" {label} ", self))
        spin = QSpinBox(self)
        spin.setRange(lo, hi)
        spin.setValue(value)
        spin.setSuffix(suffix)
        spin.setToolTip(tip)
        spin.setKeyboardTracking(False)
        self.addWidget(spin)
        return spin

    def show_tool(self, ident: str) -> None:
        for act in self.tools.actions():
            if act.objectName() == ident:
                act.setChecked(True)

    def show_brush_size(self, px: int) -> None:
        self.brush.blockSignals(True)
        self.brush.setValue(px)
        self.brush.blockSignals(False)
