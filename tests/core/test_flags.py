import numpy as np
import pytest

from annotator.core import masks as M
from annotator.core.flags import (RULE_IOU, RULE_MISSED, RULE_UNLABELLED, RULE_WRONG, FlagRules, aggregate,
                                  iou_flag, probability_flag, unlabelled_flag)


def disk(r, size=64):
    yy, xx = np.mgrid[:size, :size]
    return (yy - 32) ** 2 + (xx - 32) ** 2 <= r ** 2


@pytest.mark.parametrize("tol", [0, 1])
def test_variant_a_flags_expanded_and_shrunk_rings_not_exact(tol):
    truth = disk(10)
    rules = FlagRules(iou_tolerance_px=tol)
    assert iou_flag(truth, truth, rules) is None
    for wrong in (M.dilate(truth, 3), M.erode(truth, 3)):
        flag = iou_flag(wrong, truth, rules)
        assert flag is not None and flag.rule == RULE_IOU
        assert flag.numbers["iou"] < 0.8 and flag.numbers["threshold"] == 0.8
        assert flag.numbers["regions"][0]["iou"] < 0.8


def test_variant_a_exact_iou_number():
    a = np.zeros((40, 40), bool); a[5:15, 5:15] = True
    b = np.zeros((40, 40), bool); b[5:15, 10:20] = True
    flag = iou_flag(a, b, FlagRules(iou_tolerance_px=0))
    assert flag.numbers["iou_exact"] == pytest.approx(round(50 / 150, 4))


def test_sum_and_mean_have_separate_thresholds():
    probs = {0: 0.3, 1: 0.4, 2: 0.2, 3: 0.1}
    assert aggregate(probs, "sum") == pytest.approx(1.0)
    assert aggregate(probs, "mean") == pytest.approx(0.25)
    mean = FlagRules(operation="mean", wrong_threshold_mean=0.5)
    summ = FlagRules(operation="sum", wrong_threshold_sum=2.5, sum_reference_voters=5)
    assert mean.thresholds(4)[0] == 0.5
    assert summ.thresholds(4)[0] == pytest.approx(2.0)  # scaled to 4 voters
    assert summ.thresholds(5)[1] == pytest.approx(4.0)  # the patent's "> 4" with N = 5


@pytest.mark.parametrize("op", ["sum", "mean"])
def test_wrong_label_rule(op):
    rules = FlagRules(operation=op)
    low = {0: 0.1, 1: 0.2, 2: 0.05, 3: 0.1, 4: 0.0}
    flag = probability_flag(low, label_has_defect=True, pred_area=0, rules=rules)
    assert flag.rule == RULE_WRONG and flag.numbers["operation"] == op
    assert flag.numbers["votes"] == {str(k): v for k, v in low.items()}
    # the same votes on an image labelled defect-free are consistent: no flag
    assert probability_flag(low, label_has_defect=False, pred_area=0, rules=rules) is None


@pytest.mark.parametrize("op", ["sum", "mean"])
def test_missed_label_rule_needs_probability_and_area(op):
    rules = FlagRules(operation=op, missed_threshold_mean=0.8, missed_threshold_sum=4.0, missed_area_px=15)
    high = {0: 0.95, 1: 0.9, 2: 0.99, 3: 0.85, 4: 0.97}  # sum 4.66 > 4, mean 0.93 > 0.8
    flag = probability_flag(high, label_has_defect=False, pred_area=16, rules=rules)
    assert flag.rule == RULE_MISSED and flag.numbers["area_threshold"] == 15
    assert probability_flag(high, label_has_defect=False, pred_area=15, rules=rules) is None
    assert probability_flag(high, label_has_defect=True, pred_area=100, rules=rules) is None
    mid = {0: 0.7, 1: 0.7, 2: 0.7, 3: 0.7, 4: 0.7}  # sum 3.5, mean 0.7
    assert probability_flag(mid, label_has_defect=False, pred_area=100, rules=rules) is None


def test_bad_operation():
    with pytest.raises(ValueError):
        FlagRules(operation="max")
    with pytest.raises(ValueError):
        aggregate({}, "mean")


