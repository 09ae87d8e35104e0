"""Thin straight lines drawn along their length (ml/line_trace): a faint line under the map's
wide band comes out thin, on the line, to its true ends; regions that hold no thin straight line
(compact, wide, curved, or nothing at all) are left to the other refinements."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from annotator.core import masks as M
from annotator.core.demo_fabric import random_spec, render_fabric
from annotator.ml import line_trace as L
from annotator.ml.reference_refine import reference_crops

SIZE = 256


@pytest.fixture(scope="module")
def fabric():
    spec = random_spec(np.random.default_rng(5), style="twill")
    return [render_fabric(spec, np.random.default_rng([9, i]), SIZE) for i in range(4)]


@pytest.fixture(scope="module")
def refs(fabric):
    return reference_crops(fabric[1:], 8)


def polyline(points, thickness: int) -> np.ndarray:
    out = np.zeros((SIZE, SIZE), np.uint8)
    cv2.polylines(out, [np.asarray(points, np.int32).reshape(-1, 1, 2)], False, 1, thickness)
    return out.astype(bool)


def darken(img: np.ndarray, where: np.ndarray, factor: float) -> np.ndarray:
    out = img.copy()
    out[where] = (factor * out[where]).astype(np.uint8)
    return out


def test_a_faint_tilted_line_is_drawn_thin_and_whole(fabric, refs):
    truth = polyline([(100, 40), (118, 200)], 2)  # 160 px, tilted ~6 degrees
    img = darken(fabric[0], truth, 0.75)  # faint: a quarter darker
    band = polyline([(99, 52), (119, 215)], 12)  # the map: 12 px wide, short at one end, long at the other
    lines, traced = L.trace_lines(img, band, refs)
    assert np.array_equal(traced, band)
    assert M.tolerant_iou(lines, truth, 1) >= 0.8
    rows = np.nonzero(lines.any(1))[0]
    assert (lines.sum(1)[rows] <= 5).mean() >= 0.9, "thin"
    assert rows[0] <= 43 and rows[-1] <= 203, "to the line's true ends, not the map's"
    # the per-pixel refinement alone leaves this faint line in pieces or fat
    from annotator.ml.reference_refine import refine_with_reference
    assert M.tolerant_iou(lines, truth, 1) > M.tolerant_iou(refine_with_reference(img, band, refs), truth, 1)


def test_works_without_reference_images(fabric):
    truth = polyline([(60, 128), (220, 131)], 2)  # a horizontal mis-yarn
    img = darken(fabric[0], truth, 0.6)
    band = polyline([(56, 129), (224, 130)], 12)
    lines, _ = L.trace_lines(img, band, None)
    assert M.tolerant_iou(lines, truth, 1) >= 0.8


def test_regions_without_a_thin_straight_line_are_left_alone(fabric, refs):
    img = fabric[0].copy()
    mask = np.zeros((SIZE, SIZE), bool)
    blob = np.zeros_like(mask)
    cv2.circle(blob.view(np.uint8), (60, 60), 9, 1, -1)
    img = darken(img, blob, 0.5)
    mask |= cv2.dilate(blob.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)  # compact
    wide = np.zeros_like(mask)
    wide[150:160, 30:200] = True  # a 10-px stripe: elongated but not thin
    img = darken(img, wide, 0.6)
    mask |= polyline([(26, 155), (204, 155)], 18)
    ys = np.arange(20, 230)
    wave = np.stack([200 + 7 * np.sin(ys / 12.0), ys], 1)  # curved: 7 px either way
    img = darken(img, polyline(wave, 2), 0.5)
    mask |= polyline(wave, 22)
    empty = polyline([(20, 235), (130, 235)], 12)  # elongated, on good fabric
    mask |= empty
    lines, traced = L.trace_lines(img, mask, refs)
    assert not lines.any() and not traced.any()
    assert not L.trace_lines(img, np.zeros_like(mask), refs)[0].any()


def test_pieces_of_one_line_are_joined_and_drawn_as_one(fabric, refs):
    truth = polyline([(30, 120), (226, 126)], 2)
    img = darken(fabric[0], truth, 0.7)
    pieces = polyline([(34, 120), (90, 122)], 12) | polyline([(115, 122), (150, 123)], 10) \
        | polyline([(175, 124), (222, 126)], 12)  # the map broke the line into three pieces
    blob = np.zeros_like(pieces)
    cv2.circle(blob.view(np.uint8), (130, 170), 8, 1, -1)  # off the axis: not part of the line
    chained = L.chain_collinear(pieces | blob)
    bridges = chained & ~(pieces | blob)
    near_line = cv2.dilate(truth.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    assert bridges.any() and not (bridges & ~near_line).any(), "bridges lie on the line"
    n_before = cv2.connectedComponents((pieces | blob).astype(np.uint8))[0] - 1
    n_after = cv2.connectedComponents(chained.astype(np.uint8))[0] - 1
    assert (n_before, n_after) == (4, 2)
    lines, traced = L.trace_lines(img, pieces | blob, refs)
    assert np.array_equal(traced, pieces)  # the blob is left to the other refinements
    assert M.tolerant_iou(lines, truth, 1) >= 0.8
    assert lines[:, 95:110].any() and lines[:, 155:170].any(), "the gaps are drawn"
