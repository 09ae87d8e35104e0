"""One open project as the GUI sees it: the store, the review loop, store events as Qt
signals, unsaved-edit drafts, and the job functions for the headless verbs.

Not a widget and no computation of its own: reads and writes go through
:class:`~annotator.core.store.Project` and :class:`~annotator.core.review.Review`;
jobs call the same verbs as the CLI (``prelabel_project``, ``check_project``,
``export_project``, ``import_folder``/``import_mvtec``).

Threads: a job opens **its own connection** to the project folder (SQLite in WAL mode),
so the GUI thread keeps reading while a worker writes, without waiting on the worker's
lock. The worker's store events are forwarded through :class:`StoreEvents`, whose
signal is delivered queued to the GUI thread (the store calls listeners in the
committing thread).
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PySide6.QtCore import QObject, Signal

from annotator.core.flags import FlagRules
from annotator.core.images import ImageError, load_image, save_png_atomic
from annotator.core.jobs import CancelToken, ProgressFn
from annotator.core.review import Review
from annotator.core.store import Project, ProjectError

DRAFTS = "drafts"  # unsaved working masks, one PNG per image, inside the project folder


class StoreEvents(QObject):
    """Callable store listener that re-emits ``(event, id)`` as a Qt signal; connected
    slots of GUI-thread objects run queued in the GUI thread. ``id`` -1 means None."""

    changed = Signal(str, int)

    def __call__(self, event: str, ident: Optional[int]) -> None:
        self.changed.emit(event, -1 if ident is None else int(ident))


@dataclass
class CheckOptions:
    """Settings of a check round (the CLI's ``check`` flags)."""

    variant: str = "both"
    folds: int = 3
    scheme: str = "disjoint"
    rules: FlagRules = field(default_factory=FlagRules)
    checker_config: Any = None  # annotator.ml.checkers.CheckerConfig; None = its defaults


@dataclass
class ImageView:
    """Everything the window shows for one image, read in one go."""

    record: Any  # ImageRecord
    pixels: np.ndarray
    mask: Optional[np.ndarray]
    classes: list
    label_id: Optional[int]
    draft: Optional[np.ndarray]  # an unsaved edit that differs from the label
    flags: list  # open flags, most suspicious first
    pred_mask: Optional[np.ndarray]  # of the most suspicious flag that has one
    heatmap: Optional[np.ndarray]
    note: str = ""  # a warning to show with the image (its label's file was damaged)


class ProjectSession(QObject):
    changed = Signal(str, int)  # store event, image/round id (-1: none); GUI thread

    def __init__(self, project: Project, parent: Optional[QObject] = None) -> None:
        super().__init__(parent)
        self.project = project
        self.review = Review(project)
        self.path = project.path
        self.check_options = CheckOptions()
        self.prelabel_config: Any = None  # annotator.ml.prelabel.PrelabelConfig; None = defaults
        self._events = StoreEvents(self)
        self._events.changed.connect(self.changed)
        self._unsubscribe = project.subscribe(self._events)

    @classmethod
    def open(cls, path, parent: Optional[QObject] = None) -> "ProjectSession":
        return cls(Project.open(path), parent)

    def close(self) -> None:
        self._unsubscribe()
        self.project.close()

    @property
    def name(self) -> str:
        return self.path.name

    # ---- reading what the canvas needs

    def load_image(self, image_id: int) -> np.ndarray:
        """BGR pixels; raises ImageError with a readable message."""
        return load_image(self.project.image(image_id).source)

    def view_of(self, image_id: int) -> ImageView:
        """Read an image with its label, draft, flags and heat map (raises ImageError /
        ProjectError with a readable message). A draft equal to the label is dropped."""
        p = self.project
        record, pixels = p.image(image_id), self.load_image(image_id)
        label = p.current_label(image_id)
        draft = self.load_draft(image_id)
        flags = p.flags(image_id=image_id, unresolved_only=True)
        pred = next((f.pred_mask for f in flags if f.pred_path is not None), None)
        note = ""
        try:
            mask = None if label is None else label.mask
            classes = [] if label is None else list(label.classes)
        except ProjectError:
            # the label's file was damaged or deleted: show the last version that reads (or an empty mask),
            # with its classes; the window marks it edited (``note``), so that accepting it saves a new,
            # readable version: the image is never a dead end
            older = p.last_readable_label(image_id)
            note = (f"The label file {label.path.name} cannot be read. Showing "
                    + (f"the last version that reads (round {older.round}, {older.source})" if older
                       else "an empty mask") + ": check it and accept (A) to save it again.")
            mask = older.mask if older is not None else np.zeros((record.height, record.width), bool)
            classes = [] if older is None else list(older.classes)
        if draft is not None and mask is not None and np.array_equal(draft, mask):
            self.drop_draft(image_id)
            draft = None
        return ImageView(record, pixels, mask, classes, None if label is None else label.id, draft, flags, pred,
                         p.heatmap(image_id), note)

    def class_colours(self) -> dict[str, str]:
        return {c.name: c.colour for c in self.project.classes()}

    def round_number(self) -> int:
        rounds = self.project.rounds()
        return rounds[-1].number if rounds else 0

    # ---- drafts: an edited mask survives a crash before it is saved

    def _draft_path(self, image_id: int) -> Path:
        return self.path / DRAFTS / f"{image_id}.png"

    def save_draft(self, image_id: int, mask: np.ndarray) -> None:
        (self.path / DRAFTS).mkdir(exist_ok=True)
        save_png_atomic(self._draft_path(image_id), np.where(mask, 255, 0).astype(np.uint8), fsync=False)

    def load_draft(self, image_id: int) -> Optional[np.ndarray]:
        path = self._draft_path(image_id)
        if not path.is_file():
            return None
        try:
            from annotator.core.images import load_mask

            img = self.project.image(image_id)
            return load_mask(path, (img.width, img.height))
        except (ImageError, ValueError):
            return None

    def drop_draft(self, image_id: int) -> None:
        self._draft_path(image_id).unlink(missing_ok=True)

    # ---- job functions: fn(on_progress, cancel), run in a worker thread

    def _in_worker(self, body: Callable[[Project, ProgressFn, CancelToken], Any], torch_job: bool = False):
        path, events = self.path, self._events

        def run(on_progress: ProgressFn, cancel: CancelToken) -> Any:
            if torch_job:
                limit_torch_threads()
            with Project.open(path) as project:
                project.subscribe(events)
                return body(project, on_progress, cancel)

        return run

    def prelabel_fn(self):
        config = self.prelabel_config

        def body(project, on_progress, cancel):
            from annotator.pipeline.prelabel import prelabel_project

            return prelabel_project(project, config, on_progress=on_progress, cancel=cancel)

        return self._in_worker(body, torch_job=True)

    def check_fn(self, options: Optional[CheckOptions] = None):
        o = options or self.check_options

        def body(project, on_progress, cancel):
            from annotator.pipeline.check import check_project

            return check_project(project, variant=o.variant, folds=o.folds, scheme=o.scheme, rules=o.rules,
                                 checker_config=o.checker_config, on_progress=on_progress, cancel=cancel)

        return self._in_worker(body, torch_job=True)

    def export_fn(self, out: str, fmt: str):
        def body(project, on_progress, cancel):
            from annotator.pipeline.project_io import export_project

            return export_project(project, out, fmt, on_progress=on_progress, cancel=cancel)

        return self._in_worker(body)

    def relink_fn(self, folder: str):
        def body(project, on_progress, cancel):
            from annotator.pipeline.project_io import relink

            return relink(project, folder, on_progress=on_progress, cancel=cancel)

        return self._in_worker(body)

    def import_fn(self, sources: list[tuple[str, str]]):
        """``sources``: (kind, folder) with kind ``mvtec`` (train/good -> defect-free,
        test/** -> to label), ``label`` or ``good`` (a plain folder of images)."""

        def body(project, on_progress, cancel):
            from annotator.pipeline import project_io

            reports = []
            for kind, folder in sources:  # a batch whose paths other images hold goes under its folder's name
                if kind == "mvtec":
                    reports.append(project_io.import_mvtec(project, folder, on_progress=on_progress, cancel=cancel,
                                                           prefix=project_io.AUTO))
                else:
                    reports.append(project_io.import_folder(project, folder, good=kind == "good",
                                                            on_progress=on_progress, cancel=cancel,
                                                            prefix=project_io.AUTO))
            return reports

        return self._in_worker(body)


def limit_torch_threads() -> None:
    """Leave one core to the GUI thread: torch's default (every core) starves the event
    loop on a 2-core machine, and on a busy one its spinning threads make training ~10x
    slower. Process-wide; set once, by the first model job."""
    import torch

    n = max(1, (os.cpu_count() or 2) - 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def import_ml_stack(on_progress: ProgressFn, cancel: CancelToken) -> None:
    """Job body run once after start-up: import torch and the model code, and train a
    checker for one step on two random 32 px images, so every lazy import of torch, timm
    and the optimiser happens now and not inside the first pre-label or check job.

    Importing C extensions holds the GIL for up to a few hundred ms at a time, and the
    garbage collector's full passes over torch's millions of objects held it for ~0.5 s
    in the middle of jobs. So the collector is off while this runs, and afterwards every
    object that exists (the imported modules) is frozen out of its sight (``gc.freeze``)."""
    gc.disable()
    try:
        import annotator.pipeline.check  # noqa: F401
        import annotator.pipeline.prelabel  # noqa: F401
        from annotator.ml.checkers import CheckerConfig, train_checker

        limit_torch_threads()
        cancel.raise_if_cancelled()
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
        train_checker(images, [np.zeros((32, 32), bool)] * 2,
                      CheckerConfig(crop_size=32, batch_size=2, steps=1, tile_size=32, tile_overlap=0, device="cpu"))
        gc.freeze()
    finally:
        gc.enable()


def prediction_near_region(mask: np.ndarray, pred: np.ndarray, bbox: tuple[int, int, int, int],
                           margin: int = 8) -> np.ndarray:
    """The working mask with the checkers' prediction taken inside the region's box
    (``x, y, w, h``) grown by ``margin`` px: "accept the prediction for this region"."""
    x, y, w, h = bbox
    out = np.array(mask, dtype=bool, copy=True)
    y0, x0 = max(0, y - margin), max(0, x - margin)
    y1, x1 = min(out.shape[0], y + h + margin), min(out.shape[1], x + w + margin)
    out[y0:y1, x0:x1] = np.asarray(pred, dtype=bool)[y0:y1, x0:x1]
    return out
