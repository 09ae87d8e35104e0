"""The review-loop state machine: transitions, reviewer actions, rounds, queue, loop end."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from annotator.core.review import EVENTS, IllegalTransition, Review, ReviewError, carry_classes, next_state
from annotator.core.masks import label_regions
from annotator.core.store import STATES, FlagSpec, Project

H, W = 20, 20


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def write_png(path: Path) -> Path:
    assert cv2.imwrite(str(path), np.full((H, W), 100, np.uint8))
    return path


@pytest.fixture
def project(tmp_path):
    with Project.create(tmp_path / "proj") as p:
        for k in range(3):
            p.add_image(write_png(tmp_path / f"{k}.png"), f"test/hole/00{k}.png")
        p.add_image(write_png(tmp_path / "good.png"), "train/good/000.png", role="good")
        yield p


@pytest.fixture
def review(project):
    return Review(project)


def label_ids(project):
    return [i.id for i in project.images(role="label")]


def prelabel_all(review, scores=(0.2, 0.9, 0.5)):
    r = review.start_prelabel_round()
    for image_id, score in zip(label_ids(review.project), scores):
        review.record_prelabel(r, image_id, box(2, 6, 2, 6), "hole", anomaly_score=score, is_defect=score > 0.4)
    assert review.end_prelabel_round(r) == {"prelabelled": 3, "defective": 2}
    return r


def precheck_all(review):
    for image_id in label_ids(review.project):
        review.accept_as_is(image_id)


# ---------------------------------------------------------------- the transition table


LEGAL = {
    ("new", "prelabel"): "prelabelled", ("prelabelled", "prelabel"): "prelabelled",
    ("new", "review"): "prechecked", ("prelabelled", "review"): "prechecked",
    ("prechecked", "review"): "prechecked", ("flagged", "review"): "prechecked",
    ("accepted", "review"): "prechecked",
    ("prechecked", "check_flagged"): "flagged", ("prechecked", "check_clean"): "accepted",
    ("flagged", "check_flagged"): "flagged", ("flagged", "check_clean"): "accepted",
    ("accepted", "check_flagged"): "flagged", ("accepted", "check_clean"): "accepted",
}


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("event", list(EVENTS))
def test_transition_table(state, event):
    if (state, event) in LEGAL:
        assert next_state(state, event) == LEGAL[(state, event)]
    else:
        with pytest.raises(IllegalTransition, match=f"in state '{state}'"):
            next_state(state, event)


# ---------------------------------------------------------------- the whole loop


def test_full_loop_until_a_clean_round_covering_everything(review, project):
    ids = label_ids(project)
    assert review.phase() == "precheck" and review.queue() == []
    prelabel_all(review)
    assert [review.state(i) for i in ids] == ["prelabelled"] * 3
    assert [q.image_id for q in review.queue()] == [ids[1], ids[2], ids[0]]  # highest anomaly first
    precheck_all(review)
    assert review.queue() == [] and not review.loop_finished()

    r = review.start_check_round()
    summary = review.record_check_results(r, {ids[0]: [], ids[1]: [FlagSpec("iou", 0.7, {"iou": 0.3}, box(2, 8, 2, 8))],
                                              ids[2]: []})
    assert summary == {"checked": 3, "flagged": 1, "accepted": 2, "flags": 1, "by_rule": {"iou": 1}, "overruled": 0,
                       "accepted_before": 0}
    assert [review.state(i) for i in ids] == ["accepted", "flagged", "accepted"]
    assert review.phase() == "check" and not review.loop_finished()
    (item,) = review.queue()
    assert item.image_id == ids[1] and item.suspicion == 0.7

    label = review.accept_prediction(ids[1], item.flag_ids[0])
    assert label.source == "checker" and label.round == r and label.classes == ("hole",)
    assert np.array_equal(label.mask, box(2, 8, 2, 8))
    assert review.state(ids[1]) == "prechecked" and project.flags(unresolved_only=True) == []
    assert review.queue() == []

    partial = review.start_check_round()  # a round that covers only the repaired image
    review.record_check_results(partial, {ids[1]: []})
    assert all(review.state(i) == "accepted" for i in ids) and not review.loop_finished()

    final = review.start_check_round()
    review.record_check_results(final, {i: [] for i in ids})
    assert review.loop_finished() and review.phase() == "done"
    assert project.image(project.images(role="good")[0].id).state == "good"


def test_loop_not_finished_while_a_round_is_open_or_raised_flags(review, project):
    ids = label_ids(project)
    prelabel_all(review)
    precheck_all(review)
    r = review.start_check_round()
    review.record_check_results(r, {i: [] for i in ids}, final=False)
    assert not review.loop_finished()  # round still open
    review.record_check_results(r, {}, final=True)
    assert review.loop_finished()
    r2 = review.start_check_round()
    review.record_check_results(r2, {ids[0]: [FlagSpec("wrong_label", 0.1)], ids[1]: [], ids[2]: []})
    assert not review.loop_finished()


def test_loop_reopens_when_the_person_edits_or_a_new_image_arrives(review, project, tmp_path):
    ids = label_ids(project)
    prelabel_all(review)
    precheck_all(review)
    r = review.start_check_round()
    review.record_check_results(r, {i: [] for i in ids})
    assert review.loop_finished()
    review.set_class(ids[0], 1, "mis_yarn")
    assert not review.loop_finished() and review.state(ids[0]) == "prechecked"
    r = review.start_check_round()
    review.record_check_results(r, {i: [] for i in ids})
    assert review.loop_finished()
    newcomer = project.add_image(write_png(tmp_path / "late.png"), "late.png")
    assert not review.loop_finished()
    pr = review.start_prelabel_round()
    review.record_prelabel(pr, newcomer, box(1, 3, 1, 3), is_defect=True)
    assert review.end_prelabel_round(pr) == {"prelabelled": 1, "defective": 1}  # this round only
    assert [q.image_id for q in review.queue()] == [newcomer]  # newcomers still reach the person


def test_queue_in_check_phase_orders_flagged_images_by_suspicion(review, project):
    ids = label_ids(project)
    prelabel_all(review)
    precheck_all(review)
    r = review.start_check_round()
    review.record_check_results(r, {
        ids[0]: [FlagSpec("iou", 0.3)],
        ids[1]: [FlagSpec("iou", 0.1), FlagSpec("wrong_label", 0.95)],
        ids[2]: [FlagSpec("missed_label", 0.6)],
    })
    q = review.queue()
    assert [x.image_id for x in q] == [ids[1], ids[2], ids[0]]
    assert [x.suspicion for x in q] == [0.95, 0.6, 0.3]
    assert len(q[0].flag_ids) == 2 and project.flag(q[0].flag_ids[0]).rule == "wrong_label"


def test_a_new_round_supersedes_older_open_flags(review, project):
    ids = label_ids(project)
    prelabel_all(review)
    precheck_all(review)
    r1 = review.start_check_round()
    review.record_check_results(r1, {ids[0]: [FlagSpec("iou", 0.5)]})
    r2 = review.start_check_round()
    review.record_check_results(r2, {ids[0]: [FlagSpec("iou", 0.4)]})
    open_flags = project.flags(unresolved_only=True)
    assert [f.round for f in open_flags] == [r2] and review.state(ids[0]) == "flagged"


# ---------------------------------------------------------------- illegal steps


def test_illegal_steps_raise_clear_errors(review, project):
    ids = label_ids(project)
    good = project.images(role="good")[0].id
    with pytest.raises(IllegalTransition, match=r"train/good/000.png.*good"):
        review.mark_good(good)
    with pytest.raises(IllegalTransition, match="good"):
        review.record_prelabel(review.start_prelabel_round(), good, box(1, 2, 1, 2))
    with pytest.raises(ReviewError, match="has no label yet"):
        review.accept_as_is(ids[0])
    prelabel_all(review)
    review.accept_as_is(ids[0])
    with pytest.raises(IllegalTransition, match="must not overwrite"):
        review.record_prelabel(1, ids[0], box(1, 2, 1, 2))
    r = review.start_check_round()
    with pytest.raises(IllegalTransition, match=r"test/hole/001.png.*must pre-check it first"):
        review.record_check_results(r, {ids[0]: [], ids[1]: [FlagSpec("iou", 0.5)]})
    # all or nothing: the legal part was rolled back too
    assert review.state(ids[0]) == "prechecked" and project.flags() == [] and project.round_coverage(r) == {}
    with pytest.raises(ReviewError, match="not an open check round"):
        review.record_check_results(1, {})


def test_accept_prediction_checks_the_flag(review, project):
    ids = label_ids(project)
    prelabel_all(review)
    precheck_all(review)
    r = review.start_check_round()
    f_other, f_nomask = project.add_flags(r, {ids[1]: [FlagSpec("iou", 0.5, {}, box(1, 2, 1, 2))],
                                              ids[0]: [FlagSpec("wrong_label", 0.4)]})
    with pytest.raises(ReviewError, match="belongs to image"):
        review.accept_prediction(ids[0], f_other)
    with pytest.raises(ReviewError, match="no predicted mask"):
        review.accept_prediction(ids[0], f_nomask)


def test_a_failure_mid_action_changes_nothing(review, project, monkeypatch):
    ids = label_ids(project)
    prelabel_all(review)
    precheck_all(review)
    r = review.start_check_round()
    review.record_check_results(r, {ids[0]: [FlagSpec("iou", 0.5)]})
    versions = len(project.label_history(ids[0]))

    def crash(*args):
        raise OSError("crash before the state change")

    monkeypatch.setattr(project, "set_state", crash)
    with pytest.raises(OSError):
        review.replace_mask(ids[0], box(0, 9, 0, 9))
    monkeypatch.undo()
    assert len(project.label_history(ids[0])) == versions
    assert review.state(ids[0]) == "flagged" and len(project.flags(unresolved_only=True)) == 1


# ---------------------------------------------------------------- reviewer actions


def test_actions_record_versions_resolve_flags_and_move_state(review, project):
    ids = label_ids(project)
    prelabel_all(review)
    precheck_all(review)
    r = review.start_check_round()
    review.record_check_results(r, {ids[0]: [FlagSpec("missed_label", 0.5)]})
    label = review.mark_good(ids[0])
    assert label.area == 0 and label.classes == () and label.source == "reviewer" and label.round == r
    assert review.state(ids[0]) == "prechecked"
    (flag,) = project.flags()
    assert flag.resolved and flag.resolved_by == label.id
    assert [lab.source for lab in project.label_history(ids[0])] == ["model1", "reviewer", "reviewer"]


def test_region_edits_keep_classes(review, project):
    image = label_ids(project)[0]
    two = box(1, 4, 1, 4) | box(10, 14, 10, 14)
    review.replace_mask(image, two, ["hole", "broken_needle"])
    moved = box(15, 19, 2, 6)  # region 2 redrawn elsewhere (still second in scan order)
    label = review.edit_region(image, 2, moved)
    assert np.array_equal(label.mask, box(1, 4, 1, 4) | moved) and label.classes == ("hole", "broken_needle")
    label = review.set_class(image, 1, "mis_yarn")
    assert label.classes == ("mis_yarn", "broken_needle")
    label = review.edit_region(image, 1, np.zeros((H, W), bool))  # delete region 1
    assert label.classes == ("broken_needle",) and label.area == 16
    grown = review.replace_mask(image, label.mask | box(0, 2, 15, 18))  # classes carried by overlap
    assert grown.classes == (None, "broken_needle")
    with pytest.raises(ReviewError, match="no region 5"):
        review.set_class(image, 5, "hole")
    with pytest.raises(Exception, match="unknown defect class"):
        review.set_class(image, 1, "stain")
    project.add_class("stain")
    assert review.set_class(image, 1, "stain").classes == ("stain", "broken_needle")


def test_edit_region_when_region_moves_before_another_in_raster_order(review, project):
    image = label_ids(project)[0]
    review.replace_mask(image, box(4, 7, 1, 4) | box(10, 14, 10, 14), ["hole", "broken_needle"])
    label = review.edit_region(image, 2, box(0, 2, 15, 18))  # now the top-most region: index 1
    assert label.classes == ("broken_needle", "hole")


def test_carry_classes_by_overlap():
    old = box(0, 5, 0, 5) | box(10, 15, 10, 15)
    old_regions, _ = label_regions(old)
    new = box(0, 3, 0, 3) | box(12, 18, 12, 18) | box(0, 2, 15, 19)
    assert carry_classes(old_regions, ["a", "b"], new) == ["a", None, "b"]


def test_a_mask_kept_against_a_flag_is_recorded_but_not_sent_back(review, project):
    ids = label_ids(project)
    prelabel_all(review)
    precheck_all(review)
    flag = lambda: [FlagSpec("iou", 0.6, {"iou": 0.4}, box(2, 9, 2, 9))]  # noqa: E731
    r1 = review.start_check_round()
    review.record_check_results(r1, {ids[0]: flag(), ids[1]: flag(), ids[2]: []})
    assert not any(review.kept_against_flag(i) for i in ids)
    review.accept_as_is(ids[0])  # the person keeps the flagged mask: overrules the checkers
    review.replace_mask(ids[1], box(3, 7, 3, 7))  # the person repairs the other one
    assert review.kept_against_flag(ids[0]) and not review.kept_against_flag(ids[1])
    assert not review.kept_against_flag(ids[2])  # never flagged

    overruled = [i for i in ids if review.kept_against_flag(i)]
    r2 = review.start_check_round()
    summary = review.record_check_results(r2, {ids[0]: flag(), ids[1]: [], ids[2]: []}, overruled=overruled)
    assert summary["overruled"] == 1 and summary["flagged"] == 0 and summary["flags"] == 1
    assert review.state(ids[0]) == "accepted" and review.queue() == []
    (stored,) = project.flags(round=r2)
    assert stored.resolved and stored.resolved_by == project.current_label(ids[0]).id  # kept for the record
    assert review.loop_finished()

    # a repaired label is not "kept": a flag on it is sent back as usual
    r3 = review.start_check_round()
    summary = review.record_check_results(r3, {ids[0]: [], ids[1]: flag(), ids[2]: []},
                                          overruled=[i for i in ids if review.kept_against_flag(i)])
    assert summary["flagged"] == 1 and review.state(ids[1]) == "flagged" and not review.loop_finished()


def test_a_label_passes_a_check_only_in_an_ended_round_that_raised_no_flag_on_it(review, project):
    ids = label_ids(project)
    prelabel_all(review)
    precheck_all(review)
    assert not any(review.accepted_by_check(i) for i in ids)  # no check round yet
    flag = lambda: [FlagSpec("iou", 0.6, {"iou": 0.4}, box(2, 9, 2, 9))]  # noqa: E731
    r1 = review.start_check_round()
    review.record_check_results(r1, {ids[0]: flag(), ids[1]: []}, final=False)
    assert not review.accepted_by_check(ids[1])  # the round has not ended
    review.record_check_results(r1, {ids[2]: []})
    assert not review.accepted_by_check(ids[0])  # flagged
    assert review.accepted_by_check(ids[1]) and review.accepted_by_check(ids[2])
    review.accept_as_is(ids[0])  # kept against its flag: that rule, not this one
    assert review.kept_against_flag(ids[0]) and not review.accepted_by_check(ids[0])
    review.replace_mask(ids[1], box(3, 7, 3, 7))  # changed after it passed: judged again
    assert not review.accepted_by_check(ids[1])
    # the third passed label's flag in round 2 is recorded, resolved, not sent back
    r2 = review.start_check_round()
    passed = [i for i in ids if review.accepted_by_check(i)]
    assert passed == [ids[2]]
    summary = review.record_check_results(r2, {ids[0]: [], ids[1]: [], ids[2]: flag()}, accepted_before=passed)
    assert summary["flagged"] == 0 and summary["accepted_before"] == 1 and summary["overruled"] == 0
    assert review.state(ids[2]) == "accepted" and review.loop_finished()
    assert project.round(r2).summary["accepted_before"] == 1  # the stored round says the same
    # a round in which it was flagged, even if not sent back, is not a pass
    r3 = review.start_check_round()
    review.record_check_results(r3, {ids[0]: [], ids[1]: [], ids[2]: []})
    assert review.accepted_by_check(ids[2])  # round 1 still counts
