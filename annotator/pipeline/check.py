"""Verb ``check``: train the checkers (model 2) on the pre-checked labels and flag the
suspicious ones (spec 003, claims 3-8)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from annotator.core import masks as M
from annotator.core.flags import FlagRules, iou_flag, probability_flag, unlabelled_flag
from annotator.core.jobs import CancelToken, ProgressFn, check_cancel, no_progress
from annotator.core.review import Review
from annotator.core.store import FlagSpec, Project

from . import PipelineError, current_mask, load_readable

VARIANTS = ("iou", "ensemble", "both")
CHECKABLE = ("prechecked", "flagged", "accepted")


def flags_for(label_mask, check, variant: str, rules: FlagRules, image=None, model1_mask=None) -> list[FlagSpec]:
    """Apply the flag rules of ``variant`` to one image's out-of-fold checker result (``image``:
    the picture itself, for the image evidence; ``model1_mask``: model 1's latest pre-label, for
    the cross-check of regions the label leaves out)."""
    specs = []
    if image is not None:
        found = unlabelled_flag(label_mask, model1_mask, image, rules)
        if found is not None:
            f, suggestion = found
            specs.append(FlagSpec(f.rule, f.suspicion, f.numbers, suggestion))
    if variant in ("iou", "both"):
        f = iou_flag(label_mask, check.pred_mask, rules, check.pred_prob_map, image)
        if f is not None:
            specs.append(FlagSpec(f.rule, f.suspicion, {**f.numbers, "voters": list(check.voters)}, check.pred_mask))
    if variant in ("ensemble", "both"):
        f = probability_flag(check.probs, bool(label_mask.any()), check.pred_area, rules, label_mask, image)
        if f is not None:
            specs.append(FlagSpec(f.rule, f.suspicion, f.numbers, check.pred_mask))
    return specs


def _model1_mask(project: Project, image_id: int, level: Optional[float] = None):
    """Model 1's latest pre-label of the image (None when it has none); with ``level``, only its
    regions where the stored heat map (1 = pixel threshold) reaches ``level``."""
    versions = [v for v in project.label_history(image_id) if v.source == "model1"]
    if not versions:
        return None
    mask = versions[-1].mask
    heat = project.heatmap(image_id) if level is not None else None
    if heat is None or heat.shape != mask.shape:
        return mask
    return M.regions_peaking_above(mask, heat, level)


def _image_level(project: Project) -> Optional[float]:
    """Model 1's image threshold in heat-map units (pixel threshold = 1), from its latest run."""
    from annotator.ml.prelabel import CONFIG_FILE

    runs = project.model_runs("prelabel")
    try:
        th = json.loads((Path(runs[-1].folder) / CONFIG_FILE).read_text(encoding="utf-8"))["thresholds"]
        return float(th["image"]) / float(th["pixel"])
    except (IndexError, OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None  # no run, or an unreadable one: every region of the pre-label counts


def check_project(project: Project, variant: str = "both", folds: int = 3, scheme: str = "disjoint",
                  rules: FlagRules = FlagRules(), checker_config=None, seed: int = 0,
                  on_progress: ProgressFn = no_progress, cancel: Optional[CancelToken] = None,
                  resend_overruled: bool = False, recheck_accepted: bool = False) -> dict:
    """One check round over every image a person has pre-checked.

    The checkers train on those images' current labels (the patent's "all training
    samples"); each image is judged only by checkers that did not train on it.

    A label a person kept unchanged against a flag is not sent back again (its new flags are
    stored, resolved, and counted as ``overruled``) unless ``resend_overruled``: checkers that
    miss a kind of defect object to every correct label of that kind in every round, and
    without this the loop would show the same images forever (measured by `bench loop`: 24 of
    62 images re-flagged in rounds 2 and 3 after the reviewer had kept each of them).

    Likewise a label an earlier check round accepted and nobody has changed since is not sent
    back (flags stored, resolved, counted as ``accepted_before``) unless ``recheck_accepted``:
    spec 003 checks again what a person re-pre-checked after a flag, and checkers retrained each
    round raise a new false alarm or two on labels that passed before, so the loop, which ends
    only on a round that sends nothing back, would not end (measured by `bench loop`, seed 1:
    1-2 correct labels sent back in each of rounds 2-6; docs/adr/0004-overruled-flags.md).

    Pre-checked images whose file no longer reads are left out (not trained on, not judged, state
    unchanged) and listed in the summary's ``unreadable``.
    """
    from annotator.ml.checkers import CheckerConfig, run_checkers

    if variant not in VARIANTS:
        raise PipelineError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    review = Review(project)
    targets = [i for s in CHECKABLE for i in project.images(role="label", state=s)]
    waiting = len(project.images(role="label", state="prelabelled")) + len(project.images(role="label", state="new"))
    need = max(folds, 2) * 2
    if len(targets) < need:
        raise PipelineError(
            f"the checkers need at least {need} pre-checked images, the project has {len(targets)}"
            f" ({waiting} still wait for a person's pre-check)")
    unreadable: list = []  # files moved, deleted or damaged since the import: neither trained on nor judged
    loaded = load_readable(project, targets, unreadable)
    images = {rec.id: img for rec, img in loaded}
    if len(images) < need:
        raise PipelineError(
            f"the checkers need at least {need} pre-checked images that can be read, the project has {len(images)}"
            f" ({len(unreadable)} cannot be read: {unreadable[0]})")
    current = {rec.id: project.current_label(rec.id) for rec, _ in loaded}
    labels = {rec.id: current_mask(rec, current[rec.id]) for rec, _ in loaded}
    run = run_checkers(images, labels, n_models=folds, scheme=scheme, config=checker_config or CheckerConfig(),
                       seed=seed, on_progress=on_progress, cancel=cancel)
    # An image edited while the checkers trained is not judged on its old label: it stays
    # pre-checked and is covered by the next round.
    unchanged = [i for i in images if project.current_label(i).id == current[i].id]
    flags_by_image = {}
    level = _image_level(project) if rules.unlabelled_check and rules.unlabelled_detections_only else None
    for k, i in enumerate(unchanged):  # the image evidence costs ~0.05 s a flagged image: progress and cancel
        check_cancel(cancel)
        model1 = _model1_mask(project, i, level) if rules.unlabelled_check else None
        flags_by_image[i] = flags_for(labels[i], run.checks[i], variant, rules, images[i], model1)
        on_progress(k + 1, len(unchanged), "judging the labels")
    kept = set() if resend_overruled else {i for i in unchanged if review.kept_against_flag(i)}
    passed = set() if recheck_accepted else review.accepted_by_check_among(i for i in unchanged if i not in kept)
    rnd = review.start_check_round()
    summary = review.record_check_results(rnd, flags_by_image, overruled=kept, accepted_before=passed)
    summary.update(round=rnd, variant=variant, waiting_for_precheck=waiting,
                   edited_during_check=len(images) - len(unchanged))
    if unreadable:
        summary["unreadable"] = unreadable
    return summary
