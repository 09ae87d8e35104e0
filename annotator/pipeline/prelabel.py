"""Verb ``prelabel``: fit model 1 on the project's good images, pre-label the rest."""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Iterator, Optional

from annotator.core.jobs import CancelToken, Cancelled, ProgressFn, check_cancel, no_progress
from annotator.core.review import Review
from annotator.core.store import Project

from . import PipelineError, load_readable

MIN_GOOD = 4  # below this, held-out calibration of the thresholds is meaningless


def fit_model1(project: Project, config=None, on_progress: ProgressFn = no_progress,
               cancel: Optional[CancelToken] = None, unreadable: Optional[list] = None):
    """Fit model 1 on the images marked good that can be read; store it as a model run. Good
    images whose file no longer reads are left out and listed in ``unreadable``."""
    from annotator.ml.prelabel import PrelabelConfig, fit_prelabeller

    config = config or PrelabelConfig()
    goods = project.images(role="good")
    unread: list = []
    images = []
    for k, g in enumerate(goods):
        check_cancel(cancel)
        images += [img for _, img in load_readable(project, [g], unread)]
        on_progress(k + 1, len(goods), "loading good images")
    if unreadable is not None:
        unreadable += unread
    if len(images) < MIN_GOOD:
        lost = f" ({len(unread)} more cannot be read: {unread[0]})" if unread else ""
        raise PipelineError(
            f"model 1 needs at least {MIN_GOOD} defect-free images, the project has {len(images)}{lost}; "
            "add some with `annotator import PROJECT DIR --good`")
    started = time.perf_counter()
    model = fit_prelabeller(images, config, on_progress=on_progress, cancel=cancel)
    fit_s = time.perf_counter() - started
    folder = project.new_model_dir(config.method)
    model.save(folder)
    metrics = {"fit_seconds": round(fit_s, 2), "n_good": len(images), **getattr(model, "metrics", {})}
    project.add_model_run("prelabel", config.method, folder, config=asdict(config), metrics=metrics)
    return model


def prelabel_project(project: Project, config=None, on_progress: ProgressFn = no_progress,
                     cancel: Optional[CancelToken] = None, refit: bool = True) -> dict:
    """Pre-label every image not yet touched by a person (state new or prelabelled).

    Each image's result is committed on its own, so a cancel or a crash keeps the work
    done so far; images a person already checked are never overwritten. Images (good ones
    included) whose file no longer reads are left as they are and listed in the summary's
    ``unreadable``, one line each.
    """
    review = Review(project)
    targets = project.images(role="label", state="new") + project.images(role="label", state="prelabelled")
    if not targets:
        return {"prelabelled": 0, "defective": 0, "note": "nothing to pre-label"}
    unreadable: list = []
    model = fit_model1(project, config, on_progress, cancel, unreadable) if refit else load_model1(project)
    rnd = review.start_prelabel_round()
    done = defective = n_unread = 0
    try:
        for chunk in _chunks(targets):
            check_cancel(cancel)
            # a few images per call: the backbone scores them in batches and their masks are
            # drawn in parallel (Prelabeller.predict); each is still committed on its own
            loaded = load_readable(project, chunk, unreadable)
            n_unread += len(chunk) - len(loaded)
            results = model.predict([img for _, img in loaded], cancel=cancel) if loaded else []
            for (rec, _), result in zip(loaded, results):
                check_cancel(cancel)
                with project.transaction():
                    review.record_prelabel(rnd, rec.id, result.mask, None, result.score, result.is_defect)
                    project.set_heatmap(rec.id, result.heatmap)
                done += 1
                defective += bool(result.is_defect)
                on_progress(done + n_unread, len(targets), "pre-labelling")
    finally:
        summary = review.end_prelabel_round(rnd)
    summary.update(prelabelled_now=done, defective_now=defective)
    if unreadable:
        summary["unreadable"] = unreadable
    return summary


def _chunks(records: list, max_images: int = 8, max_pixels: int = 8_000_000) -> Iterator[list]:
    """Consecutive groups of at most ``max_images`` images and ``max_pixels`` pixels (at least one
    image each), so a folder of 12000 x 9000 photographs is not loaded all at once."""
    chunk: list = []
    pixels = 0
    for rec in records:
        size = int(rec.width) * int(rec.height)
        if chunk and (len(chunk) >= max_images or pixels + size > max_pixels):
            yield chunk
            chunk, pixels = [], 0
        chunk.append(rec)
        pixels += size
    if chunk:
        yield chunk


def load_model1(project: Project):
    from annotator.ml.prelabel import Prelabeller

    runs = project.model_runs("prelabel")
    if not runs:
        raise PipelineError("no model 1 in this project yet; run `annotator prelabel PROJECT` first")
    return Prelabeller.load(runs[-1].folder)


__all__ = ["prelabel_project", "fit_model1", "load_model1", "Cancelled"]
