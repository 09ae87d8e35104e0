"""Does the image itself show a labelled area to be unlike the fabric around it?

The checkers (model 2) learn each defect kind from the few labelled examples their subset
holds; on kinds they fit badly (faint creases, mis-yarns, knots) they predict only part of a
correct label, or nothing, and the IoU rule then flags a label that is right. Measured on
`annotator bench checkers`: 35 of 37 correct labels that were flagged had every predicted
pixel inside the label. The label errors that leave label pixels unpredicted are of two
kinds, and both lie on normal fabric: a *false region* (a stray mark) and the ring of an
*expanded* label. So the question the checker could not answer can be asked of the image:
are the label pixels the checker did not predict different from the fabric around them?

:func:`supported_by_image` answers it for each connected piece ``E`` of a candidate mask by a
permutation test that needs no training and no threshold on colours:

* statistics: how ``E``'s pixels differ from the fabric in a ring around it (outside the
  whole label): the difference of their mean colours; the RMS distance of ``E``'s pixels
  to the ring's mean colour over the ring's own RMS spread (a knot or a hole edge can keep the
  mean colour and still differ pixel by pixel); and the log ratio of their mean gradient
  magnitudes (a smear or a soft stain flattens the fine texture);
* null distribution: the same shape (piece and ring together) moved to ``placements`` other
  places in the same image, away from every label and prediction, where the fabric is in the
  same phase of its weave: the shifts are taken in order of the image's autocorrelation
  (a woven or knitted texture repeats; a thin line laid along a knit's wale and the same
  line laid between two wales differ more than a faint defect does, so random shifts would
  hide it). On a texture without a repeat the best shifts are simply the nearest ones;
* the piece is *supported* when any statistic lies as far from the placements' average as
  only a share ``alpha`` of the placements do (Bonferroni over the statistics), and by at least
  ``min_effect`` (``SupportTest.min_effect``): on a large piece the placements agree so closely
  that a departure too small to see would otherwise count.

Pure numpy + OpenCV; windows around each piece keep the cost independent of the image size.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from . import masks as M


MAX_TRIES = 50  # shifts examined per placement wanted, at most (most are refused where labels crowd the window)


@dataclass(frozen=True)
class SupportTest:
    ring: tuple[int, int] = (2, 6)  # px: the fabric compared with lies between these distances from the label
    # Null size, significance and search window: chosen on `annotator bench checkers` (demo data,
    # two draws, IoU 1 px rule without the rim and band tests of FlagRules, precision / recall; the flags of the checkers alone 0.35 / 0.96
    # and 0.34 / 0.96): 100 placements at alpha 0.02 within 96 px 0.79 / 0.96 and 0.51 / 0.92;
    # within 160 px 0.77 / 0.96 and 0.50 / 0.88; the whole image 0.77 / 0.96 and 0.50 / 0.88;
    # 60 placements at alpha 0.05 within 160 px 0.82 / 0.96 and 0.51 / 0.88.
    placements: int = 100  # shifted copies of the piece that form the null distribution
    min_placements: int = 20  # fewer possible placements: the piece cannot be tested (not supported)
    # significance over the statistics together (Bonferroni): 0.03 with 100 placements supports a piece that lies
    # beyond every placement on at least one of the three statistics (3 / 101 = 0.0297), as 0.02 did for two
    alpha: float = 0.03
    min_px: int = 3  # smaller pieces are not tested
    margin: int = 96  # px of image around a piece searched for placements
    max_piece: int = 256  # px: larger pieces are tested in parts of at most this size
    keep_out: int = 8  # px: placements stay this far from every label and predicted pixel
    # A third statistic: the piece's mean gradient magnitude against its ring's (log ratio). A soft blob or a
    # smear on a natural texture flattens the fine texture while large-scale shading hides its colour shift.
    # `annotator bench checkers`, IoU 1 px: demo (twill, knit) precision / recall 0.793 / 0.958 -> 0.821 / 0.958;
    # scikit-image photographs (brick, grass, gravel) 0.333 / 0.733 -> 0.349 / 0.733. With 150 placements at
    # alpha 0.02 (stricter per statistic) the demo lost precision (0.719: knots). Not used for the rim outside a
    # label (flags.iou_flag): the gradient beside the label's own edge supported the plain fabric there.
    texture: bool = True
    # Smallest departure from the placements' average that lets a statistic support a piece: the colour
    # difference in units of the ring's RMS spread, the RMS ratio, the gradient log ratio. Without it a large
    # piece passes on a difference too small to see: the 2-px outer band of an expanded label around a twill
    # mis-yarn (841 px) had a gradient log ratio 0.106 from the placements' average, beyond all 100 of them,
    # and the flag was lifted. `annotator bench checkers` (default rules), precision / recall:
    # - seed 1: 0.750 / 0.875 -> 0.759 / 0.917;
    # - seeds 0 and 2 and the photographs: unchanged;
    # - the three demo draws pooled: 0.802 / 0.903 -> 0.805 / 0.917.
    # Other floors (docs/benchmarks.md):
    # - 0.1: nothing changed;
    # - 0.2: seed 1 0.733 / 0.917;
    # - 0.3: seed 0 precision 0.917 -> 0.846 (knots), photographs 0.349 / 0.733 -> 0.359 / 0.767.
    # 0 = significance alone.
    min_effect: float = 0.15


@dataclass(frozen=True)
class PieceResult:
    area: int
    bbox: tuple[int, int, int, int]  # x, y, w, h
    mean_distance: float
    rms_ratio: float
    p_value: float  # Bonferroni-corrected over the statistics; 1.0 when not testable
    placements: int
    supported: bool
    gradient_log_ratio: float | None = None  # the texture statistic (SupportTest.texture), else None
    # the largest departure from the placements' average among the significant statistics, in the units of
    # SupportTest.min_effect (0 when none is significant): why a piece with a small p may still be unsupported
    effect: float = 0.0

    def to_dict(self) -> dict:
        out = {"area": self.area, "bbox": list(self.bbox), "mean_distance": round(self.mean_distance, 2),
               "rms_ratio": round(self.rms_ratio, 3), "p": round(self.p_value, 4),
               "placements": self.placements, "supported": self.supported, "effect": round(self.effect, 3)}
        if self.gradient_log_ratio is not None:
            out["gradient_log_ratio"] = round(self.gradient_log_ratio, 3)
        return out


def _spread(colours: np.ndarray) -> float:
    """RMS distance of ``colours`` (N x C) to their mean colour (at least 1e-6)."""
    return max(float(np.sqrt(((colours - colours.mean(0)) ** 2).sum(1).mean())), 1e-6)


def _stats(pixels: np.ndarray, ring: np.ndarray, texture: bool = False) -> np.ndarray:
    """(mean colour of the piece - mean colour of the ring, per channel ..., RMS distance of the
    piece's pixels to the ring's mean / the ring's own RMS spread[, log of the piece's mean
    gradient magnitude over the ring's]). With ``texture`` the last column of ``pixels`` and
    ``ring`` is the gradient magnitude, the others are colours."""
    if texture:
        grad = float(np.log((pixels[:, -1].mean() + 1.0) / (ring[:, -1].mean() + 1.0)))
        pixels, ring = pixels[:, :-1], ring[:, :-1]
    centre = ring.mean(0)
    rms = float(np.sqrt(((pixels - centre) ** 2).sum(1).mean())) / _spread(ring)
    out = np.append(pixels.mean(0) - centre, rms)
    return np.append(out, grad) if texture else out


def _shifts_by_autocorrelation(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) of every shift of ``grey`` whose two copies overlap by at least a quarter in each
    direction, ordered from the most to the least self-similar (normalised autocorrelation)."""
    h, w = grey.shape
    g = grey.astype(np.float32) - float(grey.mean())
    size = (cv2.getOptimalDFTSize(2 * h), cv2.getOptimalDFTSize(2 * w))
    f = np.fft.rfft2(g, s=size)
    ac = np.fft.irfft2(f * np.conj(f), s=size)
    ones = np.fft.rfft2(np.ones_like(g), s=size)
    overlap = np.fft.irfft2(ones * np.conj(ones), s=size)
    ac = ac / np.maximum(overlap, 1.0)  # mean product per overlapping pixel
    dy, dx = np.meshgrid(np.arange(-(h - 1), h), np.arange(-(w - 1), w), indexing="ij")
    ok = (np.abs(dy) <= 3 * h // 4) & (np.abs(dx) <= 3 * w // 4) & ((np.abs(dy) >= 3) | (np.abs(dx) >= 3))
    vals = ac[dy[ok] % size[0], dx[ok] % size[1]]
    order = np.argsort(-vals, kind="stable")
    return dy[ok][order], dx[ok][order]


def _test_piece(img: np.ndarray, shifts: tuple[np.ndarray, np.ndarray], piece: np.ndarray, label: np.ndarray,
                busy: np.ndarray, t: SupportTest, origin: tuple[int, int]) -> PieceResult:
    """Test one piece; every array is a crop around it (the search window), ``origin`` its (x, y);
    ``shifts``: the window's shifts by autocorrelation."""
    ys, xs = np.nonzero(piece)
    bbox = (int(xs.min()) + origin[0], int(ys.min()) + origin[1], int(xs.max() - xs.min() + 1),
            int(ys.max() - ys.min() + 1))
    ring = M.dilate(piece, t.ring[1]) & ~M.dilate(label, t.ring[0])
    area = int(piece.sum())
    if ring.sum() < 10:
        return PieceResult(area, bbox, 0.0, 0.0, 1.0, 0, False)
    stat = _stats(img[piece], img[ring], t.texture)
    # the shape that moves: piece + ring
    ys, xs = np.nonzero(piece | ring)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    pc, rc = piece[y0:y1, x0:x1], ring[y0:y1, x0:x1]
    shape = pc | rc
    h, w = piece.shape
    dys, dxs = shifts
    inside = (y0 + dys >= 0) & (x0 + dxs >= 0) & (y1 + dys <= h) & (x1 + dxs <= w)
    dys, dxs = dys[inside][: MAX_TRIES * t.placements], dxs[inside][: MAX_TRIES * t.placements]
    null: list[np.ndarray] = []
    for dy, dx in zip(dys.tolist(), dxs.tolist()):
        ny0, nx0 = y0 + dy, x0 + dx
        if (busy[ny0:ny0 + y1 - y0, nx0:nx0 + x1 - x0] & shape).any():
            continue
        sub = img[ny0:ny0 + y1 - y0, nx0:nx0 + x1 - x0]
        null.append(_stats(sub[pc], sub[rc], t.texture))
        if len(null) >= t.placements:
            break
    k = 2 if t.texture else 1  # scalar statistics after the colour difference
    colour = slice(0, len(stat) - k)
    mean_d = float(np.linalg.norm(stat[colour]))
    grad = float(stat[-1]) if t.texture else None
    if len(null) < t.min_placements:
        return PieceResult(area, bbox, mean_d, float(stat[-k]), 1.0, len(null), False, grad)
    arr = np.asarray(null)
    centre = arr.mean(0)
    # distances from the null's centre: a piece is unusual whichever way it departs from what
    # this shape shows elsewhere in the fabric (a dark line on a bright column comes out *closer*
    # to the ring's mean colour than the column it replaces)
    d_obs = [float(np.linalg.norm(stat[colour] - centre[colour]))] + [abs(float(stat[j] - centre[j]))
                                                                      for j in range(-k, 0)]
    d_null = [np.linalg.norm(arr[:, colour] - centre[colour], axis=1)] + [np.abs(arr[:, j] - centre[j])
                                                                          for j in range(-k, 0)]
    p = [(1 + int((dn >= do).sum())) / (len(arr) + 1) for do, dn in zip(d_obs, d_null)]
    p_value = min(1.0, len(p) * min(p))
    # effect sizes in the statistics' own units (the colour one over the ring's spread)
    effects = [d_obs[0] / _spread(img[ring][:, : len(stat) - k])] + d_obs[1:]
    effect = float(max((e for pj, e in zip(p, effects) if len(p) * pj <= t.alpha), default=0.0))
    supported = p_value <= t.alpha and effect >= t.min_effect
    return PieceResult(area, bbox, mean_d, float(stat[-k]), p_value, len(arr), supported, grad, effect)


def supported_by_image(image: np.ndarray, label: np.ndarray, candidate: np.ndarray, avoid: np.ndarray | None = None,
                       test: SupportTest = SupportTest()) -> tuple[np.ndarray, list[PieceResult]]:
    """The pixels of ``candidate`` (bool, image size) that lie in pieces the image supports as
    unlike the fabric around ``label``, and the result of each tested piece.

    ``label``: the whole labelled mask (the ring of normal fabric is taken outside it);
    ``avoid``: more pixels the shifted copies must keep away from (e.g. a checker's prediction).
    """
    label = M.as_bool(label)
    candidate = M.as_bool(candidate)
    if image.shape[:2] != label.shape or candidate.shape != label.shape:
        raise ValueError(f"image {image.shape[:2]}, label {label.shape} and candidate {candidate.shape} differ in size")
    out = np.zeros(label.shape, bool)
    if not candidate.any():
        return out, []
    busy_all = label | candidate if avoid is None else label | candidate | M.as_bool(avoid)
    n, cc, stats, _ = cv2.connectedComponentsWithStats(candidate.astype(np.uint8), connectivity=8)
    H, W = label.shape
    grow = test.margin + test.ring[1] + test.keep_out + 1
    results = []
    shifts: dict = {}  # per search window: pieces of a small image share the whole image's
    for r in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[r])
        if area < test.min_px:
            continue
        # a long or large piece is tested in parts of at most max_piece px a side: the window
        # (and its autocorrelation) stays small, and each stretch of a long line is judged alone
        for cy0, cy1 in M.spans(y, y + bh, test.max_piece):
            for cx0, cx1 in M.spans(x, x + bw, test.max_piece):
                ys = slice(max(0, cy0 - grow), min(H, cy1 + grow))
                xs = slice(max(0, cx0 - grow), min(W, cx1 + grow))
                piece = cc[ys, xs] == r
                piece[: cy0 - ys.start] = False
                piece[cy1 - ys.start:] = False
                piece[:, : cx0 - xs.start] = False
                piece[:, cx1 - xs.start:] = False
                if piece.sum() < test.min_px:
                    continue
                img = image[ys, xs].astype(np.float32)  # per window: the cost does not grow with the image
                img = img[..., None] if img.ndim == 2 else img
                grey = img.mean(-1)
                if test.texture:
                    grad = np.abs(cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)) + np.abs(cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3))
                    img = np.concatenate([img, grad[..., None]], -1)
                busy = M.dilate(busy_all[ys, xs], test.keep_out) if test.keep_out > 0 else busy_all[ys, xs]
                key = (ys.start, ys.stop, xs.start, xs.stop)
                if key not in shifts:
                    shifts[key] = _shifts_by_autocorrelation(grey)
                res = _test_piece(img, shifts[key], piece, label[ys, xs], busy, test, (xs.start, ys.start))
                results.append(res)
                if res.supported:
                    out[ys, xs] |= piece
    return out, results
