"""Binary-mask arithmetic: exact IoU (spec 003, claims 3-5), a tolerant match for thin
defects, connected regions and light clean-up. Masks are 2-D arrays; any non-zero
pixel is "defect".
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def as_bool(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"masks differ in size: {a.shape} vs {b.shape}")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """The patent's match degree D = B / (A + C - B) on pixel counts.

    A and C are the areas of the two masks, B the area of their intersection.
    Both empty: 1.0 (they agree). One empty, the other not: 0.0.
    """
    a, b = as_bool(a), as_bool(b)
    _same_shape(a, b)
    area_a = int(np.count_nonzero(a))
    area_c = int(np.count_nonzero(b))
    inter = int(np.count_nonzero(a & b))
    union = area_a + area_c - inter
    return 1.0 if union == 0 else inter / union


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    m = as_bool(mask).astype(np.uint8)
    if radius <= 0:
        return m.astype(bool)
    return cv2.dilate(m, _disk(radius)).astype(bool)


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    m = as_bool(mask).astype(np.uint8)
    if radius <= 0:
        return m.astype(bool)
    return cv2.erode(m, _disk(radius), borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def tolerant_iou(a: np.ndarray, b: np.ndarray, radius: int = 2) -> float:
    """IoU that forgives boundary offsets of up to ``radius`` pixels.

    A pixel of either mask counts as matched when the other mask has a pixel within
    ``radius`` (disk). Score = (matched_a + matched_c - B) / (A + C - B): the matched
    pixels over the union. ``radius=0`` gives exactly :func:`iou`; a one-pixel shift of
    a two-pixel line scores 1.0 at ``radius>=1`` where plain IoU gives 0.33.
    """
    a, b = as_bool(a), as_bool(b)
    _same_shape(a, b)
    if radius <= 0:
        return iou(a, b)
    area_a = int(np.count_nonzero(a))
    area_c = int(np.count_nonzero(b))
    if area_a == 0 and area_c == 0:
        return 1.0
    if area_a == 0 or area_c == 0:
        return 0.0
    inter = int(np.count_nonzero(a & b))
    matched_a = int(np.count_nonzero(a & dilate(b, radius)))
    matched_c = int(np.count_nonzero(b & dilate(a, radius)))
    union = area_a + area_c - inter
    return (matched_a + matched_c - inter) / union


@dataclass(frozen=True)
class Region:
    """One 8-connected region of a mask."""

    index: int  # 1-based, in raster order of the label image
    area: int
    bbox: tuple[int, int, int, int]  # x, y, w, h
    centroid: tuple[float, float]  # x, y


def label_regions(mask: np.ndarray) -> tuple[np.ndarray, list[Region]]:
    """Connected components (8-connectivity), numbered 1.. in raster order of each
    region's first pixel (top row first, then leftmost), whatever order OpenCV's
    labelling uses. Region classes are stored by this index, so it must be stable.
    Returns (label image int32, regions)."""
    m = as_bool(mask).astype(np.uint8)
    n, labels, stats, cents = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 1:
        return labels, []
    tops = stats[1:, cv2.CC_STAT_TOP]
    firsts = [int(np.argmax(labels[tops[k - 1]] == k)) for k in range(1, n)]
    order = sorted(range(1, n), key=lambda k: (int(tops[k - 1]), firsts[k - 1]))
    if order != list(range(1, n)):
        remap = np.zeros(n, np.int32)
        remap[order] = np.arange(1, n, dtype=np.int32)
        labels = remap[labels]
    regions = [
        Region(
            index=new,
            area=int(stats[k, cv2.CC_STAT_AREA]),
            bbox=(int(stats[k, 0]), int(stats[k, 1]), int(stats[k, 2]), int(stats[k, 3])),
            centroid=(float(cents[k, 0]), float(cents[k, 1])),
        )
        for new, k in enumerate(order, start=1)
    ]
    return labels, regions


def regions_peaking_above(mask: np.ndarray, values: np.ndarray, level: float, reach_px: int = 2) -> np.ndarray:
    """The connected regions of ``mask`` where ``values`` reach ``level`` (on the region or
    within ``reach_px`` of it); the other regions are dropped."""
    _same_shape(mask, values)
    labels, regions = label_regions(mask)
    keep = np.zeros(labels.shape, bool)
    h, w = labels.shape
    for r in regions:
        x, y, bw, bh = r.bbox
        y0, x0 = max(0, y - reach_px), max(0, x - reach_px)
        y1, x1 = min(h, y + bh + reach_px), min(w, x + bw + reach_px)
        own = labels[y0:y1, x0:x1] == r.index
        near = dilate(own, reach_px) if reach_px > 0 else own
        if float(values[y0:y1, x0:x1][near].max()) >= level:
            keep[y0:y1, x0:x1] |= own
    return keep


def region_ious(label: np.ndarray, pred: np.ndarray, radius: int = 0) -> list[tuple[Region, float]]:
    """IoU of each connected region of ``label`` with the predicted mask.

    A region is compared with the predicted pixels that touch it (the predicted
    components overlapping the region, or lying within ``radius`` of it), so an
    unrelated prediction elsewhere does not lower its score.
    """
    label, pred = as_bool(label), as_bool(pred)
    _same_shape(label, pred)
    lab_img, regions = label_regions(label)
    pred_img, _ = label_regions(pred)
    out = []
    for r in regions:
        own = lab_img == r.index
        near = dilate(own, max(radius, 1))
        touching = np.unique(pred_img[near & pred])
        touching = touching[touching > 0]
        pred_part = np.isin(pred_img, touching) if touching.size else np.zeros_like(pred)
        out.append((r, tolerant_iou(own, pred_part, radius)))
    return out


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop connected regions smaller than ``min_area`` pixels."""
    m = as_bool(mask)
    if min_area <= 1:
        return m.copy()
    lab_img, regions = label_regions(m)
    keep = [r.index for r in regions if r.area >= min_area]
    return np.isin(lab_img, keep) if keep else np.zeros_like(m)


def regions_touching(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The 8-connected regions of ``mask`` that contain at least one ``seed`` pixel."""
    n, cc = cv2.connectedComponents(as_bool(mask).astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[np.unique(cc[as_bool(seed)])] = True
    keep[0] = False
    return keep[cc]


def rect_sides(mask: np.ndarray) -> tuple[float, float]:
    """(short, long) side in px of the minimum-area rectangle around a non-empty mask's pixels:
    how thin and how long a region is, whatever its angle."""
    (_, _), (a, b), _ = cv2.minAreaRect(cv2.findNonZero(as_bool(mask).astype(np.uint8)))
    return min(a, b), max(a, b)


def spans(a: int, b: int, size: int) -> list[tuple[int, int]]:
    """[a, b) cut into the fewest near-equal (start, end) spans of at most ``size``: windows
    along a long region."""
    n = max(1, -(-(b - a) // size))
    edges = np.linspace(a, b, n + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def to_u8(mask: np.ndarray) -> np.ndarray:
    """0/255 uint8 image of a mask, the on-disk form."""
    return np.where(as_bool(mask), 255, 0).astype(np.uint8)
