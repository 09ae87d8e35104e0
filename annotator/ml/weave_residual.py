"""Model 1's second look: the image with the weave's own spectrum taken out.

Why: model 1's patch memory compares 4-px patches with good fabric. A faint open-width crease is
a 1-3 px line that crosses the yarns where no gap belongs; patch by patch it looks like the gap
between two yarns, so its map rises in a few spots at most (five of six twill creases of the demo,
seed 0, stayed below most good images). A person sees it by its length and straightness. Summing
the evidence along a line on the image itself fails too: the weave's own gaps are long, straight
and just as dark (docs/benchmarks.md, sessions 11-13). They are also *periodic*, and a crease is
not. This is the classic move of fabric inspection (Fourier-domain restoration of the periodic
background): take out what every good image holds at the same spatial frequencies, then look.
A faint stain (a shading change of a few px) stands out there too, where the weave hid it.

1. Fit: the mean power spectrum ``P`` of the luminance of the good fit images, on ``N x N``
   windows (``N``: the largest power of two <= ``WINDOW`` that fits the smallest image).
2. Whitening: each window of an image is divided, in the frequency domain, by ``sqrt(P + eps)``
   (``eps``: the median of ``P``), and scaled to unit sd. The weave's frequencies (yarn pitch,
   gaps, twill diagonals), which hold most of the power, are damped; a line straight through the
   yarns, or a smooth stain, keeps its energy.
3. Two scores, the best window's (the window's frame, ``N / 16`` px, where its wrap-around shows,
   is left out):
   * *line*: the best path from top to bottom (and from left to right) on ``STEP``-row bands,
     moving at most 1 px per band (lines wobble and follow the weave's small tilt), darker or
     lighter than the fabric: its mean;
   * *spot*: the largest absolute value of the whitened window blurred with ``SPOT_SIGMA``.
4. Calibration (:func:`annotator.ml.prelabel.fit_prelabeller`): each score's mean and sd on the
   held-out good images make it a z-score, which counts ``MARGIN`` less (see there) and enters the
   image score in the map's units.

Measured: docs/benchmarks.md, "Session 14".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import cv2
import numpy as np

WINDOW = 256  # px: the largest window (a power of two); smaller images use a smaller one
MIN_WINDOW = 64  # px: images smaller than this get no second look
STEP = 8  # px: band height of the line's path; the path moves at most 1 px per band
EPS_QUANTILE = 0.5  # eps = this quantile of the mean power spectrum
SPOT_SIGMA = 6.0  # px: blur of the whitened window for the spot score
# Each detector is one more chance for a good image to look odd: its z-score counts this much less, so that
# its own good-image tail stays below the map's (see the comment at PrelabelConfig.weave_residual)
MARGIN = 1.0
# A texture without a period has no background to take out: there the whitened image's lines and spots are
# the texture's own, and every extra detector only lifts good images. Share of the spectrum's power (past the
# lowest 4 frequencies) in its strongest 0.5 % of frequencies (periodic_share): demo weaves 0.28-0.86 over 40
# random fabrics at 256-px windows (0.24-0.84 at 128 px; satin and some twills lowest, rib highest);
# scikit-image photographs at 128 px: brick 0.64, gravel 0.22, grass 0.14. Below this share the second look is
# off: on grass and gravel it cost image AUROC 0.728 -> 0.648 and 0.860 -> 0.785 (docs/benchmarks.md, session 14).
MIN_PERIODIC_SHARE = 0.25
_LUMA = np.array([0.114, 0.587, 0.299], np.float32)  # BGR -> luma


def window_size(shapes: Sequence[tuple[int, int]], cap: int = WINDOW) -> int:
    """The largest power of two <= ``cap`` that fits every (h, w); 0 when one is below MIN_WINDOW."""
    side = min(min(h, w) for h, w in shapes)
    if side < MIN_WINDOW:
        return 0
    return int(2 ** int(np.floor(np.log2(min(side, cap)))))


def _starts(n: int, size: int) -> list[int]:
    """Window starts along one axis: every ``size * 3 / 4`` px, the last flush with the end."""
    if n <= size:
        return [0]
    step = size * 3 // 4
    out = list(range(0, n - size, step))
    return out + [n - size]


def _luma(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, np.float32) @ _LUMA


def _windows(lum: np.ndarray, n: int):
    h, w = lum.shape
    for y in _starts(h, n):
        for x in _starts(w, n):
            win = lum[y:y + n, x:x + n]
            yield y, x, win - win.mean()


@dataclass
class LinePath:
    """The best line of an image: its score, and its centre (x, y) points in image px."""

    score: float
    points: np.ndarray  # (k, 2) int32, along the path


@dataclass
class Spot:
    """The strongest spot of an image: its score and its region (bool, image size): the blurred whitened
    image around the peak, above half the peak, of the peak's sign."""

    score: float
    region: np.ndarray


