"""The main window: composes the canvas, the panels, the actions and the jobs.

It computes nothing of its own: pixels and labels come from the store, every change goes
through :class:`~annotator.core.review.Review`, and the long verbs run as background jobs
(:mod:`annotator.gui.jobs`) whose results are applied here, on the GUI thread.

Saving: the canvas edits a working mask; the window writes it with
``Review.replace_mask`` when the person switches image, accepts, saves (Ctrl+S) or
closes. Between edits a draft PNG is kept in the project (``drafts/``), so an edit
survives a crash and comes back when the image is opened again.
"""
from __future__ import annotations

from typing import Optional

from PySide6.QtCore import QMargins, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QCloseEvent
from PySide6.QtWidgets import (QDockWidget, QFileDialog, QInputDialog, QLabel, QMainWindow, QMenu, QMessageBox,
                               QStackedWidget, QTabWidget, QToolBar, QVBoxLayout, QWidget)

from annotator.core.flags import RULE_UNLABELLED
from annotator.core.history import UndoHistory
from annotator.core.images import ImageError
from annotator.core.store import Project, ProjectError
from annotator.pipeline import PipelineError

from . import actions as A
from .browser import ImageBrowser
from .canvas import MaskCanvas
from .dialogs import AddImagesDialog, ExportDialog, NewProjectDialog, open_message
from .jobs import Job, JobManager
from .recent import Remembered
from .review_panel import STATE_HINTS, ReviewQueuePanel, ReviewSidePanel
from .session import ProjectSession, import_ml_stack, prediction_near_region
from .status_area import StatusArea, describe_result
from .theme import STATE_NAMES
from .toolbar import CanvasToolBar

USER_ERRORS = (ProjectError, PipelineError, ImageError, ValueError, OSError)


