"""Image browser: every image of the project as a list with thumbnails, filtered by
state and sorted by file, anomaly score or suspicion.

* :class:`ImageListModel` is a ``QAbstractListModel`` over plain tuples
  (:class:`BrowserRow`), so a 10,000-image project opens with one query and no pixels.
* Thumbnails are made lazily: the view asks only for the visible rows; missing ones are
  generated in a background job (:mod:`annotator.gui.jobs`) in small batches and cached
  on disk in ``<project>/thumbnails/`` (keyed by the image checksum, so a changed file
  gets a new one). An unreadable image gets a warning tile, once.
* Filtering and sorting are pure functions (:func:`visible_rows`), tested headless.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, NamedTuple, Optional

import cv2
from PySide6.QtCore import QAbstractListModel, QEvent, QModelIndex, QPoint, QRect, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QBrush, QColor, QFont, QPainter, QPen, QPixmap
from PySide6.QtWidgets import (QComboBox, QHBoxLayout, QLabel, QLineEdit, QListView, QMenu, QStyle,
                               QStyledItemDelegate, QStyleOptionViewItem, QVBoxLayout, QWidget)

from annotator.core.images import ImageError, load_image, save_png_atomic
from annotator.core.store import Project

from .jobs import Job, JobManager
from .theme import STATE_COLOURS, STATE_NAMES

THUMB_PX = 56
THUMB_DIR = "thumbnails"
BATCH = 24
ROW_H = THUMB_PX + 10

FILTERS = (  # (label, states shown; None = all)
    ("All images", None),
    ("New (not pre-labelled)", ("new",)),
    ("Pre-labelled: to pre-check", ("prelabelled",)),
    ("Pre-checked", ("prechecked",)),
    ("Flagged", ("flagged",)),
    ("Accepted", ("accepted",)),
    ("Defect-free (training)", ("good",)),
)
SORTS = ("File name", "Anomaly score", "Suspicion")
ImageIdRole = Qt.ItemDataRole.UserRole + 1
StateRole = Qt.ItemDataRole.UserRole + 2


class BrowserRow(NamedTuple):
    id: int
    rel_path: str
    state: str
    anomaly_score: Optional[float]
    suspicion: Optional[float]  # most suspicious open flag
    sha256: str
    source: str


def rows_from_project(project: Project, image_ids: Optional[Iterable[int]] = None) -> list[BrowserRow]:
    """All rows (one query each for images and open flags), or only ``image_ids``."""
    if image_ids is None:
        images = project.images()
        flags = project.flags(unresolved_only=True)
    else:
        images = [project.image(i) for i in image_ids]
        flags = [f for i in image_ids for f in project.flags(unresolved_only=True, image_id=i)]
    suspicion: dict[int, float] = {}
    for f in flags:
        suspicion[f.image_id] = max(f.suspicion, suspicion.get(f.image_id, float("-inf")))
    return [BrowserRow(i.id, i.rel_path, i.state, i.anomaly_score, suspicion.get(i.id), i.sha256, i.source)
            for i in images]


def visible_rows(rows: Iterable[BrowserRow], states: Optional[tuple[str, ...]] = None, sort: str = "File name",
                 text: str = "") -> list[BrowserRow]:
    """Filter by state and name part, then sort. Scores and suspicions sort high first;
    rows without one go last, by file name."""
    text = text.strip().lower()
    out = [r for r in rows if (states is None or r.state in states) and (not text or text in r.rel_path.lower())]
    if sort == "Anomaly score":
        out.sort(key=lambda r: (r.anomaly_score is None, -(r.anomaly_score or 0.0), r.rel_path))
    elif sort == "Suspicion":
        out.sort(key=lambda r: (r.suspicion is None, -(r.suspicion or 0.0), r.rel_path))
    else:
        out.sort(key=lambda r: r.rel_path)
    return out


# ---------------------------------------------------------------- thumbnails


def thumbnail_path(project_path: Path, row: BrowserRow, px: int = THUMB_PX) -> Path:
    return project_path / THUMB_DIR / f"{row.id}-{row.sha256[:12]}-{px}.png"


def make_thumbnail(source: str, dest: Path, px: int = THUMB_PX) -> None:
    """Shrink the image so its longer side is ``px`` and save it (raises ImageError)."""
    img = load_image(source)
    h, w = img.shape[:2]
    scale = px / max(h, w)
    small = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    save_png_atomic(dest, small, fsync=False)


def make_thumbnails(items: list[tuple[int, str, Path]], on_progress, cancel) -> dict[int, Optional[str]]:
    """Job body: id -> thumbnail file, or None where the image is unreadable."""
    out: dict[int, Optional[str]] = {}
    for k, (image_id, source, dest) in enumerate(items):
        cancel.raise_if_cancelled()
        try:
            if not dest.is_file():
                make_thumbnail(source, dest)
            out[image_id] = str(dest)
        except (ImageError, OSError, ValueError, cv2.error):
            out[image_id] = None
        on_progress(k + 1, len(items), "thumbnails")
    return out


class ThumbnailCache:
    """Pixmaps in memory, PNGs on disk, missing ones made by background jobs."""

    def __init__(self, project_path: Path, jobs: JobManager, on_ready) -> None:
        self.project_path = project_path
        self._jobs, self._on_ready = jobs, on_ready
        self._pixmaps: dict[int, QPixmap] = {}
        self._broken: set[int] = set()
        self._wanted: dict[int, BrowserRow] = {}
        self._job: Optional[Job] = None
        self._timer = QTimer(singleShot=True, interval=30)
        self._timer.timeout.connect(self._start_batch)

    def pixmap(self, row: BrowserRow) -> Optional[QPixmap]:
        pm = self._pixmaps.get(row.id)
        if pm is not None or row.id in self._broken:
            return pm
        self._wanted[row.id] = row
        if not self._timer.isActive() and self._job is None:
            self._timer.start()
        return None

    def is_broken(self, image_id: int) -> bool:
        return image_id in self._broken

    def retry(self, image_id: int) -> None:
        """Make the thumbnail again on next use (the image's file was found in a new place)."""
        self._broken.discard(image_id)
        self._pixmaps.pop(image_id, None)

    def stop(self) -> None:
        self._timer.stop()
        self._wanted.clear()
        if self._job is not None:
            self._job.cancel()

    def _start_batch(self) -> None:
        if self._job is not None or not self._wanted:
            return
        ids = list(self._wanted)[-BATCH:]  # the rows asked for last are the ones on screen
        items = []
        for row in (self._wanted.pop(i) for i in ids):
            path = thumbnail_path(self.project_path, row)
            if path.is_file():  # cached on disk by an earlier session: no job needed
                self._store(row.id, str(path))
            else:
                items.append((row.id, row.source, path))
        if not items:
            self._on_ready(ids)
            self._timer.start()
            return
        self._on_ready([i for i in ids if i in self._pixmaps])
        self._job = Job("thumbnails", lambda p, c: make_thumbnails(items, p, c), kind="thumbnails")
        self._job.succeeded.connect(self._apply)
        self._job.ended.connect(self._batch_ended)
        self._jobs.start(self._job)

    def _store(self, image_id: int, path: Optional[str]) -> None:
        pm = QPixmap(path) if path else QPixmap()
        if pm.isNull():
            self._broken.add(image_id)
        else:
            self._pixmaps[image_id] = pm

    def _apply(self, result: dict) -> None:
        for image_id, path in result.items():
            self._store(image_id, path)
        self._on_ready(list(result))

    def _batch_ended(self) -> None:
        self._job = None
        if self._wanted:
            self._timer.start()


# ---------------------------------------------------------------- model and view


class ImageListModel(QAbstractListModel):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._all: dict[int, BrowserRow] = {}
        self._rows: list[BrowserRow] = []
        self._index: dict[int, int] = {}
        self.states: Optional[tuple[str, ...]] = None
        self.sort = SORTS[0]
        self.text = ""
        self.thumbnails: Optional[ThumbnailCache] = None

    # ---- data

    def set_rows(self, rows: Iterable[BrowserRow]) -> None:
        self._all = {r.id: r for r in rows}
        self._relayout()

    def update_rows(self, rows: Iterable[BrowserRow]) -> None:
        changed = False
        for r in rows:
            old = self._all.get(r.id)
            self._all[r.id] = r
            changed |= old is None or old[:5] != r[:5]
        if changed:
            self._relayout()

    def set_view(self, states: Optional[tuple[str, ...]] = None, sort: Optional[str] = None,
                 text: Optional[str] = None) -> None:
        self.states = states
        self.sort = sort or self.sort
        self.text = self.text if text is None else text
        self._relayout()

    def _relayout(self) -> None:
        self.beginResetModel()
        self._rows = visible_rows(self._all.values(), self.states, self.sort, self.text)
        self._index = {r.id: k for k, r in enumerate(self._rows)}
        self.endResetModel()

    def thumbnails_ready(self, ids: list[int]) -> None:
        rows = [self._index[i] for i in ids if i in self._index]
        if rows:
            self.dataChanged.emit(self.index(min(rows)), self.index(max(rows)), [Qt.ItemDataRole.DecorationRole])

    # ---- QAbstractListModel

    def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._rows)

    def data(self, index: QModelIndex, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or not 0 <= index.row() < len(self._rows):
            return None
        r = self._rows[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            return Path(r.rel_path).name
        if role == ImageIdRole:
            return r.id
        if role == StateRole:
            return r.state
        if role == Qt.ItemDataRole.DecorationRole:
            return None if self.thumbnails is None else self.thumbnails.pixmap(r)
        if role == Qt.ItemDataRole.ToolTipRole:
            score = "" if r.anomaly_score is None else f"\nanomaly score {r.anomaly_score:.3f}"
            susp = "" if r.suspicion is None else f"\nsuspicion {r.suspicion:.2f}"
            return f"{r.rel_path}\n{STATE_NAMES.get(r.state, r.state)}{score}{susp}"
        if role == Qt.ItemDataRole.UserRole:
            return r
        return None

    def row_of(self, image_id: int) -> int:
        return self._index.get(image_id, -1)

    def image_ids(self) -> list[int]:
        return [r.id for r in self._rows]

    def all_count(self) -> int:
        return len(self._all)


class ImageRowDelegate(QStyledItemDelegate):
    """Thumbnail, file name, a coloured state chip and the score."""

    def sizeHint(self, option, index) -> QSize:
        return QSize(200, ROW_H)

    def paint(self, p: QPainter, option: QStyleOptionViewItem, index: QModelIndex) -> None:
        row: BrowserRow = index.data(Qt.ItemDataRole.UserRole)
        if row is None:
            return
        p.save()
        rect = option.rect
        selected = bool(option.state & QStyle.StateFlag.State_Selected)
        if selected:
            p.fillRect(rect, option.palette.highlight())
        elif option.state & QStyle.StateFlag.State_MouseOver:
            p.fillRect(rect, QColor(0, 0, 0, 14))
        thumb = QRect(rect.left() + 6, rect.top() + 5, THUMB_PX, THUMB_PX)
        pm = index.data(Qt.ItemDataRole.DecorationRole)
        if isinstance(pm, QPixmap) and not pm.isNull():
            scaled = pm.scaled(thumb.size(), Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation)
            p.drawPixmap(thumb.left() + (THUMB_PX - scaled.width()) // 2, thumb.top() + (THUMB_PX - scaled.height()) // 2,
                         scaled)
        else:
            view = option.widget
            broken = view is not None and view.model().thumbnails is not None and view.model().thumbnails.is_broken(row.id)
            p.fillRect(thumb, QColor("#f3d6d5") if broken else QColor("#e4e7ec"))
            if broken:
                p.setPen(QColor("#b02a25"))
                p.drawText(thumb, Qt.AlignmentFlag.AlignCenter, "unreadable")
        text_x = thumb.right() + 10
        fg = option.palette.highlightedText().color() if selected else option.palette.text().color()
        font = QFont(option.font)
        font.setBold(True)
        p.setFont(font)
        p.setPen(fg)
        name = p.fontMetrics().elidedText(Path(row.rel_path).name, Qt.TextElideMode.ElideMiddle, rect.right() - text_x - 6)
        p.drawText(text_x, rect.top() + 22, name)
        p.setFont(option.font)
        folder = str(Path(row.rel_path).parent)
        p.setPen(QColor("#c9d6ee") if selected else QColor("#6b7280"))
        p.drawText(text_x, rect.top() + 40, p.fontMetrics().elidedText(folder if folder != "." else "", Qt.TextElideMode.ElideLeft,
                                                                    rect.right() - text_x - 6))
        self._chip(p, row, text_x, rect.top() + 46, rect.right() - 6, selected)
        p.restore()

    def _chip(self, p: QPainter, row: BrowserRow, x: int, y: int, right: int, selected: bool) -> None:
        label = STATE_NAMES.get(row.state, row.state)
        fm = p.fontMetrics()
        w = fm.horizontalAdvance(label) + 12
        chip = QRect(x, y, w, 15)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        p.setBrush(QBrush(QColor(STATE_COLOURS.get(row.state, "#888"))))
        p.setPen(QPen(Qt.PenStyle.NoPen))
        p.drawRoundedRect(chip, 7, 7)
        p.setPen(QColor("white"))
        small = QFont(p.font())
        small.setPointSizeF(max(6.5, small.pointSizeF() * 0.85))
        p.setFont(small)
        p.drawText(chip, Qt.AlignmentFlag.AlignCenter, label)
        extra = []
        if row.anomaly_score is not None:
            extra.append(f"score {row.anomaly_score:.2f}")
        if row.suspicion is not None:
            extra.append(f"suspicion {row.suspicion:.2f}")
        if extra:
            p.setPen(QColor("#e8eefb") if selected else QColor("#4b5563"))
            p.drawText(QRect(chip.right() + 6, y, right - chip.right() - 6, 15),
                       Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignLeft, " · ".join(extra))


class ImageBrowser(QWidget):
    """Filter + sort bar over the image list. ``image_activated(id)`` when one is chosen. Its context menu
    (right click; Ctrl / Shift + click choose several) asks for ``role_requested(ids, role)`` and
    ``remove_requested(ids)``."""

    image_activated = Signal(int)
    role_requested = Signal(list, str)
    remove_requested = Signal(list)

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.model = ImageListModel(self)
        self.filter = QComboBox(self)
        for label, states in FILTERS:
            self.filter.addItem(label, states)
        self.sort = QComboBox(self)
        self.sort.addItems(SORTS)
        self.search = QLineEdit(self)
        self.search.setPlaceholderText("Find by file name…")
        self.search.setClearButtonEnabled(True)
        self.count = QLabel(self)
        self.count.setObjectName("muted")
        self.view = QListView(self)
        self.view.setModel(self.model)
        self.view.setItemDelegate(ImageRowDelegate(self.view))
        self.view.setUniformItemSizes(True)
        self.view.setMouseTracking(True)
        self.view.setVerticalScrollMode(QListView.ScrollMode.ScrollPerPixel)
        self.view.setSelectionMode(QListView.SelectionMode.ExtendedSelection)
        self.view.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.view.customContextMenuRequested.connect(self._context_menu)
        self._press_modifiers = Qt.KeyboardModifier.NoModifier
        self.view.viewport().installEventFilter(self)
        self.view.clicked.connect(self._clicked)
        self.view.activated.connect(self._activated)
        bar = QHBoxLayout()
        bar.addWidget(self.filter, 3)
        bar.addWidget(self.sort, 2)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(bar)
        lay.addWidget(self.search)
        lay.addWidget(self.view, 1)
        lay.addWidget(self.count)
        self.filter.currentIndexChanged.connect(self._view_changed)
        self.sort.currentIndexChanged.connect(self._view_changed)
        self.search.textChanged.connect(self._view_changed)
        self._current: Optional[int] = None

    def attach(self, project: Project, jobs: JobManager) -> None:
        if self.model.thumbnails is not None:
            self.model.thumbnails.stop()
        self.model.thumbnails = ThumbnailCache(project.path, jobs, self.model.thumbnails_ready)
        self.model.set_rows(rows_from_project(project))
        self._update_count()

    def detach(self) -> None:
        if self.model.thumbnails is not None:
            self.model.thumbnails.stop()
        self.model.thumbnails = None
        self.model.set_rows([])

    def retry_thumbnail(self, image_id: int) -> None:
        if self.model.thumbnails is not None:
            self.model.thumbnails.retry(image_id)

    def refresh(self, project: Project, image_ids: Optional[Iterable[int]] = None) -> None:
        if image_ids is None:
            self.model.set_rows(rows_from_project(project))
        else:
            self.model.update_rows(rows_from_project(project, list(image_ids)))
        self.select(self._current, scroll=False)
        self._update_count()

    def select(self, image_id: Optional[int], scroll: bool = True) -> None:
        self._current = image_id
        row = -1 if image_id is None else self.model.row_of(image_id)
        sel = self.view.selectionModel()
        if row < 0:
            sel.clearSelection()
            return
        index = self.model.index(row)
        sel.setCurrentIndex(index, sel.SelectionFlag.ClearAndSelect)
        if scroll:
            self.view.scrollTo(index)

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 (Qt's name)
        if watched is self.view.viewport() and event.type() == QEvent.Type.MouseButtonPress:
            self._press_modifiers = event.modifiers()
        return False

    def _clicked(self, index: QModelIndex) -> None:
        if self._press_modifiers & (Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier):
            return  # Ctrl / Shift + click chooses several rows (for the context menu); it opens none
        self._activated(index)

    def _activated(self, index: QModelIndex) -> None:
        image_id = index.data(ImageIdRole)
        if image_id is not None:
            self.image_activated.emit(int(image_id))

    def selected_rows(self) -> list[BrowserRow]:
        rows = [i.data(Qt.ItemDataRole.UserRole) for i in self.view.selectionModel().selectedIndexes()]
        return sorted((r for r in rows if r is not None), key=lambda r: r.id)

    def context_menu(self, at: Optional[QModelIndex] = None) -> Optional[QMenu]:
        """The menu for the selected rows (the row at ``at`` alone when it is not among them)."""
        if at is not None and at.isValid() and not self.view.selectionModel().isSelected(at):
            self.view.selectionModel().select(at, self.view.selectionModel().SelectionFlag.ClearAndSelect)
        rows = self.selected_rows()
        if not rows:
            return None
        ids, n = [r.id for r in rows], len(rows)
        menu = QMenu(self)
        to_good = [r.id for r in rows if r.state != "good"]
        to_label = [r.id for r in rows if r.state == "good"]
        for chosen, role, text in ((to_good, "good", "Defect-free: train model 1 on {}"),
                                   (to_label, "label", "To label: stop training model 1 on {}")):
            if chosen:
                k = len(chosen)
                what = ("it" if k == 1 else "them") + ("" if k == n else f" ({k} of the {n})")
                menu.addAction(text.format(what), lambda c=chosen, r=role: self.role_requested.emit(c, r))
        menu.addSeparator()
        menu.addAction("Remove from the project…" if n == 1 else f"Remove these {n} images from the project…",
                       lambda: self.remove_requested.emit(ids))
        return menu

    def _context_menu(self, pos: QPoint) -> None:
        menu = self.context_menu(self.view.indexAt(pos))
        if menu is not None:
            menu.exec(self.view.viewport().mapToGlobal(pos))

    def _view_changed(self) -> None:
        self.model.set_view(self.filter.currentData(), self.sort.currentText(), self.search.text())
        self.select(self._current)
        self._update_count()

    def _update_count(self) -> None:
        n, total = self.model.rowCount(), self.model.all_count()
        self.count.setText(f"{n} of {total} images" if n != total else f"{total} images")
