import numpy as np
import pytest

from annotator.core import masks as M
from annotator.core.label_noise import ERROR_KINDS, inject_error


def truth():
    m = np.zeros((96, 96), bool)
    yy, xx = np.mgrid[:96, :96]
    m |= (yy - 30) ** 2 + (xx - 30) ** 2 <= 9 ** 2
    m[60:64, 10:80] = True  # a 4-px line
    return m


def test_each_kind_changes_the_label_the_way_its_name_says():
    t = truth()
    rng = np.random.default_rng(0)
    missing = inject_error(t, "missing", rng)
    assert missing.sum() < t.sum() and not (missing & ~t).any()
    false = inject_error(t, "false", rng)
    assert (false & t).sum() == t.sum() and (false & ~t).sum() >= 15
    assert len(M.label_regions(false)[1]) == 3
    expanded = inject_error(t, "expanded", rng)
    assert expanded.sum() > t.sum() and (expanded & t).sum() == t.sum()
    shrunk = inject_error(t, "shrunk", rng)
    assert shrunk.sum() < t.sum() and not (shrunk & ~t).any()


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_errors_drop_iou_below_the_patent_threshold(kind):
    t = truth()
    for seed in range(5):
        wrong = inject_error(t, kind, np.random.default_rng(seed))
        assert M.iou(wrong, t) < 1.0


def test_on_empty_truth_only_a_false_region_is_possible():
    z = np.zeros((64, 64), bool)
    out = inject_error(z, "missing", np.random.default_rng(1))
    assert out.sum() >= 15


def test_unknown_kind():
    with pytest.raises(ValueError):
        inject_error(truth(), "typo", np.random.default_rng(0))
