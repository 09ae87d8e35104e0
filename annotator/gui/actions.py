"""Actions as data: one table of id, text, icon, tip (and section); shortcuts come from
``resources/shortcuts.json`` (defaults) overridden per user in ``QSettings``.

The main window builds its menus, toolbars and key bindings from :data:`ACTIONS` with
:func:`build_actions`, passing one handler per id; the cheat sheet
(:class:`CheatSheetDialog`) lists the same table and lets the person change a shortcut.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from PySide6.QtCore import QSettings, Qt
from PySide6.QtGui import QAction, QColor, QFont, QIcon, QKeySequence, QPainter, QPixmap
from PySide6.QtWidgets import (QApplication, QDialog, QDialogButtonBox, QHeaderView, QKeySequenceEdit, QLabel,
                               QStyle, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from annotator.core.flags import RULE_UNLABELLED

SHORTCUTS_FILE = Path(__file__).resolve().parents[2] / "resources" / "shortcuts.json"
SETTINGS_GROUP = "shortcuts"


@dataclass(frozen=True)
class ActionSpec:
    id: str
    text: str
    icon: str  # "std:<QStyle.StandardPixmap name>" | "glyph:<character>" | ""
    tip: str
    section: str  # heading in the cheat sheet
    checkable: bool = False


ACTIONS: tuple[ActionSpec, ...] = (
    ActionSpec("review.accept", "Accept label", "std:SP_DialogApplyButton",
               "Accept the label as it is now (with your edits) and go to the next image", "Review"),
    ActionSpec("review.accept_prediction", "Accept checker prediction", "glyph:⇄",
               "Replace the label by the predicted mask of the open flag (the checkers' mask; for a model 1 "
               "cross-check, the label plus the regions it left out). Its name follows the open flag.", "Review"),
    ActionSpec("review.mark_good", "Mark defect-free", "glyph:✓",
               "This image has no defect: clear its label and go to the next image", "Review"),
    ActionSpec("review.next", "Next image", "std:SP_ArrowForward", "Save and go to the next image in the queue", "Review"),
    ActionSpec("review.previous", "Previous image", "std:SP_ArrowBack", "Save and go back to the previous image",
               "Review"),
    ActionSpec("edit.undo", "Undo", "glyph:↶", "Undo the last edit of this image", "Edit"),
    ActionSpec("edit.redo", "Redo", "glyph:↷", "Redo the edit just undone", "Edit"),
    ActionSpec("edit.delete_region", "Delete region", "glyph:✕", "Delete the selected region", "Edit"),
    ActionSpec("edit.merge_regions", "Merge regions", "glyph:⊕", "Merge the two regions selected last", "Edit"),
    ActionSpec("tool.pan", "Pan", "glyph:✥", "Drag to move the image; wheel zooms", "Tools", True),
    ActionSpec("tool.brush", "Brush", "glyph:✎", "Paint defect pixels (Ctrl+wheel: brush size)", "Tools", True),
    ActionSpec("tool.eraser", "Eraser", "glyph:⌫", "Erase defect pixels (Ctrl+wheel: brush size)", "Tools", True),
    ActionSpec("tool.polygon", "Polygon", "glyph:⬠", "Click corners, double-click to fill the polygon", "Tools", True),
    ActionSpec("tool.fill", "Flood fill", "glyph:◉", "Fill similar pixels around the click (tolerance in the tool bar)",
               "Tools", True),
    ActionSpec("tool.select", "Select region", "glyph:➚",
               "Click a region to select it (then set its class); Shift+click merges it into the selected one",
               "Tools", True),
    ActionSpec("tool.split", "Split region", "glyph:✂", "Drag a cut line across a region to split it in two",
               "Tools", True),
    ActionSpec("tool.brush_smaller", "Smaller brush", "", "Brush and eraser 2 px smaller", "Tools"),
    ActionSpec("tool.brush_larger", "Larger brush", "", "Brush and eraser 2 px larger", "Tools"),
    ActionSpec("view.heatmap", "Heat map", "glyph:♨", "Show model 1's anomaly heat map", "View", True),
    ActionSpec("view.prediction", "Checker prediction", "glyph:◌", "Show the checkers' predicted mask (dashed)",
               "View", True),
    ActionSpec("view.outlines", "Region outlines", "glyph:▢", "Show region outlines and numbers", "View", True),
    ActionSpec("view.opacity_down", "Mask more transparent", "", "Lower the mask overlay opacity", "View"),
    ActionSpec("view.opacity_up", "Mask more opaque", "", "Raise the mask overlay opacity", "View"),
    ActionSpec("view.fit", "Fit to window", "glyph:⤢", "Zoom so the whole image is visible", "View"),
    ActionSpec("view.actual_size", "Actual size", "", "Zoom to 100 %", "View"),
    ActionSpec("jobs.prelabel", "Pre-label", "std:SP_MediaPlay",
               "Fit model 1 on the defect-free images and pre-label every image no person has checked yet", "Jobs"),
    ActionSpec("jobs.check", "Run check", "std:SP_BrowserReload",
               "Train the checkers on the pre-checked labels and flag the suspicious ones", "Jobs"),
    ActionSpec("jobs.cancel", "Cancel job", "std:SP_BrowserStop", "Stop the running job; work done so far is kept",
               "Jobs"),
    ActionSpec("file.new", "New project…", "std:SP_FileDialogNewFolder",
               "Create a project from a folder of images or an MVTec-AD tree", "Project"),
    ActionSpec("file.open", "Open project…", "std:SP_DialogOpenButton", "Open a project folder", "Project"),
    ActionSpec("file.save", "Save mask", "std:SP_DialogSaveButton", "Save the edited mask of this image now", "Project"),
    ActionSpec("file.import", "Add images…", "std:SP_FileDialogNewFolder",
               "Add a batch of images to label, of defect-free images, or an MVTec-AD tree", "Project"),
    ActionSpec("file.import_good", "Add defect-free images…", "",
               "Add a folder of defect-free images: model 1 trains on these", "Project"),
    ActionSpec("file.relink", "Find moved images…", "",
               "Point the project at image files moved or copied since the import (matched by content)", "Project"),
    ActionSpec("file.export", "Export labels…", "std:SP_DriveFDIcon", "Export every image's label", "Project"),
    ActionSpec("file.quit", "Quit", "", "Save and close the app", "Project"),
    ActionSpec("help.cheat_sheet", "Keyboard shortcuts", "glyph:⌨",
               "List every shortcut; change them here", "Help"),
)
SPECS: dict[str, ActionSpec] = {a.id: a for a in ACTIONS}
TOOL_IDS = ("tool.pan", "tool.brush", "tool.eraser", "tool.polygon", "tool.fill", "tool.select", "tool.split")

#: menu title -> action ids (None: separator); "@recent" marks the recent-projects submenu
MENUS: dict[str, list] = {
    "&Project": ["file.new", "file.open", "@recent", None, "file.save", "file.import", "file.import_good", "file.relink",
                 "file.export", None,
                 "file.quit"],
    "&Edit": ["edit.undo", "edit.redo", None, "edit.delete_region", "edit.merge_regions"],
    "&Review": ["review.accept", "review.accept_prediction", "review.mark_good", None, "review.next",
                "review.previous"],
    "&Tools": list(TOOL_IDS) + [None, "tool.brush_smaller", "tool.brush_larger"],
    "&View": ["view.heatmap", "view.prediction", "view.outlines", None, "view.opacity_down", "view.opacity_up",
              "view.fit", "view.actual_size"],
    "&Jobs": ["jobs.prelabel", "jobs.check", "jobs.cancel"],
    "&Help": ["help.cheat_sheet"],
}
#: the main tool bar (None: separator)
MAIN_TOOLBAR = ("file.new", "file.open", None, "jobs.prelabel", "jobs.check", "jobs.cancel", None, "edit.undo",
                "edit.redo", None, "view.heatmap", "view.prediction", "view.outlines", None, "file.export", None,
                "help.cheat_sheet")


# ---------------------------------------------------------------- shortcuts (pure-ish)


def default_shortcuts(path: Path = SHORTCUTS_FILE) -> dict[str, list[str]]:
    """id -> key sequences (portable text) from the defaults file; unknown ids are ignored."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = {}
    out: dict[str, list[str]] = {}
    for ident in SPECS:
        value = raw.get(ident, [])
        keys = [value] if isinstance(value, str) else list(value)
        out[ident] = [k for k in keys if k]
    return out


