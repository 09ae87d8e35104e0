"""Verb ``demo``: a built-in fabric project, generated on the spot (nothing is downloaded).

``run_demo(headless=False)`` builds the project and runs model 1, so the app opens on
pre-labels. ``headless=True`` goes on through a full round with a *simulated* reviewer (it
knows the generator's ground truth and behaves like a hurried person, see
:mod:`annotator.bench.reviewer`): pre-check, one check round, and a report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from annotator.core.demo_fabric import write_demo_mvtec
from annotator.core.images import load_mask
from annotator.core.jobs import CancelToken, ProgressFn, no_progress
from annotator.core.store import DB_NAME, Project

from . import project_io

DEMO_COUNTS = dict(n_train_good=40, n_test_good=12, n_per_defect=5)


def truth_masks(project: Project, data_root: Path) -> dict:
    """Ground truth of the demo images, by image id (empty for good ones)."""
    out = {}
    for img in project.images(role="label"):
        rel = Path(img.rel_path)  # test/<kind>/<stem>.png
        kind = rel.parent.name
        gt = data_root / "ground_truth" / kind / f"{rel.stem}_mask.png"
        out[img.id] = load_mask(gt, (img.width, img.height)) if gt.is_file() else np.zeros((img.height, img.width), bool)
    return out


def build_demo(folder, size: int = 256, seed: int = 0, style: str = "twill") -> Project:
    folder = Path(folder)
    if (folder / DB_NAME).exists():
        project = Project.open(folder)
        if project_io.missing_files(project):  # a demo folder moved since (older ones kept absolute paths)
            project_io.relink(project, folder)
        return project
    write_demo_mvtec(folder / "data", style=style, size=size, seed=seed, **DEMO_COUNTS)
    project = Project.create(folder)
    project_io.import_mvtec(project, folder / "data")
    return project


def run_demo(folder, *, size: int = 256, seed: int = 0, headless: bool = True,
             on_progress: ProgressFn = no_progress, cancel: Optional[CancelToken] = None,
             log: Callable[[str], None] = lambda s: None) -> dict:
    from annotator.pipeline.prelabel import prelabel_project

    folder = Path(folder)
    log(f"demo project: {folder.resolve()}")
    project = build_demo(folder, size=size, seed=seed)
    try:
        report: dict = {"project": str(project.path)}
        if project.images(role="label", state="new"):
            log("model 1: fitting PatchCore on the good images and pre-labelling the rest")
            report["prelabel"] = prelabel_project(project, on_progress=on_progress, cancel=cancel)
        if headless:
            report.update(_simulated_round(project, folder / "data", seed, on_progress, cancel, log))
        report["status"] = project_io.status_counts(project)
        return report
    finally:
        project.close()


def _simulated_round(project: Project, data_root: Path, seed: int, on_progress, cancel, log) -> dict:
    from annotator.bench.reviewer import SimulatedReviewer, label_quality
    from annotator.core.review import Review
    from annotator.pipeline.check import check_project

    review = Review(project)
    truth = truth_masks(project, data_root)
    reviewer = SimulatedReviewer(truth, seed=seed)
    pending = [q.image_id for q in review.queue() if q.state == "prelabelled"]
    for image_id in pending:
        reviewer.precheck(review, image_id)
    labels = {i: project.current_label(i).mask for i in truth}
    after_precheck = label_quality(labels, truth)
    log(f"simulated pre-check: {len(pending)} images viewed, {len(reviewer.edited)} edited, "
        f"{after_precheck['label_errors']} label errors left")
    log("model 2: training the checkers and flagging suspicious labels")
    summary = check_project(project, on_progress=on_progress, cancel=cancel)
    flagged = {f.image_id for f in project.flags(unresolved_only=True)}
    caught = len(flagged & set(after_precheck["wrong_ids"]))
    log(f"check round {summary['round']}: {summary['flagged']} images flagged, "
        f"{caught} of {after_precheck['label_errors']} label errors among them")
    return {
        "precheck": {"viewed": len(pending), "edited": len(reviewer.edited),
                     "mean_iou": after_precheck["mean_iou"], "label_errors": after_precheck["label_errors"]},
        "check": {**summary, "errors_caught": caught},
    }