@dataclass
class Findings:
    line: Optional[LinePath]
    spot: Optional[Spot]


class WeaveResidual:
    """The fitted spectrum and both scores. Calibrate with :meth:`calibrate` before :meth:`z_line` / :meth:`z_spot`."""

    def __init__(self, spectrum: np.ndarray, calibration: Optional[dict] = None) -> None:
        self.spectrum = np.asarray(spectrum, np.float64)
        self.n = int(self.spectrum.shape[0])
        self.filter = 1.0 / np.sqrt(self.spectrum + np.quantile(self.spectrum, EPS_QUANTILE))
        cal = calibration or {}
        self.line_mu, self.line_sd = (float(x) for x in cal.get("line", (0.0, 1.0)))
        self.spot_mu, self.spot_sd = (float(x) for x in cal.get("spot", (0.0, 1.0)))

    @classmethod
    def fit(cls, images: Sequence[np.ndarray], cap: int = WINDOW) -> Optional["WeaveResidual"]:
        """From good images (HxWx3 uint8); None when they are too small (MIN_WINDOW) or their texture has
        no period (MIN_PERIODIC_SHARE)."""
        n = window_size([im.shape[:2] for im in images], cap)
        if not n:
            return None
        total, count = np.zeros((n, n), np.float64), 0
        for im in images:
            for _, _, win in _windows(_luma(im), n):
                total += np.abs(np.fft.fft2(win)) ** 2
                count += 1
        spectrum = total / count
        return cls(spectrum) if periodic_share(spectrum) >= MIN_PERIODIC_SHARE else None

    def calibrate(self, good: Sequence[Findings]) -> None:
        """Each score's mean and sd, from the findings on held-out good images."""
        self.line_mu, self.line_sd = _mean_sd([f.line.score for f in good if f.line is not None])
        self.spot_mu, self.spot_sd = _mean_sd([f.spot.score for f in good if f.spot is not None])

    def calibration(self) -> dict:
        return {"window": self.n, "line": [self.line_mu, self.line_sd], "spot": [self.spot_mu, self.spot_sd]}

    def z_line(self, score: float) -> float:
        return (score - self.line_mu) / self.line_sd

    def z_spot(self, score: float) -> float:
        return (score - self.spot_mu) / self.spot_sd

    def whiten(self, window: np.ndarray) -> np.ndarray:
        """A zero-mean ``n x n`` luminance window with the weave's spectrum taken out, in units of its sd."""
        out = np.real(np.fft.ifft2(np.fft.fft2(window) * self.filter)).astype(np.float32)
        return out / max(float(out.std()), 1e-6)

    def analyse(self, image: np.ndarray) -> Optional[Findings]:
        """The best line and the strongest spot of ``image`` (HxWx3 uint8), or None when it is smaller
        than the window."""
        lum = _luma(image)
        if min(lum.shape) < self.n:
            return None
        trim = max(self.n // 16, 2)
        line: Optional[LinePath] = None
        spot = None  # (score, y0, x0, blurred window, sign, peak y, peak x)
        for y0, x0, win in _windows(lum, self.n):
            white = self.whiten(win)
            for transposed in (False, True):
                plane = np.ascontiguousarray(white.T) if transposed else white
                found = _best_path_in(plane, trim)
                if found is not None and (line is None or found[0] > line.score):
                    score, xs, ys = found
                    if transposed:
                        xs, ys = ys, xs
                    line = LinePath(score, np.stack([xs + x0, ys + y0], 1).astype(np.int32))
            blurred = cv2.GaussianBlur(white, (0, 0), SPOT_SIGMA)
            inner = np.abs(blurred[trim:-trim, trim:-trim])
            py, px = np.unravel_index(int(np.argmax(inner)), inner.shape)
            if spot is None or inner[py, px] > spot[0]:
                py, px = py + trim, px + trim
                spot = (float(inner[py - trim, px - trim]), y0, x0, blurred, np.sign(blurred[py, px]), py, px)
        score, y0, x0, blurred, sign, py, px = spot
        above = (sign * blurred >= 0.5 * score).astype(np.uint8)
        _, cc = cv2.connectedComponents(above, connectivity=8)
        region = np.zeros(lum.shape, bool)
        region[y0:y0 + self.n, x0:x0 + self.n] = cc == cc[py, px]
        return Findings(line, Spot(score, region))

    def path_mask(self, path: LinePath, shape: tuple[int, int], width: int = 2) -> np.ndarray:
        """The path drawn ``width`` px wide (bool, ``shape``)."""
        out = np.zeros(shape, np.uint8)
        cv2.polylines(out, [path.points.reshape(-1, 1, 2)], False, 1, thickness=width)
        return out.astype(bool)


def periodic_share(spectrum: np.ndarray) -> float:
    """How periodic a texture is: the share of its power spectrum (past the lowest 4 frequencies: shading)
    in the strongest 0.5 % of its frequencies."""
    n = spectrum.shape[0]
    f = np.fft.fftfreq(n) * n
    power = np.sort(spectrum[np.hypot(f[:, None], f[None, :]) >= 4].ravel())[::-1]
    return float(power[:max(1, int(0.005 * power.size))].sum() / max(power.sum(), 1e-12))


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    s = np.asarray(values, np.float64)
    if s.size < 2:
        return (float(s.mean()) if s.size else 0.0), 1.0
    return float(s.mean()), float(max(s.std(), 1e-6 * max(abs(float(s.mean())), 1.0)))


def _best_path_in(plane: np.ndarray, trim: int) -> Optional[tuple[float, np.ndarray, np.ndarray]]:
    """(mean, xs, ys) of the best top-to-bottom path through ``plane`` (whitened, n x n), darker or
    lighter, on STEP-row bands moving at most 1 px per band, inside the frame of ``trim`` px."""
    n = plane.shape[0]
    inner = plane[trim:n - trim, trim:n - trim]
    bands = cv2.blur(inner, (1, STEP))[STEP // 2::STEP]
    if len(bands) < 2 or bands.shape[1] < 12:
        return None
    best = None
    for sign in (1.0, -1.0):
        s = sign * bands
        acc = s[0].astype(np.float64)
        back = np.zeros(s.shape, np.int8)
        for r in range(1, len(s)):
            left = np.r_[-np.inf, acc[:-1]]  # came from x - 1
            right = np.r_[acc[1:], -np.inf]  # came from x + 1
            choice = np.argmax(np.stack([left, acc, right]), 0)
            acc = np.choose(choice, [left, acc, right]) + s[r]
            back[r] = choice - 1
        end = int(np.argmax(acc[4:-4])) + 4  # not along the frame's edge
        mean = float(acc[end] / len(s))
        if best is None or mean > best[0]:
            xs = np.empty(len(s), np.int64)
            xs[-1] = end
            for r in range(len(s) - 1, 0, -1):
                xs[r - 1] = xs[r] + back[r, xs[r]]
            ys = np.arange(len(s)) * STEP + STEP // 2
            xs, ys = _extent(xs + trim, ys + trim, s[np.arange(len(s)), xs], n)
            best = (mean, xs, ys)
    return best


def _extent(xs: np.ndarray, ys: np.ndarray, evidence: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The stretch of a path that holds the line: its ends trimmed to where the evidence along it (each band's
    value, averaged with its neighbours) reaches half its median; an end that is not trimmed runs on to the
    window's edge (``size`` px), as most lines do."""
    ones = np.ones(3)
    ev = np.convolve(evidence, ones, mode="same") / np.convolve(np.ones(len(evidence)), ones, mode="same")
    on = np.flatnonzero(ev >= 0.5 * max(float(np.median(evidence)), 1e-6))
    if on.size == 0:
        return xs, ys
    a, b = int(on[0]), int(on[-1])
    xs, ys = xs[a:b + 1], ys[a:b + 1]
    if a == 0:
        xs, ys = np.r_[xs[0], xs], np.r_[0, ys]
    if b == len(evidence) - 1:
        xs, ys = np.r_[xs, xs[-1]], np.r_[ys, size - 1]
    return xs, ys
