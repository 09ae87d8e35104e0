"""Mask editing behind the canvas, without Qt: brush, eraser, polygon, flood fill,
region delete / merge / split, region classes, and the pyramids the canvas draws from.

Conventions
* Coordinates are image pixels as floats: pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``
  and its centre is ``(i + 0.5, j + 0.5)``; a shape covers the pixels whose centres it
  contains. Boxes are ``(x0, y0, x1, y1)``, end exclusive (:data:`Box`).
* Every edit touches only its bounding box (numpy slices), so a dab on a 12000 x 9000
  mask costs what the dab covers.

:class:`LabelEditor` is the working copy of one image's label: a bool mask plus a
*class raster* (uint8 per pixel: 1 = unclassified, 2.. = a defect class; what it holds
where the mask is 0 is a memory, so undoing a delete brings the class back). A region's
class is the most common classified value among its pixels (unclassified only when no
pixel is classified) and is written back over the whole region, so regions are one
colour. Regions are numbered like :func:`annotator.core.masks.label_regions` (raster
order of their first pixel) but relabelled locally: after an edit only the regions that
touch the edited box are recomputed.

Undo goes through :class:`annotator.core.history.UndoHistory`: each step pushes one
:class:`MaskEdit` of the mask (bbox only); the class-raster patch of the same step is
kept beside it and applied when that command is undone or redone.
"""
from __future__ import annotations

import math
import sys
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import cv2
import numpy as np

from .history import MaskEdit, UndoHistory
from .masks import Region, as_bool

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (end exclusive)
UNCLASSIFIED = 1
TILE = 256  # the overlay's tile size: the pyramid goes up until the image fits one tile


# ----------------------------------------------------------------- boxes


