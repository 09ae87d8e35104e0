"""A simulated reviewer for the loop benchmark and the headless demo.

It behaves like a hurried person (spec 003's pre-check, issue #2):
* pre-check: a pre-label that already matches the truth is accepted as is (viewed, not
  edited); any other is repaired toward the truth, but each repair leaves one label error
  of the patent's four kinds with probability ``error_rate`` (default 15 %);
* a flagged image is repaired to the truth (a false alarm on a right label is accepted as is).

"Matches" uses the checkers' own criterion (tolerant IoU with ``FlagRules`` defaults), so a
label the reviewer accepts is one a perfect checker would not flag.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from annotator.core import masks as M
from annotator.core.flags import FlagRules
from annotator.core.label_noise import ERROR_KINDS, inject_error
from annotator.core.review import Review

RULES = FlagRules()


def label_is_right(label: np.ndarray, truth: np.ndarray) -> bool:
    """Right = tolerant IoU to the truth at or above the checkers' threshold."""
    return M.tolerant_iou(label, truth, RULES.iou_tolerance_px) >= RULES.iou_threshold


@dataclass
class SimulatedReviewer:
    truth: dict  # image id -> bool mask
    error_rate: float = 0.15
    seed: int = 0
    edited: set = field(default_factory=set)  # image ids edited in the current round
    errors_made: dict = field(default_factory=dict)  # image id -> error kind left

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def new_round(self) -> None:
        self.edited = set()

    def _hurried_copy(self, image_id: int) -> np.ndarray:
        truth = self.truth[image_id]
        if self.rng.random() >= self.error_rate:
            self.errors_made.pop(image_id, None)
            return truth
        kind = str(self.rng.choice(ERROR_KINDS))
        self.errors_made[image_id] = kind
        return inject_error(truth, kind, self.rng)

    def precheck(self, review: Review, image_id: int) -> bool:
        """Pre-check one pre-labelled image. Returns True when it had to edit."""
        current = review.project.current_label(image_id)
        if current is not None and label_is_right(current.mask, self.truth[image_id]):
            review.accept_as_is(image_id)
            return False
        review.replace_mask(image_id, self._hurried_copy(image_id))
        self.edited.add(image_id)
        return True

    def label_from_scratch(self, image_id: int) -> np.ndarray:
        """Baseline: no pre-label. A defect-free image needs no drawing (view only)."""
        if not self.truth[image_id].any():
            return self.truth[image_id]
        self.edited.add(image_id)
        return self._hurried_copy(image_id)

    def handle_flag(self, review: Review, image_id: int) -> bool:
        """Repair a flagged image to the truth. Returns True when it had to edit."""
        current = review.project.current_label(image_id)
        if current is not None and label_is_right(current.mask, self.truth[image_id]):
            review.accept_as_is(image_id)
            return False
        review.replace_mask(image_id, self.truth[image_id])
        self.errors_made.pop(image_id, None)
        self.edited.add(image_id)
        return True


def label_quality(labels: dict, truth: dict) -> dict:
    """Mean IoU of all labels to the truth and the number of wrong labels."""
    ious = [M.iou(labels[i], truth[i]) for i in truth]
    wrong = [i for i in truth if not label_is_right(labels[i], truth[i])]
    return {"mean_iou": round(float(np.mean(ious)), 4) if ious else None, "label_errors": len(wrong),
            "wrong_ids": wrong}
