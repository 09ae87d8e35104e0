"""Synthetic fabric photographs with exact ground-truth defect masks.

Used by the built-in demo project, the tests and the benchmarks: nothing is
downloaded. The images are rendered procedurally (vectorised numpy + OpenCV):

* woven fabrics ("plain", "twill", "satin") are a height field of interlaced warp
  (vertical) and weft (horizontal) yarns with round cross-sections, crossing
  dips, uneven spacing and thickness, fibre streaks and twist;
* knits ("knit" = single jersey, "rib" = 1x1 rib) are columns of V-shaped loop
  legs (wales) stacked in courses; rib alternates raised face wales and recessed
  back wales;
* the height field is shaded with one light from the upper left and ambient
  occlusion, then mapped through a small per-image rotation (up to +-2 deg), a
  weave phase offset and a smooth displacement, optically blurred, lit with a
  gradient and vignetting, scaled in brightness (+-8 %) and given sensor noise.

Defects are painted onto a finished image by :func:`add_defect`, which returns the
defective image and a crisp 0/255 mask. Every defect is composited as layers of
(alpha, target) whose small alpha tails are cut off before compositing, so the
mask is exactly the set of pixels the defect touched: pixels outside the mask are
bit-identical to the input, thin lines have masks exactly as wide as drawn. A defect
fainter than ``VISIBILITY_FLOOR`` has its colour change scaled up to it (labelled
defects are ones a person saw; ``min_visibility=0`` keeps them as painted).

Geometry conventions: images are ``H x W x 3`` uint8 BGR; the warp / wales run
down the image (along the fabric length), the weft / courses across it. Only
stdlib, numpy and cv2 are imported here (``annotator.core`` rule).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np

__all__ = [
    "STYLES",
    "PALETTES",
    "DEFECT_KINDS",
    "THIN_LINE_KINDS",
    "FabricSpec",
    "RenderInfo",
    "random_spec",
    "render_fabric",
    "render_fabric_info",
    "add_defect",
    "render_sample",
    "write_demo_mvtec",
]

STYLES: tuple[str, ...] = ("plain", "twill", "satin", "knit", "rib")
WOVEN_STYLES = ("plain", "twill", "satin")
KNIT_STYLES = ("knit", "rib")

DEFECT_KINDS: tuple[str, ...] = (
    "mis_yarn",
    "broken_needle",
    "open_width",
    "hole",
    "stain",
    "knot",
    "slub",
)
#: Kinds drawn as thin lines (mask width 1-4 px across the line).
THIN_LINE_KINDS: tuple[str, ...] = ("mis_yarn", "broken_needle", "open_width")

#: Default floor of a defect's visibility (see :func:`visibility`). Painted as modelled, the
#: weakest kinds came out at 0.4-0.6 (a knit's mis-yarn, stains, a slub's mean change), and
#: knots on knits were found by neither a person looking at the image nor any model; a
#: labelled defect is one QA staff saw, so the demo lifts every defect to this floor.
#: ``min_visibility=0`` keeps the subtle set (used by the benchmarks' ``--subtle`` runs).
VISIBILITY_FLOOR: float = 1.0

#: Yarn colour palettes: name -> (warp RGB, weft RGB, melange strength). Knits use
#: the warp colour. Colours are the lit top of a yarn; the average image is darker.
PALETTES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], float]] = {
    "greige": ((204, 194, 174), (196, 188, 170), 0.0),
    "white": ((216, 216, 210), (212, 213, 208), 0.0),
    "denim": ((54, 76, 124), (172, 168, 158), 0.0),
    "navy": ((52, 60, 102), (58, 66, 108), 0.0),
    "charcoal": ((86, 86, 90), (94, 94, 97), 0.0),
    "heather": ((160, 160, 162), (156, 156, 158), 1.0),
    "red": ((178, 44, 52), (168, 40, 48), 0.0),
    "olive": ((118, 122, 72), (110, 114, 66), 0.0),
    "sky": ((128, 170, 212), (136, 176, 214), 0.0),
}

# light from the upper left (x right, y down, z towards the camera)
_LIGHT = np.array([-0.42, -0.5, 0.76], dtype=np.float32)
_LIGHT /= np.linalg.norm(_LIGHT)
_AMBIENT, _DIFFUSE = 0.38, 0.62
_FLAT_SHADE = _AMBIENT + _DIFFUSE * float(_LIGHT[2])


def _rgb2bgr(c: Iterable[int]) -> tuple[int, int, int]:
    r, g, b = c
    return (int(b), int(g), int(r))


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class FabricSpec:
    """One fabric product: everything that is the same on every image of it.

    Per-image variation (weave phase, rotation, lighting, noise) is drawn from the
    generator passed to :func:`render_fabric`, within the limits given here.
    """

    style: str = "twill"
    palette: str = "denim"
    warp_bgr: tuple[int, int, int] = _rgb2bgr(PALETTES["denim"][0])
    weft_bgr: tuple[int, int, int] = _rgb2bgr(PALETTES["denim"][1])
    melange: float = 0.0  # heather: strong fibre-to-fibre brightness variation
    period: float = 7.0  # px between warp yarns (woven) / wale width (knits)
    period_weft: float = 6.5  # px between weft yarns / course height (knits)
    cover: float = 0.86  # yarn diameter as a fraction of its period (warp / knit yarn)
    cover_weft: float = 0.86  # weft yarn diameter as a fraction of the weft period
    weave: tuple[tuple[int, ...], ...] = ()  # woven repeat: weave[j][i] = warp i over weft j
    irregularity: float = 0.06  # relative std of yarn thickness / spacing
    yarn_variation: float = 0.03  # relative std of brightness from yarn to yarn (dye, twist)
    fibre: float = 0.09  # fibre streak contrast
    relief: float = 0.8  # strength of the 3-D shading
    noise_sigma: float = 2.2  # sensor read noise, grey levels
    blur_sigma: float = 0.6  # optical blur, px
    backing_bgr: tuple[int, int, int] = (24, 24, 26)  # what shows through holes
    # per-image variation limits
    rotation_deg: float = 2.0
    brightness: float = 0.08
    gradient: float = 0.08  # lighting gradient across the image (relative)
    vignetting: float = 0.12
    blur_jitter: float = 0.25

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weave"] = [list(r) for r in self.weave]
        return d


def _twill(up: int, down: int, direction: int) -> tuple[tuple[int, ...], ...]:
    n = up + down
    return tuple(tuple(int((i + direction * j) % n < up) for i in range(n)) for j in range(n))


def _satin(n: int, step: int) -> tuple[tuple[int, ...], ...]:
    # warp-faced satin: each warp goes under exactly one weft per repeat
    return tuple(tuple(int((j - step * i) % n != 0) for i in range(n)) for j in range(n))


def random_spec(
    rng: np.random.Generator | int | None = None,
    style: str | None = None,
    palette: str | None = None,
) -> FabricSpec:
    """A random plausible fabric product of the given (or a random) style."""
    rng = _as_rng(rng)
    if style is None:
        style = STYLES[int(rng.integers(len(STYLES)))]
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    if palette is None:
        names = list(PALETTES)
        if style != "twill":
            names.remove("denim")  # indigo warp on ecru weft is a twill look
        if style == "satin":
            names.remove("heather")  # satin is a smooth filament fabric, not melange
        if style == "twill" and rng.random() < 0.35:
            palette = "denim"
        else:
            palette = names[int(rng.integers(len(names)))]
    if palette not in PALETTES:
        raise ValueError(f"unknown palette {palette!r}; expected one of {tuple(PALETTES)}")
    warp, weft, mel = PALETTES[palette]
    if style in KNIT_STYLES:
        weft = warp

    weave: tuple[tuple[int, ...], ...] = ()
    if style == "plain":
        weave = ((1, 0), (0, 1))
        period = rng.uniform(5.5, 8.0)
        period_weft = period * rng.uniform(0.85, 1.1)
        cover = rng.uniform(0.84, 0.93)
        cover_weft = rng.uniform(0.84, 0.93)
        fibre = rng.uniform(0.07, 0.11)
    elif style == "twill":
        # mostly warp-faced (2/1, 3/1 as in denim and drill), sometimes balanced 2/2
        if palette == "denim":
            up, down = 3, 1
        else:
            up, down = (2, 1) if rng.random() < 0.7 else (2, 2)
        weave = _twill(up, down, 1 if rng.random() < 0.5 else -1)
        period = rng.uniform(4.8, 6.8)
        period_weft = period * rng.uniform(1.0, 1.25)
        cover = rng.uniform(0.9, 0.97)
        cover_weft = rng.uniform(0.75, 0.88) if up > down else cover
        fibre = rng.uniform(0.07, 0.11)
    elif style == "satin":
        n, step = [(5, 2), (5, 3), (8, 3)][int(rng.integers(3))]
        weave = _satin(n, step)
        period = rng.uniform(4.0, 5.5)
        period_weft = period * rng.uniform(1.1, 1.4)
        cover = rng.uniform(1.0, 1.08)  # flat filament yarns close up: no gaps
        cover_weft = rng.uniform(0.8, 0.95)
        fibre = rng.uniform(0.04, 0.07)  # smooth, lustrous filament
    elif style == "knit":
        period = rng.uniform(7.5, 10.5)
        period_weft = period * rng.uniform(0.68, 0.82)
        cover = rng.uniform(0.85, 0.95)
        cover_weft = cover
        fibre = rng.uniform(0.08, 0.12)
    else:  # rib
        period = rng.uniform(7.5, 10.0)
        period_weft = period * rng.uniform(0.65, 0.8)
        cover = rng.uniform(0.88, 0.97)
        cover_weft = cover
        fibre = rng.uniform(0.08, 0.12)

    backing = int(rng.integers(14, 40))
    return FabricSpec(
        style=style,
        palette=palette,
        warp_bgr=_rgb2bgr(warp),
        weft_bgr=_rgb2bgr(weft),
        melange=float(mel),
        period=float(period),
        period_weft=float(period_weft),
        cover=float(cover),
        cover_weft=float(cover_weft),
        weave=weave,
        irregularity=float(rng.uniform(0.04, 0.08)),
        # ring-dyed indigo warp varies a lot from yarn to yarn
        yarn_variation=float(rng.uniform(0.07, 0.1) if palette == "denim" else rng.uniform(0.02, 0.04)),
        fibre=float(fibre),
        relief=float(rng.uniform(0.55, 0.75) if style == "satin" else rng.uniform(0.65, 1.0)),
        noise_sigma=float(rng.uniform(1.6, 2.8)),
        blur_sigma=float(rng.uniform(0.45, 0.8)),
        backing_bgr=(backing, backing, int(backing + rng.integers(0, 6))),
    )


# ----------------------------------------------------------------- noise helpers

_F32 = np.float32


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Zero-mean, roughly unit-std noise that varies over about ``cell`` px."""
    h, w = shape
    gh = max(2, int(math.ceil(h / cell)) + 2)
    gw = max(2, int(math.ceil(w / cell)) + 2)
    g = rng.standard_normal((gh, gw), dtype=_F32)
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)


