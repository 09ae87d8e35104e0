"""Undo/redo for label editing, kept in the core (widgets only call it).

* A command has ``apply(target)`` and ``revert(target)``; the target is the GUI's working
  copy (for masks: a plain 2-D numpy array, edited in place).
* :class:`MaskEdit` stores only the before/after pixels of the changed bounding box.
* One brush stroke = one undo step (:meth:`UndoHistory.begin_stroke` ... ``end()``).
* :class:`UndoHistory` keeps unlimited undo/redo per image id, so switching images and
  coming back keeps each image's history. A new edit after an undo clears the redo stack.

Independent of the project store: save the working mask with
:meth:`annotator.core.review.Review.replace_mask` when the person is done.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterator, Optional, Protocol

import numpy as np


class Command(Protocol):
    def apply(self, target: Any) -> None: ...

    def revert(self, target: Any) -> None: ...


@dataclass(frozen=True)
class MaskEdit:
    """Pixels of the box ``(x, y, w, h)`` before and after an edit."""

    x: int
    y: int
    before: np.ndarray = field(repr=False)
    after: np.ndarray = field(repr=False)

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        h, w = self.before.shape[:2]
        return self.x, self.y, w, h

    @property
    def nbytes(self) -> int:
        return self.before.nbytes + self.after.nbytes

    def _box(self) -> tuple[slice, slice]:
        x, y, w, h = self.bbox
        return slice(y, y + h), slice(x, x + w)

    def apply(self, mask: np.ndarray) -> None:
        mask[self._box()] = self.after

    def revert(self, mask: np.ndarray) -> None:
        mask[self._box()] = self.before

    @classmethod
    def from_diff(cls, before: np.ndarray, after: np.ndarray) -> Optional["MaskEdit"]:
        """The edit turning ``before`` into ``after`` (same shape); None if identical."""
        if before.shape != after.shape:
            raise ValueError(f"masks differ in size: {before.shape} vs {after.shape}")
        changed = before != after
        if changed.ndim > 2:
            changed = changed.any(axis=tuple(range(2, changed.ndim)))
        rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
        if rows.size == 0:
            return None
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        return cls(int(x0), int(y0), before[y0:y1, x0:x1].copy(), after[y0:y1, x0:x1].copy())

    @classmethod
    def from_patch(cls, mask: np.ndarray, x: int, y: int, patch: np.ndarray) -> "MaskEdit":
        """The edit that writes ``patch`` at ``(x, y)`` of ``mask`` (not applied yet)."""
        h, w = patch.shape[:2]
        if x < 0 or y < 0 or y + h > mask.shape[0] or x + w > mask.shape[1]:
            raise ValueError(f"patch {w}x{h} at ({x}, {y}) lies outside the {mask.shape[1]}x{mask.shape[0]} mask")
        return cls(x, y, mask[y:y + h, x:x + w].copy(), np.array(patch, dtype=mask.dtype))


class History:
    """Undo and redo stacks of one document (one image)."""

    def __init__(self) -> None:
        self._undo: list[Command] = []
        self._redo: list[Command] = []

    def push(self, command: Command) -> None:
        """Record a command that was already applied; clears the redo stack."""
        self._undo.append(command)
        self._redo.clear()

    def do(self, command: Command, target: Any) -> None:
        """Apply and record."""
        command.apply(target)
        self.push(command)

    def undo(self, target: Any) -> Optional[Command]:
        if not self._undo:
            return None
        command = self._undo.pop()
        command.revert(target)
        self._redo.append(command)
        return command

    def redo(self, target: Any) -> Optional[Command]:
        if not self._redo:
            return None
        command = self._redo.pop()
        command.apply(target)
        self._undo.append(command)
        return command

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    @property
    def nbytes(self) -> int:
        return sum(getattr(c, "nbytes", 0) for c in self._undo + self._redo)

    def __len__(self) -> int:
        return len(self._undo)

    def clear(self) -> None:
        self._undo.clear()
        self._redo.clear()


class Stroke:
    """One brush stroke in progress: paint into ``mask`` freely, then :meth:`end`.

    Keeps a transient copy of the mask while the stroke lasts; only the changed box is
    stored in the history.
    """

    def __init__(self, history: History, mask: np.ndarray) -> None:
        self.mask = mask
        self._history = history
        self._before: Optional[np.ndarray] = mask.copy()

    @property
    def active(self) -> bool:
        return self._before is not None

    def end(self) -> Optional[MaskEdit]:
        """Finish: push one :class:`MaskEdit` (None, nothing pushed, if nothing changed)."""
        if self._before is None:
            raise RuntimeError("stroke already ended")
        edit = MaskEdit.from_diff(self._before, self.mask)
        self._before = None
        if edit is not None:
            self._history.push(edit)
        return edit

    def cancel(self) -> None:
        """Abandon: restore the mask as it was when the stroke began."""
        if self._before is not None:
            self.mask[...] = self._before
            self._before = None


class UndoHistory:
    """Unlimited undo/redo per image, keyed by image id (any hashable key)."""

    def __init__(self) -> None:
        self._by_image: dict[Hashable, History] = {}

    def of(self, image_id: Hashable) -> History:
        return self._by_image.setdefault(image_id, History())

    def begin_stroke(self, image_id: Hashable, mask: np.ndarray) -> Stroke:
        return Stroke(self.of(image_id), mask)

    @contextmanager
    def stroke(self, image_id: Hashable, mask: np.ndarray) -> Iterator[Stroke]:
        """``with history.stroke(id, mask): paint...`` = one undo step; an exception
        restores the mask and records nothing."""
        s = self.begin_stroke(image_id, mask)
        try:
            yield s
        except BaseException:
            s.cancel()
            raise
        s.end()

    def replace(self, image_id: Hashable, mask: np.ndarray, new_mask: np.ndarray) -> Optional[MaskEdit]:
        """Overwrite ``mask`` in place with ``new_mask`` as one undo step (e.g. accepting a
        prediction in the editor); stores only the changed box."""
        edit = MaskEdit.from_diff(mask, np.asarray(new_mask, dtype=mask.dtype))
        if edit is not None:
            self.of(image_id).do(edit, mask)
        return edit

    def do(self, image_id: Hashable, command: Command, target: Any) -> None:
        self.of(image_id).do(command, target)

    def undo(self, image_id: Hashable, target: Any) -> bool:
        return self.of(image_id).undo(target) is not None

    def redo(self, image_id: Hashable, target: Any) -> bool:
        return self.of(image_id).redo(target) is not None

    def can_undo(self, image_id: Hashable) -> bool:
        return image_id in self._by_image and self._by_image[image_id].can_undo

    def can_redo(self, image_id: Hashable) -> bool:
        return image_id in self._by_image and self._by_image[image_id].can_redo

    def forget(self, image_id: Hashable) -> None:
        """Drop an image's history (e.g. after its mask was replaced from outside)."""
        self._by_image.pop(image_id, None)

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self._by_image.values())
