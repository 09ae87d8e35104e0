"""The mask canvas driven with real mouse, wheel and key events (offscreen).

Positions are given in image pixels and mapped through the view, so the tests check
what a person's hand would do: paint, erase, fill, select, split, merge, zoom, undo."""
from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import QEvent, QPoint, QPointF, Qt
from PySide6.QtGui import QMouseEvent, QWheelEvent
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication

from annotator.core.history import UndoHistory
from annotator.core.mask_tools import capsule, snap
from annotator.core.masks import label_regions
from annotator.gui.canvas import MaskCanvas

H, W = 200, 300
COLOURS = {"hole": "#f58231", "stain": "#4363d8"}


def blobs() -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[20:40, 20:60] = True     # region 1
    m[100:140, 150:200] = True  # region 2
    return m


def image() -> np.ndarray:
    img = np.full((H, W, 3), 90, np.uint8)
    img[:, 200:] = 200  # a bright band on the right
    img[60:80, 100:130] = 104  # a patch 14 grey levels off
    return img


@pytest.fixture
def canvas(qtbot):
    c = MaskCanvas(UndoHistory())
    qtbot.addWidget(c)
    c.resize(800, 600)
    c.show()
    qtbot.waitExposed(c)
    c.set_image(1, image(), blobs(), ["hole", None], COLOURS)
    c.zoom_to(2.0)
    return c


def vpos(c: MaskCanvas, x: float, y: float) -> QPointF:
    """Viewport position of image point (x, y)."""
    return c.viewportTransform().map(QPointF(x, y))


def mouse(c, kind, x, y, button=Qt.LeftButton, buttons=None, mods=Qt.NoModifier):
    p = vpos(c, x, y)
    buttons = button if buttons is None else buttons
    ev = QMouseEvent(kind, p, c.viewport().mapToGlobal(p), button, buttons, mods)
    QApplication.sendEvent(c.viewport(), ev)


def drag(c, points, button=Qt.LeftButton, mods=Qt.NoModifier):
    (x0, y0), rest = points[0], points[1:]
    mouse(c, QEvent.MouseButtonPress, x0, y0, button, button, mods)
    for x, y in rest:
        mouse(c, QEvent.MouseMove, x, y, Qt.NoButton, button, mods)
    x1, y1 = points[-1]
    mouse(c, QEvent.MouseButtonRelease, x1, y1, button, Qt.NoButton, mods)


def click(c, x, y, mods=Qt.NoModifier):
    drag(c, [(x, y)], mods=mods)


def wheel(c, x, y, dy, mods=Qt.NoModifier):
    p = vpos(c, x, y)
    ev = QWheelEvent(p, c.viewport().mapToGlobal(p), QPoint(), QPoint(0, dy), Qt.NoButton, mods,
                     Qt.NoScrollPhase, False)
    QApplication.sendEvent(c.viewport(), ev)


def expected_stroke(points, size) -> np.ndarray:
    out = np.zeros((H, W), bool)
    snapped = [snap(x, y, size) for x, y in points]
    for a, b in zip(snapped, snapped[1:] + snapped[-1:]):
        box, patch = capsule(a, b, size / 2, W, H)
        out[box[1]:box[3], box[0]:box[2]] |= patch
    return out


def test_a_fast_brush_stroke_paints_the_whole_path_and_nothing_else(canvas, qtbot):
    canvas.set_brush_size(5)
    before = canvas.working_mask().copy()
    pts = [(70.3, 160.2), (120.7, 170.1), (250.2, 60.9)]  # jumps of 50-170 px between events
    with qtbot.waitSignal(canvas.mask_edited) as sig:
        drag(canvas, pts)
    assert sig.args == [1]
    np.testing.assert_array_equal(canvas.working_mask(), before | expected_stroke(pts, 5))
    assert len(canvas.history.of(1)) == 1  # one stroke = one undo step


