"""The canvas's mouse tools: small state machines that turn mouse and key events (in
scene = image-pixel coordinates) into calls on :class:`annotator.gui.canvas.MaskCanvas`.

The mask arithmetic lives in :mod:`annotator.core.mask_tools` (no Qt); a tool only
decides *when* to paint, fill or cut and shows a preview while it is in progress.

=========  ===============================================================================
pan        left-drag pans (middle-drag and Space+drag pan in every tool)
brush      left-drag paints a round brush; one stroke = one undo step
eraser     the same, erasing
polygon    click vertices; double-click, Enter or a click on the first vertex fills;
           Backspace drops the last vertex; Esc cancels
fill       click: flood fill from that pixel on the image colour (tolerance), added
select     click selects the region under the cursor (empty = none);
           Shift+click merges that region into the selected one
split      drag a cut line across a region: it is cut in two along the line
=========  ===============================================================================

Below the tools: the items they and the canvas draw over the image (region outlines
and number badges, the predicted mask, the brush cursor), all with cosmetic pens so
they keep their on-screen size at any zoom.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
from PySide6.QtCore import QLineF, QPointF, QRectF, Qt
from PySide6.QtGui import (
    QBrush, QColor, QFont, QFontMetricsF, QKeyEvent, QMouseEvent, QPainter, QPainterPath, QPen, QPolygonF, QTransform,
)
from PySide6.QtWidgets import QGraphicsItem, QGraphicsPathItem, QGraphicsScene

from ..core.mask_tools import LabelEditor, mask_contours

if TYPE_CHECKING:  # pragma: no cover
    from .canvas import MaskCanvas

PREVIEW_Z = 60
PREVIEW_COLOUR = QColor("#00e5ff")


def preview_item(canvas: "MaskCanvas", dashed: bool = False, filled: bool = False) -> QGraphicsPathItem:
    """A path in the scene drawn with a 1.5 px cosmetic pen (the same width at any zoom)."""
    item = QGraphicsPathItem()
    if filled:
        item.setBrush(QColor(0, 229, 255, 45))
    pen = QPen(PREVIEW_COLOUR, 1.5)
    pen.setCosmetic(True)
    if dashed:
        pen.setStyle(Qt.DashLine)
    item.setPen(pen)
    item.setZValue(PREVIEW_Z)
    canvas.scene().addItem(item)
    return item


class CanvasTool:
    """Base: a tool ignores what it does not use."""

    name = ""
    cursor = Qt.ArrowCursor
    shows_brush = False

    def __init__(self, canvas: "MaskCanvas") -> None:
        self.canvas = canvas

    def press(self, pos: QPointF, event: QMouseEvent) -> None: ...

    def move(self, pos: QPointF, event: QMouseEvent) -> None: ...

    def release(self, pos: QPointF, event: QMouseEvent) -> None: ...

    def double_click(self, pos: QPointF, event: QMouseEvent) -> None: ...

    def key(self, event: QKeyEvent) -> bool:
        return False

    def wants_key(self, key: int) -> bool:
        """True for keys this tool needs now (they then beat window shortcuts)."""
        return False

    def finish(self) -> None:
        """Commit what is in progress (before undo, a tool or image switch)."""

    def cancel(self) -> None:
        """Drop what is in progress."""


class PanTool(CanvasTool):
    name = "pan"
    cursor = Qt.OpenHandCursor


class BrushTool(CanvasTool):
    name = "brush"
    cursor = Qt.CrossCursor
    shows_brush = True
    erase = False

    def press(self, pos, event):
        if event.button() == Qt.LeftButton and not self.canvas.stroke_active():
            self.canvas.begin_stroke(self.erase)
            self.canvas.stroke_to(pos)

    def move(self, pos, event):
        if self.canvas.stroke_active() and event.buttons() & Qt.LeftButton:
            self.canvas.stroke_to(pos)

    def release(self, pos, event):
        if event.button() == Qt.LeftButton and self.canvas.stroke_active():
            self.canvas.stroke_to(pos)
            self.canvas.end_stroke()

    def finish(self):
        if self.canvas.stroke_active():
            self.canvas.end_stroke()

    def cancel(self):
        self.canvas.cancel_stroke()

    def wants_key(self, key):
        return key == Qt.Key_Escape and self.canvas.stroke_active()

    def key(self, event):
        if self.wants_key(event.key()):
            self.cancel()
            return True
        return False


class EraserTool(BrushTool):
    name = "eraser"
    erase = True


class PolygonTool(CanvasTool):
    name = "polygon"
    cursor = Qt.CrossCursor
    CLOSE_PX = 8  # a click this close (screen px) to the first vertex closes

    def __init__(self, canvas):
        super().__init__(canvas)
        self.points: list[QPointF] = []
        self.hover: Optional[QPointF] = None
        self.item: Optional[QGraphicsPathItem] = None

    def press(self, pos, event):
        if event.button() != Qt.LeftButton:
            return
        if len(self.points) >= 3 and self._near_first(pos):
            self.finish()
            return
        self.points.append(QPointF(pos))
        self._redraw()

    def move(self, pos, event):
        self.hover = QPointF(pos)
        if self.points:
            self._redraw()

    def double_click(self, pos, event):
        if event.button() == Qt.LeftButton:
            self.finish()

    def wants_key(self, key):
        return bool(self.points) and key in (Qt.Key_Return, Qt.Key_Enter, Qt.Key_Escape, Qt.Key_Backspace)

    def key(self, event):
        if not self.wants_key(event.key()):
            return False
        if event.key() == Qt.Key_Escape:
            self.cancel()
        elif event.key() == Qt.Key_Backspace:
            self.points.pop()
            self._redraw()
        else:
            self.finish()
        return True

    def finish(self):
        points = [(p.x(), p.y()) for p in self._dedup()]
        self.cancel()
        if len(points) >= 3:
            self.canvas.fill_polygon(points)

    def cancel(self):
        self.points = []
        if self.item is not None:
            self.canvas.scene().removeItem(self.item)
            self.item = None

    def _dedup(self) -> list[QPointF]:
        out: list[QPointF] = []
        for p in self.points:
            if not out or QLineF(out[-1], p).length() > 1e-6:
                out.append(p)
        return out

    def _near_first(self, pos: QPointF) -> bool:
        a = self.canvas.mapFromScene(self.points[0])
        b = self.canvas.mapFromScene(pos)
        return (a - b).manhattanLength() <= self.CLOSE_PX

    def _redraw(self):
        if self.item is None:
            self.item = preview_item(self.canvas, filled=True)
        path = QPainterPath(self.points[0])
        for p in self.points[1:]:
            path.lineTo(p)
        if self.hover is not None:
            path.lineTo(self.hover)
        s = 3.0 / max(self.canvas.zoom(), 1e-6)  # vertex handles: 6 screen px
        for p in self.points:
            path.addRect(p.x() - s, p.y() - s, 2 * s, 2 * s)
        self.item.setPath(path)


class FillTool(CanvasTool):
    name = "fill"
    cursor = Qt.PointingHandCursor

    def press(self, pos, event):
        if event.button() == Qt.LeftButton:
            self.canvas.flood_fill_at(pos)


class SelectTool(CanvasTool):
    name = "select"

    def press(self, pos, event):
        if event.button() != Qt.LeftButton:
            return
        index = self.canvas.region_at(pos)
        selected = self.canvas.selected_region()
        if event.modifiers() & Qt.ShiftModifier and index and selected and index != selected:
            self.canvas.merge_regions(selected, index)
        else:
            self.canvas.select_region(index)


class SplitTool(CanvasTool):
    name = "split"
    cursor = Qt.CrossCursor

    def __init__(self, canvas):
        super().__init__(canvas)
        self.start: Optional[QPointF] = None
        self.item: Optional[QGraphicsPathItem] = None

    def press(self, pos, event):
        if event.button() == Qt.LeftButton:
            self.start = QPointF(pos)
            self.item = preview_item(self.canvas, dashed=True)

    def move(self, pos, event):
        if self.start is not None and self.item is not None:
            path = QPainterPath(self.start)
            path.lineTo(pos)
            self.item.setPath(path)

    def release(self, pos, event):
        if event.button() == Qt.LeftButton and self.start is not None:
            start = self.start
            self.cancel()
            self.canvas.split_along(start, QPointF(pos))

    def wants_key(self, key):
        return key == Qt.Key_Escape and self.start is not None

    def key(self, event):
        if self.wants_key(event.key()):
            self.cancel()
            return True
        return False

    def cancel(self):
        self.start = None
        if self.item is not None:
            self.canvas.scene().removeItem(self.item)
            self.item = None


TOOLS: dict[str, type[CanvasTool]] = {
    t.name: t for t in (PanTool, BrushTool, EraserTool, PolygonTool, FillTool, SelectTool, SplitTool)
}


# ----------------------------------------------------------------- items drawn over the image


def _segments_path(segments: np.ndarray) -> QPainterPath:
    path = QPainterPath()
    for xa, ya, xb, yb in segments.tolist():
        path.moveTo(xa, ya)
        path.lineTo(xb, yb)
    return path


def _path(contours: Sequence[np.ndarray]) -> QPainterPath:
    path = QPainterPath()
    path.setFillRule(Qt.OddEvenFill)
    for c in contours:
        path.addPolygon(QPolygonF([QPointF(x, y) for x, y in c.tolist()]))
        path.closeSubpath()
    return path


def _cosmetic(colour, width: float, style=Qt.SolidLine) -> QPen:
    pen = QPen(QColor(colour), width, style)
    pen.setCosmetic(True)
    return pen


class ScreenMarginItem(QGraphicsItem):
    """An item drawn with cosmetic pens: its bounds grow by a few screen pixels."""

    margin_px = 4.0

    def __init__(self) -> None:
        super().__init__()
        self._margin = self.margin_px

    def set_view_scale(self, s: float) -> None:
        self.prepareGeometryChange()
        self._margin = self.margin_px / max(s, 1e-6)


class OutlineItem(ScreenMarginItem):
    """One region's outline along pixel edges: the class colour over a dark halo;
    white when selected."""

    def __init__(self, segments: np.ndarray, colour: str) -> None:
        super().__init__()
        self.path, self.colour, self.selected = _segments_path(segments), QColor(colour), False

    def boundingRect(self) -> QRectF:
        m = self._margin
        return self.path.boundingRect().adjusted(-m, -m, m, m)

    def paint(self, painter: QPainter, option, widget=None) -> None:
        painter.setRenderHint(QPainter.Antialiasing)
        painter.setBrush(Qt.NoBrush)
        for colour, width in ((QColor(0, 0, 0, 150), 3.5 if self.selected else 3.0),
                              (QColor(Qt.white) if self.selected else self.colour, 2.0 if self.selected else 1.25)):
            pen = _cosmetic(colour, width)
            pen.setCapStyle(Qt.SquareCap)  # segments meet cleanly at corners
            painter.setPen(pen)
            painter.drawPath(self.path)


class Badge(QGraphicsItem):
    """A region's number (and class), a fixed size on screen above its top-left corner."""

    _font: Optional[QFont] = None

    @classmethod
    def font(cls) -> QFont:
        if cls._font is None:
            cls._font = QFont()
            cls._font.setPointSizeF(8)
            cls._font.setBold(True)
        return cls._font

    def __init__(self) -> None:
        super().__init__()
        self.setFlag(QGraphicsItem.ItemIgnoresTransformations)
        self.text, self.colour, self.selected = "", QColor(), False
        self._rect = QRectF()

    def set(self, text: str, colour: str, selected: bool) -> None:
        if (text, QColor(colour), selected) != (self.text, self.colour, self.selected):
            self.prepareGeometryChange()
            self.text, self.colour, self.selected = text, QColor(colour), selected
            w = QFontMetricsF(self.font()).horizontalAdvance(text)
            self._rect = QRectF(0, -16, w + 8, 15)
            self.update()

    def boundingRect(self) -> QRectF:
        return self._rect

    def paint(self, painter: QPainter, option, widget=None) -> None:
        painter.setRenderHint(QPainter.Antialiasing)
        painter.setPen(_cosmetic(QColor(0, 0, 0, 170), 1))
        painter.setBrush(QColor(Qt.white) if self.selected else self.colour)
        painter.drawRoundedRect(self._rect, 3, 3)
        light = self.selected or self.colour.lightnessF() > 0.6
        painter.setPen(QColor(20, 20, 20) if light else Qt.white)
        painter.setFont(self.font())
        painter.drawText(self._rect, Qt.AlignCenter, self.text)


