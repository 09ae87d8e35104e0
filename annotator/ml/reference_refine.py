"""Pixel-accurate pre-label masks from a matched piece of good fabric.

The anomaly map locates a defect to its 4-px patch grid and its blur, so a 2-px line comes
out ~12 px wide and a region often covers only part of a long line. The image itself says
where the defect ends: next to it, or in a good image, there is fabric that looks like the
defect's surroundings, and once that piece is found, the per-pixel difference to it is the
defect.

For each region of a pre-label mask, in windows of at most ``WINDOW`` px along it:

1. the *ring* is the window minus the region (dilated by ``EXCLUDE`` px) and minus other
   regions; it is matched (masked normalised cross-correlation, ``cv2.matchTemplate``)
   against the image near the region (never over itself) and against the good reference
   images kept with the model;
2. the ``MATCHES`` best pieces are fitted to the window by a gain and an offset per colour
   channel (least squares on the ring, so lighting gradients do not count), and the
   per-pixel residual is their median colour distance to the window, lightly blurred;
3. defect pixels are those whose residual exceeds the ring's ``RING_QUANTILE`` (the ring is
   good fabric by construction): near the region, and grown along connected residual
   within the window (up to ``PAD`` px past the old region's ends).

A region keeps its old mask where the evidence is weak: a compact region whose residual is
less than ``MIN_CONTRAST`` times the ring's level (faint stains: the colour refinement does
better there), or a result under ``MIN_KEEP`` or over ``MAX_GROW`` times the old area.
Compact regions take the union with their old mask (a hole's rim often matches fabric
colours); elongated ones (lines) take the new mask alone, since the old one is ~4x too wide.

Measured on the demo fabrics (5 styles, seed 7, 8 test images per kind, 200 good images;
pre-labels a reviewer can keep, i.e. tolerant IoU >= 0.8 to the truth): 73 -> 111 of 280
defective images (26 % -> 40 %); open-width lines 0 -> 12 of 40, mis-yarns 0 -> 7, broken
needles 2 -> 6, knots 1 -> 7, holes 26 -> 29, slubs 22 -> 27, stains 22 -> 23; mean IoU
0.360 -> 0.407. Without reference images (matching within the image only) 53 instead of 60
were kept on three of the styles. About 0.1 s per defective 256x256 image on one CPU core;
matching on colour instead of grey kept the same pre-labels at 3x the time.

Tried and not kept: refining a line again to follow it further drew it 1-2 px wider per pass;
following a line past its ends in 24-px steps, each a stretch of its axis kept where the
residual confirmed it, kept 121 instead of 111 demo pre-labels but moved the real brick
photographs the wrong way (mean IoU of blobs 0.70 -> 0.65, cracks 0.25 -> 0.22), also with
stricter acceptance (contrast 1.5-2, coverage of the step 50-90 %).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import cv2
import numpy as np

from annotator.core.masks import rect_sides, regions_touching, spans

WINDOW = 64  # px of region per matched window (longer regions are cut into several)
PAD = 16  # px of ring around the region in each window
EXCLUDE = 4  # px: the region is dilated by this before the ring is taken
SEARCH = 128  # px around the window searched in the image itself
MATCHES = 3  # best matched pieces whose residuals are combined (median)
RING_QUANTILE = 0.99  # defect = residual above this quantile of the ring's residual
RESIDUAL_SIGMA = 1.0  # px, blur of the residual
# compact regions: median residual of the new mask / ring level, at least. 1.5 (session 3) kept the GrabCut mask
# of most knots, which holds only their dark body (not the highlight, nor the tail): with thin lines traced
# apart (line_trace), 1.0 keeps 129 -> 139 of 210 demo pre-labels (seed 0, 60 good: knots 8 -> 14 of 30,
# slubs 23 -> 26, holes 28 -> 29; stains unchanged); 0 and 1.2 gave 139 and 138; photographs unchanged
MIN_CONTRAST = 1.0
LINE_ASPECT = 3.0  # a region whose minimum-area rectangle is this many times longer than wide is a line
MIN_KEEP, MAX_GROW = 0.2, 2.5  # the new mask's area must lie within these multiples of the old one
MAX_WINDOWS = 64  # regions needing more windows than this keep their mask (cost)
REFERENCE_SIZE = 256  # px: reference images are kept as centre crops of at most this size


def reference_crops(images: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Up to ``n`` centre crops (same size, at most ``REFERENCE_SIZE``) of good BGR images,
    stacked as uint8 (n, h, w, 3); empty (0, 0, 0, 3) when none is given."""
    images = [im for im in images[:n] if im.ndim == 3 and im.shape[2] == 3]
    if not images:
        return np.zeros((0, 0, 0, 3), np.uint8)
    h = min(REFERENCE_SIZE, *(im.shape[0] for im in images))
    w = min(REFERENCE_SIZE, *(im.shape[1] for im in images))
    out = []
    for im in images:
        y, x = (im.shape[0] - h) // 2, (im.shape[1] - w) // 2
        out.append(im[y:y + h, x:x + w])
    return np.ascontiguousarray(np.stack(out).astype(np.uint8))


