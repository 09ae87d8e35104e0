"""The verbs on a tiny real project: model 1 trains on the good images only, the checkers
judge out-of-fold, flags go back to the reviewer, the loop ends only on a clean round."""
import numpy as np
import pytest

from annotator.core.demo_fabric import write_demo_mvtec
from annotator.core.flags import FlagRules
from annotator.core.review import Review
from annotator.core.store import Project
from annotator.pipeline import PipelineError, project_io
from annotator.pipeline.demo import truth_masks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fabric")
    write_demo_mvtec(root, n_train_good=8, n_test_good=3, n_per_defect=1, size=64, seed=3,
                     kinds=("hole", "stain", "knot"))
    return root


def small_prelabel():
    from annotator.ml.prelabel import PrelabelConfig

    return PrelabelConfig(tile=64, tile_overlap=0)


def small_checkers():
    from annotator.ml.checkers import CheckerConfig

    return CheckerConfig(steps=15, crop_size=64, batch_size=4, tile_size=64, tile_overlap=0)


def test_model1_fits_on_good_images_only(tmp_path, data, monkeypatch):
    import annotator.ml.prelabel as P
    from annotator.pipeline import prelabel as verb

    seen = []
    real_fit = P.fit_prelabeller

    def spy(images, config, **kw):
        seen.extend(img.copy() for img in images)
        return real_fit(images, config, **kw)

    monkeypatch.setattr(P, "fit_prelabeller", spy)
    with Project.create(tmp_path / "p") as p:
        project_io.import_mvtec(p, data)
        summary = verb.prelabel_project(p, small_prelabel())
        goods = [p.load_image(g.id) for g in p.images(role="good")]
        assert len(seen) == len(goods) == 8
        assert all(any(np.array_equal(s, g) for g in goods) for s in seen)
        assert summary["prelabelled"] == 6
        states = {i.state for i in p.images(role="label")}
        assert states == {"prelabelled"}
        img = p.images(role="label")[0]
        assert p.heatmap(img.id).shape == (64, 64) and img.anomaly_score is not None
        assert p.model_runs("prelabel")


def test_prelabel_needs_good_images(tmp_path, data):
    from annotator.pipeline.prelabel import prelabel_project

    with Project.create(tmp_path / "p") as p:
        project_io.import_folder(p, data / "test")
        with pytest.raises(PipelineError, match="defect-free"):
            prelabel_project(p)


def test_cancel_keeps_what_was_done(tmp_path, data):
    from annotator.core.jobs import CancelToken, Cancelled
    from annotator.pipeline.prelabel import prelabel_project

    token = CancelToken()
    calls = []

    def progress(done, total, msg):
        calls.append(msg)
        if msg == "pre-labelling" and done == 2:
            token.cancel()

    with Project.create(tmp_path / "p") as p:
        project_io.import_mvtec(p, data)
        with pytest.raises(Cancelled):
            prelabel_project(p, small_prelabel(), on_progress=progress, cancel=token)
        states = [i.state for i in p.images(role="label")]
        assert states.count("prelabelled") == 2 and states.count("new") == 4
        assert p.rounds("prelabel")[-1].ended is not None
    with Project.open(tmp_path / "p") as p:  # reopens fine, resumes the rest
        prelabel_project(p, small_prelabel())
        assert {i.state for i in p.images(role="label")} == {"prelabelled"}


def test_check_round_flags_wrong_labels_and_loop_ends_on_clean_round(tmp_path, data):
    from annotator.pipeline.check import check_project

    with Project.create(tmp_path / "p") as p:
        project_io.import_mvtec(p, data)
        review = Review(p)
        truth = truth_masks(p, data)
        ids = sorted(truth)
        wrong = ids[0]
        for i in ids:  # pre-check: the truth, except one image labelled wildly wrong
            mask = truth[i].copy()
            if i == wrong:
                mask = ~mask
            review.replace_mask(i, mask)
        with pytest.raises(PipelineError, match="at least"):
            check_project(p, folds=4, checker_config=small_checkers())
        summary = check_project(p, variant="iou", folds=2, checker_config=small_checkers(),
                                rules=FlagRules(iou_tolerance_px=1))
        assert summary["checked"] == 6
        flagged = {f.image_id for f in p.flags(unresolved_only=True)}
        assert wrong in flagged
        flag = p.flags(unresolved_only=True, image_id=wrong)[0]
        assert flag.numbers["iou"] < 0.8 and flag.numbers["voters"]
        assert "iou_checker" in flag.numbers  # the image was there for its evidence
        assert flag.pred_mask is not None and flag.pred_mask.shape == (64, 64)
        assert not review.loop_finished()
        # the reviewer works through the flags; a round that still flags keeps the loop open
        for q in review.queue():
            review.replace_mask(q.image_id, truth[q.image_id])
        lenient = FlagRules(iou_threshold=0.0, operation="mean", wrong_threshold_mean=0.0,
                            missed_threshold_mean=1.1)
        check_project(p, variant="both", folds=2, checker_config=small_checkers(), rules=lenient)
        assert review.loop_finished()
        assert {i.state for i in p.images(role="label")} == {"accepted"}


