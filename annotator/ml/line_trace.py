"""Thin straight lines of a pre-label, drawn along their whole length.

A 1-3 px line (a mis-yarn, a broken needle, an open-width line, a scratch) comes out of the
anomaly map as a band ~12 px wide, and the per-pixel refinements (fine map, matched good fabric;
:mod:`annotator.ml.reference_refine`) keep only the stretches where the line stands out pixel by
pixel: a faint line ends up in pieces, which a reviewer must redraw. Along the line, though, the
evidence adds up. Pieces of one line that the map broke up are first joined (``chain_collinear``);
then for each elongated region of the map's mask:

1. the residual to matched good fabric (``reference_refine.window_residual``, in units of the
   ring's level) is sampled in the region's frame: ``u`` along its principal axis, ``v`` across;
2. smoothed along ``u`` (``ALONG_SIGMA``), each column's peak across gives the line's centre; a
   piecewise-linear centre line, stiff against bends (``centre_curve``), is fitted to the columns
   whose peak clears the ring level, then again without the outliers. Too few such columns, or
   too few of them on the fitted line (a wavy crack, a blob), and the region is left to the other
   refinements;
3. the width is the full width at half maximum of the residual's median profile across the
   fitted line; a profile wider than ``MAX_WIDTH`` px or without a clear peak is not a thin line;
4. the extent: the region's extent along ``u``, trimmed at both ends to where the residual on the
   line clears its flanks' ``FLANK_QUANTILE``, then followed outwards while it does (gaps up to
   ``GAP`` px, at most ``FOLLOW`` px: the map's blur ends a few px from the true end). Gaps inside
   are bridged: the map already found the line there.

Measured on the demo fabrics (seed 0; 60 good images; 6 test images per kind and style), pre-labels a
reviewer can keep (tolerant IoU >= 0.8 to the truth): twill 20 -> 25 of 42, plain 23 -> 24, knit 12 ->
19, satin 27 -> 32, rib 20 -> 29: broken needles 18 -> 28 of 30, mis-yarns 10 -> 24, open-width lines
2 -> 5; the compact kinds and the good images unchanged; mean IoU 0.49 -> 0.55. Joining the pieces of
a line (chain_collinear) is 4 of these (knit 1, rib 3). Scikit-image photographs
(128-px crops, 40 defects each): brick 9 -> 9 kept, gravel 0 -> 2, grass 0 -> 0 (model 1 finds no defect
there). The masks cost less, not more: 45 -> 35 ms per image on twill (lines skip the per-pixel
refinement's many windows).
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from annotator.ml.reference_refine import is_elongated, region_windows, regions_in_boxes, window_residual

MIN_AREA = 16  # px: smaller regions are not traced
ALONG_SIGMA = 3.0  # px: the residual is smoothed along the line before its centre is found
ACROSS = 14  # px either side of the axis sampled for the centre
PROFILE = 7  # px either side of the fitted line sampled for the width
SEARCH = 4  # px: each column's peak is looked for this close to the median profile's peak
MIN_STRONG = 8  # columns whose peak clears the ring level, at least
KNOT = 32  # px between the knots of the centre line (see centre_curve) ...
BEND = 4.0  # ... and the weight of its bends, against one column's squared error
ON_LINE_PX = 1.5  # px: a column is on the fitted line when its peak is this close ...
MIN_ON_LINE = 0.6  # ... and at least this share of the strong columns must be
MAX_WIDTH = 5  # px (full width at half maximum); wider profiles are not thin lines
MIN_PEAK = 0.25  # the profile's peak above its flanks, in ring levels, at least
FLANK_QUANTILE = 0.9  # the line is on where its residual clears this quantile of its flanks'
ALONG_MEAN = 9  # px: running mean of the residual on and beside the line for the extent
FOLLOW = 16  # px followed past the region's ends ...
GAP = 4  # ... across gaps of at most this many px
CHAIN_GAP = 48  # px: pieces of a line at most this far apart along its axis are joined ...
CHAIN_OFF = 4  # ... when they lie within this many px of it


def trace_lines(image: np.ndarray, mask: np.ndarray, references: Optional[np.ndarray] = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(lines, traced): the thin lines drawn in the elongated regions of ``mask`` (bool, image size)
    on ``image`` (HxWx3 uint8), and the regions of ``mask`` they replace. A region that does not
    hold a clear thin straight line is in neither. Pieces of one line (a faint line's map breaks
    up) are joined first (see chain_collinear)."""
    lines = np.zeros(mask.shape, bool)
    traced = np.zeros(mask.shape, bool)
    chained = chain_collinear(mask)
    for box, img, region, others, refs in regions_in_boxes(image, chained, references):
        if region.sum() < MIN_AREA or not is_elongated(region):
            continue
        line = trace_line(img, region, others, refs)
        if line is not None:
            lines[box] |= line
            traced[box] |= region & mask[box]
    return lines, traced