def is_elongated(region: np.ndarray) -> bool:
    """A line rather than a blob: its minimum-area rectangle is ``LINE_ASPECT`` times longer than wide."""
    short, long_ = rect_sides(region)
    return long_ >= LINE_ASPECT * max(short, 1.0)


def _grey(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)


def _best_matches(sources: list[tuple[np.ndarray, tuple[int, int, int, int] | None]], tpl: np.ndarray,
                  ring: np.ndarray) -> list[tuple[float, int, int, int]]:
    """(score, source, y, x) of the best placements of the masked template, best first.
    Sources and template are grey: matching on grey found the same pieces as on colour (the same
    pre-labels kept on the demo fabrics) in a third of the time."""
    found = []
    for si, (src, forbid) in enumerate(sources):
        if src.shape[0] < tpl.shape[0] or src.shape[1] < tpl.shape[1]:
            continue
        r = cv2.matchTemplate(src, tpl, cv2.TM_CCOEFF_NORMED, mask=ring)
        r = np.nan_to_num(r, nan=-1.0, posinf=-1.0, neginf=-1.0)
        if forbid is not None:  # placements overlapping the window itself
            y0, y1, x0, x1 = forbid
            r[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = -1.0
        for _ in range(2):  # two per source, apart
            y, x = np.unravel_index(int(np.argmax(r)), r.shape)
            if r[y, x] <= -1.0:
                break
            found.append((float(r[y, x]), si, int(y), int(x)))
            r[max(0, y - 3):y + 4, max(0, x - 3):x + 4] = -1.0
    found.sort(key=lambda t: -t[0])
    return found[:MATCHES]


def _residual(tpl: np.ndarray, pieces: list[np.ndarray], ring: np.ndarray) -> np.ndarray:
    out = []
    for ref in pieces:
        fitted = np.empty_like(tpl)
        for c in range(3):
            a, b = ref[..., c][ring], tpl[..., c][ring]
            design = np.stack([a, np.ones_like(a)], 1)
            gain, offset = np.linalg.lstsq(design, b, rcond=None)[0]
            fitted[..., c] = gain * ref[..., c] + offset
        out.append(np.sqrt(((tpl - fitted) ** 2).sum(-1)))
    res = np.median(np.stack(out), 0) if len(out) > 1 else out[0]
    return cv2.GaussianBlur(res.astype(np.float32), (0, 0), RESIDUAL_SIGMA)


def window_residual(image: np.ndarray, grey: np.ndarray, box: tuple[int, int, int, int], ring: np.ndarray,
                    refs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, float] | None:
    """Residual of the window ``image[y0:y1, x0:x1]`` (``box``) against its best matched pieces of good
    fabric (the image within ``SEARCH`` px, never over the window itself, and the ``refs``), and the
    ring's level (its ``RING_QUANTILE``); None when nothing could be matched. ``ring`` (bool, window
    size) is the fabric known to be good, on which the pieces are matched and fitted."""
    h, w = grey.shape
    cy0, cy1, cx0, cx1 = box
    tpl = image[cy0:cy1, cx0:cx1]
    th, tw = tpl.shape[:2]
    sy0, sy1, sx0, sx1 = max(0, cy0 - SEARCH), min(h, cy1 + SEARCH), max(0, cx0 - SEARCH), min(w, cx1 + SEARCH)
    # placements in the search area that overlap the window itself are forbidden
    forbid = (cy0 - sy0 - th + 1, cy1 - sy0, cx0 - sx0 - tw + 1, cx1 - sx0)
    colour = [image[sy0:sy1, sx0:sx1]] + [c for c, _ in refs]
    sources = [(grey[sy0:sy1, sx0:sx1], forbid)] + [(g, None) for _, g in refs]
    best = _best_matches(sources, grey[cy0:cy1, cx0:cx1], ring.astype(np.uint8))
    if not best:
        return None
    pieces = [colour[si][y:y + th, x:x + tw] for _, si, y, x in best]
    res = _residual(tpl, pieces, ring)
    return res, float(np.quantile(res[ring], RING_QUANTILE))


def region_windows(region: np.ndarray, others: np.ndarray
                   ) -> Iterator[tuple[tuple[int, int, int, int], np.ndarray, np.ndarray]]:
    """The windows along a region (at most ``WINDOW`` px of it each, ``PAD`` px of fabric around):
    (box y0, y1, x0, x1; ring: the box's fabric away from this and ``others`` regions; zone: the box's
    part of the region, dilated by ``EXCLUDE``). Windows with no zone or little ring are left out;
    nothing at all when the region needs more than ``MAX_WINDOWS`` (cost)."""
    h, w = region.shape
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    wins = [(a, b, c, d) for a, b in spans(y0, y1, WINDOW) for c, d in spans(x0, x1, WINDOW)]
    if len(wins) > MAX_WINDOWS:
        return
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * EXCLUDE + 1,) * 2)
    zone_all = cv2.dilate(region.astype(np.uint8), k).astype(bool)
    not_ring = cv2.dilate((zone_all | others).astype(np.uint8), k).astype(bool)
    for wy0, wy1, wx0, wx1 in wins:
        cy0, cy1, cx0, cx1 = max(0, wy0 - PAD), min(h, wy1 + PAD), max(0, wx0 - PAD), min(w, wx1 + PAD)
        ring = ~not_ring[cy0:cy1, cx0:cx1]
        zone = np.zeros(ring.shape, bool)
        zone[wy0 - cy0:wy1 - cy0, wx0 - cx0:wx1 - cx0] = True
        zone &= zone_all[cy0:cy1, cx0:cx1]
        if zone.any() and ring.sum() >= 0.25 * ring.size:
            yield (cy0, cy1, cx0, cx1), ring, zone