def _streak_noise(rng: np.random.Generator, shape: tuple[int, int], sx: float, sy: float,
                  shear: float = 0.0, white: np.ndarray | None = None) -> np.ndarray:
    """Unit-std noise blurred anisotropically (streaks along the larger sigma).

    ``shear`` slants vertical streaks to run along ``dx/dy = shear``.
    """
    n = rng.standard_normal(shape, dtype=_F32) if white is None else white
    ksize = (2 * int(math.ceil(2.5 * sx)) + 1, 2 * int(math.ceil(2.5 * sy)) + 1)
    n = cv2.GaussianBlur(n, ksize, sigmaX=sx, sigmaY=sy, borderType=cv2.BORDER_REFLECT)
    # std of blurred white noise is about 1 / sqrt(4 pi sx sy)
    n *= _F32(math.sqrt(4.0 * math.pi * max(sx, 0.6) * max(sy, 0.6)))
    if shear:
        h, w = shape
        m = np.array([[1.0, -shear, shear * h / 2.0], [0.0, 1.0, 0.0]], np.float32)
        n = cv2.warpAffine(n, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return n


def _yarn_grid(rng: np.random.Generator, n_px: int, period: float, jitter: float,
               pattern: tuple[float, ...] = (1.0,)) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Split ``n_px`` pixels into yarns of jittered widths, with a random phase.

    ``pattern`` repeats relative widths (rib: wide face wale, narrow back wale).
    Returns per-pixel yarn index, position across the yarn (0..1), yarn width in
    px, and the number of yarns.
    """
    n = int(n_px / (0.6 * period * min(pattern))) + 6
    widths = np.resize(np.asarray(pattern, np.float64), n) * period
    widths *= np.clip(1.0 + jitter * rng.standard_normal(n), 0.75, 1.25)
    edges = np.concatenate([[0.0], np.cumsum(widths)])
    edges -= rng.uniform(0.0, float(widths[0]))
    x = np.arange(n_px, dtype=np.float64) + 0.5
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, n - 1)
    frac = (x - edges[idx]) / widths[idx]
    return idx, frac.astype(_F32), widths[idx].astype(_F32), n


# ------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class RenderInfo:
    """A rendered image and its per-image geometry (what :func:`add_defect` aligns to).

    ``angle_deg`` is the weave rotation: the warp (fabric length) runs along
    ``dx/dy = tan(angle)``, the weft along ``dy/dx = -tan(angle)``.
    """

    image: np.ndarray
    angle_deg: float
    brightness: float


def _shade(height: np.ndarray, scale: float) -> np.ndarray:
    """Lambert shading + ambient occlusion of a unitless height field (1.0 = flat top)."""
    hb = cv2.GaussianBlur(height, (0, 0), 0.7)
    k = _F32(scale / 8.0)
    gx = cv2.Sobel(hb, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(hb, cv2.CV_32F, 0, 1, ksize=3)
    gx *= k
    gy *= k
    ndotl = (_LIGHT[2] - gx * _LIGHT[0] - gy * _LIGHT[1]) / np.sqrt(1.0 + gx * gx + gy * gy)
    shade = (_AMBIENT + _DIFFUSE * np.maximum(ndotl, 0.0)) * _F32(1.0 / _FLAT_SHADE)
    shade *= 0.5 + 0.25 * np.clip(height + 1.0, 0.0, 2.0)  # ambient occlusion
    return shade


def _render_woven(spec: FabricSpec, rng: np.random.Generator, hc: int, wc: int):
    P = np.asarray(spec.weave, dtype=bool)
    R_j, R_i = P.shape
    irr = spec.irregularity
    xi, fu, _, n_w = _yarn_grid(rng, wc, spec.period, irr * 0.5)
    yj, fv, _, n_f = _yarn_grid(rng, hc, spec.period_weft, irr * 0.5)
    ci = (xi + int(rng.integers(R_i))) % R_i
    cj = (yj + int(rng.integers(R_j))) % R_j

    # one gather of a per-cell code: warp-over bit + "same state as neighbour" bits
    up_, dn_, lf_, rt_ = (np.roll(P, 1, 0), np.roll(P, -1, 0), np.roll(P, 1, 1), np.roll(P, -1, 1))
    table = (P.astype(np.uint8) | (up_ == P) << 1 | (dn_ == P) << 2 | (lf_ == P) << 3 | (rt_ == P) << 4)
    code = table.astype(np.uint8)[np.ix_(cj, ci)]
    S = (code & 1).astype(bool)

    # yarn diameter: per yarn, and slowly varying along its length
    tw = np.clip(1.0 + irr * rng.standard_normal(n_w, dtype=_F32), 0.8, 1.2)
    tf = np.clip(1.0 + irr * rng.standard_normal(n_f, dtype=_F32), 0.8, 1.2)
    along_w = cv2.resize(rng.standard_normal((n_w, hc // 12 + 3), dtype=_F32), (hc, n_w),
                         interpolation=cv2.INTER_CUBIC)  # (n_w, hc)
    along_f = cv2.resize(rng.standard_normal((n_f, wc // 12 + 3), dtype=_F32), (wc, n_f),
                         interpolation=cv2.INTER_CUBIC)  # (n_f, wc)
    thick_w = (spec.cover * tw[xi])[None, :] * (1.0 + 0.8 * irr * along_w[xi].T)
    thick_f = (spec.cover_weft * tf[yj])[:, None] * (1.0 + 0.8 * irr * along_f[yj])

    dw = np.abs(fu - 0.5)[None, :] * 2.0 / thick_w
    df = np.abs(fv - 0.5)[:, None] * 2.0 / thick_f
    in_w = dw < 1.0
    in_f = df < 1.0
    hw = np.sqrt(np.clip(1.0 - dw * dw, 0.0, 1.0))
    hf = np.sqrt(np.clip(1.0 - df * df, 0.0, 1.0))

    # crossing dips: a yarn dives towards the cell edge where its neighbour changes state
    dip_t = np.sin(np.pi * np.minimum(fv, 0.5))[:, None]
    dip_b = np.sin(np.pi * np.minimum(1.0 - fv, 0.5))[:, None]
    zw = np.minimum(np.where(code & 2, _F32(1), dip_t), np.where(code & 4, _F32(1), dip_b))
    dip_l = np.sin(np.pi * np.minimum(fu, 0.5))[None, :]
    dip_r = np.sin(np.pi * np.minimum(1.0 - fu, 0.5))[None, :]
    zf = np.minimum(np.where(code & 8, _F32(1), dip_l), np.where(code & 16, _F32(1), dip_r))
    Hw = np.where(S, zw, -zw) * 0.55 + hw * 0.45
    Hf = np.where(S, -zf, zf) * 0.55 + hf * 0.45
    vis_w = in_w & ((Hw >= Hf) | ~in_f)
    vis_f = in_f & ~vis_w
    height = np.where(vis_w, Hw, np.where(vis_f, Hf, _F32(-1.1)))

    # albedo: yarn colour x per-yarn shade x fibre streaks x faint ply twist
    fib = spec.fibre + 0.1 * spec.melange
    white = rng.standard_normal((hc, wc), dtype=_F32)
    nw = _streak_noise(rng, (hc, wc), 0.5, 2.4, white=white)
    nf = _streak_noise(rng, (hc, wc), 2.4, 0.5, white=white)
    var = spec.yarn_variation + 0.05 * spec.melange
    yarn_w = (1.0 + var * rng.standard_normal(n_w, dtype=_F32))[xi][None, :]
    yarn_f = (1.0 + var * rng.standard_normal(n_f, dtype=_F32))[yj][:, None]
    ph = rng.uniform(0, 2 * np.pi)
    # twist: cos(a(y) + b(x)) written as a separable sum of outer products
    a_w = np.arange(hc, dtype=_F32) * _F32(2 * np.pi / (0.9 * spec.period)) + _F32(ph)
    b_w = fu * _F32(2 * np.pi * 0.9)
    twist_w = np.cos(a_w)[:, None] * np.cos(b_w)[None, :] - np.sin(a_w)[:, None] * np.sin(b_w)[None, :]
    a_f = np.arange(wc, dtype=_F32) * _F32(2 * np.pi / (0.9 * spec.period_weft)) + _F32(ph)
    b_f = fv * _F32(2 * np.pi * 0.9)
    twist_f = np.cos(b_f)[:, None] * np.cos(a_f)[None, :] - np.sin(b_f)[:, None] * np.sin(a_f)[None, :]
    mod = np.where(vis_w, yarn_w * (1.0 + fib * nw + 0.04 * twist_w), yarn_f * (1.0 + fib * nf + 0.04 * twist_f))
    warp = np.asarray(spec.warp_bgr, _F32)
    weft = np.asarray(spec.weft_bgr, _F32)
    lut = np.stack([0.3 * np.minimum(warp, weft), warp, weft])
    which = vis_w.view(np.uint8) + 2 * vis_f.view(np.uint8)  # 0 gap, 1 warp, 2 weft
    return height, lut[which], np.where(which > 0, mod, _F32(1))


def _leg(X, Y, cx, cy, sa: float, ca: float, L, hw) -> np.ndarray:
    """Height (0..1, -1 outside) of one loop leg: a tilted ellipse with a round top."""
    dx = X - cx
    dy = Y - cy
    e2 = np.square((dx * sa + dy * ca) / L) + np.square((dx * ca - dy * sa) / hw)
    return np.where(e2 < 1.0, np.sqrt(np.maximum(1.0 - e2, 0.0)), _F32(-1.0))


def _render_knit(spec: FabricSpec, rng: np.random.Generator, hc: int, wc: int, rib: bool):
    irr = spec.irregularity
    pattern = (1.0, 0.42) if rib else (1.0,)
    xi, fu, wwid, n_w = _yarn_grid(rng, wc, spec.period, irr * 0.4, pattern)
    yj, fv, hwid, n_c = _yarn_grid(rng, hc, spec.period_weft, irr * 0.4)
    back = (xi % 2 == 1) if rib else np.zeros(wc, bool)

    w = wwid[None, :]
    h = hwid[:, None]
    X = (fu * wwid)[None, :]
    Y = (fv * hwid)[:, None]
    # per-stitch loop size (yarn tension) variation
    stitch = np.clip(1.0 + irr * 0.9 * rng.standard_normal((n_c, n_w), dtype=_F32), 0.82, 1.18)
    st = stitch[np.ix_(yj, xi)] * _F32(spec.cover)
    up = fv < 0.5  # the nearer neighbouring course is the one above
    Y_nb = Y + np.where(up, _F32(1), _F32(-1))[:, None] * h
    st_nb = stitch[np.ix_(np.clip(yj + np.where(up, -1, 1), 0, n_c - 1), xi)] * _F32(spec.cover)

    a = math.atan2(0.36, 1.25 * spec.period_weft / spec.period)
    sa, ca = math.sin(a), math.cos(a)
    Lh = (0.64 / ca) * h
    hwl = 0.215 * w
    left = np.maximum(_leg(X, Y, 0.29 * w, 0.5 * h, sa, ca, Lh * st, hwl * st),
                      _leg(X, Y_nb, 0.29 * w, 0.5 * h, sa, ca, Lh * st_nb, hwl * st_nb))
    right = np.maximum(_leg(X, Y, 0.71 * w, 0.5 * h, -sa, ca, Lh * st, hwl * st),
                       _leg(X, Y_nb, 0.71 * w, 0.5 * h, -sa, ca, Lh * st_nb, hwl * st_nb))
    is_left = left >= right
    hmax = np.maximum(left, right)
    inside = hmax >= 0.0
    height = np.where(inside, 0.2 + 0.8 * hmax, _F32(-1.0))

    fib = spec.fibre + 0.1 * spec.melange
    white = rng.standard_normal((hc, wc), dtype=_F32)
    mod = 1.0 + fib * np.where(is_left, _streak_noise(rng, (hc, wc), 0.5, 2.2, math.tan(a), white),
                               _streak_noise(rng, (hc, wc), 0.5, 2.2, -math.tan(a), white[::-1]))
    if rib:
        # back wales: small purl bumps deep in the groove between raised face wales
        ex = (X - 0.5 * w) / (0.6 * w)
        ey = (Y - 0.5 * h) / (0.45 * h * st / spec.cover)
        e2 = ex * ex + ey * ey
        purl = np.where(e2 < 1.0, -0.95 + 0.25 * np.sqrt(np.clip(1.0 - e2, 0.0, 1.0)), _F32(-1.0))
        height = np.where(back[None, :], purl, height + 0.2)
        inside = np.where(back[None, :], e2 < 1.0, inside)
        mod = np.where(back[None, :], 0.6 * (1.0 + fib * _streak_noise(rng, (hc, wc), 2.2, 0.5, 0.0, white)), mod)
    mod *= stitch[np.ix_(yj, xi)] ** 0.4  # looser loops catch a little more light
    var = spec.yarn_variation + 0.05 * spec.melange
    mod *= (1.0 + var * rng.standard_normal(n_w, dtype=_F32))[xi][None, :]
    col = np.asarray(spec.warp_bgr, _F32)
    lut = np.stack([0.3 * col, col])
    return height.astype(_F32), lut[inside.view(np.uint8)], np.where(inside, mod, _F32(1))


def render_fabric_info(
    spec: FabricSpec,
    rng: np.random.Generator | int | None = None,
    size: int | tuple[int, int] = (256, 256),
) -> RenderInfo:
    """Like :func:`render_fabric`, also returning the per-image weave angle."""
    rng = _as_rng(rng)
    if isinstance(size, (int, np.integer)):
        H = W = int(size)
    else:
        H, W = (int(s) for s in size)
    if H < 8 or W < 8:
        raise ValueError(f"image size must be at least 8x8, got {(H, W)}")
    if spec.style not in STYLES:
        raise ValueError(f"unknown style {spec.style!r}")

    theta = math.radians(rng.uniform(-spec.rotation_deg, spec.rotation_deg))
    disp_amp = rng.uniform(0.3, 1.2)
    margin = int(math.ceil(max(H, W) * abs(math.sin(math.radians(spec.rotation_deg))) * 0.6 + disp_amp)) + 4
    hc, wc = H + 2 * margin, W + 2 * margin

    if spec.style in WOVEN_STYLES:
        height, colour, mod = _render_woven(spec, rng, hc, wc)
        scale = 0.35 * spec.relief * spec.period
    else:
        height, colour, mod = _render_knit(spec, rng, hc, wc, rib=spec.style == "rib")
        scale = 0.3 * spec.relief * spec.period
    mod *= _shade(height, scale)
    albedo = colour * mod[..., None]

    # geometry: rotation about the centre plus a slow displacement (fabric is never straight)
    yo, xo = np.mgrid[0:H, 0:W].astype(_F32)
    cxo, cyo = (W - 1) / 2.0, (H - 1) / 2.0
    c, s = math.cos(theta), math.sin(theta)
    cell = max(40.0, 0.45 * max(H, W))
    map_x = _smooth_noise(rng, (H, W), cell) * _F32(disp_amp)
    map_x += _F32(cxo + margin) + _F32(c) * (xo - cxo) - _F32(s) * (yo - cyo)
    map_y = _smooth_noise(rng, (H, W), cell) * _F32(disp_amp)
    map_y += _F32(cyo + margin) + _F32(s) * (xo - cxo) + _F32(c) * (yo - cyo)
    img = cv2.remap(albedo, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)

    # optics
    sigma = max(0.3, spec.blur_sigma * (1.0 + rng.uniform(-spec.blur_jitter, spec.blur_jitter)))
    img = cv2.GaussianBlur(img, (0, 0), sigma)

    # lighting: brightness, gradient, vignetting, a slight colour cast
    bright = 1.0 + rng.uniform(-spec.brightness, spec.brightness)
    ga = rng.uniform(0, 2 * np.pi)
    gmag = rng.uniform(0.3, 1.0) * spec.gradient
    inv = 1.0 / max(W, H)
    xn = (np.arange(W, dtype=_F32) - _F32(cxo)) * _F32(inv)
    yn = (np.arange(H, dtype=_F32) - _F32(cyo)) * _F32(inv)
    vcx, vcy = rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15)
    vig = rng.uniform(0.3, 1.0) * spec.vignetting * 2.0
    light = (1.0 + 2.0 * gmag * (math.cos(ga) * xn[None, :] + math.sin(ga) * yn[:, None]))
    light *= 1.0 - vig * (np.square(xn - vcx)[None, :] + np.square(yn - vcy)[:, None])
    light *= _F32(bright)
    cast = (1.0 + rng.uniform(-0.015, 0.015, 3)).astype(_F32)
    img *= light[..., None]
    img *= cast

    # sensor noise: read + shot
    std = np.sqrt(np.maximum(img[..., 1], 0.0) * _F32(0.012) + _F32(spec.noise_sigma ** 2))
    img += rng.standard_normal(img.shape, dtype=_F32) * std[..., None]
    img += 0.5
    out = np.clip(img, 0, 255).astype(np.uint8)
    return RenderInfo(image=out, angle_deg=math.degrees(theta), brightness=bright)


def render_fabric(
    spec: FabricSpec,
    rng: np.random.Generator | int | None = None,
    size: int | tuple[int, int] = (256, 256),
) -> np.ndarray:
    """A defect-free fabric photo: ``H x W x 3`` uint8 BGR; ``size`` is (H, W) or an int."""
    return render_fabric_info(spec, rng, size).image


# --------------------------------------------------------------------- defects
#
# A painter returns layers (window, alpha, target): alpha in [0, 1] with its soft
# tails already cut off (so ``alpha > 0`` is the crisp mask), target the defect's
# appearance. Layers are composited in order inside their window.


def _thr(alpha: np.ndarray, t: float = 0.5) -> np.ndarray:
    """Cut alpha tails below ``t``: the crisp mask is then ``alpha > 0``."""
    return np.where(alpha >= t, alpha, _F32(0)).astype(_F32)


def _lit(nx, ny, nz) -> np.ndarray:
    """Shading of a surface normal under the fabric's light (1.0 = flat)."""
    n = np.sqrt(nx * nx + ny * ny + nz * nz) + 1e-6
    ndotl = (nx * _LIGHT[0] + ny * _LIGHT[1] + nz * _LIGHT[2]) / n
    return ((_AMBIENT + _DIFFUSE * np.maximum(ndotl, 0.0)) / _FLAT_SHADE).astype(_F32)


class _Win:
    """A rectangular window of the image with absolute pixel coordinates."""

    def __init__(self, ctx: "_Ctx", y0: int, y1: int, x0: int, x1: int):
        self.sl = (slice(y0, y1), slice(x0, x1))
        self.shape = (y1 - y0, x1 - x0)
        self.yy, self.xx = np.mgrid[y0:y1, x0:x1].astype(_F32)
        self.f = ctx.f[self.sl]
        self.local = ctx.local[self.sl]
        self._ctx = ctx

    def noise(self, scale: float = 1.0) -> np.ndarray:
        c = self._ctx
        return c.rng.standard_normal(self.shape + (3,), dtype=_F32) * _F32(c.sigma * scale)

    def streaks(self, sx: float, sy: float) -> np.ndarray:
        return _streak_noise(self._ctx.rng, self.shape, sx, sy)


class _Ctx:
    """What the defect painters need to know about the image."""

    def __init__(self, img: np.ndarray, rng: np.random.Generator, spec: FabricSpec | None,
                 angle_deg: float | None):
        self.f = img.astype(_F32)
        self.H, self.W = img.shape[:2]
        self.short = min(self.H, self.W)
        self.rng = rng
        self.spec = spec
        a = math.radians(angle_deg if angle_deg is not None else rng.uniform(-1.0, 1.0))
        self.weft_slope = -math.tan(a)  # dy/dx of weft-direction lines
        self.warp_slope = math.tan(a)  # dx/dy of warp-direction lines
        self.period = spec.period if spec is not None else 7.0
        self.period_weft = spec.period_weft if spec is not None else 7.0
        k = int(2 * round(max(self.period, self.period_weft)) + 1)
        self.local = cv2.blur(self.f, (k, k), borderType=cv2.BORDER_REFLECT)  # weave averaged out
        self.sigma = spec.noise_sigma if spec is not None else 2.2
        lum = self.lum(self.f[::2, ::2])
        # texture contrast (std / mean of brightness): ~0.15 on wovens, ~0.3 on knits;
        # line defects scale their contrast with it so they stay visible but moderate
        self.contrast = float(np.clip(lum.std() / max(float(lum.mean()), 1.0), 0.08, 0.5))

    def full(self) -> _Win:
        return _Win(self, 0, self.H, 0, self.W)

    def win(self, cx: float, cy: float, r: float) -> _Win:
        r = int(math.ceil(r)) + 2
        x0, x1 = max(0, int(cx) - r), min(self.W, int(cx) + r + 1)
        y0, y1 = max(0, int(cy) - r), min(self.H, int(cy) + r + 1)
        return _Win(self, y0, y1, x0, x1)

    @staticmethod
    def lum(bgr: np.ndarray) -> np.ndarray:
        return bgr[..., 0] * 0.114 + bgr[..., 1] * 0.587 + bgr[..., 2] * 0.299

    def colour_at(self, x: float, y: float) -> np.ndarray:
        xi = int(np.clip(round(x), 0, self.W - 1))
        yi = int(np.clip(round(y), 0, self.H - 1))
        return self.local[yi, xi].copy()

    def yarn_colour(self, x: float, y: float, which: str = "weft") -> np.ndarray:
        """Lit-top colour of a yarn near (x, y): bright end of the local pixels.

        With a spec, its yarn colour is scaled to that brightness (so a warp-coloured
        defect on denim stays indigo); without one, the bright pixels' mean colour.
        """
        r = int(2 * max(self.period, self.period_weft)) + 2
        xi, yi = int(np.clip(x, 0, self.W - 1)), int(np.clip(y, 0, self.H - 1))
        patch = self.f[max(0, yi - r):yi + r + 1, max(0, xi - r):xi + r + 1].reshape(-1, 3)
        lum = self.lum(patch)
        top = float(np.percentile(lum, 85))
        if self.spec is None:
            return patch[lum >= np.percentile(lum, 70)].mean(axis=0).astype(_F32)
        c = np.asarray(self.spec.weft_bgr if which == "weft" else self.spec.warp_bgr, _F32)
        return c * _F32(top / max(float(self.lum(c)), 1.0))

    def point(self, margin: float) -> tuple[float, float]:
        mx = min(margin, self.W / 2 - 1)
        my = min(margin, self.H / 2 - 1)
        return self.rng.uniform(mx, self.W - mx), self.rng.uniform(my, self.H - my)


Layer = tuple[_Win, np.ndarray, np.ndarray]  # (window, alpha h x w, target h x w x 3)


def _wavy(rng: np.random.Generator, n: int, amp: float) -> np.ndarray:
    t = np.arange(n, dtype=_F32)
    out = np.zeros(n, _F32)
    for k, share in ((1, 1.0), (2, 0.4)):
        lam = rng.uniform(50.0, 180.0) / k
        out += share * np.sin(2 * np.pi * t / lam + rng.uniform(0, 2 * np.pi)).astype(_F32)
    return out * _F32(amp / 1.4)


def _line(c: _Ctx, horizontal: bool, width: int, span: float, wave: float,
          from_edge: bool = False) -> tuple[_Win, np.ndarray, np.ndarray]:
    """A long thin line: window, thresholded alpha and signed distance across it.

    Alpha is antialiased, then cut at 0.5: an interval of length ``width`` holds
    exactly ``width`` pixel centres, so every column (horizontal line) / row
    (vertical line) it covers gets exactly ``width`` pixels (fewer in the 3 px
    tapers at its ends).
    """
    rng = c.rng
    w = c.full()
    if horizontal:
        n_along, n_across, slope, along, across = c.W, c.H, c.weft_slope, w.xx, w.yy
    else:
        n_along, n_across, slope, along, across = c.H, c.W, c.warp_slope, w.yy, w.xx
    pos = rng.uniform(0.15, 0.85) * n_across
    t = np.arange(n_along, dtype=_F32)
    centre = pos + (t - n_along / 2.0) * slope + _wavy(rng, n_along, wave)
    d = across - (centre[None, :] if horizontal else centre[:, None])
    alpha = np.clip(width / 2.0 + 0.5 - np.abs(d), 0.0, 1.0)
    length = span * n_along
    start = 0.0 if (from_edge and rng.random() < 0.5) else rng.uniform(0, n_along - length)
    end = start + length
    taper = np.clip((end - along) / 3.0, 0, 1)
    if start > 0:
        taper = taper * np.clip((along - start) / 3.0, 0, 1)
    return w, _thr(alpha * taper), d


def _mis_yarn(c: _Ctx) -> list[Layer]:
    rng = c.rng
    width = int(rng.choice([1, 2, 2, 3, 3, 4]))
    w, alpha, d = _line(c, True, width, rng.uniform(0.7, 1.0), rng.uniform(0.3, 1.4))
    lum = float(c.lum(c.local).mean())
    if rng.random() < 0.5:
        # wrong colour: another dye lot / colour, moderate contrast
        hue = rng.standard_normal(3).astype(_F32)
        hue -= hue.mean()
        hue /= np.linalg.norm(hue) + 1e-6
        gain = 1.0 + rng.uniform(0.22, 0.38) * hue
        sgn = 1.0 if lum < 90 else (-1.0 if lum > 170 else rng.choice([-1.0, 1.0]))
        gain *= 1.0 + sgn * rng.uniform(0.08, 0.16)
    else:
        # wrong count: a thicker or thinner yarn, lighter or darker
        sgn = 1.0 if lum < 90 else (-1.0 if lum > 200 else rng.choice([-1.0, 1.0]))
        gain = np.full(3, 1.0 + sgn * rng.uniform(0.22, 0.36), _F32)
    half = width / 2.0 + 0.5
    prof = np.clip(1.0 - np.square(d / half), 0.0, 1.0)  # round yarn cross-section
    tex = (1.0 + 0.07 * w.streaks(3.0, 0.5)) * (0.9 + 0.15 * prof)
    target = w.f * gain[None, None, :] * tex[..., None]
    return [(w, alpha, target)]


def _broken_needle(c: _Ctx) -> list[Layer]:
    rng = c.rng
    width = int(rng.integers(2, 5))
    w, alpha, d = _line(c, False, width, rng.uniform(0.75, 1.0), rng.uniform(0.2, 0.8), from_edge=True)
    pc = c.period_weft
    rung = np.maximum(np.cos((w.yy - rng.uniform(0, pc)) * _F32(2 * np.pi / pc)), 0.0) ** 6
    dark = rng.uniform(0.45, 0.62)
    shade = dark + (0.9 - dark) * rung  # dark gap with the floats of the ladder across it
    target = w.local * (shade * (1.0 + 0.05 * w.streaks(1.5, 0.5)))[..., None] + w.noise()
    return [(w, alpha, target)]


def _open_width(c: _Ctx) -> list[Layer]:
    rng = c.rng
    width = int(rng.integers(1, 4))
    w, alpha, d = _line(c, False, width, rng.uniform(0.85, 1.0), rng.uniform(0.5, 2.5), from_edge=True)
    strength = float(np.clip(rng.uniform(0.9, 1.4) * c.contrast, 0.14, 0.35))
    mode = int(rng.integers(3)) if width >= 2 else int(rng.integers(2))
    if mode == 0:
        prof = np.ones_like(d)  # lighter: flattened, shiny crease
    elif mode == 1:
        prof = -np.ones_like(d)  # darker: shadowed fold
    else:
        prof = np.where(d < 0, _F32(1.0), _F32(-0.8))  # fold: lit side and shadow side
    keep = float(np.clip(1.0 - 2.0 * c.contrast, 0.3, 0.7))
    flat = keep * w.f + (1.0 - keep) * w.local  # pressed yarns lose their relief
    target = flat * (1.0 + strength * prof)[..., None]
    return [(w, alpha, target)]


def _blob_shape(rng: np.random.Generator, R: float, rough: float) -> Callable[[np.ndarray], np.ndarray]:
    """A random irregular closed outline: radius (at most ``R``) as a function of angle."""
    amps = [rng.uniform(0.04, 0.16) / (k - 1) for k in range(2, 6)]
    phases = [rng.uniform(0, 2 * np.pi) for _ in range(2, 6)]
    n = 28  # fine periodic jitter for a frayed / irregular outline
    knots = rng.standard_normal(n + 1).astype(_F32)
    knots[-1] = knots[0]

    def shape(theta: np.ndarray) -> np.ndarray:
        theta = np.asarray(theta, _F32)
        r = np.ones_like(theta)
        for k, a, p in zip(range(2, 6), amps, phases):
            r += _F32(a) * np.cos(k * theta + _F32(p))
        r += rough * np.interp((theta % (2 * np.pi)) / (2 * np.pi) * n, np.arange(n + 1), knots).astype(_F32)
        return r

    scale = _F32(R) / float(shape(np.linspace(0, 2 * np.pi, 361)).max())  # R is the largest radius

    def radius(theta: np.ndarray) -> np.ndarray:
        return shape(theta) * scale

    return radius


def _polar(w: _Win, cx: float, cy: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    dx, dy = w.xx - _F32(cx), w.yy - _F32(cy)
    return dx, dy, np.sqrt(dx * dx + dy * dy), np.arctan2(dy, dx)


def _hole(c: _Ctx) -> list[Layer]:
    rng = c.rng
    R = min(rng.uniform(3.0, 15.0), 0.22 * c.short)
    cx, cy = c.point(R * 1.5 + 4)
    w = c.win(cx, cy, R * 1.5 + 4)
    dx, dy, rho, theta = _polar(w, cx, cy)
    shape = _blob_shape(rng, R, 0.07)
    r = shape(theta)
    # loosened, shadowed yarns around the edge, the dark backing inside
    a_ring = _thr(np.clip(r + rng.uniform(1.0, 2.2) + 0.5 - rho, 0, 1))
    t_ring = w.f * _F32(rng.uniform(0.6, 0.75))
    a_hole = _thr(np.clip(r + 0.5 - rho, 0, 1))
    back = np.asarray(c.spec.backing_bgr if c.spec is not None else (24, 24, 26), _F32)
    depth = np.clip(rho / np.maximum(r, 1e-3), 0, 1)[..., None]
    t_hole = back * (1.0 + 0.3 * depth) + w.noise()
    layers: list[Layer] = [(w, a_ring, t_ring), (w, a_hole, t_hole)]

    # broken yarn ends sticking into the hole along the warp / weft directions
    strands = np.zeros(w.shape, _F32)
    oy, ox = w.sl[0].start, w.sl[1].start
    for _ in range(int(rng.integers(3, 6 + int(R // 2)))):
        phi = rng.uniform(0, 2 * np.pi)
        rb = float(shape(np.array([phi]))[0])
        sx, sy = cx + (rb + 1.5) * math.cos(phi) - ox, cy + (rb + 1.5) * math.sin(phi) - oy
        vx, vy = -math.cos(phi), -math.sin(phi)
        if abs(vx) > abs(vy):  # snap to the nearest yarn axis
            vx, vy = math.copysign(1.0, vx), rng.uniform(-0.3, 0.3)
        else:
            vx, vy = rng.uniform(-0.3, 0.3), math.copysign(1.0, vy)
        ln = rng.uniform(0.35, 0.85) * R + 1.5
        ex, ey = sx + vx * ln, sy + vy * ln
        thick = 1 if R < 8 or rng.random() < 0.5 else 2
        cv2.line(strands, (round(sx * 16), round(sy * 16)), (round(ex * 16), round(ey * 16)), 1.0,
                 thick, cv2.LINE_AA, shift=4)
    a_str = _thr(np.clip(strands * 1.6, 0, 1) * (rho < r + 1.0), 0.6)
    yarn = c.yarn_colour(cx, cy)
    t_str = yarn[None, None, :] * _F32(rng.uniform(0.75, 0.95)) * (1.0 + 0.12 * w.streaks(0.8, 0.8))[..., None]
    layers.append((w, a_str, t_str + w.noise()))
    return layers


def _stain(c: _Ctx) -> list[Layer]:
    rng = c.rng
    D = min(rng.uniform(16.0, 64.0), 0.55 * c.short)
    cx, cy = c.point(D * 0.65 + 2)
    w = c.win(cx, cy, D * 0.75)
    field = np.zeros(w.shape, _F32)
    for k in range(int(rng.integers(1, 4))):  # a few overlapping soft blobs
        ox, oy = (0.0, 0.0) if k == 0 else rng.uniform(-0.25, 0.25, 2) * D
        s = D * (0.3 if k == 0 else rng.uniform(0.15, 0.25))
        e = rng.uniform(0.6, 1.0)
        ang = rng.uniform(0, np.pi)
        dx, dy = w.xx - _F32(cx + ox), w.yy - _F32(cy + oy)
        u = dx * _F32(math.cos(ang)) + dy * _F32(math.sin(ang))
        v = (dy * _F32(math.cos(ang)) - dx * _F32(math.sin(ang))) / _F32(e)
        field = np.maximum(field, np.exp(-(u * u + v * v) / _F32(2 * s * s)))
    field *= 1.0 + 0.2 * _smooth_noise(rng, w.shape, max(5.0, D / 4.0))
    lo, hi = 0.22, rng.uniform(0.5, 0.9)  # hi - lo sets how soft the edge is
    a = np.clip((field - lo) / (hi - lo), 0.0, 1.0)
    a = a * a * (3.0 - 2.0 * a)

    lum = float(c.lum(c.colour_at(cx, cy)))
    kind = int(rng.integers(3))
    if lum < 75 and rng.random() < 0.6:
        gain = np.array([1.35, 1.38, 1.42], _F32) * _F32(rng.uniform(0.95, 1.15))  # dried residue / bleach
    elif kind == 0:
        gain = np.array([0.64, 0.76, 0.85], _F32)  # oil: darker, yellowish
    elif kind == 1:
        gain = np.array([0.58, 0.72, 0.92], _F32)  # rust: orange-brown
    else:
        gain = np.array([0.78, 0.78, 0.8], _F32)  # dirt / water mark: grey
    gain = 1.0 + (gain - 1.0) * _F32(rng.uniform(0.75, 1.15))
    change = float(np.abs(gain - 1.0).mean())
    # the mask is where the colour changed visibly (>= ~4 %); below that the stain is cut off
    a = _thr(a, min(0.9, 0.04 / max(change, 1e-3)))
    wet = 0.85 * w.f + 0.15 * w.local  # stained fibres lose a little texture contrast
    return [(w, a, wet * gain[None, None, :])]


def _knot(c: _Ctx) -> list[Layer]:
    rng = c.rng
    D = min(rng.uniform(6.0, 11.0), 0.2 * c.short)  # 6 px: smaller knots were lost in a knit's loops
    cx, cy = c.point(D + 5)
    w = c.win(cx, cy, D + 6)
    dx, dy, rho, theta = _polar(w, cx, cy)
    ecc = rng.uniform(0.7, 1.0)
    ang = rng.uniform(0, np.pi)
    stretch = np.sqrt(np.square(np.cos(theta - ang)) + np.square(np.sin(theta - ang) / ecc))
    r = _blob_shape(rng, D / 2.0 + 0.25, 0.05)(theta) / stretch
    e = rho / np.maximum(r, 1e-3)
    a_body = _thr(np.clip(r + 0.5 - rho, 0, 1))
    h = np.sqrt(np.clip(1.0 - e * e, 0.0, 1.0))
    # analytic normal of a dome: tilts outwards with the radius
    g = e / np.maximum(h, 0.25) * 1.2
    shade = _lit(g * dx / np.maximum(rho, 1e-3), g * dy / np.maximum(rho, 1e-3), np.ones_like(h))
    swirl = 0.07 * np.cos(3.0 * theta + 1.4 * rho + rng.uniform(0, 6.3))  # wound fibres
    tex = 1.0 + swirl + 0.08 * w.streaks(0.8, 0.8)
    yarn = c.yarn_colour(cx, cy) * _F32(rng.uniform(1.0, 1.3))
    t_body = yarn[None, None, :] * (shade * (0.6 + 0.4 * h) * tex)[..., None] + w.noise()
    # cast shadow towards the lower right
    off = 0.2 * D + 0.8
    rho_s = np.sqrt(np.square(dx - off) + np.square(dy - off))
    a_shadow = _thr(np.clip(r + 0.5 - rho_s, 0, 1))
    t_shadow = w.f * _F32(rng.uniform(0.55, 0.7))
    layers: list[Layer] = [(w, a_shadow, t_shadow), (w, a_body, t_body)]
    if rng.random() < 0.5:  # a short cut tail
        tails = np.zeros(w.shape, _F32)
        oy, ox = w.sl[0].start, w.sl[1].start
        phi = rng.uniform(0, 2 * np.pi)
        ln = 0.5 * D + rng.uniform(1.5, 4.0)
        sx, sy = cx - ox, cy - oy
        ex, ey = sx + ln * math.cos(phi), sy + ln * math.sin(phi)
        cv2.line(tails, (round(sx * 16), round(sy * 16)), (round(ex * 16), round(ey * 16)), 1.0, 1,
                 cv2.LINE_AA, shift=4)
        layers.append((w, _thr(np.clip(tails, 0, 1) * (a_body == 0)), yarn[None, None, :] * 0.85 + w.noise()))
    return layers


def _slub(c: _Ctx) -> list[Layer]:
    rng = c.rng
    L = min(rng.uniform(14.0, 48.0), 0.6 * c.W)
    yarn_d = c.period_weft * (c.spec.cover_weft if c.spec is not None else 0.88)
    T = float(np.clip(yarn_d * rng.uniform(1.3, 1.8), 3.0, 0.25 * c.H))
    cx, cy = c.point(0.0)
    cx = float(np.clip(cx, L / 2 + 3, c.W - L / 2 - 3))
    cy = float(np.clip(cy, T + 3, c.H - T - 3))
    w = c.win(cx, cy, L / 2 + T + 3)
    phi = math.atan(c.weft_slope)
    dx, dy = w.xx - _F32(cx), w.yy - _F32(cy)
    s = dx * _F32(math.cos(phi)) + dy * _F32(math.sin(phi))
    sn = np.clip(2.0 * s / L, -1.0, 1.0)
    n = dy * _F32(math.cos(phi)) - dx * _F32(math.sin(phi)) - _F32(rng.uniform(-1.0, 1.0)) * sn * sn
    lump = 1.0 + 0.12 * np.sin(s * _F32(2 * np.pi / rng.uniform(6, 12)) + _F32(rng.uniform(0, 6.3)))
    hw = 0.5 * T * np.clip(1.0 - sn * sn, 0.0, 1.0) ** 0.45 * lump  # spindle: thick middle, tapered ends
    hw = np.where(np.abs(s) < L / 2, hw, _F32(0))
    a_body = _thr(np.clip(hw + 0.5 - np.abs(n), 0, 1))
    e = np.clip(np.abs(n) / np.maximum(hw, 1e-3), 0, 1)
    nz = np.sqrt(np.clip(1.0 - e * e, 0.02, 1.0))
    ny = np.sign(n) * e  # round cross-section: the normal tilts across the yarn
    shade = _lit(-_F32(math.sin(phi)) * ny, _F32(math.cos(phi)) * ny, nz)
    twist = 1.0 + 0.08 * np.cos((s / _F32(0.9 * T) + n / _F32(T)) * _F32(2 * np.pi))
    fib = 1.0 + 0.12 * w.streaks(3.0, 0.5)
    yarn = c.yarn_colour(cx, cy, "weft") * _F32(rng.uniform(1.0, 1.2))
    t_body = yarn[None, None, :] * (shade * twist * fib * (0.65 + 0.35 * nz))[..., None] + w.noise()
    # shadow along the lower edge
    a_sh = _thr(np.clip(hw + 1.8 - np.abs(n), 0, 1) * (n > 0) * (hw > 0.5))
    t_sh = w.f * _F32(rng.uniform(0.6, 0.72))
    return [(w, a_sh, t_sh), (w, a_body, t_body)]


_PAINTERS: dict[str, Callable[[_Ctx], list[Layer]]] = {
    "mis_yarn": _mis_yarn,
    "broken_needle": _broken_needle,
    "open_width": _open_width,
    "hole": _hole,
    "stain": _stain,
    "knot": _knot,
    "slub": _slub,
}


def add_defect(
    image: np.ndarray,
    kind: str,
    rng: np.random.Generator | int | None = None,
    spec: FabricSpec | None = None,
    *,
    angle_deg: float | None = None,
    min_visibility: float = VISIBILITY_FLOOR,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of ``kind`` onto a copy of ``image``.

    Returns ``(defective image, mask)``: the mask is uint8 0/255, ``H x W``, and
    covers exactly the pixels the defect painted; every pixel outside it is
    identical to the input. ``spec`` (the fabric the image was rendered from)
    gives yarn colours and periods; ``angle_deg`` (from :func:`render_fabric_info`)
    aligns warp / weft-direction defects with the weave, else a small random
    tilt is used. Images must be at least 24 px on each side.

    ``min_visibility`` is the floor of the defect's :func:`visibility` (its luminance change
    over the std of the image's luminance). A fainter defect has its colour change scaled
    up to the floor (the mask does not change). 0 keeps every defect as painted (the
    "subtle" set, see docs/adr/0003-demo-visibility-floor.md).
    """
    if kind not in _PAINTERS:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {DEFECT_KINDS}")
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8, got {img.shape} {img.dtype}")
    if min(img.shape[:2]) < 24:
        raise ValueError(f"image too small for a defect: {img.shape[:2]}")
    ctx = _Ctx(img, _as_rng(rng), spec, angle_deg)
    out = ctx.f.copy()
    mask = np.zeros(img.shape[:2], bool)
    for w, alpha, target in _PAINTERS[kind](ctx):
        sel = alpha > 0
        if not sel.any():
            continue
        a = alpha[sel][:, None]
        region = out[w.sl]
        region[sel] = region[sel] * (1.0 - a) + target[sel] * a
        mask[w.sl] |= sel
    result = img.copy()
    if mask.any():
        base = img[mask].astype(_F32)
        change = out[mask] - base
        line = kind in THIN_LINE_KINDS
        vis = visibility(img, change, mask, line=line)
        if 0.0 < vis < min_visibility:
            if line:  # first its mean change, then its shade against the fabric beside it
                change *= _F32(max(1.0, min_visibility / max(_mean_change(img, change), 1e-6)))
                change *= _F32(_line_gain(img, change, mask, min_visibility))
            else:
                change *= _F32(min_visibility / vis)
        result[mask] = np.clip(base + change + 0.5, 0, 255).astype(np.uint8)
    return result, mask.astype(np.uint8) * 255


#: px: a line's shade is compared with the fabric 2-4 px beside it (see :func:`visibility`)
LINE_FLANK = 4
_LUMA = np.array([0.114, 0.587, 0.299], _F32)  # BGR -> luma


def visibility(image: np.ndarray, change: np.ndarray, mask: np.ndarray, line: bool = False) -> float:
    """How plainly a defect shows, in units of the std of the image's luminance.

    ``change``: the BGR change (float, N x 3) of the ``mask`` pixels (bool, H x W). For a blob it
    is the RMS of the luminance change. A thin line the eye follows by its average shade against
    the fabric beside it: the mean luminance of its brightened pixels, and of its darkened ones
    (each group at least a quarter of the line; a fold has a lit and a shadowed side), against
    the mean of the fabric ``LINE_FLANK`` px beside the line, the larger of the two; and at most
    its mean luminance change. The change alone (the measure before session 11) rated a 1-px
    line painted along the dark gap between two yarns by how much it brightened the gap, although
    it came out as bright as the yarns beside it: invisible, with a visibility of 1. The shade
    alone rates a fold (a lit and a shadowed side, mean change near 0) visible where its lit side
    happens to lie on a bright yarn. About 0.4-0.6 is a defect a person finds only by searching;
    above 1 it is plain to see.
    """
    std = _luma_std(image)
    if line:
        groups, flank = _line_shades(image, change, mask)
        shade = max((abs(before + d - flank) for before, d in groups), default=0.0) / std
        return min(shade, _mean_change(image, change))
    d_lum = np.asarray(change, _F32) @ _LUMA
    return float(np.sqrt(np.mean(np.square(d_lum)))) / std


def _luma_std(image: np.ndarray) -> float:
    return max(float((np.asarray(image, _F32) @ _LUMA).std()), 1.0)


def _mean_change(image: np.ndarray, change: np.ndarray) -> float:
    """|mean luminance change| of a line over the image's luminance std."""
    return abs(float((np.asarray(change, _F32) @ _LUMA).mean())) / _luma_std(image)


def _line_shades(image: np.ndarray, change: np.ndarray, mask: np.ndarray
                 ) -> tuple[list[tuple[float, float]], float]:
    """([(mean luminance before, mean luminance change)] of the line's brightened and of its darkened
    pixels, where they are at least a quarter of it), mean luminance of the fabric beside the line."""
    lum = np.asarray(image, _F32) @ _LUMA
    m8 = mask.astype(np.uint8)
    near = cv2.dilate(m8, np.ones((2 * LINE_FLANK + 1,) * 2, np.uint8)) > 0
    flank = near & ~(cv2.dilate(m8, np.ones((3, 3), np.uint8)) > 0)
    if not flank.any():  # nothing lies 2-4 px beside it (a tiny image): compare with the rest of the image
        flank = ~mask
    flank_mean = float(lum[flank].mean()) if flank.any() else 0.0
    before = lum[mask]
    d_lum = np.asarray(change, _F32) @ _LUMA
    groups = []
    for sel in (d_lum > 0, d_lum < 0):
        if sel.any() and sel.sum() >= 0.25 * d_lum.size:
            groups.append((float(before[sel].mean()), float(d_lum[sel].mean())))
    return groups, flank_mean


def _line_gain(image: np.ndarray, change: np.ndarray, mask: np.ndarray, floor: float) -> float:
    """The factor (>= 1) on a line's change that brings its shade against the fabric beside it
    (:func:`visibility`) to ``floor``: the smallest that does it for its brightened or its darkened
    pixels, each moved further the way the painter moved them."""
    target = floor * _luma_std(image)
    groups, flank = _line_shades(image, change, mask)
    gains = []
    for before, d in groups:
        if abs(before + d - flank) >= target:
            return 1.0
        gains.append((flank - before + np.sign(d) * target) / d)
    return max(1.0, min(gains)) if gains else 1.0


def render_sample(
    spec: FabricSpec,
    rng: np.random.Generator | int | None = None,
    size: int | tuple[int, int] = (256, 256),
    kind: str | None = None,
    min_visibility: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One image and its mask; ``kind=None`` gives a good image and an empty mask."""
    rng = _as_rng(rng)
    info = render_fabric_info(spec, rng, size)
    if kind is None:
        return info.image, np.zeros(info.image.shape[:2], np.uint8)
    floor = VISIBILITY_FLOOR if min_visibility is None else min_visibility
    return add_defect(info.image, kind, rng, spec, angle_deg=info.angle_deg, min_visibility=floor)


# ------------------------------------------------------------------ MVTec tree


def write_demo_mvtec(
    root: str | Path,
    *,
    style: str = "twill",
    n_train_good: int = 60,
    n_test_good: int = 20,
    n_per_defect: int = 6,
    size: int | tuple[int, int] = 256,
    seed: int = 0,
    kinds: Iterable[str] = DEFECT_KINDS,
    spec: FabricSpec | None = None,
    min_visibility: float | None = None,
) -> dict:
    """Write an MVTec-AD style tree of one fabric product and return a manifest.

    ``root/train/good/000.png``, ``root/test/good/000.png``, ``root/test/<kind>/000.png``
    and ``root/ground_truth/<kind>/000_mask.png`` (0/255). Every image has its own
    generator derived from ``seed`` and its place in the tree, so the output is
    deterministic and an image does not change when the counts change.
    """
    root = Path(root)
    kinds = tuple(kinds)
    for k in kinds:
        if k not in _PAINTERS:
            raise ValueError(f"unknown defect kind {k!r}")
    if spec is None:
        spec = random_spec(np.random.default_rng([seed, 0]), style=style)

    def save(path: Path, arr: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), arr):
            raise OSError(f"could not write {path}")

    counts: dict[str, int] = {}
    for split, code, n in (("train", 1, n_train_good), ("test", 2, n_test_good)):
        for i in range(n):
            img = render_fabric(spec, np.random.default_rng([seed, code, 0, i]), size)
            save(root / split / "good" / f"{i:03d}.png", img)
        counts[f"{split}/good"] = n
    for ki, kind in enumerate(kinds):
        k_code = DEFECT_KINDS.index(kind) + 1
        for i in range(n_per_defect):
            img, mask = render_sample(spec, np.random.default_rng([seed, 3, k_code, i]), size, kind, min_visibility)
            save(root / "test" / kind / f"{i:03d}.png", img)
            save(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
        counts[f"test/{kind}"] = n_per_defect
    return {
        "root": str(root),
        "seed": seed,
        "size": list(size) if not isinstance(size, (int, np.integer)) else [int(size), int(size)],
        "style": spec.style,
        "spec": spec.to_dict(),
        "kinds": list(kinds),
        "min_visibility": VISIBILITY_FLOOR if min_visibility is None else min_visibility,
        "counts": counts,
    }
