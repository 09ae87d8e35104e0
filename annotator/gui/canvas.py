"""The mask canvas: a tiled, zoomable view of one image with its editable label mask.

Drawing (bottom to top): the image, the heat map, the mask overlay, the checker's
predicted mask, region outlines with numbers, tool previews, the brush cursor.

* The image and the overlay are :class:`TiledLayer` items: 512 px (image) / 256 px
  (overlay) tiles rendered on first sight from a pyramid level that matches the zoom
  (image: area-averaged halvings; overlay: max-pooled class codes, so one-pixel lines
  stay visible zoomed out), kept in an LRU cache. Nothing ever builds one big pixmap.
* An edit repaints only its box: the cached overlay tiles it touches are patched in
  place at the level on screen (other levels are dropped) and only that rectangle of the
  viewport is updated. Overlay opacity is the item's opacity (no re-render).
* The label is a :class:`annotator.core.mask_tools.LabelEditor`; undo/redo go through
  the core :class:`UndoHistory`, keyed by image id, so they survive image switches.

The canvas knows nothing of projects: the window feeds :meth:`MaskCanvas.set_image` and
saves :meth:`MaskCanvas.working_mask` / :meth:`MaskCanvas.region_classes` through Review.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import numpy as np
from PySide6.QtCore import QEvent, QLineF, QPoint, QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QImage, QKeyEvent, QMouseEvent, QPainter, QPixmap, QTransform, QWheelEvent
from PySide6.QtWidgets import QFrame, QGraphicsItem, QGraphicsPixmapItem, QGraphicsScene, QGraphicsView

from ..core.history import UndoHistory
from ..core.mask_tools import Box, ImagePyramid, LabelEditor, StepResult, heat_rgba, intersects, sl, snap
from .tools import TOOLS, BrushCursor, CanvasTool, OutlineSet, PredictionItem

UNCLASSIFIED_COLOUR = "#ffe119"
FALLBACK_COLOURS = ("#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990", "#9a6324")
BACKGROUND = "#1e1f22"
FILL_BOUND = 2048  # flood fill stays within the visible part, at most this far from the seed
Z_IMAGE, Z_HEAT, Z_OVERLAY, Z_PRED, Z_OUTLINE, Z_CURSOR = 0, 10, 20, 30, 40, 70


def to_qimage(arr: np.ndarray) -> QImage:
    """A QImage over a contiguous uint8 array (gray, BGR or premultiplied RGBA); keep the
    array alive while the image is used (QPixmap.fromImage copies it)."""
    fmt = {2: QImage.Format_Grayscale8, 3: QImage.Format_BGR888, 4: QImage.Format_RGBA8888_Premultiplied}
    h, w = arr.shape[:2]
    return QImage(arr.data, w, h, arr.strides[0], fmt[2 if arr.ndim == 2 else arr.shape[2]])


class TiledLayer(QGraphicsItem):
    """A raster drawn from pyramid tiles. ``source(level, box)`` gives the pixels of
    ``box`` (level coordinates) as a uint8 array, or None where all transparent."""

    def __init__(self, tile: int, source: Callable[[int, Box], Optional[np.ndarray]],
                 level_for: Callable[[float], int], cache_tiles: int) -> None:
        super().__init__()
        self.tile, self._source, self._level_for, self._cap = tile, source, level_for, cache_tiles
        self._sizes: list[tuple[int, int]] = [(0, 0)]
        self._cache: OrderedDict[tuple[int, int, int], Optional[QPixmap]] = OrderedDict()
        self._level = 0
        self.rendered = 0  # tiles rendered whole (cache misses)
        self.patched = 0  # cached tiles patched in place after an edit
        self.setFlag(QGraphicsItem.ItemUsesExtendedStyleOption)

    def reset(self, sizes: list[tuple[int, int]]) -> None:
        self.prepareGeometryChange()
        self._sizes = sizes
        self._cache.clear()

    def boundingRect(self) -> QRectF:
        return QRectF(0, 0, *self._sizes[0])

    def paint(self, painter: QPainter, option, widget=None) -> None:
        scale = option.levelOfDetailFromTransform(painter.worldTransform())
        lv = self._level = max(0, min(len(self._sizes) - 1, self._level_for(scale)))
        r = option.exposedRect.intersected(self.boundingRect())
        if r.isEmpty():
            return
        painter.setRenderHint(QPainter.SmoothPixmapTransform, scale * (1 << lv) < 0.999)
        span = self.tile << lv
        (w, h), (lw, lh) = self._sizes[0], self._sizes[lv]
        for ty in range(int(r.top()) // span, min(math.ceil(r.bottom() / span), -(-lh // self.tile))):
            for tx in range(int(r.left()) // span, min(math.ceil(r.right() / span), -(-lw // self.tile))):
                pix = self._tile(lv, tx, ty)
                if pix is None:
                    continue
                x0, y0 = tx * span, ty * span
                tw, th = min(pix.width() << lv, w - x0), min(pix.height() << lv, h - y0)
                painter.drawPixmap(QRectF(x0, y0, tw, th), pix, QRectF(0, 0, tw / (1 << lv), th / (1 << lv)))

    def _tile_box(self, lv: int, tx: int, ty: int) -> Box:
        lw, lh = self._sizes[lv]
        t = self.tile
        return tx * t, ty * t, min((tx + 1) * t, lw), min((ty + 1) * t, lh)

    def _tile(self, lv: int, tx: int, ty: int) -> Optional[QPixmap]:
        key = (lv, tx, ty)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        arr = self._source(lv, self._tile_box(lv, tx, ty))
        pix = None if arr is None else QPixmap.fromImage(to_qimage(arr))
        self.rendered += 1
        self._cache[key] = pix
        if len(self._cache) > self._cap:
            self._cache.popitem(last=False)
        return pix

    def refresh(self, box: Box) -> None:
        """Pixels of ``box`` (full resolution) changed: patch the cached tiles of the
        level on screen, drop the others, repaint that rectangle."""
        for key in [k for k in self._cache if intersects(self._scene_box(*k), box)]:
            lv = key[0]
            if lv != self._level:
                del self._cache[key]
                continue
            tb = self._tile_box(*key)
            sub = (max(box[0] >> lv, tb[0]), max(box[1] >> lv, tb[1]),
                   min(-(-box[2] >> lv), tb[2]), min(-(-box[3] >> lv), tb[3]))  # level coords, in the tile
            if sub[0] >= sub[2] or sub[1] >= sub[3]:
                continue
            pix, arr = self._cache[key], self._source(lv, sub)
            if pix is None and arr is None:
                continue
            if pix is None:
                pix = QPixmap(tb[2] - tb[0], tb[3] - tb[1])
                pix.fill(Qt.transparent)
            p = QPainter(pix)
            p.setCompositionMode(QPainter.CompositionMode_Source)
            x, y = sub[0] - tb[0], sub[1] - tb[1]
            if arr is None:
                p.fillRect(x, y, sub[2] - sub[0], sub[3] - sub[1], Qt.transparent)
            else:
                p.drawImage(x, y, to_qimage(arr))
            p.end()
            self._cache[key] = pix
            self.patched += 1
        self.update(QRectF(box[0], box[1], box[2] - box[0], box[3] - box[1]))

    def _scene_box(self, lv: int, tx: int, ty: int) -> Box:
        span = self.tile << lv
        return tx * span, ty * span, (tx + 1) * span, (ty + 1) * span


def image_level(scale: float) -> int:
    """Finest level not larger than needed: drawn shrunk by at most 2x, smoothly."""
    return max(0, math.floor(-math.log2(scale) + 1e-9)) if scale > 0 else 0


def overlay_level(scale: float) -> int:
    return max(0, round(-math.log2(scale))) if scale > 0 else 0


class MaskCanvas(QGraphicsView):
    """Zoomable, tiled canvas showing one image with its editable mask (module notes)."""

    mask_edited = Signal(int)  # image id: an edit, undo or redo finished (mask or region classes changed)
    region_selected = Signal(int, int)  # image id, region index (1-based) or 0 for none
    zoom_changed = Signal(float)  # screen pixels per image pixel
    brush_size_changed = Signal(int)

    MIN_ZOOM, MAX_ZOOM = 1 / 64, 64.0

    def __init__(self, history: UndoHistory, parent=None) -> None:
        super().__init__(parent)
        self.history = history
        self._editor = LabelEditor(history)
        self._image: Optional[np.ndarray] = None
        self._image_pyr: Optional[ImagePyramid] = None
        self._colours: dict[str, str] = {}
        self._lut = np.zeros((256, 4), np.uint8)
        self._left: dict[int, tuple] = {}  # image id -> (shape, mask pixels) when it was left
        self._brush, self._tolerance, self._fitted = 15, 24, True
        self._selected_id, self._selected_index, self._selected_first = 0, 0, (0, 0)
        self._heat_src: Optional[np.ndarray] = None
        self._pred_src: Optional[np.ndarray] = None
        self._show = {"heatmap": False, "prediction": False}
        self._pan_from: Optional[QPoint] = None
        self._space = False
        self._setup_scene()
        self._tool: CanvasTool = TOOLS["brush"](self)
        self.set_tool("brush")

    def _setup_scene(self) -> None:
        scene = QGraphicsScene(self)
        scene.setItemIndexMethod(QGraphicsScene.NoIndex)  # few items, some moving
        self.setScene(scene)
        self.setBackgroundBrush(QColor(BACKGROUND))
        self.setFrameShape(QFrame.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setTransformationAnchor(QGraphicsView.NoAnchor)
        self.setResizeAnchor(QGraphicsView.NoAnchor)
        self.setViewportUpdateMode(QGraphicsView.MinimalViewportUpdate)
        self.setOptimizationFlags(QGraphicsView.DontAdjustForAntialiasing)
        self.setFocusPolicy(Qt.StrongFocus)
        self.viewport().setMouseTracking(True)
        self._image_layer = TiledLayer(512, self._image_source, image_level, 96)  # <= ~100 MB
        self._overlay = TiledLayer(256, self._overlay_source, overlay_level, 320)
        self._heat = QGraphicsPixmapItem()
        self._heat.setTransformationMode(Qt.SmoothTransformation)
        self._pred, self._cursor = PredictionItem(), BrushCursor()
        self._outlines = OutlineSet(scene, Z_OUTLINE)
        for item, z in ((self._image_layer, Z_IMAGE), (self._heat, Z_HEAT), (self._overlay, Z_OVERLAY),
                        (self._pred, Z_PRED), (self._cursor, Z_CURSOR)):
            item.setZValue(z)
            scene.addItem(item)
        self._overlay.setOpacity(0.5)
        self._heat.setOpacity(0.55)
        for item in (self._heat, self._pred, self._cursor):
            item.setVisible(False)

    # ------------------------------------------------------------ public API

    def set_image(self, image_id: int, image_bgr: np.ndarray, mask: Optional[np.ndarray],
                  classes: Sequence[Optional[str]], class_colours: dict[str, str],
                  heatmap: Optional[np.ndarray] = None, pred_mask: Optional[np.ndarray] = None) -> None:
        """Show an image (BGR or gray uint8; referenced, not copied) with its label
        (``mask`` copied; ``classes`` one per region in label_regions order). Coming back
        to an image keeps its undo history when ``mask`` is the working mask it left."""
        self._tool.cancel()
        self._remember_leaving()
        h, w = image_bgr.shape[:2]
        back = self._left.pop(image_id, None)
        if back is not None and (self.history.can_undo(image_id) or self.history.can_redo(image_id)):
            if back != ((h, w), 0 if mask is None else int(np.count_nonzero(mask))):
                self.history.forget(image_id)  # changed elsewhere: its patches no longer apply
        self._image = image_bgr if image_bgr.ndim == 2 or image_bgr.shape[2] == 3 else image_bgr[..., :3]
        self._colours.update(class_colours)
        self._editor.load(image_id, (h, w), mask, classes)
        self._update_lut()
        sizes = list(self._editor.pyramid.sizes)
        self._image_pyr = ImagePyramid(self._image, len(sizes) - 1, reuse=self._image_pyr)
        self._image_layer.reset(sizes)
        self._overlay.reset(sizes)
        self._heat_src, self._pred_src = heatmap, pred_mask
        self._heat.setPixmap(QPixmap())
        self._pred.set_mask(None)
        self._refresh_decorations()
        self._outlines.selected = self._selected_id = 0
        self._outlines.rebuild(self._editor, self._colour_of)
        self._sync_selection(())
        self.fit_to_window()

    def image_id(self) -> Optional[int]:
        return self._editor.image_id

    def working_mask(self) -> np.ndarray:
        """The live working mask as a read-only view (copy it before giving it to a thread)."""
        view = self._editor.mask.view()
        view.flags.writeable = False
        return view

    def regions(self) -> list:
        """Regions of the working mask (``core.masks.Region``, in label_regions order)."""
        return self._editor.regions()

    def region_classes(self) -> list[Optional[str]]:
        """Class of each working region: pass it to ``Review.replace_mask`` when saving."""
        return self._editor.region_classes()

    def set_tool(self, name: str) -> None:
        if name not in TOOLS:
            raise ValueError(f"unknown tool {name!r}; one of {sorted(TOOLS)}")
        self._tool.finish()
        self._tool = TOOLS[name](self)
        self.viewport().setCursor(self._tool.cursor)
        self._cursor.setVisible(False)

    def tool(self) -> str:
        return self._tool.name

    def set_brush_size(self, px: int) -> None:
        px = int(min(max(px, 1), 999))
        if px != self._brush:
            self._brush = px
            self._cursor.set_diameter(px)
            self.brush_size_changed.emit(px)

    def brush_size(self) -> int:
        return self._brush

    def set_fill_tolerance(self, t: int) -> None:
        self._tolerance = int(min(max(t, 0), 255))

    def set_paint_class(self, name: Optional[str]) -> None:
        """Class of newly painted pixels that join no classified region (default None)."""
        self._editor.paint_class = name
        self._update_lut()

    def set_class_colours(self, class_colours: dict[str, str]) -> None:
        self._colours.update(class_colours)
        self._update_lut()
        self._overlay.reset(list(self._editor.pyramid.sizes))
        self._outlines.rebuild(self._editor, self._colour_of)

    def set_overlay_opacity(self, a: float) -> None:
        self._overlay.setOpacity(min(max(float(a), 0.0), 1.0))

    def set_heatmap_opacity(self, a: float) -> None:
        self._heat.setOpacity(min(max(float(a), 0.0), 1.0))

    def set_show_heatmap(self, on: bool) -> None:
        self._show["heatmap"] = bool(on)
        self._refresh_decorations()

    def set_show_prediction(self, on: bool) -> None:
        self._show["prediction"] = bool(on)
        self._refresh_decorations()

    def set_show_outlines(self, on: bool) -> None:
        self._outlines.set_visible(bool(on))

    def undo(self) -> bool:
        return self._history_step(self._editor.undo)

    def redo(self) -> bool:
        return self._history_step(self._editor.redo)

    def can_undo(self) -> bool:
        return self._editor.image_id is not None and self.history.can_undo(self._editor.image_id)

    def can_redo(self) -> bool:
        return self._editor.image_id is not None and self.history.can_redo(self._editor.image_id)

    def selected_region(self) -> int:
        return self._editor.index_of(self._selected_id)

    def select_region(self, index: int) -> None:
        self._selected_id = self._editor.info(index).id if index else 0
        self._sync_selection(())

    def delete_selected_region(self) -> None:
        if self.selected_region():
            self._step(self._editor.delete_region(self.selected_region()))

    def merge_regions(self, a: int, b: int) -> None:
        self._step(self._editor.merge_regions(a, b))

    def split_region(self, index: int, line: tuple[QPointF, QPointF]) -> None:
        p0, p1 = ((p.x(), p.y()) for p in line)
        self._step(self._editor.split_region(index, p0, p1))

    def set_region_class(self, index: int, name: Optional[str]) -> None:
        """Set a region's defect class: one undo step, emits mask_edited."""
        self._step(self._editor.set_region_class(index, name))

    def replace_mask(self, mask: np.ndarray) -> None:
        """Replace the working mask as one undo step (e.g. take the checker's prediction)."""
        self._step(self._editor.replace_mask(mask))

    def zoom(self) -> float:
        return self.transform().m11()

    def fit_to_window(self) -> None:
        w, h = self._editor.size
        if w and h:
            vw, vh = max(self.viewport().width(), 1), max(self.viewport().height(), 1)
            self._set_zoom(min(vw / w, vh / h) * 0.97)
            self._centre_on(QPointF(w / 2, h / 2))
            self._fitted = True

    def zoom_to(self, factor: float) -> None:
        """Zoom (screen px per image px) about the middle of the view."""
        self._set_zoom(factor)

    def tile_stats(self) -> dict[str, int]:
        """Counters for tests and benchmarks: tiles rendered whole, overlay tiles patched."""
        return {"image_rendered": self._image_layer.rendered, "overlay_rendered": self._overlay.rendered,
                "overlay_patched": self._overlay.patched}

    # ------------------------------------------------------------ used by the tools

    def stroke_active(self) -> bool:
        return self._editor.stroke_active

    def begin_stroke(self, erase: bool) -> None:
        self._editor.begin_stroke(erase)

    def stroke_to(self, pos: QPointF) -> None:
        box = self._editor.stroke_to(pos.x(), pos.y(), self._brush)
        if box is not None:
            self._overlay.refresh(box)

    def end_stroke(self) -> None:
        self._step(self._editor.end_stroke())

    def cancel_stroke(self) -> None:
        box = self._editor.cancel_step()
        if box is not None:
            self._overlay.refresh(box)

    def fill_polygon(self, points: Sequence[tuple[float, float]]) -> None:
        self._step(self._editor.fill_polygon(points))

    def flood_fill_at(self, pos: QPointF) -> None:
        """Flood fill within the visible part of the image (at most FILL_BOUND px away)."""
        x, y = math.floor(pos.x()), math.floor(pos.y())
        seen = self.mapToScene(self.viewport().rect()).boundingRect()
        bound = (max(math.floor(seen.left()), x - FILL_BOUND), max(math.floor(seen.top()), y - FILL_BOUND),
                 min(math.ceil(seen.right()), x + FILL_BOUND), min(math.ceil(seen.bottom()), y + FILL_BOUND))
        if self._image is not None:
            self._step(self._editor.flood_fill(self._image, x, y, self._tolerance, bound))

    def region_at(self, pos: QPointF) -> int:
        return self._editor.region_at(math.floor(pos.x()), math.floor(pos.y()))

    def split_along(self, p0: QPointF, p1: QPointF) -> None:
        """Split the region the cut crosses most (the selected one when it crosses it)."""
        n = max(2, int(QLineF(p0, p1).length() * 2))
        counts = np.bincount([self.region_at(p0 + (p1 - p0) * (k / n)) for k in range(n + 1)])
        counts[0] = 0
        if counts.any():
            sel = self.selected_region()
            index = sel if 0 < sel < len(counts) and counts[sel] else int(np.argmax(counts))
            self.split_region(index, (p0, p1))

    # ------------------------------------------------------------ internals

    def _image_source(self, lv: int, box: Box) -> np.ndarray:
        return np.ascontiguousarray(self._image_pyr.level(lv)[sl(box)])

    def _overlay_source(self, lv: int, box: Box) -> Optional[np.ndarray]:
        codes = self._editor.display(box) if lv == 0 else self._editor.pyramid.levels[lv][sl(box)]
        return self._lut[codes] if codes.any() else None

    def _colour_of(self, code: int) -> str:
        name = self._editor.name_of(code)
        if name is None:
            return UNCLASSIFIED_COLOUR
        return self._colours.get(name) or FALLBACK_COLOURS[(code - 2) % len(FALLBACK_COLOURS)]

    def _update_lut(self) -> None:
        self._editor.code_of(self._editor.paint_class)
        for code in range(1, len(self._editor.class_names) + 2):
            c = QColor(self._colour_of(code))
            self._lut[code] = (c.red(), c.green(), c.blue(), 255)

    def _step(self, res: Optional[StepResult]) -> bool:
        if res is None:
            return False
        self._update_lut()
        self._overlay.refresh(res.box)
        self._outlines.update_regions(self._editor, self._colour_of, res.removed, res.added)
        self._sync_selection(res.removed)
        self.mask_edited.emit(self._editor.image_id)
        return True

    def _history_step(self, fn) -> bool:
        self._tool.finish()
        return self._editor.image_id is not None and self._step(fn())

    def _sync_selection(self, removed) -> None:
        """Follow the selected region through an edit (by its first pixel); announce
        its index when it changed."""
        if self._selected_id and (self._selected_id in removed or not self.selected_region()):
            y, x = self._selected_first
            index = self._editor.region_at(x, y)
            self._selected_id = self._editor.info(index).id if index else 0
        index = self.selected_region()
        if index:
            self._selected_first = self._editor.info(index).first
        self._outlines.set_selected(self._selected_id)
        if index != self._selected_index:
            self._selected_index = index
            self.region_selected.emit(self._editor.image_id, index)

    def _remember_leaving(self) -> None:
        ed = self._editor
        if ed.image_id is not None:
            self._tool.finish()
            self._left[ed.image_id] = (ed.mask.shape, sum(r.area for r in ed.region_infos()))

    def _refresh_decorations(self) -> None:
        if self._show["heatmap"] and self._heat_src is not None and self._heat.pixmap().isNull():
            arr = heat_rgba(self._heat_src)
            self._heat.setPixmap(QPixmap.fromImage(to_qimage(arr)))
            w, h = self._editor.size
            self._heat.setTransform(QTransform.fromScale(w / arr.shape[1], h / arr.shape[0]))
        self._heat.setVisible(self._show["heatmap"] and self._heat_src is not None)
        if self._show["prediction"] and self._pred_src is not None and self._pred.empty:
            self._pred.set_mask(self._pred_src)
        self._pred.setVisible(self._show["prediction"] and self._pred_src is not None)

    # ---- view geometry (scroll bars hidden; the scene rect leaves a view's worth of margin)

    def _set_zoom(self, factor: float, anchor: Optional[QPointF] = None) -> None:
        """Zoom keeping the scene point under ``anchor`` (view px; default the middle) fixed."""
        factor = min(max(factor, self.MIN_ZOOM), self.MAX_ZOOM)
        if anchor is None:
            anchor = QPointF(self.viewport().width() / 2, self.viewport().height() / 2)
        fixed = self.viewportTransform().inverted()[0].map(anchor)
        self.setTransform(QTransform.fromScale(factor, factor))
        self._update_scene_rect()
        self._scroll_by(self.viewportTransform().map(fixed) - anchor)
        for item in (self._cursor, self._pred, self._outlines):
            item.set_view_scale(factor)
        self._fitted = False
        self.zoom_changed.emit(factor)

    def _update_scene_rect(self) -> None:
        w, h = self._editor.size
        mx, my = self.viewport().width() / self.zoom(), self.viewport().height() / self.zoom()
        self.setSceneRect(QRectF(-mx, -my, w + 2 * mx, h + 2 * my))

    def _scroll_by(self, d: QPointF) -> None:
        hb, vb = self.horizontalScrollBar(), self.verticalScrollBar()
        hb.setValue(hb.value() + round(d.x()))
        vb.setValue(vb.value() + round(d.y()))

    def _centre_on(self, p: QPointF) -> None:
        centre = QPointF(self.viewport().width() / 2, self.viewport().height() / 2)
        self._scroll_by(self.viewportTransform().map(p) - centre)

    # ---- events

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        if self._fitted:
            self.fit_to_window()
        else:
            self._update_scene_rect()

    def mousePressEvent(self, event: QMouseEvent) -> None:
        b = event.button()
        if b == Qt.MiddleButton or (b == Qt.LeftButton and (self._space or self._tool.name == "pan")):
            self._pan_from = event.position().toPoint()
            self.viewport().setCursor(Qt.ClosedHandCursor)
        else:
            self._tool.press(self._scene_pos(event), event)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        pos = self._scene_pos(event)
        if self._pan_from is not None:
            now = event.position().toPoint()
            self._scroll_by(QPointF(self._pan_from - now))
            self._pan_from = now
            return
        self._tool.move(pos, event)
        self._place_cursor(pos)

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        if self._pan_from is not None and event.button() in (Qt.MiddleButton, Qt.LeftButton):
            self._pan_from = None
            self.viewport().setCursor(Qt.OpenHandCursor if self._space else self._tool.cursor)
        else:
            self._tool.release(self._scene_pos(event), event)

    def mouseDoubleClickEvent(self, event: QMouseEvent) -> None:
        self._tool.double_click(self._scene_pos(event), event)

    def wheelEvent(self, event: QWheelEvent) -> None:
        dy = event.angleDelta().y() or event.angleDelta().x()
        if dy and event.modifiers() & Qt.ControlModifier:
            new = round(self._brush * 1.15 ** (dy / 120))
            self.set_brush_size(new if new != self._brush else self._brush + (1 if dy > 0 else -1))
            self._place_cursor(self._scene_pos(event))
        elif dy:
            self._set_zoom(self.zoom() * 2 ** (dy / 360), event.position())
        event.accept()

    def event(self, event) -> bool:
        if event.type() == QEvent.ShortcutOverride:  # keys a tool needs now beat window shortcuts
            key = event.key()
            if key == Qt.Key_Space or self._tool.wants_key(key):
                event.accept()
                return True
        return super().event(event)

    def keyPressEvent(self, event: QKeyEvent) -> None:
        key = event.key()
        if key == Qt.Key_Space:
            if not event.isAutoRepeat():
                self._space = True
                self.viewport().setCursor(Qt.OpenHandCursor)
        elif key in (Qt.Key_BracketLeft, Qt.Key_BracketRight):  # when no window action took them
            d = max(1, round(self._brush * 0.1))
            self.set_brush_size(self._brush + (d if key == Qt.Key_BracketRight else -d))
        elif not self._tool.key(event):
            super().keyPressEvent(event)

    def keyReleaseEvent(self, event: QKeyEvent) -> None:
        if event.key() == Qt.Key_Space and not event.isAutoRepeat():
            self._space = False
            self._pan_from = None
            self.viewport().setCursor(self._tool.cursor)
        else:
            super().keyReleaseEvent(event)

    def leaveEvent(self, event) -> None:
        self._cursor.setVisible(False)
        super().leaveEvent(event)

    def _scene_pos(self, event) -> QPointF:
        return self.viewportTransform().inverted()[0].map(event.position())

    def _place_cursor(self, pos: QPointF) -> None:
        show = self._tool.shows_brush and self._image is not None
        if show:
            self._cursor.setPos(QPointF(*snap(pos.x(), pos.y(), self._brush)))
        self._cursor.setVisible(show)