def _refine_region(image: np.ndarray, grey: np.ndarray, region: np.ndarray, others: np.ndarray,
                   refs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray | None:
    """New mask of one region (same size as the inputs), or None where the evidence is too weak."""
    out = np.zeros(region.shape, bool)
    contrasts, any_window = [], False
    for (cy0, cy1, cx0, cx1), ring, zone in region_windows(region, others):
        found = window_residual(image, grey, (cy0, cy1, cx0, cx1), ring, refs)
        if found is None:
            continue
        res, level = found
        high = res > level
        sel = zone & high
        if sel.any():
            # follow the residual beyond the old region, inside the window
            sel = regions_touching(high & ~others[cy0:cy1, cx0:cx1], sel)
            if sel.any():  # (empty when all of it lay in other regions)
                contrasts.append(float(np.median(res[sel])) / max(level, 1e-6))
        out[cy0:cy1, cx0:cx1] |= sel
        any_window = True
    if not any_window:
        return None
    line = is_elongated(region)
    if not line and (not contrasts or float(np.median(contrasts)) < MIN_CONTRAST):
        return None
    out = cv2.morphologyEx(out.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8)).astype(bool)
    out = regions_touching(out, region & out)  # parts that touch the old region
    area, old = int(out.sum()), int(region.sum())
    if not (MIN_KEEP * old <= area <= MAX_GROW * old) or area < 4:
        return None
    return out if line else out | region


def refine_with_reference(image: np.ndarray, mask: np.ndarray, references: np.ndarray | None = None) -> np.ndarray:
    """Refine every 8-connected region of ``mask`` (bool, image size) on ``image`` (HxWx3 uint8),
    matching against the image itself and the good ``references`` (n, h, w, 3)."""
    out = np.zeros(mask.shape, bool)
    for box, img, region, others, refs in regions_in_boxes(image, mask, references):
        new = _refine_region(img, _grey(img), region, others, refs)
        out[box] |= region if new is None else new
    return out


def regions_in_boxes(image: np.ndarray, mask: np.ndarray, references: np.ndarray | None
                     ) -> Iterator[tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray, list]]:
    """Each 8-connected region of ``mask`` with what a refinement of it reads: (box: slices of the
    image, the box's image as float32, the region and the other regions in the box, the reference
    crops as (colour, grey) float32 pairs). The box is the region grown by the refinement's reach."""
    if not mask.any():
        return
    refs = [(r, _grey(r)) for r in (x.astype(np.float32) for x in (references if references is not None else []))]
    n, cc, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    for r in range(1, n):
        x, y, bw, bh = (int(v) for v in stats[r, :4])
        box = _around(y, y + bh, x, x + bw, mask.shape)
        img = image[box].astype(np.float32)  # per box: a 12000 x 9000 image would be 1.3 GB as float
        region = cc[box] == r
        yield box, img, region, mask[box] & ~region, refs


def _around(y0: int, y1: int, x0: int, x1: int, shape: tuple[int, ...]) -> tuple[slice, slice]:
    """The box y0:y1, x0:x1 grown by everything a refinement of it reads (ring, search area,
    dilations), clipped to the image: work on it gives the same result as on the whole image,
    at a cost that does not grow with the image (a 12000 x 9000 scan has the same few regions)."""
    m = SEARCH + PAD + 2 * EXCLUDE + 2
    return slice(max(0, y0 - m), min(shape[0], y1 + m)), slice(max(0, x0 - m), min(shape[1], x1 + m))