def test_iou_rule_ignores_stray_predicted_pixels():
    empty = np.zeros((64, 64), bool)
    pred = empty.copy()
    pred[10:12, 10:13] = True  # 6 px of checker noise
    assert iou_flag(empty, pred, FlagRules(min_pred_region_px=10)) is None
    assert iou_flag(empty, pred, FlagRules(min_pred_region_px=1)) is not None


def _prob_map(truth, unsure_ring_px=0, p_in=0.95, p_ring=0.4):
    """A checker map: sure inside the defect, unsure on a ring around it, sure outside."""
    p = np.where(truth, p_in, 0.02).astype(np.float32)
    if unsure_ring_px:
        ring = M.dilate(truth, unsure_ring_px) & ~M.erode(truth, unsure_ring_px)
        p[ring] = p_ring
    return p


def test_uncertain_band_ignores_unsure_boundary_but_catches_sure_errors():
    truth = disk(6)
    band = FlagRules(iou_tolerance_px=0, iou_uncertain_band=(0.2, 0.8))
    plain = FlagRules(iou_tolerance_px=0)
    p = _prob_map(truth, unsure_ring_px=2)
    pred = p > 0.5
    # the checker is unsure on a 2-px ring: plain IoU flags the correct label, the band does not
    assert iou_flag(truth, pred, plain) is not None
    assert iou_flag(truth, pred, band, p) is None
    # a label missing the region the checker is sure of is still flagged, with the band's numbers
    flag = iou_flag(np.zeros_like(truth), pred, band, p)
    assert flag is not None and flag.numbers["uncertain_band"] == [0.2, 0.8]
    assert flag.numbers["uncertain_px"] == int(((p > 0.2) & (p < 0.8)).sum())
    # a false region where the checker is sure there is nothing is flagged
    false_region = truth.copy()
    false_region[2:10, 2:10] = True
    assert iou_flag(false_region, pred, band, p) is not None
    # an expanded label (4 px) reaches past the unsure ring into sure-clean pixels
    assert iou_flag(M.dilate(truth, 4), pred, band, p) is not None
    # without a probability map the band cannot apply: the plain rule is used
    assert iou_flag(truth, pred, band) is not None


def test_uncertain_band_validation_and_size_check():
    with pytest.raises(ValueError):
        FlagRules(iou_uncertain_band=(0.6, 0.9))
    with pytest.raises(ValueError):
        FlagRules(iou_uncertain_band=(0.5, 0.5))
    rules = FlagRules(iou_uncertain_band=[0.3, 0.7])
    assert rules.iou_uncertain_band == (0.3, 0.7)
    with pytest.raises(ValueError, match="differ in size"):
        iou_flag(disk(5), disk(5), rules, np.zeros((10, 10), np.float32))


# ---------------------------------------------------------------- image evidence


def _fabric(seed=0, size=128):
    """Stripes with pixel noise (BGR) and a faint 2-px vertical line at x = 61..62, rows 14..114."""
    rng = np.random.default_rng(seed)
    grey = np.tile(np.where(np.arange(size) % 6 < 2, 100.0, 150.0), (size, 1)) + rng.normal(0, 10, (size, size))
    line = np.zeros((size, size), bool)
    line[14:114, 61:63] = True
    grey[line] -= 20
    return np.repeat(np.clip(grey, 0, 255)[..., None], 3, 2).astype(np.uint8), line


def test_image_evidence_lifts_a_flag_on_an_under_segmented_correct_line():
    image, line = _fabric()
    pred = line.copy()
    pred[40:, :] = False  # the checker saw a quarter of the line
    assert iou_flag(line, pred, FlagRules()).numbers["iou"] < 0.8  # no image: the plain rule
    assert iou_flag(line, pred, FlagRules(image_support=False), image=image) is not None
    assert iou_flag(line, pred, FlagRules(), image=image) is None
    assert iou_flag(line, np.zeros_like(line), FlagRules(), image=image) is None  # it saw nothing


