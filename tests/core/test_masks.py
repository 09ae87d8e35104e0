import numpy as np
import pytest

from annotator.core import masks as M


def square(h, w, y, x, s):
    m = np.zeros((h, w), bool)
    m[y:y + s, x:x + s] = True
    return m


def test_iou_offset_squares_is_50_over_150():
    a = square(40, 40, 5, 5, 10)
    b = square(40, 40, 5, 10, 10)  # 5 px offset: B = 50, A = C = 100
    assert M.iou(a, b) == pytest.approx(50 / 150)


def test_iou_is_b_over_a_plus_c_minus_b_on_random_masks():
    rng = np.random.default_rng(1)
    for _ in range(20):
        a = rng.random((30, 20)) > 0.6
        c = rng.random((30, 20)) > 0.5
        b = np.logical_and(a, c).sum()
        assert M.iou(a, c) == pytest.approx(b / (a.sum() + c.sum() - b))


def test_iou_empty_cases():
    z = np.zeros((8, 8), bool)
    assert M.iou(z, z) == 1.0
    assert M.iou(z, square(8, 8, 1, 1, 2)) == 0.0


def test_iou_rejects_different_sizes():
    with pytest.raises(ValueError, match="differ in size"):
        M.iou(np.zeros((4, 4)), np.zeros((4, 5)))


def test_tolerant_iou_forgives_one_pixel_shift_of_thin_line():
    a = np.zeros((64, 64), bool)
    a[10:50, 20:22] = True  # two-pixel vertical line
    b = np.roll(a, 1, axis=1)
    assert M.iou(a, b) == pytest.approx(40 / 120)
    assert M.tolerant_iou(a, b, 0) == M.iou(a, b)
    assert M.tolerant_iou(a, b, 1) == pytest.approx(1.0)


def test_tolerant_iou_radius1_still_catches_a_3px_ring():
    yy, xx = np.mgrid[:64, :64]
    truth = (yy - 32) ** 2 + (xx - 32) ** 2 <= 10 ** 2
    grown = M.dilate(truth, 3)
    shrunk = M.erode(truth, 3)
    assert M.tolerant_iou(grown, truth, 1) < 0.8
    assert M.tolerant_iou(shrunk, truth, 1) < 0.8
    assert M.tolerant_iou(truth, truth, 1) == 1.0


def test_regions_and_region_ious():
    m = square(40, 40, 2, 2, 5) | square(40, 40, 20, 20, 10)
    _, regions = M.label_regions(m)
    assert sorted(r.area for r in regions) == [25, 100]
    pred = square(40, 40, 20, 20, 10)  # only the big one predicted
    scores = {r.area: v for r, v in M.region_ious(m, pred)}
    assert scores[100] == 1.0 and scores[25] == 0.0


def test_remove_small_regions():
    m = square(20, 20, 0, 0, 2) | square(20, 20, 10, 10, 5)
    out = M.remove_small_regions(m, 10)
    assert out.sum() == 25 and not out[0, 0]


def test_to_u8():
    assert set(np.unique(M.to_u8(square(5, 5, 1, 1, 2)))) == {0, 255}


def test_regions_are_numbered_in_raster_order_of_first_pixel():
    rng = np.random.default_rng(5)
    m = rng.random((200, 200)) > 0.93
    labels, regions = M.label_regions(m)
    firsts = []
    for r in regions:
        ys, xs = np.nonzero(labels == r.index)
        k = np.argmin(ys * 1000 + xs)
        firsts.append((ys[k], xs[k]))
        assert r.area == len(ys)
    assert firsts == sorted(firsts)
    assert [r.index for r in regions] == list(range(1, len(regions) + 1))


def test_rect_sides_measure_a_region_whatever_its_angle():
    import cv2

    m = np.zeros((100, 100), np.uint8)
    cv2.line(m, (10, 10), (80, 80), 1, 3)  # a 3-px line, ~99 px long, at 45 degrees
    short, long_ = M.rect_sides(m)
    assert 2 <= short <= 5 and 95 <= long_ <= 105
    assert M.rect_sides(np.ones((4, 9), bool)) == pytest.approx((3.0, 8.0), abs=1.0)


def test_spans_cut_a_range_into_near_equal_windows():
    assert M.spans(0, 256, 256) == [(0, 256)]
    assert M.spans(10, 20, 256) == [(10, 20)]
    parts = M.spans(0, 660, 256)
    assert len(parts) == 3 and parts[0][0] == 0 and parts[-1][1] == 660
    assert all(b - a <= 256 for a, b in parts) and all(parts[i][1] == parts[i + 1][0] for i in range(2))


def test_regions_peaking_above_keeps_regions_whose_values_reach_the_level_nearby():
    mask = np.zeros((40, 60), bool)
    mask[5:10, 5:10] = True  # peaks on the region
    mask[20:25, 20:25] = True  # stays low
    mask[5:10, 40:45] = True  # the peak is 2 px beside it
    values = np.ones((40, 60), np.float32)
    values[7, 7] = 2.0
    values[7, 46] = 2.0
    values[22, 22] = 1.4
    kept = M.regions_peaking_above(mask, values, 1.5)
    assert kept[5:10, 5:10].all() and kept[5:10, 40:45].all() and not kept[20:25, 20:25].any()
    assert not M.regions_peaking_above(mask, values, 1.5, reach_px=0)[5:10, 40:45].any()
    assert not M.regions_peaking_above(np.zeros((40, 60), bool), values, 0.0).any()
    with pytest.raises(ValueError):
        M.regions_peaking_above(mask, values[:10], 1.0)
