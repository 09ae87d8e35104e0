"""The checkers benchmark's scoring: precision, recall, per-kind recall and false alarms."""
from annotator.bench.checkers import score


def test_score_counts_hits_misses_and_false_alarms_by_kind():
    errors = {("twill", "test/hole/000.png"): "missing", ("twill", "test/good/001.png"): "false",
              ("knit", "test/stain/002.png"): "shrunk"}
    flagged = {("twill", "test/hole/000.png"), ("twill", "test/good/001.png"),  # two hits
               ("knit", "test/knot/000.png"), ("knit", "test/knot/001.png"), ("twill", "test/good/004.png")}
    s = score(flagged, errors, n_images=20)
    assert (s["flagged"], s["errors"], s["caught"]) == (5, 3, 2)
    assert s["precision"] == 0.4 and s["recall"] == round(2 / 3, 3)
    assert s["false_alarm_rate"] == round(3 / 17, 3)
    assert s["recall_by_kind"] == {"missing": 1.0, "false": 1.0, "expanded": None, "shrunk": 0.0}
    assert s["false_alarms_by_image_kind"] == {"good": 1, "knot": 2}


def test_score_with_nothing_flagged():
    s = score(set(), {"test/hole/000.png": "missing"}, n_images=5)
    assert s["precision"] is None and s["recall"] == 0.0 and s["false_alarms_by_image_kind"] == {}
