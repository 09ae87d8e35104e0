"""The review side of the window: the queue of what needs the person now
(:meth:`Review.queue`), the flag panel (why the checkers flagged this image, with the
numbers), the review buttons and the regions/classes of the current mask.

Texts for flags come from :func:`annotator.core.flag_text.describe_flag`, a pure function over a stored flag.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from PySide6.QtCore import QAbstractListModel, QModelIndex, QSize, Qt, Signal
from PySide6.QtGui import QColor, QIcon, QPixmap
from PySide6.QtWidgets import (QFrame, QGridLayout, QHBoxLayout, QLabel, QListView, QListWidget, QListWidgetItem,
                               QPushButton, QScrollArea, QSizePolicy, QToolButton, QVBoxLayout, QWidget)

from annotator.core.flag_text import FlagView, describe_flag
from annotator.core.review import QueueItem
from annotator.core.store import DefectClass, Flag

from .theme import DONE, STATE_NAMES

STATE_HINTS = {
    "new": "Model 1 has not pre-labelled this image yet. Paint the defect (B), or press G if there is none.",
    "prelabelled": "Pre-check: correct the mask with the brush (B) and eraser (E), give each region its class "
                   "(select it, then 1–9), and accept (A). No defect at all? Press G.",
    "prechecked": "You checked this label. It waits for the next check round (Ctrl+Shift+K).",
    "flagged": "The checkers doubted this label; its flags were resolved by your last action.",
    "accepted": "The checkers agree with this label.",
    "good": "A defect-free training image for model 1. It takes no label.",
}


def short_path(rel_path: str) -> str:
    """The file with its folder (``hole/003.png``): names repeat across folders."""
    parts = Path(rel_path).parts
    return "/".join(parts[-2:])


def queue_heading(phase: str, n: int, round_no: int) -> str:
    if phase == "done":
        return "Loop finished"
    if phase == "precheck":
        return f"Pre-check · {n} image{'s' if n != 1 else ''} to go"
    return f"Round {round_no} · {n} image{'s' if n != 1 else ''} need you"


# ---------------------------------------------------------------- queue


class QueueModel(QAbstractListModel):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.items: list[QueueItem] = []

    def set_items(self, items: list[QueueItem]) -> None:
        self.beginResetModel()
        self.items = list(items)
        self.endResetModel()

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.items)

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        it = self.items[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            what = STATE_NAMES.get(it.state, it.state)
            score = "" if it.suspicion is None else (
                f" · suspicion {it.suspicion:.2f}" if it.flag_ids else f" · score {it.suspicion:.2f}")
            return f"{short_path(it.rel_path)}\n{what}{score}"
        if role == Qt.ItemDataRole.UserRole:
            return it.image_id
        if role == Qt.ItemDataRole.ToolTipRole:
            return it.rel_path
        return None

    def row_of(self, image_id: int) -> int:
        for k, it in enumerate(self.items):
            if it.image_id == image_id:
                return k
        return -1


class ReviewQueuePanel(QWidget):
    image_activated = Signal(int)

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.heading = QLabel("No project open", self)
        self.heading.setObjectName("heading")
        self.model = QueueModel(self)
        self.view = QListView(self)
        self.view.setModel(self.model)
        self.view.setUniformItemSizes(True)
        self.view.setSpacing(1)
        self.view.clicked.connect(lambda i: self.image_activated.emit(int(i.data(Qt.ItemDataRole.UserRole))))
        self.done = QLabel(self)
        self.done.setObjectName("doneBanner")
        self.done.setWordWrap(True)
        self.done.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.done.hide()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.heading)
        lay.addWidget(self.done)
        lay.addWidget(self.view, 1)
        lay.addStretch(0)  # takes the room when the list is hidden

    def set_queue(self, items: list[QueueItem], phase: str, round_no: int, current: Optional[int],
                  running: str = "") -> None:
        """``running``: the name of the job now running, if any."""
        self.model.set_items(items)
        self.heading.setText(queue_heading(phase, len(items), round_no))
        finished = phase == "done"
        self.done.setVisible(finished or not items)
        self.view.setVisible(bool(items))
        if finished:
            self.done.setText("✓  Loop finished\nThe last check round raised no flag and every label is "
                              "accepted. Export the labels (Ctrl+E).")
        elif not items and running:
            self.done.setText(f"{running}…\nImages appear here as they are done.")
        elif not items:
            self.done.setText("Nothing waits for you now.\n" + (
                "Run a check (Ctrl+Shift+K) to let the checkers judge the pre-checked labels."
                if phase != "precheck" or round_no else "Pre-label the project (Ctrl+Shift+L) to start."))
        self.done.setProperty("finished", finished)
        self.done.style().unpolish(self.done)
        self.done.style().polish(self.done)
        self.select(current)

    def select(self, image_id: Optional[int]) -> None:
        row = -1 if image_id is None else self.model.row_of(image_id)
        if row >= 0:
            self.view.setCurrentIndex(self.model.index(row))
        else:
            self.view.clearSelection()

    def neighbour(self, image_id: Optional[int], step: int) -> Optional[int]:
        """The queue item after (step 1) or before (-1) ``image_id``; from outside the
        queue, the first item."""
        ids = [it.image_id for it in self.model.items]
        if not ids:
            return None
        if image_id not in ids:
            return ids[0] if step > 0 else ids[-1]
        k = ids.index(image_id) + step
        return ids[k] if 0 <= k < len(ids) else None


# ---------------------------------------------------------------- flags


class FlagCard(QFrame):
    def __init__(self, view: FlagView, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setObjectName("flagCard")
        title = QLabel(view.title, self)
        title.setObjectName("flagTitle")
        title.setWordWrap(True)
        reason = QLabel(view.reason, self)
        reason.setWordWrap(True)
        grid = QGridLayout()
        grid.setHorizontalSpacing(12)
        grid.setVerticalSpacing(2)
        for r, (name, value) in enumerate(view.numbers):
            key = QLabel(name, self)
            key.setObjectName("muted")
            grid.addWidget(key, r, 0)
            grid.addWidget(QLabel(value, self), r, 1)
        grid.setColumnStretch(1, 1)
        lay = QVBoxLayout(self)
        lay.addWidget(title)
        lay.addWidget(reason)
        lay.addLayout(grid)


class FlagPanel(QWidget):
    """Why the checkers flagged the current image: one card per open flag."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.heading = QLabel("Flags", self)
        self.heading.setObjectName("heading")
        self.empty = QLabel("No open flag on this image.", self)
        self.empty.setObjectName("hint")
        self.empty.setWordWrap(True)
        self._cards = QWidget(self)
        self._cards_lay = QVBoxLayout(self._cards)
        self._cards_lay.setContentsMargins(0, 0, 0, 0)
        self._cards_lay.addStretch(1)
        scroll = self._scroll = QScrollArea(self)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(self._cards)
        scroll.hide()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.heading)
        lay.addWidget(self.empty)
        lay.addWidget(scroll, 1)
        lay.addStretch(0)
        self.views: list[FlagView] = []
        self.shown: list[Flag] = []  # the flags the cards show, in order

    def set_flags(self, flags: list[Flag]) -> None:
        while self._cards_lay.count() > 1:
            w = self._cards_lay.takeAt(0).widget()
            if w is not None:
                w.setParent(None)  # gone from the screen now, not at the next deferred delete
                w.deleteLater()
        self.shown = list(flags)
        self.views = [describe_flag(f) for f in flags]
        for k, v in enumerate(self.views):
            self._cards_lay.insertWidget(k, FlagCard(v, self._cards))
        self.heading.setText(f"Flags · {len(flags)} open" if flags else "Flags")
        self.empty.setVisible(not flags)
        self._scroll.setVisible(bool(flags))
        grow = QSizePolicy.Policy.Expanding if flags else QSizePolicy.Policy.Maximum
        self.setSizePolicy(QSizePolicy.Policy.Preferred, grow)  # no flags: the region list gets the room

    def set_hint(self, text: str) -> None:
        """What the person reads when the image has no open flag."""
        self.empty.setText(text)