class OutlineSet:
    """Outline and badge items of the working regions, updated region by region."""

    def __init__(self, scene: QGraphicsScene, z: float) -> None:
        self.scene, self.z = scene, z
        self.items: dict[int, tuple[OutlineItem, Badge]] = {}
        self.selected, self.visible, self.scale = 0, True, 1.0

    def clear(self) -> None:
        self.update_regions(None, None, tuple(self.items), ())

    def update_regions(self, editor: Optional[LabelEditor], colour_of, removed, added) -> None:
        for rid in removed:
            outline, badge = self.items.pop(rid, (None, None))
            if outline is not None:
                self.scene.removeItem(outline)
                self.scene.removeItem(badge)
        if editor is None:
            return
        for rid in added:
            r = editor.by_id(rid)
            outline, badge = OutlineItem(r.outline, colour_of(r.code)), Badge()
            outline.set_view_scale(self.scale)
            for item, dz in ((outline, 0), (badge, 1)):
                item.setZValue(self.z + dz)
                item.setVisible(self.visible)
                self.scene.addItem(item)
            badge.setPos(r.box[0], r.box[1])
            self.items[rid] = (outline, badge)
        for i, r in enumerate(editor.region_infos(), start=1):
            name = editor.name_of(r.code)
            self.items[r.id][1].set(f"{i} {name}" if name else str(i), colour_of(r.code), r.id == self.selected)

    def rebuild(self, editor: LabelEditor, colour_of) -> None:
        self.clear()
        self.update_regions(editor, colour_of, (), tuple(r.id for r in editor.region_infos()))

    def set_selected(self, rid: int) -> None:
        for key in {self.selected, rid} & set(self.items):
            outline, badge = self.items[key]
            outline.selected = key == rid
            outline.update()
            badge.set(badge.text, badge.colour.name(), key == rid)
        self.selected = rid

    def set_visible(self, on: bool) -> None:
        self.visible = on
        for outline, badge in self.items.values():
            outline.setVisible(on)
            badge.setVisible(on)

    def set_view_scale(self, s: float) -> None:
        self.scale = s
        for outline, _ in self.items.values():
            outline.set_view_scale(s)