def test_check_does_not_resend_a_mask_the_person_kept_against_a_flag(tmp_path, data):
    from annotator.pipeline.check import check_project

    strict = FlagRules(iou_threshold=1.01, iou_tolerance_px=0)  # every label is flagged
    with Project.create(tmp_path / "p") as p:
        project_io.import_mvtec(p, data)
        review = Review(p)
        truth = truth_masks(p, data)
        for i, m in truth.items():
            review.replace_mask(i, m)
        first = check_project(p, variant="iou", folds=2, checker_config=small_checkers(), rules=strict)
        assert first["flagged"] == len(truth) and first["overruled"] == 0
        kept = sorted(truth)[:2]
        for i in kept:
            review.accept_as_is(i)  # the person keeps these masks against the flags
        second = check_project(p, variant="iou", folds=2, checker_config=small_checkers(), rules=strict)
        assert second["overruled"] == 2 and second["flagged"] == len(truth) - 2
        assert {review.state(i) for i in kept} == {"accepted"}
        again = check_project(p, variant="iou", folds=2, checker_config=small_checkers(), rules=strict,
                              resend_overruled=True)
        assert again["overruled"] == 0 and {review.state(i) for i in kept} == {"flagged"}


def test_check_does_not_resend_a_label_an_earlier_round_accepted(tmp_path, data):
    """Spec 003 checks again what the person re-pre-checked after a flag; a label that passed a round
    and has not changed is not sent back by a later round's false alarm (unless asked)."""
    from annotator.pipeline.check import check_project

    lenient = FlagRules(iou_threshold=0.0, operation="mean", wrong_threshold_mean=0.0, missed_threshold_mean=1.1,
                        unlabelled_check=False)  # nothing is flagged
    strict = FlagRules(iou_threshold=1.01, iou_tolerance_px=0, unlabelled_check=False)  # every label is flagged
    with Project.create(tmp_path / "p") as p:
        project_io.import_mvtec(p, data)
        review = Review(p)
        truth = truth_masks(p, data)
        ids = sorted(truth)
        for i in ids:
            review.replace_mask(i, truth[i])
        first = check_project(p, variant="iou", folds=2, checker_config=small_checkers(), rules=lenient)
        assert first["flagged"] == 0 and review.loop_finished()
        review.replace_mask(ids[0], truth[ids[0]] | np.pad(np.ones((4, 4), bool), ((0, 60), (0, 60))))
        second = check_project(p, variant="iou", folds=2, checker_config=small_checkers(), rules=strict)
        assert second["flagged"] == 1 and second["accepted_before"] == len(ids) - 1 and second["overruled"] == 0
        assert [q.image_id for q in review.queue()] == [ids[0]]  # only the changed label comes back
        assert {review.state(i) for i in ids[1:]} == {"accepted"}
        assert all(f.resolved for i in ids[1:] for f in p.flags(round=second["round"], image_id=i))
        again = check_project(p, variant="iou", folds=2, checker_config=small_checkers(), rules=strict,
                              recheck_accepted=True)
        assert again["flagged"] == len(ids) and again["accepted_before"] == 0


def test_prelabel_works_through_groups_bounded_by_count_and_pixels():
    from types import SimpleNamespace

    from annotator.pipeline.prelabel import _chunks

    small = [SimpleNamespace(width=256, height=256) for _ in range(19)]
    assert [len(c) for c in _chunks(small)] == [8, 8, 3]
    huge = SimpleNamespace(width=12000, height=9000)  # 108 MP: alone, but never skipped
    mixed = small[:2] + [huge] + small[:3]
    assert [len(c) for c in _chunks(mixed)] == [2, 1, 3]
    assert [r for c in _chunks(mixed) for r in c] == mixed
    assert list(_chunks([])) == []


def _hole_model1_found_and_the_person_erased(tmp_path):
    """A project whose labels are the truth, except one hole: model 1's pre-label has it, the
    person's label does not. Returns (project path, truth by image id, that image's id)."""
    data = tmp_path / "fabric"  # 160 px: room around the hole for the image evidence's placements
    write_demo_mvtec(data, n_train_good=2, n_test_good=3, n_per_defect=1, size=160, seed=4, kinds=("hole", "stain"))
    with Project.create(tmp_path / "p") as p:
        project_io.import_mvtec(p, data)
        review = Review(p)
        truth = truth_masks(p, data)
        erased = next(i for i in sorted(truth) if "hole" in p.image(i).rel_path)
        p.set_label(erased, truth[erased], source="model1")  # model 1 found the hole ...
        for i, m in truth.items():
            review.replace_mask(i, np.zeros_like(m) if i == erased else m)  # ... the person erased it
    return tmp_path / "p", truth, erased


