"""Undo history: one stroke = one step, bounding-box patches only, per-image stacks."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from annotator.core.history import History, MaskEdit, UndoHistory

H, W = 200, 300


def blank(dtype=np.uint8) -> np.ndarray:
    return np.zeros((H, W), dtype)


def dab(mask: np.ndarray, x: int, y: int, r: int = 5) -> None:
    cv2.circle(mask, (x, y), r, 255, -1)


def test_a_stroke_stores_only_its_bounding_box():
    hist, mask = UndoHistory(), blank()
    with hist.stroke(1, mask):
        for x in range(50, 71, 5):  # a short horizontal drag = many dabs, one step
            dab(mask, x, 60)
    (edit,) = hist.of(1)._undo
    assert edit.bbox == (45, 55, 31, 11)
    assert edit.before.shape == edit.after.shape == (11, 31)
    assert edit.nbytes == 2 * 11 * 31 < mask.nbytes / 50
    assert hist.nbytes == edit.nbytes


def test_undo_and_redo_restore_exactly():
    hist, mask = UndoHistory(), blank()
    states = [mask.copy()]
    for x, y in [(20, 20), (100, 150), (280, 10)]:
        with hist.stroke(7, mask):
            dab(mask, x, y, 8)
        states.append(mask.copy())
    for expected in reversed(states[:-1]):
        assert hist.undo(7, mask)
        assert np.array_equal(mask, expected)
    assert not hist.undo(7, mask) and not hist.can_undo(7)
    for expected in states[1:]:
        assert hist.redo(7, mask)
        assert np.array_equal(mask, expected)
    assert not hist.can_redo(7)


def test_new_edit_after_undo_clears_redo():
    hist, mask = UndoHistory(), blank()
    for x in (30, 60):
        with hist.stroke(1, mask):
            dab(mask, x, 30)
    hist.undo(1, mask)
    assert hist.can_redo(1)
    with hist.stroke(1, mask):
        dab(mask, 200, 100)
    assert not hist.can_redo(1) and not hist.redo(1, mask)
    assert len(hist.of(1)) == 2


def test_history_is_per_image_and_survives_switching():
    hist = UndoHistory()
    masks = {1: blank(), 2: blank()}
    with hist.stroke(1, masks[1]):
        dab(masks[1], 10, 10)
    with hist.stroke(2, masks[2]):
        dab(masks[2], 100, 100)
    with hist.stroke(1, masks[1]):
        dab(masks[1], 50, 50)
    hist.undo(2, masks[2])  # image 2 only
    assert masks[2].sum() == 0 and masks[1][50, 50] and masks[1][10, 10]
    hist.undo(1, masks[1])
    hist.undo(1, masks[1])
    assert masks[1].sum() == 0
    hist.redo(2, masks[2])
    assert masks[2][100, 100] == 255
    hist.forget(1)
    assert not hist.can_redo(1) and not hist.can_undo(1)


def test_unlimited_undo():
    hist, mask = UndoHistory(), blank()
    rng = np.random.default_rng(0)
    for _ in range(400):
        with hist.stroke("img", mask):
            dab(mask, int(rng.integers(0, W)), int(rng.integers(0, H)), 3)
    while hist.undo("img", mask):
        pass
    assert mask.sum() == 0


def test_empty_stroke_records_nothing_and_failed_stroke_is_cancelled():
    hist, mask = UndoHistory(), blank()
    with hist.stroke(1, mask):
        pass
    assert not hist.can_undo(1)
    with pytest.raises(RuntimeError):
        with hist.stroke(1, mask):
            dab(mask, 40, 40)
            raise RuntimeError("tool crashed")
    assert mask.sum() == 0 and not hist.can_undo(1)


def test_event_driven_stroke_for_the_gui():
    hist, mask = UndoHistory(), blank(bool)
    stroke = hist.begin_stroke(3, mask)  # mouse press
    mask[10:12, 10:40] = True  # mouse moves
    mask[12:20, 38:40] = True
    edit = stroke.end()  # mouse release
    assert edit.bbox == (10, 10, 30, 10) and not stroke.active
    with pytest.raises(RuntimeError):
        stroke.end()
    hist.undo(3, mask)
    assert not mask.any()


def test_replace_whole_mask_stores_only_changed_box():
    hist, mask = UndoHistory(), blank(bool)
    mask[5:10, 5:10] = True
    new = mask.copy()
    new[100:110, 200:220] = True
    edit = hist.replace(9, mask, new)
    assert edit.bbox == (200, 100, 20, 10) and np.array_equal(mask, new)
    assert hist.replace(9, mask, new) is None  # no change, no step
    hist.undo(9, mask)
    assert mask.sum() == 25


def test_mask_edit_from_patch_and_bounds():
    mask = blank()
    edit = MaskEdit.from_patch(mask, 290, 190, np.full((10, 10), 255, np.uint8))
    edit.apply(mask)
    assert mask[190:, 290:].all() and mask.sum() == 100 * 255
    edit.revert(mask)
    assert mask.sum() == 0
    with pytest.raises(ValueError, match="outside"):
        MaskEdit.from_patch(mask, 295, 0, np.ones((4, 10), np.uint8))
    with pytest.raises(ValueError, match="differ"):
        MaskEdit.from_diff(mask, np.zeros((5, 5), np.uint8))


def test_history_takes_any_command():
    class AppendClass:
        def apply(self, classes):
            classes.append("hole")

        def revert(self, classes):
            classes.pop()

    h, classes = History(), ["mis_yarn"]
    h.do(AppendClass(), classes)
    assert classes == ["mis_yarn", "hole"]
    h.undo(classes)
    assert classes == ["mis_yarn"] and h.can_redo
    h.redo(classes)
    assert classes == ["mis_yarn", "hole"] and h.nbytes == 0
