"""The review loop of spec 003 as a state machine over a :class:`~annotator.core.store.Project`.

One state per image of role ``label``; good training images stay ``good``::

    new --prelabel--> prelabelled --review--> prechecked --check (flag)--> flagged
                                                  |  ^                        |
                                     check (clean)|  +-------- review --------+
                                                  v
                                              accepted

* ``prelabel``: model 1 ran (new/prelabelled -> prelabelled; never over a person's work).
* ``review``: a person acted (any reviewer action; new, prelabelled, prechecked, flagged
  or accepted -> prechecked). Every action writes a new label version, resolves the
  image's open flags and moves the state, in one transaction.
* ``check``: a check round judged the image's current label (prechecked, flagged or
  accepted -> flagged when it raised a flag, else accepted). An image must have been
  pre-checked by a person before a checker may judge it.

The GUI, the CLI and the simulated reviewer of the benchmarks all use :class:`Review`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from .masks import as_bool, label_regions
from .store import Classes, FlagSpec, ImageRecord, Label, Project, ProjectError

#: event -> (states it may start from, state it leads to)
EVENTS: dict[str, tuple[frozenset, str]] = {
    "prelabel": (frozenset({"new", "prelabelled"}), "prelabelled"),
    "review": (frozenset({"new", "prelabelled", "prechecked", "flagged", "accepted"}), "prechecked"),
    "check_flagged": (frozenset({"prechecked", "flagged", "accepted"}), "flagged"),
    "check_clean": (frozenset({"prechecked", "flagged", "accepted"}), "accepted"),
}
_WHY = {  # why an event is refused, by state
    "good": "it is a good (defect-free) training image, not one to label",
    "new": "model 1 has not pre-labelled it and no person has labelled it",
    "prelabelled": "a person must pre-check it first",
    "prechecked": "a person has already checked it; model 1 must not overwrite that",
    "flagged": "a person has already checked it; model 1 must not overwrite that",
    "accepted": "a person has already checked it; model 1 must not overwrite that",
}


class ReviewError(ProjectError):
    """A review action cannot be applied (bad region, wrong flag, wrong round...)."""


class IllegalTransition(ReviewError):
    """The image's state does not allow the requested step."""


_VERB = {"prelabel": "pre-label", "review": "review", "check_flagged": "flag", "check_clean": "accept"}


def next_state(state: str, event: str) -> str:
    """The state after ``event``; raises :class:`IllegalTransition` when not allowed."""
    sources, target = EVENTS[event]
    if state not in sources:
        raise IllegalTransition(f"cannot {_VERB[event]} an image in state {state!r}: {_WHY[state]}")
    return target


@dataclass(frozen=True)
class QueueItem:
    image_id: int
    rel_path: str
    state: str
    suspicion: Optional[float]  # max open-flag suspicion, or model 1's anomaly score
    flag_ids: tuple[int, ...]  # open flags, most suspicious first