class MainWindow(QMainWindow):
    project_opened = Signal(str)
    image_shown = Signal(int)
    error_shown = Signal(str)
    refreshed = Signal()
    closed = Signal()

    def __init__(self, settings: Optional[QSettings] = None) -> None:
        super().__init__()
        self.settings = settings or QSettings("annotator", "annotator")
        self.remembered = Remembered(self.settings)
        self.history = UndoHistory()
        self.jobs = JobManager(self)
        self.session: Optional[ProjectSession] = None
        self.current_id: Optional[int] = None
        self.dirty = False
        self.last_error = ""
        self.last_result: object = None
        self._closing = False
        self._changed: set[int] = set()
        self._full_refresh = False
        self._boxes: list[QMessageBox] = []
        self._class_actions: list[QAction] = []
        self._regions_seen: list[int] = []
        self._shown_label: Optional[int] = None
        self.setWindowTitle("annotator")
        self._build()
        self._refresh_timer = QTimer(self, singleShot=True, interval=120)
        self._refresh_timer.timeout.connect(self._refresh)
        self._draft_timer = QTimer(self, singleShot=True, interval=1500)
        self._draft_timer.timeout.connect(self._write_draft)
        self.jobs.job_ended.connect(lambda _job: self._update_enabled())
        self._update_enabled()

    # ================================================================ building

    def _build(self) -> None:
        self.canvas = MaskCanvas(self.history, self)
        self.canvas.mask_edited.connect(self._on_mask_edited)
        self.canvas.region_selected.connect(self._on_region_selected)
        self.canvas.brush_size_changed.connect(lambda px: self.tool_bar.show_brush_size(px))
        self.canvas.zoom_changed.connect(self._on_zoom)
        self.actions = A.build_actions(self, self._handlers(), self.settings)
        self.tool_bar = CanvasToolBar(self.actions, self)
        self.tool_bar.brush_size_changed.connect(self.canvas.set_brush_size)
        self.tool_bar.tolerance_changed.connect(self.canvas.set_fill_tolerance)
        self.tool_bar.opacity_changed.connect(self.canvas.set_overlay_opacity)
        self.actions["tool.brush"].setChecked(True)
        self.actions["view.outlines"].setChecked(True)
        self.actions["view.prediction"].setChecked(True)
        self.canvas.set_show_prediction(True)
        self.image_info = QLabel("", self, objectName="imageInfo")
        self.empty_canvas = QLabel("", self, objectName="emptyCanvas", alignment=Qt.AlignmentFlag.AlignCenter)
        self.canvas_stack = QStackedWidget(self)
        self.canvas_stack.addWidget(self.empty_canvas)
        self.canvas_stack.addWidget(self.canvas)
        centre = QWidget(self)
        lay = QVBoxLayout(centre, contentsMargins=QMargins(0, 0, 0, 0), spacing=0)
        for widget, stretch in ((self.tool_bar, 0), (self.image_info, 0), (self.canvas_stack, 1)):
            lay.addWidget(widget, stretch)
        self.setCentralWidget(centre)
        self.queue = ReviewQueuePanel(self)
        self.queue.image_activated.connect(self.show_image)
        self.browser = ImageBrowser(self)
        self.browser.image_activated.connect(self.show_image)
        self.browser.role_requested.connect(self.set_role)
        self.browser.remove_requested.connect(self.remove_images)
        self.left_tabs = QTabWidget(self)
        self.left_tabs.addTab(self.queue, "To do")
        self.left_tabs.addTab(self.browser, "All images")
        self._dock("work", "Images", self.left_tabs, Qt.DockWidgetArea.LeftDockWidgetArea)
        side = ReviewSidePanel(self.actions, self)
        self.flags, self.regions = side.flags, side.regions
        self.regions.region_chosen.connect(self.canvas.select_region)
        self.regions.class_chosen.connect(self.set_region_class)
        self.regions.add_class_requested.connect(self.add_class)
        self._dock("review", "Review", side, Qt.DockWidgetArea.RightDockWidgetArea)
        self.status_area = StatusArea(self)
        self.status_area.cancel_requested.connect(self.cancel_jobs)
        self.status_area.clear()
        bottom = QToolBar("Loop", self, objectName="loopBar", movable=False)
        bottom.addWidget(self.status_area)
        self.addToolBar(Qt.ToolBarArea.BottomToolBarArea, bottom)
        self._build_menus()

    def _dock(self, name: str, title: str, widget: QWidget, area) -> None:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"dock:{name}")
        dock.setFeatures(QDockWidget.DockWidgetFeature.DockWidgetMovable)
        dock.setWidget(widget)
        self.addDockWidget(area, dock)

    def _handlers(self) -> dict:
        h = {
            "review.accept": self.accept, "review.accept_prediction": self.accept_prediction,
            "review.mark_good": self.mark_good, "review.next": lambda: self.step(1),
            "review.previous": lambda: self.step(-1), "edit.undo": self.undo, "edit.redo": self.redo,
            "edit.delete_region": self.canvas.delete_selected_region, "edit.merge_regions": self.merge_regions,
            "tool.brush_smaller": lambda: self.canvas.set_brush_size(self.canvas.brush_size() - 2),
            "tool.brush_larger": lambda: self.canvas.set_brush_size(self.canvas.brush_size() + 2),
            "view.heatmap": self.canvas.set_show_heatmap, "view.prediction": self.canvas.set_show_prediction,
            "view.outlines": self.canvas.set_show_outlines, "view.fit": self.canvas.fit_to_window,
            "view.opacity_down": lambda: self._nudge_opacity(-10), "view.opacity_up": lambda: self._nudge_opacity(10),
            "view.actual_size": lambda: self.canvas.zoom_to(1.0),
            "jobs.prelabel": self.run_prelabel, "jobs.check": self.run_check, "jobs.cancel": self.cancel_jobs,
            "file.new": self.new_project, "file.open": self.choose_project, "file.save": self.save_current,
            "file.import": self.add_images, "file.import_good": self.import_good, "file.relink": self.relink,
            "file.export": self.export, "file.quit": self.close,
            "help.cheat_sheet": self.show_cheat_sheet,
        }
        for ident in A.TOOL_IDS:
            h[ident] = lambda on, name=ident.split(".")[1]: on and self.canvas.set_tool(name)
        return h

    def _build_menus(self) -> None:
        self.recent_menu = QMenu("Open recent", self)
        A.build_menus(self.menuBar(), self.actions, self.recent_menu)
        self.remembered.fill_menu(self.recent_menu, self.open_project)
        main = QToolBar("Main", self, objectName="mainBar", movable=False,
                        toolButtonStyle=Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        A.fill_toolbar(main, self.actions)
        self.addToolBar(Qt.ToolBarArea.TopToolBarArea, main)

    # ================================================================ projects

    def open_project(self, path) -> bool:
        if not self.close_project():
            return False
        try:
            self.session = ProjectSession.open(path, self)
        except (ProjectError, OSError) as exc:
            self.show_error("Cannot open the project", str(exc))
            return False
        s = self.session
        s.changed.connect(self._on_store_event)
        self.browser.attach(s.project, self.jobs)
        self._classes_changed()
        self.remembered.add_recent(str(s.path))
        self.remembered.fill_menu(self.recent_menu, self.open_project)
        self.setWindowTitle(f"{s.name} — annotator")
        self._refresh_now()
        last, zoom = self.remembered.place(s.path)
        target = last if last is not None else self.queue.neighbour(None, 1)
        if target is not None and self._image_exists(target):
            self.show_image(target)
            if zoom is not None:
                self.canvas.zoom_to(zoom)
        self._update_enabled()
        self._note_missing_files()
        self.project_opened.emit(str(s.path))
        return True

    def _note_missing_files(self) -> None:
        from annotator.pipeline.project_io import missing_files

        missing = missing_files(self.session.project)
        if missing:
            what = "1 image file is not where it was" if len(missing) == 1 else \
                f"{len(missing)} image files are not where they were"
            self.statusBar().showMessage(f"{what} imported from (first: {missing[0]}). Moved? Project → Find moved "
                                         "images…", 30000)

    def close_project(self) -> bool:
        if self.session is None:
            return True
        if self.jobs.busy("pipeline"):
            self.show_error("A job is running", "Wait for it to finish or cancel it before closing the project.")
            return False
        if not self.save_current():
            return False
        for img in self.session.project.images():  # image ids are per project
            self.history.forget(img.id)
        self.browser.detach()
        self.session.close()
        self.session, self.current_id = None, None
        self.status_area.clear()
        return True

    def choose_project(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open project folder", self.remembered.last_dir())
        if folder:
            self.open_project(folder)

    def new_project(self) -> None:
        dialog = NewProjectDialog(self)
        if dialog.exec() == NewProjectDialog.DialogCode.Accepted:
            self.create_project(dialog.request())

    def create_project(self, req) -> Optional[Job]:
        """Create the project folder, open it, import its images as a job."""
        try:
            Project.create(req.project_dir).close()
        except (ProjectError, OSError) as exc:
            self.show_error("Cannot create the project", str(exc))
            return None
        if not self.open_project(req.project_dir):
            return None
        return self._start(Job("Importing images", self.session.import_fn(req.sources())), self._imported)

    def add_images(self, kind: Optional[str] = None, folder: Optional[str] = None) -> Optional[Job]:
        """Add a batch to the open project (asked for when not given): ``kind`` label, good or mvtec."""
        if self.session is None:
            return None
        if kind is None or folder is None:
            dialog = AddImagesDialog(self.remembered.last_dir(), self)
            if dialog.exec() != AddImagesDialog.DialogCode.Accepted:
                return None
            kind, folder = dialog.choice()
        return self._start(Job("Adding images", self.session.import_fn([(kind, folder)])), self._imported)

    def import_good(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of defect-free images", self.remembered.last_dir())
        if folder and self.session is not None:
            self._start(Job("Importing defect-free images", self.session.import_fn([("good", folder)])), self._imported)

    def _imported(self, reports: list) -> None:
        added = sum(r.get("added", 0) for r in reports)
        skipped = [f"{rel}: {why}" for r in reports for rel, why in r.get("skipped", [])]
        under = "".join(f" {r['prefix_reason'][0].upper()}{r['prefix_reason'][1:]}." for r in reports
                        if r.get("prefix_reason"))
        self.statusBar().showMessage(f"{added} images added.{under} Next: pre-label them (Ctrl+Shift+L).", 20000)
        if skipped:
            self.show_error("Some files were not imported", "\n".join(skipped[:20]) + (
                f"\n… and {len(skipped) - 20} more" if len(skipped) > 20 else ""))
        self._refresh_now(full=True)

    def relink(self, folder: Optional[str] = None) -> Optional[Job]:
        """Find image files moved since the import under ``folder`` (asked for when not given)."""
        if self.session is None:
            return None
        if folder is None:
            folder = QFileDialog.getExistingDirectory(self, "Folder that holds the moved images",
                                                      self.remembered.last_dir())
            if not folder:
                return None
        return self._start(Job("Finding moved images", self.session.relink_fn(folder)), self._relinked)

    def _relinked(self, report: dict) -> None:
        self.last_result = report
        from annotator.pipeline.project_io import format_relink_report

        n, found = report["looked_for"], len(report["relinked"])
        self.statusBar().showMessage(
            "Every image file is where the project expects it." if not n else
            f"{found} of {n} image{'' if n == 1 else 's'} found under {report['folder']}.", 15000)
        if report["missing"]:
            lines = format_relink_report(report).splitlines()
            self.show_error(f"{len(report['missing'])} images are still missing",
                            "\n".join(lines[:25]) + (f"\n… and {len(lines) - 25} more" if len(lines) > 25 else ""))
        self._refresh_now(full=True)
        target = self.current_id or self.queue.neighbour(None, 1)
        if found and not self.dirty and target is not None:
            self.show_image(target)

    def set_role(self, image_ids: list, role: str) -> bool:
        """Make images defect-free training images for model 1 (``good``) or images to label (``label``)."""
        from annotator.pipeline.project_io import set_roles

        if not self._may_change_images() or not self.save_current():
            return False
        project = self.session.project
        try:
            report = set_roles(project, [project.image(i).rel_path for i in image_ids], role)
        except (PipelineError, ProjectError) as exc:
            self.show_error("The images keep their role", str(exc))
            return False
        n = len(report["changed"])
        what = "defect-free: model 1 trains on them" if role == "good" else "to label"
        self.statusBar().showMessage(f"{n} image{'' if n == 1 else 's'} now {what} from the next pre-label "
                                     "(Ctrl+Shift+L).", 15000)
        self._refresh_now(full=True)
        if self.current_id in image_ids:
            self.show_image(self.current_id)
        return True

    def remove_images(self, image_ids: list) -> int:
        """Take images out of the project, after asking; their files stay where they are."""
        from annotator.pipeline.project_io import remove_images

        if not self._may_change_images():
            return 0
        project = self.session.project
        paths = [project.image(i).rel_path for i in image_ids]
        what = remove_images(project, paths, dry_run=True)
        n, made = len(paths), len(what["person_labelled"])
        listed = "\n".join(paths[:12]) + (f"\n… and {n - 12} more" if n > 12 else "")
        text = (f"{listed}\n\n" + (f"{made} of them carry a label a person made; it goes with them.\n" if made else "")
                + "Their label versions, flags and heat maps leave the project. The image files stay where they are; "
                  "import them again to bring them back (without their labels).")
        if not self.confirm(f"Remove {n} image{'' if n == 1 else 's'} from the project?", text):
            return 0
        if self.current_id in image_ids:  # its unsaved edit goes with it
            self.dirty, self.current_id = False, None
            self._draft_timer.stop()
        for i in image_ids:
            self.history.forget(i)
            self.session.drop_draft(i)
        removed = len(remove_images(project, paths)["removed"])
        self.statusBar().showMessage(f"Removed {removed} image{'' if removed == 1 else 's'} from the project.", 15000)
        self._refresh_now(full=True)
        self._update_enabled()
        return removed

    def confirm(self, title: str, text: str) -> bool:
        """Ask a yes / no question (No is the default)."""
        answer = QMessageBox.question(self, title, text, QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def _may_change_images(self) -> bool:
        if self.session is None:
            return False
        if self.jobs.busy("pipeline"):
            self.show_error("A job is running", f"{self.jobs.running('pipeline')[0].name} is still running; change "
                                                "images when it has finished.")
            return False
        return True

    def _image_exists(self, image_id: int) -> bool:
        try:
            self.session.project.image(image_id)
            return True
        except ProjectError:
            return False

    # ================================================================ the current image

    def show_image(self, image_id: int) -> bool:
        """Save the working mask, then show ``image_id`` with its label, heat map and flags."""
        if self.session is None or not self.save_current():
            return False
        s = self.session
        try:
            v = s.view_of(image_id)
        except (ImageError, ProjectError) as exc:
            self.show_error("Cannot show this image", f"{exc}\nThe other images can still be labelled.")
            return False
        self.canvas.set_image(image_id, v.pixels, v.mask, v.classes, s.class_colours(), v.heatmap, v.pred_mask)
        self.current_id, self.dirty, self._shown_label = image_id, False, v.label_id
        if v.draft is not None:
            self.canvas.replace_mask(v.draft)  # one undo step; marks the image edited
            self.statusBar().showMessage("Restored your unsaved edit of this image.", 8000)
        if v.note:  # the label's file is damaged: what is shown is saved as a new version
            self.dirty = True
            self.statusBar().showMessage(v.note, 30000)
        self.flags.set_flags(v.flags)
        self._show_regions()
        self._show_info(v.record)
        self.browser.select(image_id)
        self.queue.select(image_id)
        self.remembered.set_place(s.path, image_id=image_id)
        self._update_enabled()
        self.image_shown.emit(image_id)
        return True

    def save_current(self) -> bool:
        """Write the working mask through Review.replace_mask when it was edited. False
        (with a message) when it could not be saved; the draft then keeps the edit."""
        if self.session is None or self.current_id is None or not self.dirty:
            return True
        image_id = self.current_id
        mask, classes = self.canvas.working_mask().copy(), self.canvas.region_classes()
        try:
            self._shown_label = self.session.review.replace_mask(image_id, mask, classes).id
        except USER_ERRORS as exc:
            self._write_draft()
            self.show_error("The edit was not saved", f"{exc}\nIt is kept as a draft and comes back when you "
                                                      "open this image again.")
            return False
        self.dirty = False
        self._draft_timer.stop()
        self.session.drop_draft(image_id)
        return True

    def _on_mask_edited(self, image_id: int) -> None:
        if image_id == self.current_id:
            self.dirty = True
            self._draft_timer.start()
            self._show_regions()

    def _write_draft(self) -> None:
        if self.session is not None and self.current_id is not None and self.dirty:
            try:
                self.session.save_draft(self.current_id, self.canvas.working_mask())
            except OSError as exc:
                self.statusBar().showMessage(f"Could not write the draft: {exc}", 10000)

    def _on_region_selected(self, image_id: int, index: int) -> None:
        if index and (not self._regions_seen or self._regions_seen[-1] != index):
            self._regions_seen = (self._regions_seen + [index])[-2:]
        self._show_regions()

    def _show_regions(self) -> None:
        classes = self.canvas.region_classes()
        regions = [(k + 1, r.area, classes[k] if k < len(classes) else None)
                   for k, r in enumerate(self.canvas.regions())]
        self.regions.set_regions(regions, self.canvas.selected_region() or None)

    def _show_info(self, rec) -> None:
        self.flags.set_hint(STATE_HINTS.get(rec.state, ""))
        score = "" if rec.anomaly_score is None else f" · anomaly score {rec.anomaly_score:.2f}"
        self.image_info.setText(f"  {rec.rel_path}   ·   {STATE_NAMES.get(rec.state, rec.state)}{score}"
                                f"   ·   {rec.width}×{rec.height} px")

    # ================================================================ review actions

    def _act(self, fn, *args) -> bool:
        try:
            fn(*args)
        except USER_ERRORS as exc:
            self.show_error("Not possible here", str(exc))
            return False
        return True

    def _advance_after(self, action) -> None:
        """Do a review action on the current image, then go to the next one in the queue."""
        if self.session is None or self.current_id is None:
            return
        image_id = self.current_id
        target = self.queue.neighbour(image_id, 1)
        if not action(image_id):
            return
        self._refresh_now()
        if target is None or target == image_id:
            target = self.queue.neighbour(None, 1)
        if target is not None and target != image_id:
            self.show_image(target)
        else:
            self.show_image(image_id)
            self.statusBar().showMessage("That was the last image in the queue.", 8000)

    def accept(self) -> None:
        def act(image_id: int) -> bool:
            if self.dirty:
                return self.save_current()
            return self._act(self.session.review.accept_as_is, image_id)

        self._advance_after(act)

    def accept_prediction(self) -> None:
        if self.session is None or self.current_id is None:
            return
        flag = self._prediction_flag()
        if flag is None:
            self.statusBar().showMessage("No checker prediction to accept on this image.", 6000)
            return
        region = self.canvas.selected_region()
        if region:  # only around the selected region: an edit the person then accepts
            box = self.canvas.regions()[region - 1].bbox
            self.canvas.replace_mask(prediction_near_region(self.canvas.working_mask(), flag.pred_mask, box))
            what = "suggested label" if flag.rule == RULE_UNLABELLED else "checkers' mask"
            self.statusBar().showMessage(f"Took the {what} around region {region}. "
                                         "Accept (A) when it looks right, or undo.", 8000)
            return

        def act(image_id: int) -> bool:
            self.dirty = False
            self.session.drop_draft(image_id)
            return self._act(self.session.review.accept_prediction, image_id, flag.id)

        self._advance_after(act)

    def _prediction_flag(self):
        """The open flag of the shown image whose predicted mask "Accept prediction" takes, or None."""
        if self.current_id is None:
            return None
        return next((f for f in self.flags.shown if f.pred_path is not None), None)

    def mark_good(self) -> None:
        def act(image_id: int) -> bool:
            self.dirty = False
            self.session.drop_draft(image_id)
            return self._act(self.session.review.mark_good, image_id)

        self._advance_after(act)

    def step(self, direction: int) -> None:
        target = self.queue.neighbour(self.current_id, direction)
        if target is None:
            self.statusBar().showMessage("No more images in the queue in that direction.", 5000)
        else:
            self.show_image(target)

    def undo(self) -> None:
        if not self.canvas.undo():
            self.statusBar().showMessage("Nothing to undo on this image.", 3000)

    def redo(self) -> None:
        if not self.canvas.redo():
            self.statusBar().showMessage("Nothing to redo on this image.", 3000)

    def merge_regions(self) -> None:
        if len(self._regions_seen) == 2 and self._regions_seen[0] != self._regions_seen[1]:
            a, b = self._regions_seen
            n = len(self.canvas.regions())
            if a <= n and b <= n:
                self.canvas.merge_regions(a, b)
                self._regions_seen = []
                return
        self.statusBar().showMessage("Select two regions one after the other, then merge.", 5000)

    def set_region_class(self, name: str) -> None:
        index = self.canvas.selected_region()
        if not index and len(self.canvas.regions()) == 1:
            index = 1
        if not index:
            self.statusBar().showMessage("Select a region first (tool V, or the region list).", 5000)
            return
        self.canvas.set_region_class(index, name)

    def add_class(self) -> None:
        if self.session is None:
            return
        name, ok = QInputDialog.getText(self, "New defect class", "Name (letters, digits, _ or -):")
        if ok and name.strip():
            if self._act(self.session.project.add_class, name.strip()):
                self._classes_changed()

    def _classes_changed(self) -> None:
        classes = self.session.project.classes()
        self.regions.set_classes(classes)
        if self.canvas.image_id() is not None:  # else they come with the next set_image
            self.canvas.set_class_colours({c.name: c.colour for c in classes})
        for act in self._class_actions:
            self.removeAction(act)
        self._class_actions = A.class_actions(self, [c.name for c in classes], self.set_region_class)

    def _nudge_opacity(self, delta: int) -> None:
        self.tool_bar.opacity.setValue(self.tool_bar.opacity.value() + delta)

    def _on_zoom(self, factor: float) -> None:
        if self.session is not None:
            self.remembered.set_place(self.session.path, zoom=factor)

    # ================================================================ jobs

    def _start(self, job: Job, on_success) -> Optional[Job]:
        if self.jobs.busy("pipeline"):
            self.show_error("A job is running", f"{self.jobs.running('pipeline')[0].name} is still running.")
            return None
        job.succeeded.connect(on_success)
        job.failed.connect(lambda msg, name=job.name: self.show_error(f"{name} failed", msg))
        job.cancelled.connect(lambda name=job.name: self.statusBar().showMessage(
            f"{name} cancelled; the work done so far is kept.", 10000))
        job.ended.connect(lambda: self._refresh_now(full=True))
        self.jobs.start(job)
        self.status_area.track(job)
        self._refresh_now()
        return job

    def warm_up(self) -> Job:
        """Load the ML stack in the background right after start-up (see import_ml_stack)."""
        return self.jobs.start(Job("Loading the models", import_ml_stack, kind="warmup"))

    def run_prelabel(self) -> Optional[Job]:
        if self.session is None:
            return None
        self.save_current()
        return self._start(Job("Pre-labelling", self.session.prelabel_fn()), self._prelabelled)

    def _prelabelled(self, summary: dict) -> None:
        self.last_result = summary
        self.statusBar().showMessage(describe_result("prelabel", summary), 15000)
        if not self.dirty:
            self._refresh_now()
            target = self.current_id or self.queue.neighbour(None, 1)
            if target is not None:
                self.show_image(target)

    def run_check(self) -> Optional[Job]:
        if self.session is None or not self.save_current():
            return None
        return self._start(Job("Checking labels", self.session.check_fn()), self._checked)

    def _checked(self, summary: dict) -> None:
        self.last_result = summary
        self._refresh_now()
        loop = {**summary, "loop_finished": self.session.review.loop_finished()}
        self.statusBar().showMessage(describe_result("check", loop), 20000)
        target = self.queue.neighbour(None, 1) or self.current_id
        if not self.dirty and target is not None:
            self.show_image(target)

    def export(self, out: Optional[str] = None, fmt: Optional[str] = None) -> Optional[Job]:
        if self.session is None or not self.save_current():
            return None
        if out is None or fmt is None:
            counts = self.session.review.counts()
            remaining = sum(counts[k] for k in ("new", "prelabelled", "prechecked", "flagged"))
            dialog = ExportDialog(self.session.review.loop_finished(), remaining,
                                  str(self.session.path.parent / f"{self.session.name}-export"), self)
            if dialog.exec() != ExportDialog.DialogCode.Accepted:
                return None
            fmt, out = dialog.choice()
        return self._start(Job("Exporting", self.session.export_fn(out, fmt)), self._exported)

    def _exported(self, summary: dict) -> None:
        self.last_result = summary
        self.statusBar().showMessage(describe_result("export", summary), 20000)

    def cancel_jobs(self) -> None:
        for job in self.jobs.running("pipeline"):
            job.cancel()
        if self.jobs.busy("pipeline"):
            self.status_area.cancelling()

    # ================================================================ store events and refresh

    def _on_store_event(self, event: str, ident: int) -> None:
        if event == "image_moved":
            self.browser.retry_thumbnail(ident)
        if event in ("image_added", "image_removed", "round_changed", "class_added"):
            self._full_refresh = True
        elif ident >= 0:
            self._changed.add(ident)
        if event == "class_added":
            self._classes_changed()
        if not self._refresh_timer.isActive():
            self._refresh_timer.start(400 if self.jobs.busy("pipeline") else 120)

    def _refresh_now(self, full: bool = False) -> None:
        self._full_refresh |= full
        self._refresh()

    def _refresh(self) -> None:
        """Re-read what changed: browser rows, queue, loop status, the current flags."""
        self._refresh_timer.stop()
        if self.session is None:
            return
        s, changed = self.session, self._changed
        self._changed = set()
        full, self._full_refresh = self._full_refresh or len(changed) > 200, False
        self.browser.refresh(s.project, None if full else changed)
        phase, round_no = s.review.phase(), s.round_number()
        running = self.jobs.running("pipeline")
        self.queue.set_queue(s.review.queue(), phase, round_no, self.current_id, running[0].name if running else "")
        self.status_area.set_loop(s.review.counts(), phase, round_no)
        if self.current_id is not None and (full or self.current_id in changed):
            try:
                rec = s.project.image(self.current_id)
            except ProjectError:
                return
            label = s.project.current_label(self.current_id)
            if not self.dirty and (None if label is None else label.id) != self._shown_label:
                self.show_image(self.current_id)  # changed elsewhere (a job): show the new label
            else:
                self._show_info(rec)
                self.flags.set_flags(s.project.flags(image_id=self.current_id, unresolved_only=True))
        self._update_enabled()
        self.refreshed.emit()

    def _update_enabled(self) -> None:
        has_project, has_image = self.session is not None, self.current_id is not None
        busy = self.jobs.busy("pipeline")
        for ident in ("review.accept", "review.mark_good", "file.save"):
            self.actions[ident].setEnabled(has_image)
        flag = self._prediction_flag()  # the button's name follows the flag: checker mask or cross-check suggestion
        self.actions["review.accept_prediction"].setEnabled(flag is not None)
        A.retitle(self.actions["review.accept_prediction"], *A.prediction_wording(flag.rule if flag else None))
        for ident in ("jobs.prelabel", "jobs.check", "file.export", "file.import", "file.import_good", "file.relink"):
            self.actions[ident].setEnabled(has_project and not busy)
        self.actions["jobs.cancel"].setEnabled(busy)
        self.canvas_stack.setCurrentWidget(self.canvas if has_image else self.empty_canvas)
        self.empty_canvas.setText(
            "Open a project (Ctrl+O) or create one (Ctrl+N)." if not has_project else
            f"{self.jobs.running('pipeline')[0].name}…\nThe queue fills as the work is done." if busy else
            "Choose an image in the queue or in All images.")
        if not has_image:
            self.image_info.setText("")

    # ================================================================ messages, settings, close

    def show_error(self, title: str, text: str) -> None:
        """A readable, non-blocking message box plus the status bar."""
        self.last_error = text
        self.statusBar().showMessage(f"{title}: {text.splitlines()[0]}", 15000)
        box = open_message(self, title, text)
        box.finished.connect(lambda _=0, b=box: self._boxes.remove(b) if b in self._boxes else None)
        self._boxes.append(box)
        self.error_shown.emit(text)

    def show_cheat_sheet(self) -> None:
        self._cheat = A.CheatSheetDialog(self.actions, self.settings, self)
        self._cheat.open()

    def restore_window(self) -> None:
        geometry, state = self.settings.value("window/geometry"), self.settings.value("window/state")
        if geometry is not None:
            self.restoreGeometry(geometry)
        if state is not None:
            self.restoreState(state)

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.jobs.busy():  # cancel, wait for every job to end, then close for real
            event.ignore()
            if not self._closing:
                self._closing = True
                self.statusBar().showMessage("Stopping the background jobs before closing…")
                self.status_area.cancelling()
                self.jobs.all_ended.connect(self.close, Qt.ConnectionType.QueuedConnection)
                self.browser.detach()  # no new thumbnail batches
                self.jobs.cancel_all()
            return
        if self.session is not None and not self.save_current():
            self._write_draft()
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState())
        if self.session is not None:
            self.browser.detach()
            self.session.close()
            self.session = None
        for box in list(self._boxes):
            box.close()
        self.settings.sync()
        event.accept()
        self.closed.emit()