def test_image_evidence_keeps_label_errors_on_normal_fabric():
    image, line = _fabric(seed=1)
    expanded = M.dilate(line, 4)  # the ring of an expanded label is plain fabric
    flag = iou_flag(expanded, line, FlagRules(), image=image)
    assert flag is not None and flag.numbers["iou"] < 0.8
    assert flag.numbers["iou_checker"] == flag.numbers["iou"]  # nothing of the ring was supported
    assert flag.numbers["support"] and not any(p["supported"] for p in flag.numbers["support"])
    # a small false mark beside the under-segmented line: with the evidence the IoU passes
    # (200 of 236 px), but the mark's region stays uncovered
    mark = np.zeros_like(line)
    mark[60:66, 20:26] = True
    part = line.copy()
    part[40:, :] = False
    flag = iou_flag(line | mark, part, FlagRules(), image=image)
    assert flag is not None and flag.numbers["iou"] >= 0.8 > flag.numbers["iou_checker"]
    labels, _ = M.label_regions(line | mark)
    assert flag.numbers["uncovered_regions"] == [int(labels[62, 22])]


def test_image_evidence_overrules_a_wrong_label_vote_only_where_the_image_shows_a_defect():
    image, line = _fabric(seed=2)
    low = {0: 0.1, 1: 0.05, 2: 0.2}  # the checkers do not know this kind
    assert probability_flag(low, True, 0, FlagRules()).rule == RULE_WRONG  # without the image
    assert probability_flag(low, True, 0, FlagRules(), line, image) is None
    assert probability_flag(low, True, 0, FlagRules(image_support=False), line, image) is not None
    mark = np.zeros_like(line)
    mark[60:70, 20:30] = True  # a stray mark on plain fabric
    flag = probability_flag(low, True, 0, FlagRules(), mark, image)
    assert flag.rule == RULE_WRONG and flag.numbers["label_supported"] == 0.0
    flag = probability_flag(low, True, 0, FlagRules(), line | mark, image)  # one region is not supported
    assert flag is not None and 0 < flag.numbers["label_supported"] < 1


def _hole(seed=3, r=10):
    image, _ = _fabric(seed=seed)
    yy, xx = np.mgrid[:128, :128]
    hole = (yy - 64) ** 2 + (xx - 90) ** 2 <= r ** 2
    image[hole] = 30
    return image, hole


def test_image_evidence_ignores_a_checker_drawing_a_correct_region_fat():
    image, hole = _hole()
    fat = M.dilate(hole, 3)  # the checker's blur: 3 px of plain fabric around the hole
    assert iou_flag(hole, fat, FlagRules()) is not None
    flag = iou_flag(hole, fat, FlagRules(support_rim_px=0), image=image)
    assert flag is not None and flag.numbers["rim_ignored_px"] == 0
    assert iou_flag(hole, fat, FlagRules(), image=image) is None


def test_image_evidence_keeps_a_shrunk_label():
    image, hole = _hole(seed=4)
    shrunk = M.erode(hole, 3)  # the hole's own rim is left out: the image supports it
    flag = iou_flag(shrunk, hole, FlagRules(), image=image)
    assert flag is not None and flag.numbers["rim_ignored_px"] == 0 and flag.numbers["iou"] < 0.8


def test_image_evidence_tests_an_expanded_labels_border_apart_from_the_defect_inside():
    image, hole = _hole(seed=5, r=5)
    expanded = M.dilate(hole, 5)  # the checkers saw nothing; the label is a small hole plus a ring
    nothing = np.zeros_like(hole)
    assert iou_flag(expanded, nothing, FlagRules(support_band_px=0), image=image) is None  # one piece: passes
    flag = iou_flag(expanded, nothing, FlagRules(), image=image)
    assert flag is not None and flag.numbers["iou"] < 0.8
    assert iou_flag(hole, nothing, FlagRules(), image=image) is None  # the correct label passes


def test_model1_region_the_label_leaves_out_is_flagged_where_the_image_shows_a_defect():
    image, line = _fabric(seed=6)
    blob = np.zeros_like(line)
    blob[60:70, 20:30] = True  # model 1's false region on plain fabric
    model1 = line | blob
    empty = np.zeros_like(line)
    flag, suggestion = unlabelled_flag(empty, model1, image)  # the person erased a real line
    assert flag.rule == RULE_UNLABELLED and flag.numbers["unlabelled_px"] == line.sum()
    assert (suggestion == line).all()  # the label plus the supported region, not model 1's false blob
    assert unlabelled_flag(line, model1, image) is None  # the blob alone is not supported
    assert unlabelled_flag(empty, model1, image, FlagRules(unlabelled_check=False)) is None
    assert unlabelled_flag(empty, None, image) is None  # no pre-label: nothing to compare with