class Review:
    """Reviewer actions and round bookkeeping over one project."""

    def __init__(self, project: Project) -> None:
        self.project = project

    # ---- queries

    def state(self, image_id: int) -> str:
        return self.project.image(image_id).state

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(("new", "prelabelled", "prechecked", "flagged", "accepted", "good"), 0)
        for img in self.project.images():
            out[img.state] += 1
        return out

    def phase(self) -> str:
        """``precheck`` before the first check round, ``done`` once :meth:`loop_finished`,
        else ``check``."""
        if not self.project.rounds("check"):
            return "precheck"
        return "done" if self.loop_finished() else "check"

    def queue(self) -> list[QueueItem]:
        """What needs the person now.

        Pre-check phase: every prelabelled image, highest anomaly score first. Later:
        flagged images, most suspicious open flag first; then prelabelled images that
        arrived after the first check round (they need a pre-check before any check).
        """
        p = self.project
        pre = sorted(p.images(role="label", state="prelabelled"), key=_by_anomaly)
        pre_items = [QueueItem(i.id, i.rel_path, i.state, i.anomaly_score, ()) for i in pre]
        if self.phase() == "precheck":
            return pre_items
        open_flags: dict[int, list] = {}
        for f in p.flags(unresolved_only=True):  # most suspicious first
            open_flags.setdefault(f.image_id, []).append(f)
        flagged = [p.image(i) for i in open_flags]
        items = [QueueItem(i.id, i.rel_path, i.state, open_flags[i.id][0].suspicion,
                           tuple(f.id for f in open_flags[i.id])) for i in flagged if i.state == "flagged"]
        return items + pre_items

    def loop_finished(self) -> bool:
        """True only when the latest check round has ended, covered every label image,
        sent no image back (no flag, or only overruled ones, see :meth:`record_check_results`),
        and every label image is (still) accepted."""
        p = self.project
        checks = p.rounds("check")
        if not checks or checks[-1].ended is None:
            return False
        coverage = p.round_coverage(checks[-1].number)
        images = p.images(role="label")
        return (
            all(i.id in coverage for i in images)
            and not any(coverage.values())
            and all(i.state == "accepted" for i in images)
        )

    # ---- model 1

    def start_prelabel_round(self) -> int:
        return self.project.start_round("prelabel")

    def record_prelabel(
        self, round: int, image_id: int, mask: np.ndarray, classes: Classes = None,
        anomaly_score: Optional[float] = None, is_defect: Optional[bool] = None,
    ) -> Label:
        """Model 1's result for one image: label (source ``model1``), score, decision."""
        p = self.project
        with p.transaction():
            new = self._next(image_id, "prelabel")
            label = p.set_label(image_id, mask, classes, "model1", round)
            p.set_prediction(image_id, anomaly_score, is_defect)
            p.set_state(image_id, new)
        return label

    def end_prelabel_round(self, round: int) -> dict:
        """End the round; summary: images pre-labelled in it, and how many model 1 called defective."""
        done = {lab.image_id for lab in self.project.labels_in_round(round, "model1")}
        defective = sum(bool(self.project.image(i).is_defect) for i in done)
        summary = {"prelabelled": len(done), "defective": defective}
        self.project.end_round(round, summary)
        return summary

    # ---- reviewer actions (each: new label version, open flags resolved, -> prechecked)

    def replace_mask(self, image_id: int, mask: np.ndarray, classes: Classes = None) -> Label:
        """New mask. ``classes=None`` carries each region's class over from the current
        label by overlap (unmatched regions: unclassified)."""
        if classes is None:
            current = self.project.current_label(image_id)
            if current is not None:
                old = label_regions(current.mask)[0]
                classes = carry_classes(old, current.classes, mask)
        return self._act(image_id, mask, classes)

    def edit_region(self, image_id: int, region_index: int, new_region_mask: np.ndarray) -> Label:
        """Replace the pixels of region ``region_index`` (1-based) by ``new_region_mask``
        (full image size; empty = delete the region). The edited region keeps its class."""
        current = self._current(image_id)
        old, _ = label_regions(current.mask)
        self._check_region(image_id, current, region_index)
        new_part = as_bool(new_region_mask)
        if new_part.shape != current.mask.shape:
            raise ValueError(f"region mask is {new_part.shape}, the label is {current.mask.shape}")
        mask = (current.mask & (old != region_index)) | new_part
        source = np.where(old == region_index, 0, old)
        source[new_part] = region_index
        return self._act(image_id, mask, carry_classes(source, current.classes, mask))

    def set_class(self, image_id: int, region_index: int, cls: Optional[str]) -> Label:
        current = self._current(image_id)
        self._check_region(image_id, current, region_index)
        classes = list(current.classes)
        classes[region_index - 1] = cls
        return self._act(image_id, current.mask, classes)

    def mark_good(self, image_id: int) -> Label:
        """The image has no defect: empty label."""
        img = self._image(image_id)
        return self._act(image_id, np.zeros((img.height, img.width), bool), [])

    def accept_as_is(self, image_id: int) -> Label:
        current = self._current(image_id)
        return self._act(image_id, current.mask, current.classes)

    def accept_prediction(self, image_id: int, flag_id: int) -> Label:
        """Current label := the flag's predicted mask (source ``checker``); region
        classes carried over from the current label by overlap."""
        flag = self.project.flag(flag_id)
        if flag.image_id != image_id:
            raise ReviewError(f"flag {flag_id} belongs to image {flag.image_id}, not {image_id}")
        if flag.pred_mask is None:
            raise ReviewError(f"flag {flag_id} ({flag.rule}) carries no predicted mask to accept")
        current = self.project.current_label(image_id)
        classes = None
        if current is not None:
            classes = carry_classes(label_regions(current.mask)[0], current.classes, flag.pred_mask)
        return self._act(image_id, flag.pred_mask, classes, source="checker")

    def import_label(self, image_id: int, mask: np.ndarray, classes: Classes = None) -> Label:
        """A label brought in from outside (masks folder, MVTec ground truth), taken as
        reviewer-checked: source ``import``, state ``prechecked``."""
        known = {c.name for c in self.project.classes()}
        for name in [classes] if isinstance(classes, str) else (classes or []):
            if name is not None and name not in known:
                self.project.add_class(name)
                known.add(name)
        return self._act(image_id, mask, classes, source="import")

    def _act(self, image_id: int, mask: np.ndarray, classes: Classes, source: str = "reviewer") -> Label:
        p = self.project
        with p.transaction():
            new = self._next(image_id, "review")
            label = p.set_label(image_id, mask, classes, source, self._round_now())
            p.resolve_flags(image_id, by_label=label.id)
            p.set_state(image_id, new)
        return label

    # ---- roles

    def set_role(self, image_id: int, role: str) -> None:
        """Make an image a defect-free training image for model 1 (``good``) or one to label (``label``,
        state ``new``: pre-label it again). Refused for ``good`` when :meth:`why_not_good` says so. Label
        versions are kept either way."""
        if role == "good":
            why = self.why_not_good(image_id)
            if why:
                raise ReviewError(why)
        self.project.set_role(image_id, role)

    def why_not_good(self, image_id: int) -> Optional[str]:
        """Why the image cannot become a good training image, or None. Its current label, drawn or kept by a
        person (or imported), marks a defect: model 1 would learn that defect as good fabric. Model 1's own
        pre-label does not stop it: the person overrules it."""
        img = self._image(image_id)
        label = self.project.current_label(image_id)
        if img.role != "good" and label is not None and label.source != "model1" and label.area > 0:
            return (f"{img.rel_path}: its label marks a defect ({label.area} px); mark it defect-free first if "
                    "model 1 should learn it as good fabric")
        return None

    # ---- check rounds (model 2)

    def start_check_round(self) -> int:
        return self.project.start_round("check")

    def kept_against_flag(self, image_id: int) -> bool:
        """True when the current label is a person's answer to a flag that kept the mask unchanged
        (``accept_as_is`` on a flagged image): the person has overruled the checkers on this mask."""
        p = self.project
        current = p.current_label(image_id)
        if current is None or current.source != "reviewer":
            return False
        if not any(f.resolved_by == current.id for f in p.flags(image_id=image_id)):
            return False
        older = [v for v in p.label_history(image_id) if v.id < current.id]
        return bool(older) and older[-1].path == current.path  # masks are content-addressed

    def accepted_by_check(self, image_id: int) -> bool:
        """True when an earlier, ended check round judged the image's current label and raised no
        flag on it: the label has passed a check unchanged (a label kept against a flag is
        :meth:`kept_against_flag` instead).
        Spec 003 re-checks what a person re-pre-checked after a flag; a label that passed stays
        accepted unless it changes (see :func:`annotator.pipeline.check.check_project`)."""
        return image_id in self.accepted_by_check_among([image_id])

    def accepted_by_check_among(self, image_ids: Iterable[int]) -> set[int]:
        """The images of ``image_ids`` whose current label :meth:`accepted_by_check`; each round's
        coverage and flags are read once, not once per image."""
        p = self.project
        made_in = {}  # image id -> round its current label was made in
        for i in image_ids:
            current = p.current_label(i)
            if current is not None:
                made_in[i] = current.round
        out: set[int] = set()
        for r in p.rounds("check"):
            if r.ended is None:
                continue
            clean = {i for i, n in p.round_coverage(r.number).items() if n == 0}
            clean -= {f.image_id for f in p.flags(round=r.number)}
            # a label made in or after round r (its round number >= r) was not what r judged
            out |= {i for i in clean if i in made_in and r.number > made_in[i]}
        return out

    def record_check_results(
        self, round: int, flags_by_image: Mapping[int, Iterable[Union[FlagSpec, Mapping]]], final: bool = True,
        overruled: Iterable[int] = (), accepted_before: Iterable[int] = (),
    ) -> dict:
        """Record one check round. ``flags_by_image`` has every checked image as a key
        (an empty list = no flag). Flagged images -> ``flagged``, the others ->
        ``accepted``; older open flags of a checked image are superseded. All or
        nothing. ``final=False`` lets a long round record in chunks; the last call
        (``final=True``) ends the round and returns its summary counts.

        ``overruled``: images whose flags are recorded but not sent back, because a person
        already kept this very mask against an earlier flag (:meth:`kept_against_flag`). Their
        flags are stored resolved by the current label, the image is ``accepted`` and the round
        counts them under ``overruled``, not as flagged. ``accepted_before``: the same for labels
        an earlier round accepted (:meth:`accepted_by_check`), counted under ``accepted_before``
        (give them with the call that ends the round)."""
        p = self.project
        rnd = p.round(round)
        if rnd.kind != "check" or rnd.ended is not None:
            raise ReviewError(f"round {round} is not an open check round")
        specs = {i: list(fs) for i, fs in flags_by_image.items()}
        before = set(accepted_before)
        kept = {i for i in set(overruled) | before if specs.get(i)}
        with p.transaction():
            for image_id, fs in specs.items():
                event = "check_flagged" if fs and image_id not in kept else "check_clean"
                self._move(image_id, event)
                p.resolve_flags(image_id)
            p.add_flags(round, specs)
            for image_id in kept:
                p.resolve_flags(image_id, by_label=p.current_label(image_id).id)
            p.add_round_images(round, {i: (0 if i in kept else len(fs)) for i, fs in specs.items()})
            summary = self._check_summary(round, before) if final else {}
            if final:
                p.end_round(round, summary)
        return summary

    def _move(self, image_id: int, event: str) -> None:
        self.project.set_state(image_id, self._next(image_id, event))

    def _next(self, image_id: int, event: str) -> str:
        img = self._image(image_id)
        try:
            return next_state(img.state, event)
        except IllegalTransition as e:
            raise IllegalTransition(f"image {image_id} ({img.rel_path}): {e}") from None

    def _check_summary(self, round: int, accepted_before: AbstractSet[int] = frozenset()) -> dict:
        coverage = self.project.round_coverage(round)
        flags = self.project.flags(round=round)
        by_rule: dict[str, int] = {}
        for f in flags:
            by_rule[f.rule] = by_rule.get(f.rule, 0) + 1
        held = {f.image_id for f in flags if coverage.get(f.image_id) == 0}  # flags recorded, not sent back
        return {"checked": len(coverage), "flagged": sum(1 for n in coverage.values() if n),
                "accepted": sum(1 for n in coverage.values() if not n), "flags": len(flags), "by_rule": by_rule,
                "overruled": len(held - accepted_before), "accepted_before": len(held & accepted_before)}

    # ---- helpers

    def _image(self, image_id: int) -> ImageRecord:
        return self.project.image(image_id)

    def _current(self, image_id: int) -> Label:
        label = self.project.current_label(image_id)
        if label is None:
            img = self._image(image_id)
            raise ReviewError(f"image {image_id} ({img.rel_path}) has no label yet; draw one or mark it good")
        return label

    def _check_region(self, image_id: int, label: Label, region_index: int) -> None:
        if not 1 <= region_index <= len(label.classes):
            raise ReviewError(f"image {image_id} has {len(label.classes)} regions; no region {region_index}")

    def _round_now(self) -> int:
        rounds = self.project.rounds()
        return rounds[-1].number if rounds else 0


def carry_classes(
    old_regions: np.ndarray, old_classes: Sequence[Optional[str]], new_mask: np.ndarray
) -> list[Optional[str]]:
    """Class of each region of ``new_mask``: that of the old region (label image, 1-based
    indices into ``old_classes``) it overlaps most; None where it overlaps none."""
    new_regions, regions = label_regions(new_mask)
    out: list[Optional[str]] = []
    for r in regions:
        under = old_regions[(new_regions == r.index) & (old_regions > 0)]
        if under.size == 0:
            out.append(None)
            continue
        k = int(np.bincount(under).argmax())
        out.append(old_classes[k - 1] if k <= len(old_classes) else None)
    return out


def _by_anomaly(img: ImageRecord) -> tuple:
    score = img.anomaly_score
    return (score is None, -(score or 0.0), img.id)
