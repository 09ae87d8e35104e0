"""Pre-label masks redrawn from the difference to matched good fabric (ml/reference_refine):
a thin line under a wide, short map region comes out thin and longer; a region with
no evidence under it is left alone (that the references travel with the model: test_prelabel)."""
from __future__ import annotations

import numpy as np
import pytest

from annotator.core import masks as M
from annotator.core.demo_fabric import random_spec, render_fabric
from annotator.ml import reference_refine as R

SIZE = 128


@pytest.fixture(scope="module")
def fabric():
    spec = random_spec(np.random.default_rng(5), style="twill")
    return [render_fabric(spec, np.random.default_rng([9, i]), SIZE) for i in range(4)]


def with_line(img: np.ndarray, x: int = 61, width: int = 2) -> tuple[np.ndarray, np.ndarray]:
    out, truth = img.copy(), np.zeros(img.shape[:2], bool)
    truth[:, x:x + width] = True
    out[truth] = (0.45 * out[truth]).astype(np.uint8)  # a dark broken-needle line, full height
    return out, truth


def _check_thin_and_longer(refined: np.ndarray, truth: np.ndarray, coarse: np.ndarray) -> None:
    rows = np.nonzero(refined.any(1))[0]
    assert (refined.sum(1)[rows] <= 4).mean() >= 0.9, "thin: at most 4 px wide on 90 % of its rows"
    dist_ok = np.abs(np.nonzero(refined)[1] - 61.5) <= 2
    assert dist_ok.mean() >= 0.95, "on the line"
    top, bottom = np.nonzero(coarse.any(1))[0][[0, -1]]
    assert rows[0] <= top - 8 and rows[-1] >= bottom + 4, "longer than the map's region"
    cover = refined[top:bottom + 1].any(1).mean()
    assert cover >= 0.9, "the line under the region is covered"


def test_a_wide_partial_line_region_becomes_thin_and_longer(fabric):
    img, truth = with_line(fabric[0])
    coarse = np.zeros_like(truth)
    coarse[30:100, 56:68] = True  # what the patch map gives: 12 px wide, half the length
    refined = R.refine_with_reference(img, coarse, R.reference_crops(fabric[1:], 8))
    _check_thin_and_longer(refined, truth, coarse)
    assert M.tolerant_iou(refined, truth, 1) > M.tolerant_iou(coarse, truth, 1) + 0.3


def test_works_without_reference_images(fabric):
    img, truth = with_line(fabric[0])
    coarse = np.zeros_like(truth)
    coarse[30:100, 56:68] = True
    _check_thin_and_longer(R.refine_with_reference(img, coarse, None), truth, coarse)


def test_a_region_without_evidence_keeps_its_mask(fabric):
    img = fabric[0]
    region = np.zeros(img.shape[:2], bool)
    region[50:70, 40:62] = True  # a compact region on good fabric: nothing to redraw it from
    out = R.refine_with_reference(img, region, R.reference_crops(fabric[1:], 8))
    assert np.array_equal(out, region)
    empty = np.zeros_like(region)
    assert not R.refine_with_reference(img, empty).any()


def test_reference_crops_are_centre_crops_of_one_size():
    a = np.full((300, 400, 3), 7, np.uint8)
    b = np.zeros((200, 500, 3), np.uint8)
    b[100, 250] = 9  # the centre pixel
    crops = R.reference_crops([a, b, np.zeros((10, 10), np.uint8)], 8)  # grey image skipped
    assert crops.shape == (2, 200, R.REFERENCE_SIZE, 3) and crops.dtype == np.uint8
    assert crops[1, 100, R.REFERENCE_SIZE // 2].max() == 9
    assert R.reference_crops([a, b], 1).shape[0] == 1
    assert R.reference_crops([], 8).shape[0] == 0


def test_a_region_does_not_grow_past_the_end_of_its_line(fabric):
    img, truth = with_line(fabric[0])
    truth[:40] = truth[88:] = False  # a line 48 px long in the middle of the image
    img = np.where(truth[..., None], img, fabric[0])
    coarse = np.zeros_like(truth)
    coarse[44:84, 56:68] = True  # elongated (a compact region would keep its old pixels)
    refined = R.refine_with_reference(img, coarse, R.reference_crops(fabric[1:], 8))
    rows = np.nonzero(refined.any(1))[0]
    assert 40 - 6 <= rows[0] <= 40 + 6 and 88 - 6 <= rows[-1] <= 88 + 6
    assert M.tolerant_iou(refined, truth, 1) >= 0.8


def test_regions_far_from_the_origin_of_a_large_image(fabric):
    """Refinement works on a box around each region (offsets into a larger image)."""
    spec = random_spec(np.random.default_rng(5), style="twill")
    big = render_fabric(spec, np.random.default_rng([9, 50]), 640)
    img, truth = with_line(big, x=451)
    truth[:300] = truth[500:] = False
    img = np.where(truth[..., None], img, big)
    coarse = np.zeros_like(truth)
    coarse[340:460, 446:458] = True
    refined = R.refine_with_reference(img, coarse, R.reference_crops(fabric, 8))
    assert M.tolerant_iou(refined, truth, 1) >= 0.8
    rows = np.nonzero(refined.any(1))[0]
    assert 300 - 2 <= rows[0] <= 340 - 8 and 459 + 4 <= rows[-1] <= 499 + 2  # longer, not past the line