def clip_box(box: Box, w: int, h: int) -> Optional[Box]:
    x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], w), min(box[3], h)
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def union_box(a: Optional[Box], b: Optional[Box]) -> Optional[Box]:
    if a is None or b is None:
        return a or b
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def intersects(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def expand_box(box: Box, m: int, w: int, h: int) -> Box:
    return max(box[0] - m, 0), max(box[1] - m, 0), min(box[2] + m, w), min(box[3] + m, h)


def sl(box: Box) -> tuple[slice, slice]:
    return slice(box[1], box[3]), slice(box[0], box[2])


def nonzero_box(a: np.ndarray) -> Optional[Box]:
    """Bounding box of the non-zero pixels (rows first: fast on C-ordered arrays)."""
    rows = np.flatnonzero(a.any(axis=1))
    if rows.size == 0:
        return None
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(a[y0:y1].any(axis=0))
    return int(cols[0]), y0, int(cols[-1]) + 1, y1


def _runs(occ: np.ndarray) -> list[tuple[int, int]]:
    d = np.diff(np.concatenate(([0], occ.view(np.int8), [0])))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def xy_cut(mask: np.ndarray, box: Box) -> list[Box]:
    """Boxes holding every set pixel of ``mask[box]``, cut apart along empty rows and
    columns (so no connected region spans two of them): a few row/column scans that
    spare the connected-components pass the empty space of a large image."""
    out: list[Box] = []
    stack = [(box, True, False)]  # box, cut across rows?, the other direction failed
    while stack:
        b, rows, failed = stack.pop()
        sub = mask[sl(b)]
        runs = _runs(sub.any(axis=1) if rows else sub.any(axis=0))
        if runs == [(0, sub.shape[0] if rows else sub.shape[1])]:
            if failed:
                out.append(b)
            else:
                stack.append((b, not rows, True))
            continue
        for s, e in runs:
            nb = (b[0], b[1] + s, b[2], b[1] + e) if rows else (b[0] + s, b[1], b[0] + e, b[3])
            stack.append((nb, not rows, False))
    return out


@dataclass
class Component:
    first: tuple[int, int]  # (y, x)
    area: int
    box: Box
    centroid: tuple[float, float]
    own: np.ndarray = field(repr=False)  # bool patch of its pixels over ``box``


def components(mask: np.ndarray, area: Box) -> list[Component]:
    """8-connected regions of ``mask`` inside ``area`` (unordered)."""
    out = []
    for b in xy_cut(mask, area):
        crop = np.ascontiguousarray(mask[sl(b)]).view(np.uint8)
        n, lab, stats, cents = cv2.connectedComponentsWithStats(crop, connectivity=8)
        for k in range(1, n):
            x, y, bw, bh, a = (int(v) for v in stats[k])
            own = lab[y:y + bh, x:x + bw] == k
            out.append(Component((y + b[1], x + b[0] + int(np.argmax(own[0]))), a,
                                 (x + b[0], y + b[1], x + b[0] + bw, y + b[1] + bh),
                                 (float(cents[k][0]) + b[0], float(cents[k][1]) + b[1]), own))
    return out


def _edge_runs(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of True along each row: (row, first column, end column)."""
    h, w = edges.shape
    flat = np.zeros((h, w + 1), bool)
    flat[:, :w] = edges
    d = np.diff(np.concatenate(([False], flat.ravel())).view(np.int8))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    return starts // (w + 1), starts % (w + 1), ends % (w + 1)  # the padding column ends every run


def outline_segments(own: np.ndarray, x0: int = 0, y0: int = 0) -> np.ndarray:
    """The boundary of a bool patch along pixel edges, as straight segments
    ``(xa, ya, xb, yb)`` (K x 4, image coordinates: pixel (i, j) spans [i, i+1))."""
    p = np.pad(own, 1)
    hy, hx0, hx1 = _edge_runs(p[1:, 1:-1] != p[:-1, 1:-1])  # horizontal edges at y = row
    vx, vy0, vy1 = _edge_runs((p[1:-1, 1:] != p[1:-1, :-1]).T)  # vertical edges at x = row
    hs = np.stack([hx0 + x0, hy + y0, hx1 + x0, hy + y0], axis=1)
    vs = np.stack([vx + x0, vy0 + y0, vx + x0, vy1 + y0], axis=1)
    return np.concatenate([hs, vs]).astype(np.float64)


# ----------------------------------------------------------------- shapes


def snap(x: float, y: float, size: int) -> tuple[float, float]:
    """Brush centre for a ``size`` px brush: pixel centres for odd sizes, pixel corners
    for even ones, so a size-n dab is exactly n pixels across."""
    if size % 2:
        return math.floor(x) + 0.5, math.floor(y) + 0.5
    return float(round(x)), float(round(y))


def capsule(p0: tuple[float, float], p1: tuple[float, float], radius: float,
            w: int, h: int) -> Optional[tuple[Box, np.ndarray]]:
    """Pixels whose centres lie within ``radius`` of the segment p0-p1 (a round dab when
    p0 == p1): ``(box, bool patch)`` or None when it misses the image."""
    r = max(radius, 0.5)
    box = clip_box((math.floor(min(p0[0], p1[0]) - r), math.floor(min(p0[1], p1[1]) - r),
                    math.ceil(max(p0[0], p1[0]) + r) + 1, math.ceil(max(p0[1], p1[1]) + r) + 1), w, h)
    if box is None:
        return None
    xs = np.arange(box[0], box[2], dtype=np.float32)[None, :] + 0.5 - p0[0]
    ys = np.arange(box[1], box[3], dtype=np.float32)[:, None] + 0.5 - p0[1]
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    ll = dx * dx + dy * dy
    t = np.clip((xs * dx + ys * dy) / ll, 0.0, 1.0) if ll > 0 else np.float32(0.0)
    patch = (xs - t * dx) ** 2 + (ys - t * dy) ** 2 <= r * r + 1e-4
    return box, patch


def polygon(points: Sequence[tuple[float, float]], w: int, h: int) -> Optional[tuple[Box, np.ndarray]]:
    """Pixels whose centres lie inside the closed polygon (even-odd)."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if len(pts) < 3:
        return None
    box = clip_box((math.floor(pts[:, 0].min()), math.floor(pts[:, 1].min()),
                    math.ceil(pts[:, 0].max()) + 1, math.ceil(pts[:, 1].max()) + 1), w, h)
    if box is None:
        return None
    ys = np.arange(box[1], box[3], dtype=np.float64)[:, None] + 0.5
    (ax, ay), (bx, by) = pts.T, np.roll(pts, -1, axis=0).T
    rows, edges = np.nonzero((ay > ys) != (by > ys))  # edges crossing each row's centre line
    xs = ax[edges] + (ys[rows, 0] - ay[edges]) * (bx[edges] - ax[edges]) / (by[edges] - ay[edges])
    bw = box[2] - box[0]
    cols = np.clip(np.floor(xs - 0.5).astype(np.int64) + 1 - box[0], 0, bw)  # first centre right of it
    toggles = np.bincount(rows * (bw + 1) + cols, minlength=(box[3] - box[1]) * (bw + 1))
    patch = np.cumsum(toggles.reshape(-1, bw + 1), axis=1)[:, :bw] % 2
    return box, patch.astype(bool)


def flood(image: np.ndarray, seed: tuple[int, int], tolerance: int,
          bound: Box) -> Optional[tuple[Box, np.ndarray]]:
    """Pixels 4-connected to ``seed`` whose colour is within ``tolerance`` (per channel)
    of the seed's colour, inside ``bound``."""
    h, w = image.shape[:2]
    bound = clip_box(bound, w, h)
    sx, sy = seed
    if bound is None or not (bound[0] <= sx < bound[2] and bound[1] <= sy < bound[3]):
        return None
    crop = np.ascontiguousarray(image[sl(bound)])
    ff = np.zeros((crop.shape[0] + 2, crop.shape[1] + 2), np.uint8)
    t = (int(tolerance),) * 3
    flags = 4 | cv2.FLOODFILL_MASK_ONLY | cv2.FLOODFILL_FIXED_RANGE | (1 << 8)
    cv2.floodFill(crop, ff, (sx - bound[0], sy - bound[1]), 0, t, t, flags)
    patch = ff[1:-1, 1:-1].astype(bool)
    inner = nonzero_box(patch)
    if inner is None:
        return None
    box = (bound[0] + inner[0], bound[1] + inner[1], bound[0] + inner[2], bound[1] + inner[3])
    return box, patch[sl(inner)]


def cut_line(region: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]) -> np.ndarray:
    """The pixels of ``region`` (a bool patch, p0/p1 in its coordinates) on a 4-connected
    line p0-p1, extended past both ends while it stays on the region, so a cut drawn a
    little short of the edge still goes through. A 4-connected line separates
    8-connected regions."""
    h, w = region.shape
    d = np.subtract(p1, p0, dtype=np.float64)
    n = float(np.hypot(*d))
    if n < 1e-6:
        return np.zeros_like(region)
    u = d / n
    ends = []
    for start, sign in ((np.asarray(p0, float), -1.0), (np.asarray(p1, float), 1.0)):
        q = start
        for _ in range(2 * (h + w)):
            nxt = q + sign * 0.5 * u
            ix, iy = int(math.floor(nxt[0])), int(math.floor(nxt[1]))
            if not (0 <= ix < w and 0 <= iy < h and region[iy, ix]):
                break
            q = nxt
        ends.append(q)
    line = np.zeros((h, w), np.uint8)
    a, b = (np.round((e - 0.5) * 16).astype(np.int64) for e in ends)
    cv2.line(line, (int(a[0]), int(a[1])), (int(b[0]), int(b[1])), 1, 1, cv2.LINE_4, shift=4)
    return line.astype(bool) & region


def nearest_points(a: np.ndarray, b: np.ndarray, cap: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """The closest pair between two point sets (N x 2), each subsampled to ``cap``."""
    a = a[:: max(1, len(a) // cap)]
    b = b[:: max(1, len(b) // cap)]
    d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    return a[i], b[j]


# ----------------------------------------------------------------- pyramids


def pyramid_depth(w: int, h: int, tile: int = TILE) -> int:
    """Levels above full resolution until the whole image fits one tile."""
    return max(0, math.ceil(math.log2(max(w, h) / tile))) if max(w, h) > tile else 0


def _max_pool(a: np.ndarray) -> np.ndarray:
    if a.shape[0] % 2 or a.shape[1] % 2:
        a = np.pad(a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2)))
    return np.maximum(np.maximum(a[0::2, 0::2], a[1::2, 0::2]), np.maximum(a[0::2, 1::2], a[1::2, 1::2]))


class MaxPyramid:
    """Max-pooled levels 1..n of a uint8 raster given by ``base(box)`` (level 0 is not
    stored); max pooling keeps one-pixel lines visible when zoomed out."""

    def __init__(self, w: int, h: int, depth: int, base: Callable[[Box], np.ndarray]) -> None:
        self.base = base
        self.sizes = [(w, h)]
        for _ in range(depth):
            pw, ph = self.sizes[-1]
            self.sizes.append(((pw + 1) // 2, (ph + 1) // 2))
        self.levels: list[Optional[np.ndarray]] = [None] + [np.zeros((s[1], s[0]), np.uint8) for s in self.sizes[1:]]

    def update(self, box: Box) -> None:
        x0, y0, x1, y1 = box
        for lv in range(1, len(self.sizes)):
            cw, ch = self.sizes[lv - 1]
            px0, py0, px1, py1 = x0 // 2, y0 // 2, (x1 + 1) // 2, (y1 + 1) // 2
            child = (2 * px0, 2 * py0, min(2 * px1, cw), min(2 * py1, ch))
            src = self.base(child) if lv == 1 else self.levels[lv - 1][sl(child)]
            self.levels[lv][py0:py1, px0:px1] = _max_pool(src)
            x0, y0, x1, y1 = px0, py0, px1, py1


class ImagePyramid:
    """Area-averaged halvings of an image, built on first use (level 0 is the image).
    ``reuse``: a previous pyramid whose level buffers of the same size are written over."""

    def __init__(self, image: np.ndarray, depth: int, reuse: Optional["ImagePyramid"] = None) -> None:
        self.levels: list[Optional[np.ndarray]] = [image] + [None] * depth
        self._spare = [lv for lv in (reuse.levels[1:] if reuse else []) if lv is not None]

    @property
    def depth(self) -> int:
        return len(self.levels) - 1

    def level(self, lv: int) -> np.ndarray:
        lv = min(max(lv, 0), self.depth)
        if self.levels[lv] is None:
            src = self.level(lv - 1)
            h, w = src.shape[:2]
            shape = ((h + 1) // 2, (w + 1) // 2) + src.shape[2:]
            dst = next((a for a in self._spare if a.shape == shape and a.dtype == src.dtype), None)
            if dst is not None:
                self._spare.remove(dst)
            self.levels[lv] = cv2.resize(src, (shape[1], shape[0]), dst=dst, interpolation=cv2.INTER_AREA)
        return self.levels[lv]


# ----------------------------------------------------------------- undo support


class PatchRecorder:
    """Saves the original blocks of some arrays the first time a box touches them, then
    gives the before/after patches of everything that changed (trimmed to the change)."""

    B = 64

    def __init__(self, *arrays: np.ndarray) -> None:
        self.arrays = arrays
        self.blocks: dict[tuple[int, int], list[np.ndarray]] = {}
        self.box: Optional[Box] = None

    def touch(self, box: Box) -> None:
        b = self.B
        for by in range(box[1] // b, (box[3] - 1) // b + 1):
            for bx in range(box[0] // b, (box[2] - 1) // b + 1):
                if (by, bx) not in self.blocks:
                    blk = (bx * b, by * b, bx * b + b, by * b + b)
                    self.blocks[by, bx] = [a[sl(blk)].copy() for a in self.arrays]
                    self.box = union_box(self.box, clip_box(blk, self.arrays[0].shape[1], self.arrays[0].shape[0]))

    def changed(self) -> bool:
        b = self.B
        return any(not np.array_equal(saved[k], a[by * b:by * b + b, bx * b:bx * b + b])
                   for (by, bx), saved in self.blocks.items() for k, a in enumerate(self.arrays))

    def edits(self) -> list[Optional[MaskEdit]]:
        """One :class:`MaskEdit` (or None: unchanged) per array."""
        if self.box is None:
            return [None] * len(self.arrays)
        x0, y0 = self.box[:2]
        out = []
        for k, a in enumerate(self.arrays):
            after = a[sl(self.box)]
            before = after.copy()
            for (by, bx), saved in self.blocks.items():
                blk = saved[k]
                oy, ox = by * self.B - y0, bx * self.B - x0
                before[oy:oy + blk.shape[0], ox:ox + blk.shape[1]] = blk
            e = MaskEdit.from_diff(before, after)
            out.append(None if e is None else MaskEdit(e.x + x0, e.y + y0, e.before, e.after))
        return out


def edit_box(cmd: object, w: int, h: int) -> Box:
    """The box an undo command touches (the whole image when unknown)."""
    bbox = getattr(cmd, "bbox", None)
    if bbox is None:
        return (0, 0, w, h)
    x, y, bw, bh = bbox
    return (x, y, x + bw, y + bh)


# ----------------------------------------------------------------- the editor


@dataclass
class RegionInfo:
    id: int
    first: tuple[int, int]  # (y, x) of its first pixel in raster order
    area: int
    box: Box
    centroid: tuple[float, float]
    code: int
    outline: np.ndarray = field(default=None, repr=False)  # K x 4 pixel-edge segments (outline_segments)


@dataclass(frozen=True)
class StepResult:
    """What an edit (or undo/redo) changed: the box to repaint and the regions that went
    away / came in (by internal id)."""

    box: Box
    removed: tuple[int, ...]
    added: tuple[int, ...]


class LabelEditor:
    """The working label of the image being edited (see the module notes)."""

    def __init__(self, history: UndoHistory) -> None:
        self.history = history
        self.class_names: list[str] = []
        self.paint_class: Optional[str] = None
        self.image_id: Optional[int] = None
        self.mask = np.zeros((0, 0), bool)
        self.cls = np.zeros((0, 0), np.uint8)
        self.pyramid: Optional[MaxPyramid] = None
        self._regions: dict[int, RegionInfo] = {}
        self._order: list[int] = []
        self._index: dict[int, int] = {}
        self._next_id = 1
        self._rec: Optional[PatchRecorder] = None
        self._stroke: Optional[tuple[bool, Optional[tuple[float, float]]]] = None
        # class-raster patch of each step, by id of its MaskEdit (dropped when the history drops it)
        self._cls_edits: dict[int, tuple[weakref.ref, Optional[MaskEdit]]] = {}

    # ---- classes

    def code_of(self, name: Optional[str]) -> int:
        if name is None:
            return UNCLASSIFIED
        if name not in self.class_names:
            if len(self.class_names) >= 254:
                raise ValueError("at most 254 defect classes")
            self.class_names.append(name)
        return self.class_names.index(name) + 2

    def name_of(self, code: int) -> Optional[str]:
        return self.class_names[code - 2] if code >= 2 else None

    # ---- loading and queries

    @property
    def size(self) -> tuple[int, int]:
        return self.mask.shape[1], self.mask.shape[0]

    def load(self, image_id: int, shape: tuple[int, int], mask: Optional[np.ndarray],
             classes: Sequence[Optional[str]] = ()) -> None:
        """Start editing ``image_id``: copies ``mask`` (None = empty) and colours its
        regions (``label_regions`` order) by ``classes``."""
        self.cancel_step()
        self.image_id = image_id
        h, w = shape
        if mask is not None and np.shape(mask) != (h, w):
            raise ValueError(f"mask is {np.shape(mask)}, the image {(h, w)}")
        self.mask = self._mask_buffer((h, w), mask)
        self.cls = np.zeros((h, w), np.uint8)  # pages stay untouched until written
        self._regions = {}
        self.pyramid = MaxPyramid(w, h, pyramid_depth(w, h), self.display)
        comps = sorted(components(self.mask, (0, 0, w, h)), key=lambda c: c.first)
        for k, c in enumerate(comps):
            code = self.code_of(classes[k] if k < len(classes) else None)
            self.cls[sl(c.box)][c.own] = code
            self._add_region(c, code)
            self.pyramid.update(c.box)
        self._reorder()

    def _mask_buffer(self, shape: tuple[int, int], mask: Optional[np.ndarray]) -> np.ndarray:
        """A bool copy of ``mask``; reuses the previous buffer when nothing else holds it
        (fresh pages of a 100 MB mask cost more than the copy itself)."""
        old, self.mask = self.mask, np.zeros((0, 0), bool)
        if mask is None:
            return np.zeros(shape, bool)
        if old.shape == shape and sys.getrefcount(old) <= 2:  # `old` and the call's argument
            np.copyto(old, mask, casting="unsafe")  # any dtype: non-zero -> True
            return old
        return np.asarray(mask).astype(bool)

    def display(self, box: Box) -> np.ndarray:
        """Class code per pixel where the mask is set, else 0 (what the overlay shows)."""
        return self.cls[sl(box)] * self.mask[sl(box)]

    def regions(self) -> list[Region]:
        return [Region(i + 1, r.area, (r.box[0], r.box[1], r.box[2] - r.box[0], r.box[3] - r.box[1]), r.centroid)
                for i, r in enumerate(self.region_infos())]

    def by_id(self, region_id: int) -> RegionInfo:
        return self._regions[region_id]

    def region_infos(self) -> list[RegionInfo]:
        return [self._regions[i] for i in self._order]

    def region_classes(self) -> list[Optional[str]]:
        return [self.name_of(r.code) for r in self.region_infos()]

    def index_of(self, region_id: int) -> int:
        return self._index.get(region_id, 0)

    def info(self, index: int) -> RegionInfo:
        if not 1 <= index <= len(self._order):
            raise IndexError(f"no region {index} (there are {len(self._order)})")
        return self._regions[self._order[index - 1]]

    def region_pixels(self, index: int) -> tuple[Box, np.ndarray]:
        r = self.info(index)
        crop = np.ascontiguousarray(self.mask[sl(r.box)]).view(np.uint8)
        ff = np.zeros((crop.shape[0] + 2, crop.shape[1] + 2), np.uint8)
        seed = (r.first[1] - r.box[0], r.first[0] - r.box[1])
        cv2.floodFill(crop, ff, seed, 0, 0, 0, 8 | cv2.FLOODFILL_MASK_ONLY | (1 << 8))
        return r.box, ff[1:-1, 1:-1].astype(bool)

    def region_at(self, x: int, y: int) -> int:
        w, h = self.size
        if not (0 <= x < w and 0 <= y < h) or not self.mask[y, x]:
            return 0
        cands = [i + 1 for i, rid in enumerate(self._order)
                 if intersects(self._regions[rid].box, (x, y, x + 1, y + 1))]
        for index in cands if len(cands) > 1 else []:
            box, patch = self.region_pixels(index)
            if patch[y - box[1], x - box[0]]:
                return index
        return cands[0] if cands else 0

    # ---- steps

    def _begin(self) -> None:
        if self._rec is not None:
            raise RuntimeError("an edit is already in progress")
        self._rec = PatchRecorder(self.mask, self.cls)

    def _touch(self, box: Box) -> None:
        self._rec.touch(box)

    def _end(self) -> Optional[StepResult]:
        rec = self._rec
        if rec is None or rec.box is None or not rec.changed():
            self._rec = None
            return None
        removed, added = self._relabel(rec.box)  # its class normalisation is part of the step
        self._rec = None
        mask_edit, cls_edit = rec.edits()
        if mask_edit is None:  # class-only step: a no-op mask edit carries it in the history
            x, y = (cls_edit.x, cls_edit.y)
            px = self.mask[y:y + 1, x:x + 1].copy()
            mask_edit = MaskEdit(x, y, px, px.copy())
        self.history.of(self.image_id).push(mask_edit)
        self._cls_edits[id(mask_edit)] = (weakref.ref(mask_edit), cls_edit)
        weakref.finalize(mask_edit, self._cls_edits.pop, id(mask_edit), None)
        self.pyramid.update(rec.box)
        return StepResult(rec.box, removed, added)

    def cancel_step(self) -> Optional[Box]:
        """Abandon an open stroke: restore what it changed, record nothing; returns the
        box restored."""
        rec, self._rec, self._stroke = self._rec, None, None
        if rec is None or rec.box is None:
            return None
        for k, a in enumerate(rec.arrays):
            for (by, bx), saved in rec.blocks.items():
                blk = saved[k]
                a[by * rec.B:by * rec.B + blk.shape[0], bx * rec.B:bx * rec.B + blk.shape[1]] = blk
        self.pyramid.update(rec.box)
        return rec.box

    @property
    def stroke_active(self) -> bool:
        return self._stroke is not None

    def begin_stroke(self, erase: bool) -> None:
        self._begin()
        self._stroke = (erase, None)

    def stroke_to(self, x: float, y: float, size: int) -> Optional[Box]:
        """Paint (or erase) from the last stroke point to (x, y): returns the box changed."""
        erase, last = self._stroke
        p = snap(x, y, size)
        self._stroke = (erase, p)
        shape = capsule(last or p, p, size / 2.0, *self.size)
        if shape is None:
            return None
        box, patch = shape
        self._touch(box)
        self._apply(box, patch, erase)
        return box

    def end_stroke(self) -> Optional[StepResult]:
        self._stroke = None
        return self._end()

    def _apply(self, box: Box, patch: np.ndarray, erase: bool) -> None:
        m = self.mask[sl(box)]
        if erase:
            self.cls[sl(box)][patch & m] = 0
            m &= ~patch
        else:
            self.cls[sl(box)][patch & ~m] = self.code_of(self.paint_class)
            m |= patch
        self.pyramid.update(box)

    def _one_step(self, box: Box, patch: np.ndarray, erase: bool = False) -> Optional[StepResult]:
        self._begin()
        self._touch(box)
        self._apply(box, patch, erase)
        return self._end()

    # ---- single-step edits

    def fill_polygon(self, points: Sequence[tuple[float, float]]) -> Optional[StepResult]:
        shape = polygon(points, *self.size)
        return None if shape is None else self._one_step(*shape)

    def flood_fill(self, image: np.ndarray, x: int, y: int, tolerance: int, bound: Box) -> Optional[StepResult]:
        shape = flood(image, (x, y), tolerance, bound)
        return None if shape is None else self._one_step(*shape)

    def replace_mask(self, new_mask: np.ndarray) -> Optional[StepResult]:
        new = as_bool(new_mask)
        diff = MaskEdit.from_diff(self.mask, new)
        if diff is None:
            return None
        x, y, w, h = diff.bbox
        box = (x, y, x + w, y + h)
        self._begin()
        self._touch(box)
        self.cls[sl(box)][new[sl(box)] & ~self.mask[sl(box)]] = self.code_of(self.paint_class)
        self.mask[sl(box)] = new[sl(box)]
        return self._end()

    def delete_region(self, index: int) -> Optional[StepResult]:
        box, patch = self.region_pixels(index)
        return self._one_step(box, patch, erase=True)

    def set_region_class(self, index: int, name: Optional[str]) -> Optional[StepResult]:
        self.info(index)
        self._begin()
        self._paint_region(self.info(index), self.code_of(name), force=True)
        return self._end()

    def merge_regions(self, a: int, b: int) -> Optional[StepResult]:
        """Join region b to region a with a one-pixel bridge between their closest
        points; the result takes a's class (b's when a is unclassified)."""
        if a == b:
            return None
        ra, rb = self.info(a), self.info(b)
        qa, qb = nearest_points(*(self._boundary_pixels(i) for i in (a, b)))
        code = ra.code if ra.code >= 2 else rb.code
        w, h = self.size
        box = clip_box((int(min(qa[0], qb[0])), int(min(qa[1], qb[1])),
                        int(max(qa[0], qb[0])) + 1, int(max(qa[1], qb[1])) + 1), w, h)
        bridge = np.zeros((box[3] - box[1], box[2] - box[0]), np.uint8)
        p0, p1 = (tuple(int(v) for v in np.floor(q - (box[0], box[1]))) for q in (qa, qb))
        cv2.line(bridge, p0, p1, 1, 1, cv2.LINE_8)
        self._begin()
        self._paint_region(ra, code)
        self._paint_region(rb, code)
        self._touch(box)
        patch = bridge.astype(bool)
        self.cls[sl(box)][patch] = code
        self.mask[sl(box)] |= patch
        return self._end()

    def _boundary_pixels(self, index: int) -> np.ndarray:
        """Centres of a region's boundary pixels (N x 2, image coordinates)."""
        box, patch = self.region_pixels(index)
        contours, _ = cv2.findContours(patch.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        return np.concatenate(contours).reshape(-1, 2) + (box[0] + 0.5, box[1] + 0.5)

    def split_region(self, index: int, p0: tuple[float, float], p1: tuple[float, float]) -> Optional[StepResult]:
        """Cut region ``index`` along the line p0-p1 (see :func:`cut_line`); None, and
        nothing changed, when the cut does not split it."""
        box, patch = self.region_pixels(index)
        off = np.array([box[0], box[1]], float)
        cut = cut_line(patch, tuple(np.subtract(p0, off)), tuple(np.subtract(p1, off)))
        rest = (patch & ~cut).astype(np.uint8)
        if cv2.connectedComponents(rest, connectivity=8)[0] - 1 < 2:
            return None
        return self._one_step(box, cut, erase=True)

    # ---- undo / redo

    def undo(self) -> Optional[StepResult]:
        return self._history_step(redo=False)

    def redo(self) -> Optional[StepResult]:
        return self._history_step(redo=True)

    def _history_step(self, redo: bool) -> Optional[StepResult]:
        if self._stroke is not None:
            self.end_stroke()
        hist = self.history.of(self.image_id)
        cmd = hist.redo(self.mask) if redo else hist.undo(self.mask)
        if cmd is None:
            return None
        w, h = self.size
        box = edit_box(cmd, w, h)
        pair = self._cls_edits.get(id(cmd))
        if pair is not None and pair[0]() is cmd and pair[1] is not None:
            (pair[1].apply if redo else pair[1].revert)(self.cls)
            box = union_box(box, edit_box(pair[1], w, h))
        cls, m = self.cls[sl(box)], self.mask[sl(box)]
        cls[m & (cls == 0)] = UNCLASSIFIED  # pixels set by a command from elsewhere
        self.pyramid.update(box)
        removed, added = self._relabel(box)
        return StepResult(box, removed, added)

    # ---- regions

    def _paint_region(self, r: RegionInfo, code: int, force: bool = False) -> None:
        """Give every pixel of region ``r`` the class ``code``."""
        if r.code == code and not force:
            return
        index = self.index_of(r.id)
        box, patch = self.region_pixels(index)
        if self._rec is not None:
            self._touch(box)
        self.cls[sl(box)][patch] = code
        r.code = code

    def _relabel(self, dirty: Box) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Recompute the regions touching ``dirty`` (and only those)."""
        w, h = self.size
        area = expand_box(dirty, 1, w, h)
        while True:
            hits = [r for r in self._regions.values() if intersects(r.box, area)]
            grown = area
            for r in hits:
                grown = union_box(grown, r.box)
            if grown == area:
                break
            area = grown
        old = {(r.first, r.area, r.box): r for r in hits if not intersects(r.box, expand_box(dirty, 1, w, h))}
        for r in hits:
            del self._regions[r.id]
        added = []
        for c in components(self.mask, area):
            keep = old.pop((c.first, c.area, c.box), None)
            if keep is not None:  # pulled in by the growing area, untouched
                self._regions[keep.id] = keep
                continue
            cls = self.cls[sl(c.box)]
            code = self._vote(cls[c.own])
            if self._rec is not None and (cls[c.own] != code).any():
                self._touch(c.box)
                cls[c.own] = code
            added.append(self._add_region(c, code).id)
        kept = set(self._regions)
        self._reorder()
        return tuple(r.id for r in hits if r.id not in kept), tuple(added)

    def _add_region(self, c: Component, code: int) -> RegionInfo:
        outline = outline_segments(c.own, c.box[0], c.box[1])
        info = RegionInfo(self._next_id, c.first, c.area, c.box, c.centroid, code, outline)
        self._next_id += 1
        self._regions[info.id] = info
        return info

    def _reorder(self) -> None:
        self._order = sorted(self._regions, key=lambda i: self._regions[i].first)
        self._index = {rid: i + 1 for i, rid in enumerate(self._order)}

    @staticmethod
    def _vote(codes: np.ndarray) -> int:
        counts = np.bincount(codes, minlength=2)
        if len(counts) > 2 and counts[2:].any():
            return int(np.argmax(counts[2:])) + 2
        return UNCLASSIFIED



# ----------------------------------------------------------------- display helpers


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Outer and hole outlines of a mask (N x 2 float arrays through pixel centres)."""
    m = as_bool(mask)
    box = nonzero_box(m)
    if box is None:
        return []
    crop = np.ascontiguousarray(m[sl(box)]).view(np.uint8)
    contours, _ = cv2.findContours(crop, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1, 2).astype(np.float64) + (box[0] + 0.5, box[1] + 0.5) for c in contours]


def heat_rgba(heat: np.ndarray, max_side: int = 2048, lo: float = 0.35, hi: float = 1.0) -> np.ndarray:
    """A heat map (1.0 = the pixel threshold) as premultiplied RGBA for display: turbo
    colours over 0..2, transparent below ``lo``, opaque from ``hi``; subsampled so the
    longer side is at most ``max_side`` (heat maps are smooth)."""
    h = np.asarray(heat, np.float32)
    step = max(1, math.ceil(max(h.shape) / max_side))
    h = np.ascontiguousarray(h[::step, ::step])
    rgb = cv2.applyColorMap(np.clip(h * 127.5, 0, 255).astype(np.uint8), cv2.COLORMAP_TURBO)[..., ::-1]
    t = np.clip((h - lo) / (hi - lo), 0.0, 1.0)
    alpha = t * t * (3 - 2 * t)  # smoothstep
    out = np.empty(h.shape + (4,), np.uint8)
    out[..., :3] = (rgb * alpha[..., None]).astype(np.uint8)
    out[..., 3] = (alpha * 255).astype(np.uint8)
    return out