class PredictionItem(ScreenMarginItem):
    """The checker's predicted mask: hatched, with a dashed cyan outline."""

    COLOUR = QColor("#00e5ff")

    def __init__(self) -> None:
        super().__init__()
        self.path = QPainterPath()
        self.empty = True

    def set_mask(self, mask: Optional[np.ndarray]) -> None:
        self.prepareGeometryChange()
        self.path = _path(mask_contours(mask)) if mask is not None else QPainterPath()
        self.empty = mask is None

    def boundingRect(self) -> QRectF:
        m = self._margin
        return self.path.boundingRect().adjusted(-m, -m, m, m)

    def paint(self, painter: QPainter, option, widget=None) -> None:
        scale = option.levelOfDetailFromTransform(painter.worldTransform())
        hatch = QBrush(QColor(0, 229, 255, 170), Qt.BDiagPattern)
        hatch.setTransform(QTransform.fromScale(1 / scale, 1 / scale))  # screen-sized hatching
        painter.setRenderHint(QPainter.Antialiasing)
        painter.setPen(_cosmetic(QColor(0, 0, 0, 160), 3.0))
        painter.setBrush(hatch)
        painter.drawPath(self.path)
        painter.setPen(_cosmetic(self.COLOUR, 1.5, Qt.DashLine))
        painter.setBrush(Qt.NoBrush)
        painter.drawPath(self.path)


class BrushCursor(ScreenMarginItem):
    """The brush outline under the mouse: white over black, visible on any fabric."""

    def __init__(self) -> None:
        super().__init__()
        self.d = 15.0
        self.setAcceptedMouseButtons(Qt.NoButton)

    def set_diameter(self, d: float) -> None:
        if d != self.d:
            self.prepareGeometryChange()
            self.d = float(d)

    def boundingRect(self) -> QRectF:
        r = self.d / 2 + self._margin
        return QRectF(-r, -r, 2 * r, 2 * r)

    def paint(self, painter: QPainter, option, widget=None) -> None:
        painter.setRenderHint(QPainter.Antialiasing)
        painter.setBrush(Qt.NoBrush)
        r = self.d / 2
        for colour, width in ((QColor(0, 0, 0, 200), 3.0), (QColor(255, 255, 255, 230), 1.2)):
            painter.setPen(_cosmetic(colour, width))
            painter.drawEllipse(QPointF(0, 0), r, r)