def user_shortcuts(settings: QSettings) -> dict[str, list[str]]:
    out = {}
    settings.beginGroup(SETTINGS_GROUP)
    try:
        for key in settings.childKeys():
            if key in SPECS:
                value = settings.value(key, "")
                keys = [value] if isinstance(value, str) else list(value or [])
                out[key] = [k for k in keys if k]
    finally:
        settings.endGroup()
    return out


def effective_shortcuts(settings: Optional[QSettings] = None, path: Path = SHORTCUTS_FILE) -> dict[str, list[str]]:
    shortcuts = default_shortcuts(path)
    if settings is not None:
        shortcuts.update(user_shortcuts(settings))
    return shortcuts


def conflicts(shortcuts: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Key sequence -> the action ids that share it (only where more than one does)."""
    users: dict[str, list[str]] = {}
    for ident, keys in shortcuts.items():
        for k in keys:
            norm = QKeySequence(k).toString(QKeySequence.SequenceFormat.PortableText)
            users.setdefault(norm, []).append(ident)
    return {k: v for k, v in users.items() if len(v) > 1}


# ---------------------------------------------------------------- QActions


def make_icon(spec: str, widget: Optional[QWidget] = None) -> QIcon:
    if spec.startswith("std:"):
        style = (widget.style() if widget is not None else QApplication.style())
        pixmap = getattr(QStyle.StandardPixmap, spec[4:], None)
        return style.standardIcon(pixmap) if pixmap is not None else QIcon()
    if spec.startswith("glyph:"):
        return glyph_icon(spec[6:])
    return QIcon()


def glyph_icon(text: str, size: int = 32, colour: str = "#3a4250") -> QIcon:
    pm = QPixmap(size, size)
    pm.fill(Qt.GlobalColor.transparent)
    p = QPainter(pm)
    p.setRenderHint(QPainter.RenderHint.Antialiasing)
    font = QFont()
    font.setPixelSize(int(size * 0.72))
    p.setFont(font)
    p.setPen(QColor(colour))
    p.drawText(pm.rect(), Qt.AlignmentFlag.AlignCenter, text)
    p.end()
    return QIcon(pm)


def build_actions(parent: QWidget, handlers: Mapping[str, Callable], settings: Optional[QSettings] = None,
                  ) -> dict[str, QAction]:
    """One QAction per table row (with a handler); triggered -> handler (checkable: with
    the checked state). Shortcuts work anywhere in the window."""
    shortcuts = effective_shortcuts(settings)
    actions = {}
    for spec in ACTIONS:
        if spec.id not in handlers:
            continue
        act = QAction(make_icon(spec.icon, parent), spec.text, parent)
        act.setObjectName(spec.id)
        act.setCheckable(spec.checkable)
        act.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
        handler = handlers[spec.id]
        act.triggered.connect(handler if spec.checkable else (lambda _=False, h=handler: h()))
        actions[spec.id] = act
        parent.addAction(act)
    apply_shortcuts(actions, shortcuts)
    return actions


def build_menus(menubar, actions: Mapping[str, QAction], recent_menu) -> None:
    """Fill the menu bar from :data:`MENUS`."""
    for title, ids in MENUS.items():
        menu = menubar.addMenu(title)
        for ident in ids:
            if ident is None:
                menu.addSeparator()
            elif ident == "@recent":
                menu.addMenu(recent_menu)
            elif ident in actions:
                menu.addAction(actions[ident])


def fill_toolbar(bar, actions: Mapping[str, QAction], ids: Sequence = MAIN_TOOLBAR) -> None:
    for ident in ids:
        bar.addSeparator() if ident is None else bar.addAction(actions[ident])


def class_actions(parent: QWidget, names: Sequence[str], on_class: Callable[[str], None]) -> list[QAction]:
    """Keys 1-9 set the class of the selected region (classes are project data, so these
    are made per project rather than listed in the table)."""
    out = []
    for k, name in enumerate(names[:9]):
        act = QAction(f"Class {name}", parent)
        act.setShortcut(QKeySequence(str(k + 1)))
        act.triggered.connect(lambda _=False, n=name: on_class(n))
        parent.addAction(act)
        out.append(act)
    return out


def apply_shortcuts(actions: Mapping[str, QAction], shortcuts: Mapping[str, Sequence[str]]) -> None:
    for ident, act in actions.items():
        act.setShortcuts([QKeySequence(k) for k in shortcuts.get(ident, [])])
        retitle(act, act.text() or SPECS[ident].text, act.statusTip() or SPECS[ident].tip)  # keeps a context name


def retitle(act: QAction, text: str, tip: str) -> None:
    """Name and tip of an action (the tooltip also names its first shortcut)."""
    keys = act.shortcuts()
    act.setText(text)
    act.setToolTip(f"{text} ({keys[0].toString(QKeySequence.SequenceFormat.NativeText)})\n{tip}" if keys
                   else f"{text}\n{tip}")
    act.setStatusTip(tip)


def prediction_wording(rule: Optional[str]) -> tuple[str, str]:
    """(name, tip) of "review.accept_prediction" for the open flag's rule: the model 1
    cross-check suggests the label plus a region, not a checker's mask."""
    if rule == RULE_UNLABELLED:
        return ("Accept suggested label", "Replace the label by the model 1 cross-check's suggestion: the label "
                "plus the region model 1 and the image show and the label leaves out")
    if rule is None:
        return SPECS["review.accept_prediction"].text, SPECS["review.accept_prediction"].tip
    return "Accept checker prediction", "Replace the label by the checkers' predicted mask of the open flag"


# ---------------------------------------------------------------- cheat sheet


class CheatSheetDialog(QDialog):
    """Every action with its shortcut, by section; double-click a shortcut to change it.
    Changes are stored in QSettings (defaults stay in resources/shortcuts.json)."""

    def __init__(self, actions: Mapping[str, QAction], settings: QSettings, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Keyboard shortcuts")
        self.resize(620, 640)
        self._actions, self._settings = actions, settings
        self._shortcuts = effective_shortcuts(settings)
        self.table = QTableWidget(0, 3, self)
        self.table.setHorizontalHeaderLabels(["Action", "Shortcut", "What it does"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.cellDoubleClicked.connect(self._edit)
        self.note = QLabel("Double-click a shortcut to change it.", self)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close | QDialogButtonBox.StandardButton.RestoreDefaults)
        buttons.rejected.connect(self.reject)
        buttons.button(QDialogButtonBox.StandardButton.RestoreDefaults).clicked.connect(self.restore_defaults)
        lay = QVBoxLayout(self)
        lay.addWidget(self.table)
        lay.addWidget(self.note)
        lay.addWidget(buttons)
        self._fill()

    def rows(self) -> list[tuple[str, str, str]]:
        """(action text, shortcuts text, tip) in table order, section headers as ("", section, "")."""
        out, section = [], None
        for spec in sorted((s for s in ACTIONS if s.id in self._actions), key=lambda s: _SECTION_ORDER[s.section]):
            if spec.section != section:
                section = spec.section
                out.append(("", section, ""))
            keys = ", ".join(QKeySequence(k).toString(QKeySequence.SequenceFormat.NativeText)
                             for k in self._shortcuts.get(spec.id, []))
            out.append((spec.text, keys, spec.tip))
        return out

    def _fill(self) -> None:
        rows = self.rows()
        self.table.setRowCount(len(rows))
        self._ids = []
        ordered = iter(s.id for s in sorted((s for s in ACTIONS if s.id in self._actions),
                                            key=lambda s: _SECTION_ORDER[s.section]))
        for r, (text, keys, tip) in enumerate(rows):
            if not text:
                item = QTableWidgetItem(keys)
                font = item.font()
                font.setBold(True)
                item.setFont(font)
                self.table.setItem(r, 0, item)
                self.table.setSpan(r, 0, 1, 3)
                self._ids.append(None)
                continue
            self._ids.append(next(ordered))
            for c, value in enumerate((text, keys, tip)):
                self.table.setItem(r, c, QTableWidgetItem(value))
        self.table.resizeColumnsToContents()
        clash = conflicts(self._shortcuts)
        self.note.setText("Double-click a shortcut to change it." + (
            "  Used twice: " + "; ".join(f"{k} ({', '.join(SPECS[i].text for i in v)})" for k, v in clash.items())
            if clash else ""))

    def _edit(self, row: int, column: int) -> None:
        ident = self._ids[row] if 0 <= row < len(self._ids) else None
        if ident is None:
            return
        editor = QKeySequenceEdit(self)
        self.table.setCellWidget(row, 1, editor)
        editor.setFocus()
        editor.editingFinished.connect(lambda: self.set_shortcut(ident, editor.keySequence().toString(
            QKeySequence.SequenceFormat.PortableText)))

    def set_shortcut(self, ident: str, keys: str) -> None:
        self._shortcuts[ident] = [k.strip() for k in keys.split(",") if k.strip()]
        self._settings.setValue(f"{SETTINGS_GROUP}/{ident}", self._shortcuts[ident])
        apply_shortcuts(self._actions, self._shortcuts)
        for r in range(self.table.rowCount()):
            self.table.removeCellWidget(r, 1)
        self._fill()

    def restore_defaults(self) -> None:
        self._settings.remove(SETTINGS_GROUP)
        self._shortcuts = effective_shortcuts(self._settings)
        apply_shortcuts(self._actions, self._shortcuts)
        self._fill()


_SECTION_ORDER = {s: k for k, s in enumerate(("Review", "Edit", "Tools", "View", "Jobs", "Project", "Help"))}