def test_eraser_removes_exactly_under_the_stroke(canvas, qtbot):
    canvas.set_tool("eraser")
    canvas.set_brush_size(4)
    before = canvas.working_mask().copy()
    pts = [(10, 30), (70, 30)]
    with qtbot.waitSignal(canvas.mask_edited):
        drag(canvas, pts)
    np.testing.assert_array_equal(canvas.working_mask(), before & ~expected_stroke(pts, 4))
    assert len(canvas.regions()) == 3  # region 1 cut in two
    assert canvas.region_classes() == ["hole", "hole", None]


def test_undo_redo_restore_exactly_and_survive_switching_images(canvas, qtbot):
    start = canvas.working_mask().copy()
    drag(canvas, [(100, 100), (140, 150)])
    canvas.set_tool("eraser")
    drag(canvas, [(30, 10), (30, 50)])
    after, after_classes = canvas.working_mask().copy(), canvas.region_classes()
    assert after_classes == ["hole", "hole", None, None] and len(canvas.history.of(1)) == 2
    with qtbot.waitSignal(canvas.mask_edited):
        assert canvas.undo()
    assert canvas.undo()
    np.testing.assert_array_equal(canvas.working_mask(), start)
    assert not canvas.undo()
    assert canvas.redo() and canvas.redo() and not canvas.redo()
    np.testing.assert_array_equal(canvas.working_mask(), after)
    assert canvas.region_classes() == after_classes

    # switch to another image, edit it, come back with the mask the canvas left
    left = canvas.working_mask().copy()
    canvas.set_image(2, image(), None, [], COLOURS)
    canvas.zoom_to(2.0)
    canvas.set_tool("brush")
    drag(canvas, [(10, 10)])
    assert canvas.working_mask().any()
    canvas.set_image(1, image(), left, after_classes, COLOURS)
    assert canvas.region_classes() == after_classes
    assert canvas.undo() and canvas.undo()
    np.testing.assert_array_equal(canvas.working_mask(), start)
    assert canvas.region_classes() == ["hole", None]


def test_a_mask_changed_elsewhere_drops_the_stale_history(canvas):
    drag(canvas, [(100, 100)])
    canvas.set_image(2, image(), None, [], COLOURS)
    canvas.set_image(1, image(), blobs(), ["hole", None], COLOURS)  # not the mask it left
    assert not canvas.undo()


def test_polygon_fill_closes_on_double_click_enter_and_cancels_on_escape(canvas, qtbot):
    canvas.set_tool("polygon")
    before = canvas.working_mask().copy()
    for x, y in [(100, 150), (130, 150), (130, 170), (100, 170)]:
        click(canvas, x, y)
    with qtbot.waitSignal(canvas.mask_edited):  # a double click = click + double-click event
        mouse(canvas, QEvent.MouseButtonDblClick, 100, 170)
    added = canvas.working_mask() & ~before
    assert added[150:170, 100:130].all() and added.sum() == 30 * 20
    for x, y in [(240, 20), (260, 20), (260, 40)]:
        click(canvas, x, y)
    QTest.keyClick(canvas, Qt.Key_Escape)
    for x, y in [(240, 20), (260, 20), (250, 40)]:
        click(canvas, x, y)
    with qtbot.waitSignal(canvas.mask_edited):
        QTest.keyClick(canvas, Qt.Key_Return)
    assert canvas.working_mask()[20:40, 240:260].sum() > 150
    assert len(canvas.history.of(1)) == 2


def test_flood_fill_follows_the_image_colour_with_tolerance(canvas, qtbot):
    canvas.set_tool("fill")
    canvas.fit_to_window()
    canvas.set_fill_tolerance(10)
    before = canvas.working_mask().copy()
    with qtbot.waitSignal(canvas.mask_edited):
        click(canvas, 110, 70)  # inside the patch: only the patch
    added = canvas.working_mask() & ~before
    assert added[60:80, 100:130].all() and added.sum() == 600
    canvas.undo()
    canvas.set_fill_tolerance(20)  # the patch and the dark background, not the bright band
    click(canvas, 110, 70)
    m = canvas.working_mask()
    assert m[:, :200].all() and not (m[:, 200:] & ~before[:, 200:]).any()


