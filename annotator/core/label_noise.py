"""The four label errors the patent names (spec 003, Fig. 4), made on purpose.

Used by the checkers benchmark (inject errors into true labels and measure the flags) and by
the simulated reviewer of the loop benchmark (a hurried person leaves such errors).
"""
from __future__ import annotations

import cv2
import numpy as np

from . import masks as M

#: missing: a true region left out (missed label); false: a region where there is no defect;
#: expanded / shrunk: a region drawn one ring (3-5 px) too large / too small.
ERROR_KINDS = ("missing", "false", "expanded", "shrunk")


def _false_region(shape: tuple[int, int], avoid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A blob or short stroke away from the true defect, like a person's stray mark."""
    h, w = shape
    keep_out = M.dilate(avoid, 12)
    for _ in range(50):
        y, x = int(rng.integers(8, max(9, h - 8))), int(rng.integers(8, max(9, w - 8)))
        if keep_out[y, x]:
            continue
        out = np.zeros(shape, np.uint8)
        if rng.random() < 0.5:
            r = int(rng.integers(4, 9))
            axes = (r, int(r * rng.uniform(0.6, 1.4)))
            cv2.ellipse(out, (x, y), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            length = int(rng.integers(15, 40))
            angle = rng.uniform(0, np.pi)
            x2, y2 = int(x + length * np.cos(angle)), int(y + length * np.sin(angle))
            cv2.line(out, (x, y), (x2, y2), 1, int(rng.integers(2, 5)))
        region = out.astype(bool) & ~keep_out
        if region.sum() >= 15:
            return region
    return np.zeros(shape, bool)


def inject_error(truth: np.ndarray, kind: str, rng: np.random.Generator,
                 rings: tuple[int, int] = (3, 5)) -> np.ndarray:
    """Return a wrong version of ``truth`` with one error of ``kind``.

    ``expanded`` / ``shrunk`` move the region's border by a ring of ``rings[0]..rings[1]`` px.

    ``missing`` and ``expanded``/``shrunk`` need a defect in ``truth``; on a defect-free
    mask only ``false`` is possible, and the function falls back to it. ``shrunk`` on a
    region too thin to erode by a ring removes it entirely (what a person who shrinks a
    2-px line by 3 px would leave), i.e. becomes ``missing`` for that region.
    """
    truth = M.as_bool(truth)
    if kind not in ERROR_KINDS:
        raise ValueError(f"error kind must be one of {ERROR_KINDS}, got {kind!r}")
    labels, regions = M.label_regions(truth)
    if not regions or kind == "false":
        return truth | _false_region(truth.shape, truth, rng)
    region = regions[int(rng.integers(len(regions)))]
    own = labels == region.index
    rest = truth & ~own
    ring = int(rng.integers(rings[0], rings[1] + 1))
    if kind == "missing":
        return rest
    if kind == "expanded":
        return rest | M.dilate(own, ring)
    return rest | M.erode(own, ring)


def error_kind_possible(truth: np.ndarray, kind: str) -> bool:
    """Whether ``kind`` can be made on this mask without falling back to another kind."""
    has_defect = bool(M.as_bool(truth).any())
    return kind == "false" or has_defect
