"""Mask tools behind the canvas: shapes, pyramids, and the label editor (regions,
classes, one undo step per edit, bbox-only patches)."""
from __future__ import annotations

import numpy as np
import pytest

from annotator.core.history import UndoHistory
from annotator.core.mask_tools import (
    LabelEditor, MaxPyramid, PatchRecorder, capsule, cut_line, flood, polygon, snap, _max_pool,
)
from annotator.core.masks import label_regions

W, H = 120, 80


def editor(mask=None, classes=(), image_id=1, history=None) -> LabelEditor:
    ed = LabelEditor(history or UndoHistory())
    ed.load(image_id, (H, W), mask, classes)
    return ed


def stroke(ed: LabelEditor, points, size=5, erase=False):
    ed.begin_stroke(erase)
    for x, y in points:
        ed.stroke_to(x, y, size)
    return ed.end_stroke()


def two_blobs() -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[10:20, 10:30] = True   # region 1
    m[40:60, 60:90] = True   # region 2
    return m


def assert_consistent(ed: LabelEditor) -> None:
    """Locally relabelled regions == a full relabel; pyramid == a full max pool."""
    lab, regs = label_regions(ed.mask)
    assert [(r.index, r.area, r.bbox) for r in ed.regions()] == [(r.index, r.area, r.bbox) for r in regs]
    for r, info in zip(regs, ed.region_infos()):
        codes = np.unique(ed.cls[lab == r.index])
        assert codes.tolist() == [info.code], "a region is one class"
    level = ed.display((0, 0, W, H))
    for lv in range(1, len(ed.pyramid.levels)):
        level = _max_pool(level)
        np.testing.assert_array_equal(ed.pyramid.levels[lv], level)


# ---------------------------------------------------------------- shapes


def test_dabs_are_exactly_size_pixels_across():
    for size in (1, 2, 3, 4, 7, 10):
        x, y = snap(30.3, 20.8, size)
        box, patch = capsule((x, y), (x, y), size / 2, W, H)
        rows, cols = np.nonzero(patch)
        assert cols.max() - cols.min() + 1 == size and rows.max() - rows.min() + 1 == size
    box, patch = capsule(snap(30.3, 20.8, 1), snap(30.3, 20.8, 1), 0.5, W, H)
    assert patch.sum() == 1 and (box[0] + np.argmax(patch.any(0)), box[1] + np.argmax(patch.any(1))) == (30, 20)


def test_a_fast_segment_has_no_gaps():
    box, patch = capsule(snap(2, 3, 1), snap(100, 41, 1), 0.5, W, H)
    n, _ = label_regions(patch)[0].max(), None
    assert n == 1  # one connected line
    assert patch.any(axis=0).sum() == 99  # every column between the ends


def test_polygon_covers_pixel_centres_inside():
    box, patch = polygon([(10, 10), (20, 10), (20, 15), (10, 15)], W, H)
    m = np.zeros((H, W), bool)
    m[box[1]:box[3], box[0]:box[2]] = patch
    assert m[10:15, 10:20].all() and m.sum() == 50


def test_flood_fill_follows_colour_within_tolerance_and_bound():
    img = np.full((H, W, 3), 100, np.uint8)
    img[:, 60:] = 180
    img[30:40, 20:30] = 112  # a patch 12 levels off
    assert flood(img, (5, 5), 10, (0, 0, W, H))[1].sum() == 60 * H - 100
    box, patch = flood(img, (5, 5), 15, (0, 0, W, H))
    assert box == (0, 0, 60, H) and patch.all()
    box, patch = flood(img, (5, 5), 15, (0, 0, 50, 50))
    assert box == (0, 0, 50, 50)
    assert flood(img, (5, 5), 15, (10, 10, 20, 20)) is None  # seed outside the bound


def test_cut_line_is_extended_to_the_edges_and_splits():
    region = np.zeros((30, 40), bool)
    region[5:25, 5:35] = True
    cut = cut_line(region, (20.5, 10.5), (20.5, 20.5))  # drawn short of both edges
    rest = region & ~cut
    assert label_regions(rest)[1].__len__() == 2
    assert cut.sum() == 20 and cut[:, 20].sum() == 20