def test_check_flags_a_model1_region_the_person_erased(tmp_path):
    from annotator.core.flags import RULE_UNLABELLED
    from annotator.pipeline.check import check_project

    path, truth, erased = _hole_model1_found_and_the_person_erased(tmp_path)
    with Project.open(path) as p:
        check_project(p, variant="iou", folds=2, checker_config=small_checkers())
        flags = [f for f in p.flags(unresolved_only=True, image_id=erased) if f.rule == RULE_UNLABELLED]
        assert flags and flags[0].numbers["unlabelled_px"] == int(truth[erased].sum())
        assert (flags[0].pred_mask == truth[erased]).all()  # the suggestion puts the hole back
        others = [f for f in p.flags() if f.rule == RULE_UNLABELLED and f.image_id != erased]
        assert not others  # no pre-label, or nothing left out: no cross-check flag


def test_the_cross_check_takes_only_regions_model1_would_call_a_defect(tmp_path):
    import json

    from annotator.core.flags import RULE_UNLABELLED
    from annotator.pipeline.check import check_project

    path, truth, erased = _hole_model1_found_and_the_person_erased(tmp_path)
    with Project.open(path) as p:
        review = Review(p)
        folder = p.new_model_dir("patchcore")  # image threshold 1.5x the pixel threshold
        (folder / "prelabeller.json").write_text(json.dumps({"thresholds": {"image": 15.0, "pixel": 10.0}}))
        p.add_model_run("prelabel", "patchcore", folder)
        heat = np.full(truth[erased].shape, 1.2, np.float32)  # above the pixel threshold, below the image one
        p.set_heatmap(erased, heat)
        check_project(p, variant="iou", folds=2, checker_config=small_checkers())
        assert not [f for f in p.flags(image_id=erased) if f.rule == RULE_UNLABELLED]
        heat[truth[erased]] = 1.6  # the hole itself peaks above the image threshold
        p.set_heatmap(erased, heat)
        review.replace_mask(erased, np.zeros_like(truth[erased]))  # a new round judges it again
        check_project(p, variant="iou", folds=2, checker_config=small_checkers())
        flags = [f for f in p.flags(unresolved_only=True, image_id=erased) if f.rule == RULE_UNLABELLED]
        assert flags and flags[0].numbers["unlabelled_px"] == int(truth[erased].sum())


def test_cancel_while_judging_labels_records_no_round(tmp_path, data):
    from annotator.core.jobs import CancelToken, Cancelled
    from annotator.pipeline.check import check_project

    with Project.create(tmp_path / "p") as p:
        project_io.import_mvtec(p, data)
        review = Review(p)
        for i, m in truth_masks(p, data).items():
            review.replace_mask(i, m)
        token, seen = CancelToken(), []

        def progress(done, total, message=""):
            seen.append(message)
            if message == "judging the labels":
                token.cancel()

        with pytest.raises(Cancelled):
            check_project(p, variant="iou", folds=2, checker_config=small_checkers(), on_progress=progress,
                          cancel=token)
        assert "judging the labels" in seen and not p.flags()
        assert {review.state(i) for i in truth_masks(p, data)} == {"prechecked"}


def test_files_lost_since_the_import_are_listed_and_the_rest_is_done(tmp_path, data):
    """A good image and an image to label deleted after the import: pre-labelling goes on without them and
    lists them; a pre-checked image deleted before a check round is neither trained on nor judged."""
    import shutil

    from annotator.pipeline.check import check_project
    from annotator.pipeline.prelabel import prelabel_project

    root = tmp_path / "data"
    shutil.copytree(data, root)
    with Project.create(tmp_path / "p") as p:
        project_io.import_mvtec(p, root)
        (root / "train/good/000.png").unlink()
        (root / "test/hole/000.png").unlink()
        summary = prelabel_project(p, small_prelabel())
        assert summary["prelabelled"] == 5 and len(summary["unreadable"]) == 2
        assert "train/good/000.png: file not found" in summary["unreadable"][0]
        assert "test/hole/000.png: file not found" in summary["unreadable"][1]
        assert p.model_runs("prelabel")[-1].metrics["n_good"] == 7
        states = {i.rel_path: i.state for i in p.images(role="label")}
        assert states.pop("test/hole/000.png") == "new" and set(states.values()) == {"prelabelled"}

        review = Review(p)
        truth = truth_masks(p, root)
        for i in truth:
            review.replace_mask(i, truth[i])
        (root / "test/stain/000.png").unlink()
        lost = {i.rel_path: i.id for i in p.images()}
        summary = check_project(p, variant="iou", folds=2, checker_config=small_checkers())
        assert summary["checked"] == 4 and len(summary["unreadable"]) == 2
        assert p.image(lost["test/stain/000.png"]).state == "prechecked"
        assert p.image(lost["test/hole/000.png"]).state == "prechecked"
        assert not review.loop_finished()
