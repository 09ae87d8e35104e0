"""The strip at the bottom of the window: where the loop stands (round n, flagged /
accepted / remaining, finished or not) and the running job (progress, time left, cancel).
"""
from __future__ import annotations

from typing import Mapping, Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QFrame, QHBoxLayout, QLabel, QProgressBar, QPushButton, QWidget

from .jobs import Job, format_eta


def loop_summary(counts: Mapping[str, int], phase: str, round_no: int) -> tuple[str, str]:
    """(badge, detail) for the loop: e.g. ("ROUND 3 · CHECK", "2 flagged · 40 accepted · 5 remaining")."""
    remaining = sum(counts.get(s, 0) for s in ("new", "prelabelled", "prechecked", "flagged"))
    parts = []
    if counts.get("new"):
        parts.append(f"{counts['new']} new")
    if counts.get("prelabelled"):
        parts.append(f"{counts['prelabelled']} to pre-check")
    if counts.get("prechecked"):
        parts.append(f"{counts['prechecked']} pre-checked")
    parts += [f"{counts.get('flagged', 0)} flagged", f"{counts.get('accepted', 0)} accepted",
              f"{remaining} remaining"]
    if phase == "done":
        return "LOOP FINISHED", f"every label accepted ({counts.get('accepted', 0)}) · ready to export"
    badge = "PRE-CHECK" if phase == "precheck" else "CHECKING"
    return (f"ROUND {round_no} · {badge}" if round_no else badge), " · ".join(parts)


def _unread(r: Mapping) -> str:
    """The note on images whose file could not be read (moved, deleted or damaged since the import)."""
    lost = r.get("unreadable") or []
    if not lost:
        return ""
    n = len(lost)
    return (f" {n} image{'' if n == 1 else 's'} could not be read and {'was' if n == 1 else 'were'} left out: {lost[0]}"
            " (moved? Project → Find moved images…)")


def describe_result(kind: str, r: Mapping) -> str:
    """The status-bar sentence for a finished job's summary."""
    if kind == "prelabel":
        return (f"Model 1 pre-labelled {r.get('prelabelled', 0)} images ({r.get('defective', 0)} look defective). "
                "Pre-check them in the queue." + _unread(r))
    if kind == "check":
        kept, before = r.get("overruled", 0), r.get("accepted_before", 0)
        held = ([f"{kept} on labels you kept against a flag"] if kept else []) + (
            [f"{before} on labels an earlier round accepted, unchanged since"] if before else [])
        kept_note = f" Flags recorded, not sent back: {', '.join(held)}." if held else ""
        if r.get("loop_finished"):
            return "The check raised no flag: the loop is finished. Export the labels (Ctrl+E)." + kept_note + _unread(r)
        n = r.get("flagged", 0)
        return (f"Check round {r.get('round')}: {n} image{'' if n == 1 else 's'} flagged, {r.get('accepted', 0)} "
                "accepted. Work through the flags in the queue." + kept_note + _unread(r))
    if kind == "export":
        note = "" if r.get("loop_finished") else " (the loop was not finished)"
        return (f"Exported {r.get('images', 0)} images ({r.get('defective', 0)} with defects, "
                f"{r.get('regions', 0)} regions) to {r.get('out', '')}{note}." + _unread(r))
    return "Done."


class StatusArea(QFrame):
    cancel_requested = Signal()

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setObjectName("statusArea")
        self.badge = QLabel("NO PROJECT", self)
        self.badge.setObjectName("phaseBadge")
        self.detail = QLabel("", self)
        self.job_label = QLabel("", self)
        self.job_label.setObjectName("muted")
        self.progress = QProgressBar(self)
        self.progress.setFixedWidth(160)
        self.progress.setTextVisible(True)
        self.eta = QLabel("", self)
        self.eta.setObjectName("muted")
        self.cancel = QPushButton("Cancel", self)
        self.cancel.setObjectName("cancelJob")
        self.cancel.clicked.connect(self.cancel_requested)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(10, 4, 10, 4)
        lay.addWidget(self.badge)
        lay.addWidget(self.detail, 1)
        lay.addWidget(self.job_label)
        lay.addWidget(self.progress)
        lay.addWidget(self.eta)
        lay.addWidget(self.cancel)
        self._job: Optional[Job] = None
        self._show_job(False)

    def set_loop(self, counts: Mapping[str, int], phase: str, round_no: int) -> None:
        badge, detail = loop_summary(counts, phase, round_no)
        self.badge.setText(badge)
        self.detail.setText(detail)
        self.badge.setProperty("phase", phase)
        self.badge.style().unpolish(self.badge)
        self.badge.style().polish(self.badge)

    def clear(self) -> None:
        self.badge.setText("NO PROJECT")
        self.detail.setText("Open or create a project (File menu).")

    # ---- the running job

    def track(self, job: Job) -> None:
        self._job = job
        self.job_label.setText(job.name)
        self.progress.setRange(0, 0)
        self.eta.setText("starting…")
        self.cancel.setEnabled(True)
        self.cancel.setText("Cancel")
        job.progress.connect(self._on_progress)
        job.ended.connect(self._on_ended)
        self._show_job(True)

    def cancelling(self) -> None:
        self.cancel.setEnabled(False)
        self.cancel.setText("Cancelling…")

    def _on_progress(self, done: int, total: int, message: str) -> None:
        job = self.sender()
        if job is not self._job:
            return
        step = message.split(":")[0].strip()
        self.job_label.setText(f"{job.name} · {step}" if step and step.lower() != job.name.lower() else job.name)
        if total > 0:
            self.progress.setRange(0, total)
            self.progress.setValue(min(done, total))
            self.progress.setFormat("%p%")
        else:
            self.progress.setRange(0, 0)
        self.eta.setText(format_eta(job.eta_s) if total > 0 else "")

    def _on_ended(self) -> None:
        if self.sender() is self._job:
            self._job = None
            self._show_job(False)

    def _show_job(self, on: bool) -> None:
        for w in (self.job_label, self.progress, self.eta, self.cancel):
            w.setVisible(on)


__all__ = ["StatusArea", "loop_summary", "Qt"]