def test_max_pyramid_matches_a_full_max_pool_after_updates():
    rng = np.random.default_rng(0)
    base = np.zeros((77, 131), np.uint8)
    pyr = MaxPyramid(131, 77, 3, lambda b: base[b[1]:b[3], b[0]:b[2]])
    for _ in range(20):
        x0, y0 = rng.integers(0, 120), rng.integers(0, 70)
        base[y0:y0 + rng.integers(1, 9), x0:x0 + rng.integers(1, 9)] = rng.integers(0, 5)
        pyr.update((int(x0), int(y0), min(int(x0) + 9, 131), min(int(y0) + 9, 77)))
    level = base
    for lv in (1, 2, 3):
        level = _max_pool(level)
        np.testing.assert_array_equal(pyr.levels[lv], level)


def test_patch_recorder_trims_to_what_changed():
    a = np.zeros((300, 300), bool)
    rec = PatchRecorder(a)
    rec.touch((100, 100, 260, 140))
    a[110:112, 120:250] = True
    (edit,) = rec.edits()
    assert edit.bbox == (120, 110, 130, 2) and not edit.before.any() and edit.after.all()


# ---------------------------------------------------------------- editor


def test_load_keeps_classes_in_label_regions_order():
    ed = editor(two_blobs(), ["hole", None])
    assert ed.region_classes() == ["hole", None]
    assert_consistent(ed)


def test_a_stroke_is_one_undo_step_storing_only_its_box():
    hist = UndoHistory()
    ed = editor(history=hist)
    res = stroke(ed, [(10, 10), (40, 12), (70, 30)], size=5)
    assert len(hist.of(1)) == 1 and res.added
    (edit,) = hist.of(1)._undo
    x, y, w, h = edit.bbox
    assert w * h < 70 * 30 and ed.mask.sum() > 0
    assert_consistent(ed)
    painted = ed.mask.copy()
    assert ed.undo() is not None and not ed.mask.any() and ed.regions() == []
    assert ed.redo() is not None
    np.testing.assert_array_equal(ed.mask, painted)


def test_eraser_removes_and_splits_into_regions():
    ed = editor(two_blobs(), ["hole", "stain"])
    stroke(ed, [(20, 5), (20, 25)], size=3, erase=True)  # cuts region 1 in two
    assert ed.region_classes() == ["hole", "hole", "stain"]
    assert_consistent(ed)


def test_painting_into_a_classified_region_keeps_its_class():
    ed = editor(two_blobs(), ["hole", None])
    stroke(ed, [(35, 15), (29, 15)], size=3)  # from outside into region 1
    assert ed.region_classes() == ["hole", None]
    ed.paint_class = "knot"
    stroke(ed, [(100, 70)], size=3)
    assert ed.region_classes() == ["hole", None, "knot"]
    assert_consistent(ed)


def test_delete_merge_split_and_undo_restore_classes():
    ed = editor(two_blobs(), ["hole", "stain"])
    before_mask, before_cls = ed.mask.copy(), ed.cls.copy()
    ed.merge_regions(1, 2)
    assert ed.region_classes() == ["hole"] and len(ed.regions()) == 1
    assert_consistent(ed)
    ed.undo()
    np.testing.assert_array_equal(ed.mask, before_mask)
    np.testing.assert_array_equal(ed.cls, before_cls)
    assert ed.region_classes() == ["hole", "stain"]
    ed.delete_region(1)
    assert ed.region_classes() == ["stain"]
    ed.undo()
    assert ed.region_classes() == ["hole", "stain"]
    assert ed.split_region(2, (75.5, 42), (75.5, 55)) is not None  # short of both edges
    assert ed.region_classes() == ["hole", "stain", "stain"]
    assert_consistent(ed)
    assert ed.split_region(1, (12, 12), (14, 14)) is None  # a nick, not a split: no change
    assert len(ed.regions()) == 3


def test_set_region_class_is_undoable():
    hist = UndoHistory()
    ed = editor(two_blobs(), [None, None], history=hist)
    ed.set_region_class(2, "open_width")
    assert ed.region_classes() == [None, "open_width"] and len(hist.of(1)) == 1
    ed.undo()
    assert ed.region_classes() == [None, None]
    ed.redo()
    assert ed.region_classes() == [None, "open_width"]


def test_region_at_finds_a_region_nested_in_a_hole():
    m = np.zeros((H, W), bool)
    m[10:50, 10:50] = True
    m[20:40, 20:40] = False
    m[28:32, 28:32] = True
    ed = editor(m)
    assert ed.region_at(29, 29) == 2 and ed.region_at(12, 12) == 1 and ed.region_at(25, 25) == 0