def test_select_delete_merge_and_split_regions(canvas, qtbot):
    canvas.set_tool("select")
    with qtbot.waitSignal(canvas.region_selected) as sig:
        click(canvas, 170, 120)
    assert sig.args == [1, 2] and canvas.selected_region() == 2
    with qtbot.waitSignal(canvas.mask_edited):  # Shift+click: merge region 1 into the selection
        click(canvas, 30, 30, mods=Qt.ShiftModifier)
    assert len(canvas.regions()) == 1 and canvas.region_classes() == ["hole"]
    canvas.undo()
    assert len(canvas.regions()) == 2 and canvas.region_classes() == ["hole", None]

    canvas.set_tool("split")  # a cut drawn a little short of both edges
    with qtbot.waitSignal(canvas.mask_edited):
        drag(canvas, [(175.5, 104), (175.5, 136)])
    assert [r.area for r in canvas.regions()] == [800, 1000, 960]
    assert not canvas.working_mask()[100:140, 175].any()

    canvas.set_tool("select")
    click(canvas, 30, 30)
    with qtbot.waitSignal(canvas.region_selected) as sig:
        canvas.delete_selected_region()
    assert sig.args == [1, 0]
    assert len(canvas.regions()) == 2 and not canvas.working_mask()[20:40, 20:60].any()
    canvas.merge_regions(1, 2)
    assert len(canvas.regions()) == 1
    lab, regs = label_regions(canvas.working_mask())
    assert [r.bbox for r in regs] == [r.bbox for r in canvas.regions()]


def test_set_region_class_recolours_and_is_undoable(canvas, qtbot):
    with qtbot.waitSignal(canvas.mask_edited):
        canvas.set_region_class(2, "stain")
    assert canvas.region_classes() == ["hole", "stain"]
    canvas.undo()
    assert canvas.region_classes() == ["hole", None]


def test_brush_size_follows_ctrl_wheel_and_brackets(canvas, qtbot):
    canvas.set_brush_size(20)
    with qtbot.waitSignal(canvas.brush_size_changed) as sig:
        wheel(canvas, 100, 100, 120, Qt.ControlModifier)
    assert sig.args[0] == canvas.brush_size() > 20
    zoom = canvas.zoom()
    wheel(canvas, 100, 100, -240, Qt.ControlModifier)
    assert canvas.brush_size() < 20 and canvas.zoom() == zoom  # Ctrl+wheel does not zoom
    size = canvas.brush_size()
    QTest.keyClick(canvas, Qt.Key_BracketRight)
    QTest.keyClick(canvas, Qt.Key_BracketRight)
    QTest.keyClick(canvas, Qt.Key_BracketLeft)
    assert canvas.brush_size() > size


def test_wheel_zoom_keeps_the_point_under_the_cursor(canvas, qtbot):
    for x, y, dy in [(37.5, 151.25, 120), (250, 20, 360), (120, 90, -480), (5, 5, 240)]:
        p = vpos(canvas, x, y)
        before = canvas.zoom()
        with qtbot.waitSignal(canvas.zoom_changed):
            wheel(canvas, x, y, dy)
        assert canvas.zoom() == pytest.approx(before * 2 ** (dy / 360))
        q = canvas.viewportTransform().inverted()[0].map(p)
        assert abs(q.x() - x) * canvas.zoom() <= 0.51 and abs(q.y() - y) * canvas.zoom() <= 0.51


def test_middle_drag_and_space_drag_pan(canvas):
    p = QPointF(400, 300)
    at = canvas.viewportTransform().inverted()[0].map(p)
    drag(canvas, [(at.x(), at.y()), (at.x() + 20, at.y() + 10)], button=Qt.MiddleButton)
    moved = canvas.viewportTransform().inverted()[0].map(p)
    assert moved.x() == pytest.approx(at.x() - 20, abs=1) and moved.y() == pytest.approx(at.y() - 10, abs=1)
    before = canvas.working_mask().copy()
    QTest.keyPress(canvas, Qt.Key_Space)
    drag(canvas, [(100, 100), (110, 100)])  # brush tool, but Space held: pans, no paint
    QTest.keyRelease(canvas, Qt.Key_Space)
    np.testing.assert_array_equal(canvas.working_mask(), before)


