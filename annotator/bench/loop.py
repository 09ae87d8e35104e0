"""``annotator bench loop``: the patent's whole flow with a simulated reviewer.

On a generated demo project: model 1 pre-labels, the simulated reviewer pre-checks
(accepts right pre-labels, repairs the others but leaves an error of the four kinds in
``error_rate`` of its repairs), then check rounds run until one raises no flag (at most
``max_rounds``), the reviewer repairing every flagged image. Compared side by side with
(i) the same reviewer labelling every image from scratch, and (ii) pre-labels + pre-check
without checkers.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from annotator.bench.data import categories, load_category
from annotator.bench.reviewer import SimulatedReviewer, label_quality
from annotator.core.demo_fabric import write_demo_mvtec
from annotator.core.review import Review
from annotator.core.store import Project
from annotator.pipeline import project_io
from annotator.pipeline.demo import truth_masks


def _quality(project: Project, truth: dict) -> dict:
    labels = {i: project.current_label(i).mask for i in truth}
    q = label_quality(labels, truth)
    q.pop("wrong_ids")
    return q


def from_scratch(truth: dict, error_rate: float, seed: int) -> dict:
    reviewer = SimulatedReviewer(truth, error_rate=error_rate, seed=seed + 1)
    labels = {i: reviewer.label_from_scratch(i) for i in sorted(truth)}
    q = label_quality(labels, truth)
    q.pop("wrong_ids")
    return {"edited": len(reviewer.edited), **q}


def run(quick: bool = False, style: str = "twill", n_train_good: int = 60, n_test_good: int = 20,
        n_per_defect: int = 6, size: int = 256, error_rate: float = 0.15, max_rounds: int = 6, folds: int = 3,
        variant: str = "both", seed: int = 0, prelabel_config=None, checker_config=None,
        min_visibility: Optional[float] = None, data_root: Optional[os.PathLike] = None) -> dict:
    """``data_root``: one MVTec-AD category with a ground-truth mask for every defect image to
    run the loop on instead of a demo fabric (train/good trains model 1; test/ is labelled)."""
    from annotator.ml.checkers import CheckerConfig
    from annotator.pipeline.check import check_project
    from annotator.pipeline.prelabel import prelabel_project

    if quick:
        n_train_good, n_test_good, n_per_defect, size, max_rounds = 12, 6, 2, 128, 2
        checker_config = checker_config or CheckerConfig(steps=60)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if data_root is None:
            data = Path(tmp) / "data"
            write_demo_mvtec(data, style=style, n_train_good=n_train_good, n_test_good=n_test_good,
                             n_per_defect=n_per_defect, size=size, seed=seed, min_visibility=min_visibility)
        else:
            cats = categories(data_root)
            if len(cats) > 1:
                raise ValueError(f"the loop benchmark runs on one category; {data_root} holds {len(cats)}: "
                                 f"{', '.join(cats)}")
            (style, data), = cats.items()
            by_path = load_category(data, max_good=0, need_good=False).truth_by_path()  # model 1 reads train/good
        with Project.create(Path(tmp) / "project") as project:
            project_io.import_mvtec(project, data)
            if data_root is None:
                truth = truth_masks(project, data)
            else:
                truth = {img.id: by_path[img.rel_path] for img in project.images(role="label")
                         if img.rel_path in by_path}
                unknown = len(project.images(role="label")) - len(truth)
                if unknown:
                    raise ValueError(f"{data}: {unknown} test image(s) without a readable ground-truth mask; "
                                     f"the loop needs the truth of every image it labels")
            prelabel = prelabel_project(project, prelabel_config)
            review = Review(project)
            after_model1 = _quality(project, truth)
            reviewer = SimulatedReviewer(truth, error_rate=error_rate, seed=seed)
            for item in review.queue():
                reviewer.precheck(review, item.image_id)
            rounds = [{"round": "pre-check", "viewed": len(truth), "edited": len(reviewer.edited),
                       "sent_back": None, **_quality(project, truth)}]
            edits = len(reviewer.edited)
            for n in range(1, max_rounds + 1):
                summary = check_project(project, variant=variant, folds=folds, seed=seed + n,
                                        checker_config=checker_config or CheckerConfig())
                reviewer.new_round()
                flagged = [q.image_id for q in review.queue() if q.state == "flagged"]
                for image_id in flagged:
                    reviewer.handle_flag(review, image_id)
                edits += len(reviewer.edited)
                rounds.append({"round": n, "sent_back": len(flagged), "edited": len(reviewer.edited),
                               "flags_by_rule": summary.get("by_rule", {}), **_quality(project, truth)})
                if not flagged:
                    break
            finished = review.loop_finished()
            labels = {i: project.current_label(i).mask for i in truth}
            paths = {img.id: img.rel_path for img in project.images(role="label")}
            # the label errors the flow left: where, and which of the reviewer's kinds each is
            left = [{"path": paths[i], "kind": reviewer.errors_made.get(i, "other")}
                    for i in label_quality(labels, truth)["wrong_ids"]]
    scratch = from_scratch(truth, error_rate, seed)
    no_checkers = rounds[0]
    final = rounds[-1]
    return {
        "benchmark": "loop", "style": style, "data_root": None if data_root is None else str(data_root),
        "min_visibility": min_visibility, "images_to_label": len(truth),
        "defective": int(sum(m.any() for m in truth.values())), "error_rate": error_rate,
        "model1": {"defective_called": prelabel.get("defective_now"), **after_model1},
        "rounds": rounds, "loop_finished": finished,
        "from_scratch": scratch,
        "prelabel_precheck_no_checkers": {"edited": no_checkers["edited"], "mean_iou": no_checkers["mean_iou"],
                                          "label_errors": no_checkers["label_errors"]},
        "full_flow": {"edited": edits, "mean_iou": final["mean_iou"], "label_errors": final["label_errors"],
                      "errors_left": sorted(left, key=lambda e: e["path"])},
        "edit_ratio_vs_scratch": round(edits / max(1, scratch["edited"]), 3),
        "errors_left_ratio_vs_no_checkers": round(final["label_errors"] / max(1, no_checkers["label_errors"]), 3),
        "seconds": round(time.perf_counter() - started, 1),
    }


def format_report(r: dict) -> str:
    lines = [f"loop benchmark on {r.get('data_root') or 'demo ' + r['style']}: {r['images_to_label']} images to label "
             f"({r['defective']} defective), "
             f"reviewer error rate {r['error_rate']:.0%}, {r['seconds']} s",
             f"{'round':<10} {'sent back':>9} {'edited':>7} {'mean IoU':>9} {'errors':>7}"]
    for x in r["rounds"]:
        lines.append(f"{str(x['round']):<10} {str(x['sent_back'] if x['sent_back'] is not None else '-'):>9} "
                     f"{x['edited']:>7} {x['mean_iou']:>9} {x['label_errors']:>7}")
    s, n, f = r["from_scratch"], r["prelabel_precheck_no_checkers"], r["full_flow"]
    lines += [f"from scratch:              edited {s['edited']:>4}, mean IoU {s['mean_iou']}, errors {s['label_errors']}",
              f"pre-labels, no checkers:   edited {n['edited']:>4}, mean IoU {n['mean_iou']}, errors {n['label_errors']}",
              f"full flow:                 edited {f['edited']:>4}, mean IoU {f['mean_iou']}, errors {f['label_errors']}",
              *([f"errors left: " + ", ".join(f"{e['path']} ({e['kind']})" for e in f["errors_left"])]
                if f.get("errors_left") else []),
              f"edits vs scratch {r['edit_ratio_vs_scratch']:.2f} (target <= 0.40); errors left vs no checkers "
              f"{r['errors_left_ratio_vs_no_checkers']:.2f} (target <= 0.33); loop finished: {r['loop_finished']}"]
    return "\n".join(lines)
