"""``annotator bench checkers``: how well the flags catch label errors.

Ground-truth labels of generated fabric (several weaves) get one error of the patent's four
kinds (missing region, false region, ring expanded 3-5 px, ring shrunk 3-5 px) in
``error_rate`` of the images; the checkers train on these noisy labels (as they would on a
person's pre-check) and every rule variant flags out-of-fold. Reports precision and recall
of the flags against the injected errors, per kind and per variant.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from typing import Optional

import numpy as np

from annotator.bench.data import categories, load_category, skipped_line
from annotator.core import masks as M
from annotator.core.demo_fabric import write_demo_mvtec
from annotator.core.flags import FlagRules, iou_flag, probability_flag
from annotator.core.label_noise import ERROR_KINDS, inject_error

VARIANTS = {
    "iou_exact": ("iou", FlagRules(iou_tolerance_px=0)),
    "iou_tol1": ("iou", FlagRules(iou_tolerance_px=1)),
    "iou_tol1_no_image": ("iou", FlagRules(iou_tolerance_px=1, image_support=False)),
    "iou_tol2": ("iou", FlagRules(iou_tolerance_px=2)),
    "iou_tol1_band": ("iou", FlagRules(iou_tolerance_px=1, iou_uncertain_band=(0.2, 0.8))),
    "ensemble_mean": ("ensemble", FlagRules(operation="mean")),
    "ensemble_mean_no_image": ("ensemble", FlagRules(operation="mean", image_support=False)),
    "ensemble_sum": ("ensemble", FlagRules(operation="sum")),
    "both_tol1_mean": ("both", FlagRules(iou_tolerance_px=1, operation="mean")),
    "both_tol1_mean_no_image": ("both", FlagRules(iou_tolerance_px=1, operation="mean", image_support=False)),
    "both_exact_mean": ("both", FlagRules(iou_tolerance_px=0, operation="mean")),
}


def inject(truth: dict, error_rate: float, rng: np.random.Generator) -> tuple[dict, dict]:
    """Noisy copy of the labels and {key: error kind} for the images given an error."""
    keys = sorted(truth)
    chosen = rng.choice(len(keys), size=max(1, round(error_rate * len(keys))), replace=False)
    noisy, errors = dict(truth), {}
    for n, idx in enumerate(sorted(chosen)):
        key = keys[idx]
        kind = ERROR_KINDS[n % len(ERROR_KINDS)] if truth[key].any() else "false"
        wrong = inject_error(truth[key], kind, rng)
        if M.iou(wrong, truth[key]) < 1.0:
            noisy[key], errors[key] = wrong, kind
    return noisy, errors


def flagged_by(variant: str, labels: dict, checks: dict, images: dict) -> set:
    which, rules = VARIANTS[variant]
    out = set()
    for key, check in checks.items():
        if which in ("iou", "both") and iou_flag(labels[key], check.pred_mask, rules, check.pred_prob_map,
                                                 images[key]) is not None:
            out.add(key)
        if which in ("ensemble", "both") and probability_flag(
                check.probs, bool(labels[key].any()), check.pred_area, rules, labels[key], images[key]) is not None:
            out.add(key)
    return out


def _defect_kind(key) -> str:
    """The demo folder of an image key (``test/<kind>/000.png``, or ``(style, that)``)."""
    path = key[-1] if isinstance(key, tuple) else key
    parts = str(path).split("/")
    return parts[-2] if len(parts) >= 2 else "?"


def score(flagged: set, errors: dict, n_images: int) -> dict:
    hit = flagged & set(errors)
    per_kind = {k: [0, 0] for k in ERROR_KINDS}
    for key, kind in errors.items():
        per_kind[kind][1] += 1
        per_kind[kind][0] += key in hit
    false_alarms = Counter(_defect_kind(key) for key in flagged - hit)  # correct labels flagged, by kind
    return {
        "flagged": len(flagged), "errors": len(errors), "caught": len(hit),
        "precision": round(len(hit) / len(flagged), 3) if flagged else None,
        "recall": round(len(hit) / len(errors), 3) if errors else None,
        "false_alarm_rate": round(len(flagged - hit) / max(1, n_images - len(errors)), 3),
        "recall_by_kind": {k: (round(c / t, 3) if t else None) for k, (c, t) in per_kind.items()},
        "false_alarms_by_image_kind": dict(sorted(false_alarms.items())),
    }


def run(quick: bool = False, styles=("twill", "knit"), n_test_good: int = 20, n_per_defect: int = 6,
        size: int = 256, error_rate: float = 0.2, folds: int = 3, scheme: str = "disjoint", seed: int = 0,
        checker_config=None, min_visibility: Optional[float] = None, data_root: Optional[os.PathLike] = None) -> dict:
    """``data_root``: an MVTec-AD category (or a folder of them) with ground-truth masks to
    measure on instead of the demo fabrics; its test images are the labels (train/good is not used)."""
    from annotator.ml.checkers import CheckerConfig, run_checkers

    if quick:
        styles, n_test_good, n_per_defect, size = styles[:1], 6, 2, 128
        checker_config = checker_config or CheckerConfig(steps=60)
    config = checker_config or CheckerConfig()
    rng = np.random.default_rng(seed)
    totals = {v: {"flagged": set(), "errors": {}} for v in VARIANTS}
    per_style, n_total, fit_s = {}, 0, 0.0
    sets = categories(data_root) if data_root is not None else {style: None for style in styles}
    skipped = {}
    for s_i, (style, root) in enumerate(sets.items()):
        if root is not None:
            cat = load_category(root, need_good=False)
            skipped.update({f"{style}/{rel}": reason for rel, reason in cat.skipped})
        else:
            with tempfile.TemporaryDirectory() as tmp:
                write_demo_mvtec(tmp, style=style, n_train_good=1, n_test_good=n_test_good,
                                 n_per_defect=n_per_defect, size=size, seed=seed + 101 * s_i,
                                 min_visibility=min_visibility)
                cat = load_category(tmp, need_good=False)
        images = {rel: img for _, rel, img, _ in cat.test}
        truth = cat.truth_by_path()
        noisy, errors = inject(truth, error_rate, rng)
        started = time.perf_counter()
        result = run_checkers(images, noisy, n_models=folds, scheme=scheme, config=config, seed=seed)
        fit_s += time.perf_counter() - started
        pred_iou = float(np.mean([M.iou(result.checks[k].pred_mask, truth[k]) for k in truth if truth[k].any()]))
        per_style[style] = {"images": len(images), "pred_iou_vs_truth_defective": round(pred_iou, 3)}
        for v in VARIANTS:
            flagged = flagged_by(v, noisy, result.checks, images)
            per_style[style][v] = score(flagged, errors, len(images))
            totals[v]["flagged"] |= {(style, k) for k in flagged}
            totals[v]["errors"].update({(style, k): kind for k, kind in errors.items()})
        n_total += len(images)
    overall = {v: score(t["flagged"], t["errors"], n_total) for v, t in totals.items()}
    return {"benchmark": "checkers", "images": n_total, "error_rate": error_rate, "folds": folds, "scheme": scheme,
            "styles": list(sets), "data_root": None if data_root is None else str(data_root),
            "skipped": skipped, "size": size, "min_visibility": min_visibility, "steps_per_checker": config.steps,
            "seconds_train_and_score": round(fit_s, 1), "overall": overall, "per_style": per_style}


def format_report(r: dict) -> str:
    lines = [f"checkers benchmark: {r['images']} images ({r.get('data_root') or ', '.join(r['styles'])}), "
             f"{r['error_rate']:.0%} with an"
             f" injected error, {r['folds']} checkers ({r['scheme']}), {r['seconds_train_and_score']} s",
             f"{'variant':<24} {'precision':>9} {'recall':>7} {'flagged':>8}  recall by kind"]
    for v, s in r["overall"].items():
        kinds = " ".join(f"{k}={x}" for k, x in s["recall_by_kind"].items())
        lines.append(f"{v:<24} {str(s['precision']):>9} {str(s['recall']):>7} {s['flagged']:>8}  {kinds}")
    if r.get("skipped"):
        lines.append(skipped_line(r["skipped"]))
    default = r["overall"].get("iou_tol1")
    if default:
        fa = ", ".join(f"{k} {n}" for k, n in default["false_alarms_by_image_kind"].items())
        lines.append(f"false alarms of iou_tol1 on correct labels, by the image's defect kind: {fa or 'none'}")
    return "\n".join(lines)