def _frame(ys: np.ndarray, xs: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(cy, cx, d, n): centroid, long axis (dx, dy) and its normal of the pixels ys, xs."""
    cy, cx = float(ys.mean()), float(xs.mean())
    _, vecs = np.linalg.eigh(np.cov(np.stack([xs - cx, ys - cy])))
    d = vecs[:, 1]
    return cy, cx, d, np.array([-d[1], d[0]])


def chain_collinear(mask: np.ndarray) -> np.ndarray:
    """``mask`` with thin bridges from each elongated region to the regions lying on its axis
    (centroid within ``CHAIN_OFF`` px of it, no wider across it than the region plus ``CHAIN_OFF``)
    at most ``CHAIN_GAP`` px beyond its ends: one line whose map broke into pieces becomes one
    region again. Compact regions off the axis are never joined."""
    n, cc, stats, cents = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n < 3:
        return mask
    bridges = np.zeros(mask.shape, np.uint8)
    for r in range(1, n):
        x, y, w, h = (int(v) for v in stats[r, :4])
        ys, xs = np.nonzero(cc[y:y + h, x:x + w] == r)
        if len(ys) < MIN_AREA or not is_elongated(cc[y:y + h, x:x + w] == r):
            continue
        cy, cx, d, nrm = _frame(ys + y, xs + x)
        u_r = (xs + x - cx) * d[0] + (ys + y - cy) * d[1]
        half = float(np.abs((xs + x - cx) * nrm[0] + (ys + y - cy) * nrm[1]).max())
        for q in range(1, n):
            if q == r or stats[q, 4] < 4:
                continue
            qx, qy = cents[q]
            if abs((qx - cx) * nrm[0] + (qy - cy) * nrm[1]) > CHAIN_OFF:
                continue
            x2, y2, w2, h2 = (int(v) for v in stats[q, :4])
            qy_, qx_ = np.nonzero(cc[y2:y2 + h2, x2:x2 + w2] == q)
            qu = (qx_ + x2 - cx) * d[0] + (qy_ + y2 - cy) * d[1]
            qv = (qx_ + x2 - cx) * nrm[0] + (qy_ + y2 - cy) * nrm[1]
            if np.abs(qv).max() > half + CHAIN_OFF:
                continue
            if 0 < qu.min() - u_r.max() <= CHAIN_GAP:
                a, b = u_r.max(), qu.min()
            elif 0 < u_r.min() - qu.max() <= CHAIN_GAP:
                a, b = qu.max(), u_r.min()
            else:
                continue
            p0 = (int(round(cx + a * d[0])), int(round(cy + a * d[1])))
            p1 = (int(round(cx + b * d[0])), int(round(cy + b * d[1])))
            cv2.line(bridges, p0, p1, 1, 3)
    return mask | bridges.astype(bool)


def residual_map(image: np.ndarray, region: np.ndarray, others: np.ndarray, refs: list) -> np.ndarray:
    """Residual to matched good fabric over the region's windows, in units of each window's ring
    level (the larger where windows overlap); NaN outside the windows."""
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    out = np.full(region.shape, np.nan, np.float32)
    for (y0, y1, x0, x1), ring, _ in region_windows(region, others):
        found = window_residual(image, grey, (y0, y1, x0, x1), ring, refs)
        if found is not None:
            res, level = found
            out[y0:y1, x0:x1] = np.fmax(out[y0:y1, x0:x1], res / max(level, 1e-6))
    return out


def _runs_bridged(on: np.ndarray, start: int, step: int, reach: int, gap: int) -> int:
    """Index of the last ``on`` position reached from ``start`` going ``step`` (+1 / -1), at most
    ``reach`` positions, across gaps of at most ``gap``."""
    last, misses, j = start, 0, start
    while 0 <= j + step < len(on) and abs(j + step - start) <= reach:
        j += step
        if on[j]:
            last, misses = j, 0
        else:
            misses += 1
            if misses > gap:
                break
    return last


def centre_curve(at: np.ndarray, value: np.ndarray, weight: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The line's centre at each ``u``: piecewise linear with a knot every ``KNOT`` px, fitted to
    ``value`` at ``at`` (weighted least squares) with a penalty on its bends (``BEND``), so a straight
    line stays straight, a gently bending yarn is followed, and stretches without data (gaps, the
    ends) are bridged or extended straight."""
    knots = np.linspace(u[0], u[-1], max(2, int(np.ceil((u[-1] - u[0]) / KNOT)) + 1))
    basis = np.stack([np.interp(at, knots, np.eye(len(knots))[k]) for k in range(len(knots))], 1)
    w = weight / weight.mean()
    lhs = basis.T @ (w[:, None] * basis)
    rhs = basis.T @ (w * value)
    if len(knots) > 2:
        second = np.diff(np.eye(len(knots)), 2, axis=0)
        lhs = lhs + BEND * second.T @ second
    coef = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    return np.interp(u, knots, coef).astype(np.float32)


def trace_line(image: np.ndarray, region: np.ndarray, others: np.ndarray, refs: list) -> Optional[np.ndarray]:
    """The thin straight line in ``region`` (bool) of ``image`` (float32 BGR, the region's box), as a
    mask of the box; None when the residual does not show one."""
    resid = residual_map(image, region, others, refs)
    if not np.isfinite(resid).any():
        return None
    ys, xs = np.nonzero(region)
    cy, cx, d, n = _frame(ys, xs)
    u_reg = (xs - cx) * d[0] + (ys - cy) * d[1]
    v_reg = (xs - cx) * n[0] + (ys - cy) * n[1]
    u = np.arange(int(np.floor(u_reg.min())) - FOLLOW, int(np.ceil(u_reg.max())) + FOLLOW + 1, dtype=np.float32)
    inside = (u >= u_reg.min()) & (u <= u_reg.max())
    filled = np.nan_to_num(resid, nan=-1.0)  # -1: outside the windows

    def sample(offsets: np.ndarray, centre: np.ndarray) -> np.ndarray:
        """Residual at (u, centre(u) + offset) for each offset (rows) and u (columns); -1 outside."""
        v = centre[None, :] + offsets[:, None].astype(np.float32)
        mx = (cx + u[None, :] * d[0] + v * n[0]).astype(np.float32)
        my = (cy + u[None, :] * d[1] + v * n[1]).astype(np.float32)
        return cv2.remap(filled, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=-1.0)

    # 1-2: centre per column, smoothed along the line
    across = np.arange(-ACROSS, ACROSS + 1)
    band = sample(across, np.zeros_like(u))
    valid = band >= 0
    smooth = cv2.GaussianBlur(np.where(valid, band, 0).astype(np.float32), (0, 0), sigmaX=ALONG_SIGMA, sigmaY=0.01)
    weight = cv2.GaussianBlur(valid.astype(np.float32), (0, 0), sigmaX=ALONG_SIGMA, sigmaY=0.01)
    smooth = np.where(weight > 0.3, smooth / np.maximum(weight, 1e-6), 0.0)
    half = min(max(3, int(np.ceil(np.abs(v_reg).max())) + 2), ACROSS - SEARCH - 1)
    near = np.abs(across) <= half
    c0 = int(across[near][np.argmax(np.median(smooth[:, inside], 1)[near])])
    rows = (across >= c0 - SEARCH) & (across <= c0 + SEARCH)
    cols = smooth[rows][:, inside]
    peak_at = across[rows][np.argmax(cols, 0)].astype(np.float64)
    peak = cols.max(0)
    strong = peak > 1.0
    if strong.sum() < MIN_STRONG:
        return None
    us = u[inside].astype(np.float64)
    fit = centre_curve(us[strong], peak_at[strong], np.sqrt(peak[strong]), u)
    on_line = np.abs(np.interp(us[strong], u, fit) - peak_at[strong]) <= ON_LINE_PX
    if on_line.mean() < MIN_ON_LINE or on_line.sum() < 2:
        return None
    centre = centre_curve(us[strong][on_line], peak_at[strong][on_line], np.sqrt(peak[strong][on_line]), u)

    # 3: width from the median profile across the fitted line
    offsets = np.arange(-PROFILE, PROFILE + 1)
    prof_all = sample(offsets, centre)
    seen = (prof_all[:, inside] >= 0).all(0)
    if not seen.any():
        return None
    prof = np.median(prof_all[:, inside][:, seen], 1)
    base, top = float(np.median(prof[np.abs(offsets) >= 5])), float(prof[PROFILE])
    if top - base < MIN_PEAK:
        return None
    above = prof > base + 0.5 * (top - base)
    lo = hi = PROFILE
    while lo > 0 and above[lo - 1]:
        lo -= 1
    while hi < len(offsets) - 1 and above[hi + 1]:
        hi += 1
    if hi - lo + 1 > MAX_WIDTH:
        return None
    v_lo, v_hi = offsets[lo] - 0.5, offsets[hi] + 0.5

    # 4: extent along the line
    # (the same statistic on the line's rows and on as many rows of each flank, so that both have the same noise)
    kernel = np.ones(ALONG_MEAN) / ALONG_MEAN
    width = hi - lo + 1

    def along(rows: np.ndarray) -> np.ndarray:
        return np.convolve(rows.mean(0), kernel, mode="same")

    on_line_mean = along(prof_all[lo:hi + 1])
    flanks = np.concatenate([along(prof_all[:width]), along(prof_all[-width:])])
    on = on_line_mean > float(np.quantile(flanks[np.concatenate([inside, inside])], FLANK_QUANTILE))
    first = np.nonzero(inside)[0]
    hits = np.nonzero(on[first[0]:first[-1] + 1])[0]
    if not len(hits):
        return None
    start = _runs_bridged(on, first[0] + hits[0], -1, FOLLOW, GAP)
    end = _runs_bridged(on, first[0] + hits[-1], +1, FOLLOW, GAP)

    # draw it in the box
    gy, gx = np.mgrid[0:region.shape[0], 0:region.shape[1]].astype(np.float32)
    pu = (gx - cx) * d[0] + (gy - cy) * d[1]
    off = (gx - cx) * n[0] + (gy - cy) * n[1] - np.interp(pu, u, centre)
    line = (pu >= u[start] - 0.5) & (pu <= u[end] + 0.5) & (off >= v_lo) & (off <= v_hi)
    return line if line.any() else None
