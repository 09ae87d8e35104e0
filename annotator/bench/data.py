"""Benchmark data from an MVTec-AD style folder: the user's own images instead of the demo.

``annotator bench prelabel|checkers|loop --data ROOT`` measures on ``ROOT``, either one
category (``train/good/``, ``test/<kind>/``, ``ground_truth/<kind>/<stem>_mask.png``) or a
dataset folder that holds several categories (each measured on its own). Reading goes through
the importer's scanner (:func:`annotator.core.formats.scan_mvtec`), so a benchmark reads
exactly what ``annotator import --mvtec ROOT --with-labels`` would: every image format it
knows, 16-bit and grey images converted, unreadable files skipped with their reason. A defect
image without a mask has no truth to measure against: it is skipped and listed, not scored as
defect-free.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from annotator.core.formats import ROLE_GOOD, NotMvtecError, scan_mvtec
from annotator.core.images import ImageError, load_image, load_mask


@dataclass
class Category:
    name: str
    root: Path
    good: list[np.ndarray] = field(default_factory=list)  # train/good, BGR uint8
    #: (defect kind or "good", path relative to root, BGR uint8 image, bool mask)
    test: list[tuple[str, str, np.ndarray, np.ndarray]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def truth_by_path(self) -> dict[str, np.ndarray]:
        return {rel: mask for _, rel, _, mask in self.test}


def skipped_line(skipped: dict[str, str], shown: int = 5) -> str:
    """``skipped N: path (reason); …`` for a report: the first ``shown`` of them."""
    items = list(skipped.items())
    more = " …" if len(items) > shown else ""
    return f"skipped {len(items)}: " + "; ".join(f"{k} ({why})" for k, why in items[:shown]) + more


def categories(root: os.PathLike) -> dict[str, Path]:
    """``{name: folder}``: ``root`` itself if it is a category, else its sub-folders that are.

    Raises :class:`ValueError` (one line) when neither holds MVTec data.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder")
    if (root / "train" / "good").is_dir() or (root / "test").is_dir():
        return {root.resolve().name: root}
    found = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
             and ((d / "train" / "good").is_dir() or (d / "test").is_dir())}
    if not found:
        raise ValueError(f"{root} holds no MVTec AD category (train/good/ and test/<defect kind>/, "
                         f"or a folder of such categories)")
    return found


def load_category(root: os.PathLike, *, max_good: Optional[int] = None, need_good: bool = True,
                  need_test: bool = True) -> Category:
    """Read one category; ``max_good`` caps the training images (the first by path).

    Raises :class:`ValueError` (one line) when a part the benchmark needs is missing.
    """
    root = Path(root)
    try:
        scan = scan_mvtec(str(root), with_labels=True)
    except NotMvtecError as e:
        raise ValueError(str(e)) from None
    cat = Category(root.resolve().name, root, skipped=list(scan.skipped))
    missing = set(scan.missing_masks)
    goods = sorted((it for it in scan.items if it.role == ROLE_GOOD), key=lambda it: it.rel_path)
    if max_good is not None:
        goods = goods[:max_good]
    for it in goods:
        try:
            cat.good.append(load_image(it.abs_path))
        except ImageError as e:
            cat.skipped.append((it.rel_path, e.reason))
    for it in sorted((it for it in scan.items if it.role != ROLE_GOOD), key=lambda it: it.rel_path):
        if it.rel_path in missing:
            cat.skipped.append((it.rel_path, "defect image without a ground-truth mask"))
            continue
        try:
            img = load_image(it.abs_path)
            mask = (load_mask(it.mask_path, (img.shape[1], img.shape[0])) if it.mask_path
                    else np.zeros(img.shape[:2], bool))
        except ImageError as e:
            cat.skipped.append((it.rel_path, e.reason))
            continue
        cat.test.append((it.defect_kind or "good", it.rel_path, img, mask))
    if need_good and not cat.good:
        raise ValueError(f"{root}: no readable good training images in train/good/")
    if need_test and not cat.test:
        raise ValueError(f"{root}: no readable test images in test/<kind>/")
    return cat
