"""The words for a flag, in the person's words: one place for the desktop app's flag panel and for
``annotator flags`` on the command line (pure: no Qt, no torch)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .store import Flag

RULE_TITLES = {
    "iou": "Label and checkers disagree on the shape",
    "wrong_label": "Checkers see no defect where the label has one",
    "missed_label": "Checkers see a defect the label misses",
    "unlabelled_anomaly": "Model 1 and the image show a defect the label leaves out",
}


@dataclass(frozen=True)
class FlagView:
    title: str
    reason: str
    numbers: tuple[tuple[str, str], ...]  # (name, value) rows
    has_prediction: bool


def _checkers(ids: Sequence) -> str:
    return ", ".join(f"#{int(i) + 1}" for i in ids) if ids else "none"


def flag_reason(rule: str, n: Mapping) -> tuple[str, list[tuple[str, str]]]:
    """One-sentence reason and the (name, value) rows behind a flag of ``rule`` with the stored numbers ``n``."""
    rows: list[tuple[str, str]] = []
    if rule == "iou":
        iou, thr = n.get("iou", 0.0), n.get("threshold", 0.8)
        tol = n.get("tolerance_px", 0)
        # label pixels the image itself supports were counted as matched (nothing to say on an empty label)
        evidence = "iou_checker" in n and n.get("label_area", 0) > 0
        reason = (f"The checkers' mask{', with what the image itself shows,' if evidence else ''} matches the label "
                  f"with IoU {iou:.2f}" + (f", below the threshold {thr:.2f}" if iou < thr else "")
                  + (f" (boundary tolerance {tol} px)." if tol else "."))
        if iou >= thr and n.get("uncovered_regions"):
            regs = ", ".join(str(i) for i in n["uncovered_regions"])
            reason += (f" But region {regs} is mostly neither predicted nor unlike the fabric around it: "
                       f"is it a defect?")
        rows += [("IoU", f"{iou:.2f}  (threshold {thr:.2f})")]
        if evidence:
            rows += [("IoU, checkers alone", f"{n['iou_checker']:.2f}"),
                     ("Supported by the image", f"{n.get('supported_px', 0)} px")]
        if "iou_exact" in n:
            rows.append(("IoU, exact pixels", f"{n['iou_exact']:.2f}"))
        rows += [("Label area", f"{n.get('label_area', 0)} px"), ("Predicted area", f"{n.get('pred_area', 0)} px")]
        for r in n.get("regions", []):
            rows.append((f"Region {r['index']}", f"IoU {r['iou']:.2f} · {r['area']} px"))
        rows.append(("Checkers that voted", _checkers(n.get("voters", []))))
    elif rule == "unlabelled_anomaly":
        regs = n.get("regions", [])
        reason = (f"Model 1 marked {n.get('unlabelled_px', 0)} px that the label leaves out"
                  f" ({len(regs)} region{'s' if len(regs) != 1 else ''}), and the image shows "
                  f"{'it' if len(regs) == 1 else 'them'} unlike the fabric around. A defect you missed or erased?")
        for r in regs:
            x, y, w, h = r["bbox"]
            rows.append((f"Region at {x}, {y}", f"{r['area']} px · {w}×{h}"))
        ps = [p["p"] for p in n.get("support", []) if p.get("supported")]
        if ps:
            rows.append(("Image evidence", f"p = {min(ps):.3f}"))
        rows.append(("Label area", f"{n.get('label_area', 0)} px"))
    elif rule in ("wrong_label", "missed_label"):
        votes = n.get("votes", {})
        agg, thr, op = n.get("aggregate", 0.0), n.get("threshold", 0.5), n.get("operation", "mean")
        if rule == "wrong_label":
            reason = (f"You marked a defect, but the {op} of the checkers' defect probabilities is {agg:.2f}, "
                      f"below {thr:.2f}.")
            if "label_supported" in n:
                reason += " Nor does the image show all of the marked area unlike the fabric around it."
                rows.append(("Label unlike its surroundings", f"{100 * n['label_supported']:.0f} %"))
        else:
            reason = (f"The label marks no defect, but the {op} of the checkers' probabilities is {agg:.2f} "
                      f"(above {thr:.2f}) over {n.get('pred_area', 0)} px "
                      f"(more than {n.get('area_threshold', 15)} px).")
        for k, v in sorted(votes.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
            rows.append((f"Checker #{int(k) + 1 if str(k).isdigit() else k}", f"p = {float(v):.2f}"))
        rows += [(f"Aggregate ({op})", f"{agg:.2f}  vs threshold {thr:.2f}"),
                 ("Predicted area", f"{n.get('pred_area', 0)} px"),
                 ("Checkers that voted", _checkers(list(votes)))]
    else:  # a rule this version has no words for (a newer project): its numbers as they are
        reason = f"Flagged by the rule {rule!r}."
        rows += [(str(k), str(v)) for k, v in sorted(n.items()) if isinstance(v, (int, float, str))]
    return reason, rows


def describe_flag(flag: Flag) -> FlagView:
    """Title, one-sentence reason and the numbers behind a flag, in the person's words."""
    reason, rows = flag_reason(flag.rule, flag.numbers)
    rows += [("Round", str(flag.round)), ("Suspicion", f"{flag.suspicion:.2f}")]
    return FlagView(RULE_TITLES.get(flag.rule, flag.rule), reason, tuple(rows), flag.pred_path is not None)


__all__ = ["RULE_TITLES", "FlagView", "describe_flag", "flag_reason"]
