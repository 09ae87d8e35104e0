"""The real window driven offscreen through a whole review round on a tiny project, with
the real pipeline (model 1, the checkers, export), plus cancel, close-while-running and
an unreadable image. Waits are on signals, never on sleeps."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from PySide6.QtCore import QEvent, QPointF, QSettings, Qt
from PySide6.QtGui import QMouseEvent
from PySide6.QtWidgets import QApplication, QPushButton

from annotator.core.demo_fabric import write_demo_mvtec
from annotator.core.flags import FlagRules
from annotator.core.store import Project
from annotator.gui.main_window import MainWindow
from annotator.gui.session import CheckOptions
from annotator.pipeline import project_io

JOB_TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
def fabric(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fabric") / "data"
    write_demo_mvtec(root, n_train_good=8, n_test_good=3, n_per_defect=1, size=64)
    return root


@pytest.fixture
def project_dir(fabric, tmp_path) -> Path:
    with Project.create(tmp_path / "proj") as p:
        project_io.import_mvtec(p, fabric)
    return tmp_path / "proj"


@pytest.fixture
def window(qtbot, tmp_path):
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    w = MainWindow(settings)
    qtbot.addWidget(w)
    w.resize(1300, 850)
    w.show()
    qtbot.waitExposed(w)
    yield w
    if w.jobs.busy():
        with qtbot.waitSignal(w.jobs.all_ended, timeout=JOB_TIMEOUT_MS):
            w.jobs.cancel_all()
    w.close()


def tiny_checks(threshold: float) -> CheckOptions:
    """Real checkers, trained for a few steps on 32 px crops: fast on 2 cores. The flag
    threshold makes the outcome certain: 1.01 flags every image, 0.0 none."""
    from annotator.ml.checkers import CheckerConfig

    config = CheckerConfig(crop_size=32, batch_size=4, steps=6, tile_size=64, tile_overlap=16, device="cpu",
                           decoder_width=8, full_res_width=4)
    return CheckOptions(variant="iou", folds=2, rules=FlagRules(iou_threshold=threshold), checker_config=config)


def run_job(qtbot, window, start) -> object:
    job = start()
    assert job is not None, window.last_error
    outcome = {}
    job.succeeded.connect(lambda r: outcome.setdefault("ok", r))
    job.failed.connect(lambda m: outcome.setdefault("failed", m))
    with qtbot.waitSignal(job.ended, timeout=JOB_TIMEOUT_MS):
        pass
    assert "failed" not in outcome, outcome.get("failed")
    return outcome.get("ok")


# ---------------------------------------------------------------- mouse on the canvas


def mouse(canvas, kind, x, y, button=Qt.MouseButton.LeftButton, buttons=None):
    p = canvas.viewportTransform().map(QPointF(x, y))
    ev = QMouseEvent(kind, p, canvas.viewport().mapToGlobal(p), button,
                     button if buttons is None else buttons, Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(canvas.viewport(), ev)


def drag(canvas, points):
    left, none = Qt.MouseButton.LeftButton, Qt.MouseButton.NoButton
    mouse(canvas, QEvent.Type.MouseButtonPress, *points[0])
    for x, y in points[1:]:
        mouse(canvas, QEvent.Type.MouseMove, x, y, none, left)
    mouse(canvas, QEvent.Type.MouseButtonRelease, *points[-1], left, none)


def empty_row(mask) -> int:
    """A row y whose band y-8..y+8, x 12..48 holds no label yet (room to paint)."""
    for y in range(10, mask.shape[0] - 10):
        if not mask[y - 8:y + 9, 12:49].any():
            return y
    raise AssertionError("no empty band to paint in")


def trigger(window, ident):
    window.actions[ident].trigger()


# ---------------------------------------------------------------- the whole round


@pytest.mark.slow
def test_a_whole_round_through_the_window(qtbot, window, project_dir, tmp_path):
    assert window.open_project(project_dir)
    review = window.session.review
    assert window.queue.model.rowCount() == 0 and "Pre-label" in window.queue.done.text()

    # 1. pre-label (model 1) as a background job
    summary = run_job(qtbot, window, window.run_prelabel)
    assert summary["prelabelled"] == 10
    assert review.phase() == "precheck" and window.queue.model.rowCount() == 10
    assert window.current_id == window.queue.model.items[0].image_id
    assert window.show_image(window.queue.model.items[-1].image_id)  # least anomalous: room to paint
    first = window.current_id
    canvas = window.canvas

    # 2. paint, erase, undo, redo with real mouse events
    trigger(window, "tool.brush")
    canvas.set_brush_size(6)
    canvas.zoom_to(6.0)
    before = canvas.working_mask().copy()
    y = empty_row(before)
    with qtbot.waitSignal(canvas.mask_edited):
        drag(canvas, [(20, y), (30, y), (40, y)])
    painted = canvas.working_mask().copy()
    assert painted[y, 20:41].all() and painted.sum() > before.sum() and window.dirty
    trigger(window, "tool.eraser")
    canvas.set_brush_size(4)
    with qtbot.waitSignal(canvas.mask_edited):
        drag(canvas, [(30, y - 6), (30, y + 6)])
    erased = canvas.working_mask().copy()
    assert not erased[y, 30] and erased[y, 20]
    trigger(window, "edit.undo")
    np.testing.assert_array_equal(canvas.working_mask(), painted)
    trigger(window, "edit.redo")
    np.testing.assert_array_equal(canvas.working_mask(), erased)

    # 3. select a region and set its class with the class button
    trigger(window, "tool.select")
    with qtbot.waitSignal(canvas.region_selected):
        drag(canvas, [(21, y)])
    index = canvas.selected_region()
    assert index >= 1
    button = window.regions.buttons.findChild(QPushButton, "class:hole")
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
    assert canvas.region_classes()[index - 1] == "hole"

    # 4. accept: the edited mask and its class are saved through Review, and we move on
    trigger(window, "review.accept")
    saved = window.session.project.current_label(first)
    np.testing.assert_array_equal(saved.mask, erased)
    assert "hole" in saved.classes and review.state(first) == "prechecked"
    assert window.current_id != first and not window.dirty

    # 5. pre-check the rest from the keyboard: accept as is, one marked defect-free
    window.activateWindow()
    qtbot.waitActive(window)
    good_one = window.current_id
    trigger(window, "review.mark_good")
    assert window.session.project.current_label(good_one).area == 0
    while window.queue.model.rowCount():
        trigger(window, "review.accept")
    assert review.counts()["prechecked"] == 10

    # 6. a check round that flags every image (threshold above any IoU)
    window.session.check_options = tiny_checks(1.01)
    summary = run_job(qtbot, window, window.run_check)
    assert summary["flagged"] == 10 and review.phase() == "check"
    assert window.queue.model.rowCount() == 10 and window.current_id == window.queue.model.items[0].image_id
    assert window.flags.views and window.flags.views[0].title.startswith("Label and checkers")
    numbers = dict(window.flags.views[0].numbers)
    assert {"IoU", "Predicted area", "Checkers that voted", "Round"} <= set(numbers)
    assert window.status_area.badge.text().startswith("ROUND")

    # 7. work through the flags: one takes the checkers' mask, the rest are accepted
    taken = window.current_id
    canvas.select_region(0)
    trigger(window, "review.accept_prediction")
    assert window.session.project.current_label(taken).source == "checker"
    while window.queue.model.rowCount():
        trigger(window, "review.accept")
    assert not window.session.project.flags(unresolved_only=True)

    # 8. a check round that raises no flag finishes the loop
    window.session.check_options = tiny_checks(0.0)
    run_job(qtbot, window, window.run_check)
    assert review.loop_finished() and review.phase() == "done"
    assert window.status_area.badge.text() == "LOOP FINISHED"
    assert window.queue.done.isVisible() and "Loop finished" in window.queue.done.text()

    # 9. export
    out = tmp_path / "export"
    result = run_job(qtbot, window, lambda: window.export(str(out), "mvtec"))
    assert result["loop_finished"] and any(out.rglob("*.png"))


# ---------------------------------------------------------------- jobs, errors, restore


@pytest.mark.slow
def test_cancel_a_running_prelabel_job(qtbot, window, project_dir):
    window.open_project(project_dir)
    job = window.run_prelabel()
    seen = []
    job.cancelled.connect(lambda: seen.append("cancelled"))
    job.succeeded.connect(lambda r: seen.append("succeeded"))
    assert window.actions["jobs.cancel"].isEnabled() and window.status_area.cancel.isVisible()
    with qtbot.waitSignal(job.ended, timeout=JOB_TIMEOUT_MS):
        window.status_area.cancel.click()
    assert seen == ["cancelled"]
    assert not window.jobs.busy() and window.actions["jobs.prelabel"].isEnabled()
    assert "cancelled" in window.statusBar().currentMessage()


@pytest.mark.slow
def test_closing_the_window_while_a_job_runs_cancels_and_waits(qtbot, window, project_dir):
    window.open_project(project_dir)
    job = window.run_prelabel()
    with qtbot.waitSignal(window.closed, timeout=JOB_TIMEOUT_MS):
        window.close()
    assert job.outcome in ("cancelled", "succeeded")
    assert not window.jobs.busy()
    assert not [t for t in threading.enumerate() if t.name.startswith("job:") or "QThread" in t.name]


def test_an_unreadable_image_shows_an_error_and_the_app_keeps_working(qtbot, window, fabric, tmp_path):
    shutil.copytree(fabric, tmp_path / "own")  # the shared images stay intact for the other tests
    with Project.create(tmp_path / "own-proj") as p:
        project_io.import_mvtec(p, tmp_path / "own")
        images = p.images(role="label")
    project_dir = tmp_path / "own-proj"
    broken, fine = images[0], images[1]
    Path(broken.source).write_bytes(b"this is not a PNG")
    window.open_project(project_dir)
    with qtbot.waitSignal(window.error_shown) as sig:
        assert not window.show_image(broken.id)
    assert "Cannot" in window.statusBar().currentMessage() and broken.source in sig.args[0]
    assert window.show_image(fine.id) and window.current_id == fine.id


def test_images_moved_since_the_import_are_found_again_from_the_project_menu(qtbot, window, fabric, tmp_path):
    from annotator.gui.browser import FILTERS

    shutil.copytree(fabric, tmp_path / "incoming")
    with Project.create(tmp_path / "own-proj") as p:
        project_io.import_mvtec(p, tmp_path / "incoming")
        first = p.images(role="label")[0]
    shutil.move(str(tmp_path / "incoming"), str(tmp_path / "archive"))
    window.open_project(tmp_path / "own-proj")
    assert "18 image files are not where they were imported from" in window.statusBar().currentMessage()
    with qtbot.waitSignal(window.error_shown):
        assert not window.show_image(first.id)
    browser, thumbs = window.browser, window.browser.model.thumbnails
    window.left_tabs.setCurrentWidget(browser)
    browser.filter.setCurrentIndex([label for label, _ in FILTERS].index("Defect-free (training)"))
    qtbot.waitUntil(lambda: thumbs.is_broken(window.session.project.images(role="good")[0].id), timeout=30_000)
    assert window.actions["file.relink"].isEnabled()
    report = run_job(qtbot, window, lambda: window.relink(str(tmp_path / "archive")))
    assert len(report["relinked"]) == report["looked_for"] == 18 and not report["missing"]
    assert "18 of 18 images found" in window.statusBar().currentMessage()
    assert window.show_image(first.id) and window.canvas.image_id() == first.id
    good = window.session.project.images(role="good")[0]
    assert good.source.startswith(str(tmp_path / "archive"))
    qtbot.waitUntil(lambda: not thumbs.is_broken(good.id) and thumbs.pixmap(
        browser.model.data(browser.model.index(0), Qt.ItemDataRole.UserRole)) is not None, timeout=30_000)


def test_the_browser_menu_changes_roles_and_removes_images_after_asking(qtbot, window, project_dir, monkeypatch):
    window.open_project(project_dir)
    browser, project = window.browser, window.session.project
    goods = [i.id for i in project.images(role="good")][:2]
    hole = project.image_by_path("test/hole/000.png")
    assert window.show_image(hole.id)
    window.left_tabs.setCurrentWidget(browser)
    for i in goods:  # Ctrl + click adds rows to the selection and opens none of them
        browser.view.scrollTo(browser.model.index(browser.model.row_of(i)))
        rect = browser.view.visualRect(browser.model.index(browser.model.row_of(i)))
        qtbot.mouseClick(browser.view.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.ControlModifier,
                         rect.center())
    assert window.current_id == hole.id and {r.id for r in browser.selected_rows()} == {hole.id, *goods}
    menu = browser.context_menu()
    texts = [a.text() for a in menu.actions() if a.text()]
    assert texts == ["Defect-free: train model 1 on it (1 of the 3)", "To label: stop training model 1 on them (2 of the 3)",
                     "Remove these 3 images from the project…"]
    menu.actions()[1].trigger()  # the two training images become images to label
    assert {project.image(i).state for i in goods} == {"new"} and "2 images now to label" in \
        window.statusBar().currentMessage()
    # a person's label that marks a defect never becomes good fabric
    window.canvas.replace_mask(np.pad(np.ones((6, 6), bool), ((10, 48), (10, 48))))
    with qtbot.waitSignal(window.error_shown) as sig:
        assert not window.set_role([hole.id], "good")
    assert "marks a defect" in sig.args[0] and project.image(hole.id).role == "label"
    asked = []
    monkeypatch.setattr(window, "confirm", lambda title, text: asked.append((title, text)) or len(asked) > 1)
    assert window.remove_images([hole.id] + goods) == 0  # "No": nothing goes
    assert asked[0][0] == "Remove 3 images from the project?" and "1 of them carry a label a person made" in asked[0][1]
    assert len(project.images()) == 18 and window.current_id == hole.id
    assert window.remove_images([hole.id] + goods) == 3
    assert len(project.images()) == 15 and browser.model.all_count() == 15 and window.current_id is None
    assert not window.actions["review.accept"].isEnabled() and project.problems() == []
    first = browser.model.index(0)
    qtbot.mouseClick(browser.view.viewport(), Qt.MouseButton.LeftButton, pos=browser.view.visualRect(first).center())
    assert window.current_id == first.data(Qt.ItemDataRole.UserRole).id  # a plain click opens the image


def test_a_damaged_label_file_shows_the_last_version_that_reads_and_saves_it_again(qtbot, window, project_dir):
    """The current label's mask file is damaged: the image still opens, with the previous version as an
    edit and a note; saving records a new version whose file reads, and the export works again."""
    from annotator.core.review import Review

    with Project.open(project_dir) as p:
        image = p.images(role="label")[0]
        first = np.zeros((image.height, image.width), bool)
        first[5:15, 5:25] = True
        Review(p).replace_mask(image.id, first)
        second = first.copy()
        second[30:40, 30:40] = True
        damaged = Review(p).replace_mask(image.id, second)
    damaged.path.write_bytes(b"not a PNG any more")
    with pytest.raises(Exception, match="label cannot be read"):
        with Project.open(project_dir) as p:
            project_io.export_records(p)
    window.open_project(project_dir)
    assert window.show_image(image.id) and window.dirty
    np.testing.assert_array_equal(window.canvas.working_mask(), first)
    assert "cannot be read" in window.statusBar().currentMessage()
    assert window.save_current()
    with Project.open(project_dir) as p:
        np.testing.assert_array_equal(p.current_label(image.id).mask, first)
        assert len(project_io.export_records(p)) == len(p.images())


def test_reopening_restores_the_image_and_an_unsaved_edit(qtbot, window, project_dir, tmp_path):
    window.open_project(project_dir)
    target = window.session.project.images(role="label")[2].id
    window.show_image(target)
    trigger(window, "tool.brush")
    window.canvas.set_brush_size(5)
    with qtbot.waitSignal(window.canvas.mask_edited):
        drag(window.canvas, [(10, 10), (20, 12)])
    edited = window.canvas.working_mask().copy()
    window._write_draft()  # what the draft timer does 1.5 s after an edit
    window.dirty = False  # as if the app died before saving: only the draft holds the edit
    window.close()

    again = MainWindow(QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(again)
    again.show()
    assert again.open_project(project_dir)
    assert again.current_id == target and again.dirty
    np.testing.assert_array_equal(again.canvas.working_mask(), edited)
    assert "Restored" in again.statusBar().currentMessage()
    again.close()


def test_a_broken_project_is_refused_with_a_message(qtbot, window, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "project.sqlite").write_bytes(b"garbage, not SQLite")
    with qtbot.waitSignal(window.error_shown):
        assert not window.open_project(bad)
    assert window.session is None


def test_keys_drive_the_review_when_the_window_is_active(qtbot, window, project_dir):
    from PySide6.QtTest import QTest

    window.open_project(project_dir)
    ids = [i.id for i in window.session.project.images(role="label")]
    window.show_image(ids[0])
    window.activateWindow()
    qtbot.waitActive(window)
    window.canvas.setFocus()
    QTest.keyClick(window.canvas, Qt.Key.Key_E)  # eraser
    assert window.canvas.tool() == "eraser" and window.actions["tool.eraser"].isChecked()
    with qtbot.waitSignal(window.image_shown):
        QTest.keyClick(window.canvas, Qt.Key.Key_G)  # mark defect-free
    assert window.session.review.state(ids[0]) == "prechecked"
    assert window.session.project.current_label(ids[0]).area == 0


def test_accept_prediction_is_named_after_the_open_flag(qtbot, window, project_dir):
    from annotator.core.store import FlagSpec

    with Project.open(project_dir) as p:
        ids = [i.id for i in p.images(role="label")]
        rec = p.image(ids[0])
        pred = np.zeros((rec.height, rec.width), bool)
        pred[10:20, 10:30] = True
        p.add_flags(p.start_round("check"), {ids[0]: [FlagSpec("unlabelled_anomaly", 0.9, {"unlabelled_px": 200}, pred)],
                        ids[1]: [FlagSpec("iou", 0.5, {"iou": 0.3}, pred)]})
    window.open_project(project_dir)
    act = window.actions["review.accept_prediction"]
    window.show_image(ids[0])
    assert act.isEnabled() and act.text() == "Accept suggested label" and "cross-check" in act.toolTip()
    window.show_image(ids[1])
    assert act.isEnabled() and act.text() == "Accept checker prediction" and "checkers' predicted mask" in act.toolTip()
    window.show_image(ids[2])  # no open flag: nothing to accept
    assert not act.isEnabled()
    window.show_image(ids[0])
    trigger(window, "review.accept_prediction")
    assert window.session.project.current_label(ids[0]).area == 200


def test_cheat_sheet_lists_every_action_and_a_changed_key_is_kept(qtbot, window, tmp_path):
    from annotator.gui.actions import CheatSheetDialog

    dialog = CheatSheetDialog(window.actions, window.settings, window)
    qtbot.addWidget(dialog)
    texts = [row[0] for row in dialog.rows() if row[0]]
    assert {"Accept label", "Accept checker prediction", "Mark defect-free", "Next image", "Undo", "Redo",
            "Brush", "Heat map"} <= set(texts)
    accept = next(row for row in dialog.rows() if row[0] == "Accept label")
    assert accept[1].startswith("A")
    dialog.set_shortcut("review.accept", "Ctrl+Return")
    assert window.actions["review.accept"].shortcut().toString() == "Ctrl+Return"
    again = MainWindow(QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(again)
    assert again.actions["review.accept"].shortcut().toString() == "Ctrl+Return"
    dialog.restore_defaults()
    assert window.actions["review.accept"].shortcut().toString() == "A"


def test_browser_filters_sorts_and_caches_thumbnails(qtbot, window, project_dir):
    from annotator.gui.browser import FILTERS, THUMB_DIR

    window.open_project(project_dir)
    browser = window.browser
    assert browser.model.rowCount() == 18
    labels = [label for label, _ in FILTERS]
    browser.filter.setCurrentIndex(labels.index("Defect-free (training)"))
    assert browser.model.rowCount() == 8 and "8 of 18" in browser.count.text()
    browser.filter.setCurrentIndex(0)
    browser.search.setText("hole")
    assert browser.model.rowCount() == 1
    browser.search.clear()
    window.left_tabs.setCurrentWidget(browser)
    thumbs = window.session.path / THUMB_DIR
    qtbot.waitUntil(lambda: thumbs.is_dir() and len(list(thumbs.glob("*.png"))) >= 8, timeout=30_000)
    with qtbot.waitSignal(browser.image_activated):
        browser.view.clicked.emit(browser.model.index(3))
    assert window.current_id == browser.model.data(browser.model.index(3), Qt.ItemDataRole.UserRole).id


def test_flag_texts_and_loop_summary_are_plain_words():
    from annotator.core.store import Flag
    from annotator.gui.review_panel import describe_flag
    from annotator.gui.status_area import loop_summary

    iou = Flag(1, 1, 3, "iou", {"iou": 0.42, "iou_exact": 0.4, "threshold": 0.8, "tolerance_px": 1, "label_area": 120,
                                "pred_area": 80, "voters": [0, 2], "regions": [{"index": 1, "iou": 0.42, "area": 120}]},
               0.58, False, None, "", None)
    v = describe_flag(iou)
    assert "0.42" in v.reason and "0.80" in v.reason and dict(v.numbers)["Checkers that voted"] == "#1, #3"
    missed = Flag(2, 1, 3, "missed_label", {"votes": {"0": 0.9, "1": 0.7}, "operation": "mean", "aggregate": 0.8,
                                            "threshold": 0.5, "area_threshold": 15, "pred_area": 40}, 0.8, False, None,
                  "", None)
    evidence = Flag(3, 1, 3, "iou", {"iou": 0.85, "iou_checker": 0.3, "supported_px": 90, "threshold": 0.8,
                                     "tolerance_px": 1, "label_area": 140, "pred_area": 40, "uncovered_regions": [2],
                                     "regions": []}, 0.15, False, None, "", None)
    e = describe_flag(evidence)
    assert "what the image itself shows" in e.reason and "region 2" in e.reason and "below" not in e.reason
    assert dict(e.numbers)["IoU, checkers alone"] == "0.30" and dict(e.numbers)["Supported by the image"] == "90 px"
    wrong = Flag(4, 1, 3, "wrong_label", {"votes": {"0": 0.1}, "operation": "mean", "aggregate": 0.1, "threshold": 0.5,
                                          "pred_area": 0, "label_supported": 0.25}, 0.9, False, None, "", None)
    assert dict(describe_flag(wrong).numbers)["Label unlike its surroundings"] == "25 %"
    unl = Flag(5, 1, 3, "unlabelled_anomaly", {"unlabelled_px": 120, "label_area": 0, "regions": [
        {"index": 1, "area": 120, "bbox": [10, 20, 4, 30]}], "support": [{"p": 0.0198, "supported": True}]},
        0.98, False, None, "", None)
    u = describe_flag(unl)
    assert u.title.startswith("Model 1 and the image") and "120 px" in u.reason
    assert dict(u.numbers)["Region at 10, 20"] == "120 px · 4×30" and dict(u.numbers)["Image evidence"] == "p = 0.020"
    m = describe_flag(missed)
    assert m.title.startswith("Checkers see a defect") and dict(m.numbers)["Checker #2"] == "p = 0.70"
    assert loop_summary({"flagged": 2, "accepted": 5, "prechecked": 1}, "check", 4) == (
        "ROUND 4 · CHECKING", "1 pre-checked · 2 flagged · 5 accepted · 3 remaining")
    assert loop_summary({"accepted": 9}, "done", 5)[0] == "LOOP FINISHED"


def test_a_new_project_from_an_mvtec_tree_imports_as_a_job(qtbot, window, fabric, tmp_path):
    from annotator.gui.dialogs import NewProjectRequest, validate_new_project

    req = NewProjectRequest(str(tmp_path / "new"), "mvtec", mvtec_root=str(fabric))
    assert validate_new_project(req) is None
    assert "train/ and test/" in validate_new_project(NewProjectRequest(str(tmp_path / "x"), "mvtec", str(tmp_path)))
    assert "defect-free" in validate_new_project(NewProjectRequest(str(tmp_path / "y"), "folders", label_dir=str(fabric)))
    job = window.create_project(req)
    with qtbot.waitSignal(job.ended, timeout=JOB_TIMEOUT_MS):
        pass
    counts = window.session.review.counts()
    assert counts["good"] == 8 and counts["new"] == 10
    assert window.browser.model.rowCount() == 18 and "images added" in window.statusBar().currentMessage()
    assert window.remembered.recent()[0] == str((tmp_path / "new").resolve())


def test_a_new_batch_is_added_to_an_open_project_and_repeated_names_go_under_its_folder(qtbot, window, project_dir,
                                                                                        fabric, tmp_path):
    from annotator.gui.dialogs import AddImagesDialog, validate_add_images

    batch = tmp_path / "day2"
    (batch / "test" / "hole").mkdir(parents=True)
    cv2.imwrite(str(batch / "test" / "hole" / "000.png"), np.full((64, 64, 3), 77, np.uint8))  # a taken path
    cv2.imwrite(str(batch / "new.png"), np.full((64, 64, 3), 99, np.uint8))
    assert validate_add_images("label", "") == "Choose the folder to add."
    assert "no folder" in validate_add_images("label", str(tmp_path / "nowhere"))
    assert "train/ and test/" in validate_add_images("mvtec", str(batch))
    assert validate_add_images("mvtec", str(fabric)) is None and validate_add_images("label", str(batch)) is None
    dialog = AddImagesDialog(str(batch), window)
    dialog.kinds.button(1).setChecked(True)
    assert dialog.choice() == ("good", str(batch))
    window.open_project(project_dir)
    assert window.actions["file.import"].isEnabled()
    run_job(qtbot, window, lambda: window.add_images("label", str(batch)))
    paths = {i.rel_path for i in window.session.project.images()}
    assert {"day2/test/hole/000.png", "day2/new.png"} <= paths and len(paths) == 20
    assert window.browser.model.all_count() == 20
    message = window.statusBar().currentMessage()
    assert "2 images added. 1 of its file paths were taken by other images, so the batch went under day2/" in message


@pytest.mark.slow
def test_a_failed_job_reaches_the_person_as_a_message(qtbot, window, project_dir):
    window.open_project(project_dir)  # nothing pre-checked yet: the checkers cannot train
    job = window.run_check()
    with qtbot.waitSignal(window.error_shown, timeout=JOB_TIMEOUT_MS) as sig:
        pass
    assert "pre-checked images" in sig.args[0] and job.outcome == "failed"
    assert window.session.review.counts()["new"] == 10  # nothing was changed