def test_overlay_heatmap_prediction_and_outlines_toggle(canvas):
    heat = np.zeros((H, W), np.float32)
    heat[90:150, 140:210] = 1.5
    pred = blobs()
    pred[100:140, 150:210] = True
    canvas.set_image(3, image(), blobs(), ["hole", None], COLOURS, heatmap=heat, pred_mask=pred)
    canvas.set_show_heatmap(True)
    canvas.set_show_prediction(True)
    canvas.set_overlay_opacity(0.7)
    assert canvas._heat.isVisible() and canvas._pred.isVisible() and not canvas._pred.path.isEmpty()
    assert canvas._overlay.opacity() == pytest.approx(0.7)
    canvas.set_show_outlines(False)
    assert not any(o.isVisible() for o, _ in canvas._outlines.items.values())
    canvas.set_show_outlines(True)
    assert [b.text for _, b in canvas._outlines.items.values()] == ["1 hole", "2"]
    assert not canvas.grab().isNull()


def test_a_stroke_on_a_large_image_repaints_only_its_tiles(qtbot):
    c = MaskCanvas(UndoHistory())
    qtbot.addWidget(c)
    c.resize(900, 700)
    c.show()
    qtbot.waitExposed(c)
    big = np.zeros((4000, 6000, 3), np.uint8)
    big[..., 1] = np.arange(6000, dtype=np.uint8)[None, :]
    c.set_image(7, big, None, [], COLOURS)
    c.grab()  # fitted: the whole image from the small pyramid levels
    fitted = c.tile_stats()
    assert 0 < fitted["image_rendered"] <= 12
    c.zoom_to(1.0)
    c._centre_on(QPointF(3000, 2000))
    c.grab()
    warm = c.tile_stats()
    c.set_brush_size(9)
    drag(c, [(3000, 2000), (3030, 2010), (3060, 2000)])
    c.grab()
    after = c.tile_stats()
    assert after["image_rendered"] == warm["image_rendered"]  # the image is not re-rendered
    assert after["overlay_rendered"] == warm["overlay_rendered"]  # no overlay tile rebuilt whole
    assert 0 < after["overlay_patched"] - warm["overlay_patched"] <= 2 * 3  # 3 dabs, <= 2 tiles each
    m = c.working_mask()
    assert m[2000, 3000] and m[2005, 3015] and m[2010, 3030] and m[2000, 3060] and m.sum() < 1000
    edit = c.history.of(7)._undo[0]
    assert edit.before.shape[0] * edit.before.shape[1] < 80 * 30


def test_patched_overlay_tiles_match_fresh_ones_at_every_zoom(qtbot):
    c = MaskCanvas(UndoHistory())
    qtbot.addWidget(c)
    c.resize(640, 480)
    c.show()
    qtbot.waitExposed(c)
    m = np.zeros((1500, 2600), bool)
    m[300:700, 400:900] = True
    c.set_image(8, np.full((1500, 2600, 3), 120, np.uint8), m, ["hole"], COLOURS)
    for zoom, tool in [(None, "brush"), (0.6, "eraser"), (1.3, "brush")]:
        if zoom:
            c.zoom_to(zoom)
        c.grab()  # tiles cached at this zoom's level
        c.set_tool(tool)
        c.set_brush_size(40)
        before = c.tile_stats()["overlay_patched"]
        drag(c, [(500, 500), (1300, 650), (1400, 1000)])
        assert c.tile_stats()["overlay_patched"] > before
        patched = c.grab().toImage()
        c._overlay.reset(list(c._editor.pyramid.sizes))  # drop every tile: render afresh
        assert c.grab().toImage() == patched