def test_random_edits_stay_consistent_and_undo_all_the_way():
    rng = np.random.default_rng(3)
    hist = UndoHistory()
    ed = editor(two_blobs(), ["hole", None], history=hist)
    start = ed.mask.copy(), ed.cls.copy()
    for i in range(25):
        op = i % 5
        if op in (0, 1):
            pts = rng.uniform(0, [W, H], size=(4, 2))
            stroke(ed, pts, size=int(rng.integers(1, 8)), erase=op == 1)
        elif op == 2:
            ed.fill_polygon(rng.uniform(0, [W, H], size=(4, 2)))
        elif op == 3 and len(ed.regions()) >= 2:
            ed.merge_regions(1, len(ed.regions()))
        elif op == 4 and ed.regions():
            ed.set_region_class(1, ["hole", "knot", None][i % 3])
        assert_consistent(ed)
    while ed.undo() is not None:
        assert_consistent(ed)
    np.testing.assert_array_equal(ed.mask, start[0])
    np.testing.assert_array_equal(ed.cls, start[1])


def test_history_survives_switching_images():
    hist = UndoHistory()
    ed = LabelEditor(hist)
    ed.load(1, (H, W), None)
    stroke(ed, [(10, 10), (30, 10)])
    left = ed.mask.copy()
    ed.load(2, (H, W), two_blobs(), ["hole", None])
    stroke(ed, [(100, 70)])
    ed.load(1, (H, W), left)
    assert ed.undo() is not None and not ed.mask.any()
    assert ed.undo() is None


def test_a_dab_on_a_large_mask_touches_only_its_box():
    hist = UndoHistory()
    ed = LabelEditor(hist)
    ed.load(1, (4000, 6000), None)
    ed.begin_stroke(False)
    box = ed.stroke_to(3000, 2000, 21)
    assert (box[2] - box[0]) * (box[3] - box[1]) < 30 * 30
    res = ed.end_stroke()
    assert (res.box[2] - res.box[0]) <= 128 and hist.of(1)._undo[0].before.size <= 21 * 21


def test_cancelled_stroke_leaves_nothing():
    hist = UndoHistory()
    ed = editor(two_blobs(), ["hole", None], history=hist)
    before = ed.mask.copy()
    ed.begin_stroke(True)
    ed.stroke_to(15, 15, 9)
    ed.cancel_step()
    np.testing.assert_array_equal(ed.mask, before)
    assert len(hist.of(1)) == 0
    assert_consistent(ed)


def test_replace_mask_is_one_step():
    hist = UndoHistory()
    ed = editor(two_blobs(), ["hole", None], history=hist)
    new = two_blobs()
    new[60:70, 5:15] = True
    ed.replace_mask(new)
    assert len(ed.regions()) == 3 and len(hist.of(1)) == 1
    assert hist.of(1)._undo[0].bbox == (5, 60, 10, 10)
    with pytest.raises(IndexError):
        ed.info(4)


def test_outline_segments_follow_pixel_edges():
    from annotator.core.mask_tools import outline_segments
    a = np.zeros((6, 7), bool)
    a[1:4, 2:6] = True
    a[2, 3] = False  # a hole
    segs = outline_segments(a, 10, 20)
    length = np.abs(segs[:, 2] - segs[:, 0]).sum() + np.abs(segs[:, 3] - segs[:, 1]).sum()
    assert length == 2 * (4 + 3) + 4  # outer boundary + the hole's
    assert segs[:, [0, 2]].min() == 12 and segs[:, [0, 2]].max() == 16
    assert segs[:, [1, 3]].min() == 21 and segs[:, [1, 3]].max() == 24


def test_components_skip_empty_space_and_match_label_regions():
    from annotator.core.mask_tools import components, xy_cut
    rng = np.random.default_rng(5)
    m = np.zeros((300, 400), bool)
    for _ in range(30):
        y, x = rng.integers(0, 290), rng.integers(0, 390)
        m[y:y + rng.integers(1, 10), x:x + rng.integers(1, 10)] = True
    m[150, :] = True  # a line joining many of them
    boxes = xy_cut(m, (0, 0, 400, 300))
    assert sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes) < m.size
    got = sorted((c.first, c.area, c.box) for c in components(m, (0, 0, 400, 300)))
    _, regs = label_regions(m)
    want = [(r.bbox[0], r.bbox[1], r.bbox[0] + r.bbox[2], r.bbox[1] + r.bbox[3]) for r in regs]
    assert [g[2] for g in got] == want and [g[1] for g in got] == [r.area for r in regs]