# ---------------------------------------------------------------- regions and classes


def swatch(colour: str, px: int = 12) -> QIcon:
    pm = QPixmap(px, px)
    pm.fill(QColor(colour))
    return QIcon(pm)


class RegionPanel(QWidget):
    """Regions of the working mask with their classes; the class buttons set the class of
    the selected region. ``region_chosen(index)`` / ``class_chosen(name)``."""

    region_chosen = Signal(int)
    class_chosen = Signal(str)
    add_class_requested = Signal()

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.heading = QLabel("Regions", self)
        self.heading.setObjectName("heading")
        self.list = QListWidget(self)
        self.list.setMinimumHeight(90)
        self.list.currentRowChanged.connect(self._row_changed)
        self.buttons = QWidget(self)
        self._grid = QGridLayout(self.buttons)
        self._grid.setContentsMargins(0, 0, 0, 0)
        self._grid.setSpacing(4)
        hint = QLabel("Select a region (tool V or this list), then pick its class (keys 1–9).", self)
        hint.setObjectName("muted")
        hint.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.heading)
        lay.addWidget(self.list)
        lay.addWidget(self.buttons)
        lay.addWidget(hint)
        self._colours: dict[str, str] = {}
        self._updating = False

    def set_classes(self, classes: list[DefectClass]) -> None:
        while self._grid.count():
            w = self._grid.takeAt(0).widget()
            if w is not None:
                w.setParent(None)
                w.deleteLater()
        self._colours = {c.name: c.colour for c in classes}
        for k, c in enumerate(classes):
            b = QPushButton(swatch(c.colour), f"{k + 1}  {c.name}" if k < 9 else c.name, self.buttons)
            b.setObjectName(f"class:{c.name}")
            b.clicked.connect(lambda _=False, n=c.name: self.class_chosen.emit(n))
            self._grid.addWidget(b, k // 2, k % 2)
        add = QToolButton(self.buttons)
        add.setText("+ class…")
        add.setToolTip("Add a defect class of your own")
        add.clicked.connect(self.add_class_requested)
        self._grid.addWidget(add, len(classes) // 2, len(classes) % 2)

    def set_regions(self, regions: list[tuple[int, int, Optional[str]]], selected: Optional[int]) -> None:
        """(index, area px, class or None) per region."""
        self._updating = True
        self.list.clear()
        for index, area, cls in regions:
            item = QListWidgetItem(f"Region {index} · {cls or 'no class yet'} · {area} px")
            item.setData(Qt.ItemDataRole.UserRole, index)
            if cls in self._colours:
                item.setIcon(swatch(self._colours[cls]))
            self.list.addItem(item)
        if not regions:
            item = QListWidgetItem("No region: the label marks no defect.")
            item.setFlags(Qt.ItemFlag.NoItemFlags)
            self.list.addItem(item)
        self.heading.setText(f"Regions · {len(regions)}" if regions else "Regions · none")
        if selected is not None and 1 <= selected <= len(regions):
            self.list.setCurrentRow(selected - 1)
        self._updating = False

    def _row_changed(self, row: int) -> None:
        if not self._updating and row >= 0:
            self.region_chosen.emit(row + 1)


class ReviewButtons(QWidget):
    """Big buttons bound to the review actions (the same QActions as the keys)."""

    def __init__(self, actions: dict, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(6)
        for ident, name in (("review.accept", "primary"), ("review.accept_prediction", ""), ("review.mark_good", "")):
            b = QToolButton(self)
            b.setDefaultAction(actions[ident])
            b.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
            b.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
            b.setIconSize(QSize(18, 18))
            b.setObjectName(name or "secondary")
            lay.addWidget(b)


class ReviewSidePanel(QWidget):
    """The right-hand column: review buttons, the flag panel, regions and classes."""

    def __init__(self, actions: dict, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.buttons = ReviewButtons(actions, self)
        self.flags = FlagPanel(self)
        self.regions = RegionPanel(self)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        lay.addWidget(self.buttons)
        lay.addWidget(self.flags, 3)
        lay.addWidget(self.regions, 2)


__all__ = ["describe_flag", "queue_heading", "ReviewQueuePanel", "FlagPanel", "RegionPanel", "ReviewButtons",
           "FlagView", "ReviewSidePanel", "DONE"]
