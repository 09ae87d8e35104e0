"""Model 1 of spec 003: the unsupervised pre-labeller.

Trained on defect-free ("good") images only. Default method PatchCore: locally aware
(3x3 average-pooled) patch features of EfficientNet-Lite0 with offline ImageNet weights
(``blocks.0`` + ``blocks.1`` on a 4-px grid of the image magnified 2x by default, i.e. every
2 px of the image; ``blocks.2`` + ``blocks.4`` on an 8-px grid by config), a memory bank of good patches chosen by greedy k-center
coreset, and the distance of every test patch to its nearest good patch as the anomaly
map. Option ``method="padim"``: one Gaussian of the patch features shared by all
positions (fabric is stationary and tiles have no fixed place in the image) and the
Mahalanobis distance.

1. Images are magnified by ``scale`` (2 by default: small defects cover more patches) and
   cut into ``tile`` windows, so a 4096-px-wide web image keeps its 2-px lines.
2. The good images are split (seeded) into a *fit* part, which builds the model, and a
   *holdout* part, which is scored by it to calibrate the image and pixel thresholds.
   No defective image is needed or used, anywhere. The holdout maps also give the
   border profile: the map's mean and sd by distance to the image edge, where the
   backbone's zero padding raises and spreads the scores; every map is standardised
   ring by ring to the interior's mean and sd before anything is thresholded.
3. The map is blurred; image score = max of the map; mask = map above the pixel
   threshold, its thin straight lines drawn along their length (:mod:`annotator.ml.line_trace`),
   the other regions refined with the less blurred map, by colour (GrabCut) and by the
   difference to a matched piece of good fabric (:mod:`annotator.ml.reference_refine`), and
   cleaned; empty when the image is judged good.

Used by the GUI / CLI through :func:`fit_prelabeller`, :meth:`Prelabeller.predict`,
:meth:`Prelabeller.save` and :meth:`Prelabeller.load`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from annotator.core.jobs import CancelToken, ProgressFn, check_cancel, no_progress
from annotator.core.masks import rect_sides, regions_peaking_above, remove_small_regions
from annotator.ml.backbone import STAGES, create_lite0_features, full_fp32, normalise, pick_device
from annotator.ml.line_trace import trace_lines
from annotator.ml.reference_refine import reference_crops, refine_with_reference
from annotator.ml.weave_residual import MARGIN, Findings, WeaveResidual

FORMAT = "annotator.prelabel"
COARSE_MIN_PX = 256  # px after scale: smallest tile / image side for the coarse memory (see PrelabelConfig)
# 2: border profile, 3: coarse memory, 4: weave residual (older readers would ignore them and mis-threshold)
FORMAT_VERSION = 4
# The weave-residual detectors need this many held-out good images: their z-scores' means and sds come from
# them. With 8 (the demo's 40 good images) the spot score's sd came out at 0.011, against 0.028 with 12 held
# out on another twill, and 2 of 12 good demo images were called defective (none of 20 with 12 held out)
WEAVE_MIN_HOLDOUT = 12
CONFIG_FILE = "prelabeller.json"
TENSORS_FILE = "prelabeller.pt"
METHODS = ("patchcore", "padim")


@dataclass(frozen=True)
class PrelabelConfig:
    """Settings of model 1. The defaults were chosen by ``annotator.bench.prelabel`` on
    the demo fabrics (5 styles, 7 defect kinds); see the comments for the reasons."""

    # --- model
    method: str = "patchcore"  # "patchcore" (nearest good patch) or "padim" (Gaussian, Mahalanobis)
    # Lite0 stages. blocks.0 + blocks.1 (stride 2 and 4, 40 channels) beat blocks.2 + blocks.4 (stride 8 and 16)
    # on the demo fabrics: pixel AUROC +0.05..0.09 on all 5 styles, image AUROC better on knits, a little worse
    # on plain / satin; thin lines and knots need the fine grid. The backbone is also cut after blocks.1 (cheap).
    layers: tuple[str, ...] = ("blocks.0", "blocks.1")
    backbone_weights: Optional[str] = None  # None: the offline default of annotator.ml.backbone
    grid_stride: int = 4  # px between patches; 0 = the finest layer's stride (other maps are resized to it)
    pool: int = 3  # "locally aware" average pooling of each stage's map (odd; 1 = none)
    # A second, coarse memory (PatchCore only): the deeper stages blocks.2 + blocks.4 (stride 8 and 16, 152
    # channels) with their own bank. Its map is scaled to the fine map's units on the held-out good images (equal
    # 0.999 quantiles), times coarse_weight, and added; the thresholds are calibrated on the sum, the mask's fine
    # map stays the fine memory's. The fine stages see threads, knots and thin lines; the deep ones see what
    # natural textures vary in. Image AUROC (docs/benchmarks.md): scikit-image brick / grass / gravel photographs
    # (128-px crops, 100 good, 40 defects each from another generator) 0.963 / 0.632 / 0.762 fine only -> 0.973 /
    # 0.728 / 0.860; the 5 demo fabrics 0.952 -> 0.954. The weight was chosen on the two memories' maps fitted
    # apart: weight 0.5 / 1 / 2 gave photographs 0.854 / 0.862 / 0.869, demo 0.956 / 0.947 / 0.932 (knit and rib
    # lose as the deep stages weigh more). Used only where the model's images and tiles are at least
    # COARSE_MIN_PX (after scale): on smaller ones blocks.4 sees mostly padding (96-px images, 12 good: 3 of 8
    # new good images called defective, none without it). () or weight 0 = off.
    coarse_layers: tuple[str, ...] = ("blocks.2", "blocks.4")
    coarse_weight: float = 0.5
    # px between the coarse memory's patches; 0 = its finest layer's stride (8). 16 (4x fewer patches to search)
    # lost on the photographs above: image AUROC 0.978 / 0.665 / 0.828 instead of 0.975 / 0.700 / 0.887 (both
    # with a 10 000-patch coarse bank)
    coarse_grid_stride: int = 0
    # --- geometry
    tile: int = 512  # window of the scaled image (px after scale); a 256x256 image magnified 2x is one tile
    tile_overlap: int = 32  # px shared by neighbouring tiles; their maps are blended with ramps
    context: int = 0  # px of surrounding image fed with each tile (mirrored past the image edge) and cut off
    #                   after feature extraction (multiple of 16). It removes the frame of raised scores the
    #                   CNN's zero padding leaves along image edges, but the mirrored fabric costs more than it
    #                   gains (rib: image AUROC 0.80 -> 0.68 with 16 px), so it is off by default
    # Resize factor before tiling (e.g. 0.5 for oversampled images); results are full size. 2 magnifies the
    # fabric so that Lite0's first stages see small defects (knots, fine lines) over more patches. The sizes in
    # px after scale (tile, blur_sigma, refine_sigma) are set for 2 and keep their meaning in px of the image
    # (256-px window, 4-px and 1-px blur); config_for_scale() sets all four for another scale. Against scale 1
    # on the 5 demo fabrics, 3 draws (seeds 0 / 1 / 7; 200 good, 62 test images each): image AUROC 0.925 /
    # 0.956 / 0.950 -> 0.952 / 0.975 / 0.957, pixel AUROC 0.966 / 0.975 / 0.975 -> 0.967 / 0.971 / 0.978,
    # mean IoU 0.422 / 0.429 / 0.417 -> 0.490 / 0.520 / 0.469, pre-labels a reviewer can keep (tolerant
    # IoU >= 0.8) 72 / 76 / 82 -> 94 / 111 / 92 of 210 (with refine_quantile 0.999 below; docs/benchmarks.md).
    # It costs about 4x the backbone and search work; config_for_scale(1.0) is the fast setting.
    scale: float = 2.0
    # --- PatchCore memory bank (greedy k-center coreset)
    coreset_ratio: float = 0.1  # keep this share of the collected patches (PatchCore / anomalib default) ...
    coreset_max: int = 10_000  # ... but at most this many: NN search cost grows with the bank
    # ... and at most this many in the coarse memory's bank. 4096 instead of 10 000 (its 10 %): image AUROC on the
    # photographs 0.854 -> 0.853, twill 0.949 -> 0.945, knit 0.952 -> 0.960; fit 72 -> 55 s, 1.2 -> 1.7 images/s
    coarse_coreset_max: int = 4096
    coreset_presample: int = 100_000  # random cap on the patches collected from the fit images
    coreset_proj_dim: int = 0  # >0: choose the coreset in a random projection of this width (0: full width)
    # --- PaDiM
    padim_features: int = 100  # random subset of the feature channels kept (PaDiM's reduction; all 40 of blocks.0+1)
    padim_eps: float = 0.01  # ridge added to the covariance diagonal
    # --- calibration on held-out good images (never on defective ones)
    holdout_fraction: float = 0.2  # share of the good images kept out of the model to calibrate thresholds
    min_holdout: int = 2  # at least this many holdout images
    # image threshold = max(largest holdout image score, their mean + image_sd_k sd) x image_margin. Over 40
    # holdout images the largest score is about the 97.5th percentile of good images (0-5 % of the good test
    # images of the demo fabrics exceed it); the mean + 3 sd floor guards small holdouts; a margin > 1 trades
    # recall for fewer false alarms (1.1 cost 10-15 points of recall on the demo fabrics and saved 0-5 % alarms)
    image_margin: float = 1.0
    image_sd_k: float = 3.0
    # few holdout images: their max is a poor estimate of the good images' upper tail (over 2 images a new good
    # image exceeds it 1 time in 3), so the threshold's excess over the median pixel is widened by this / n_holdout
    # (2.5 % at 40 holdout images, 50 % at 2)
    image_small_holdout: float = 1.0
    # pixel threshold = this quantile of all holdout map values (capped at the image threshold). It only shapes
    # the masks of images already judged defective, so it sits below the image threshold and covers the defect's
    # extent: mean IoU over 5 demo styles 0.18 / 0.21 / 0.22 at 0.999 / 0.9999 / 0.99999
    pixel_quantile: float = 0.9999
    # Each region of the map above the pixel threshold is cut at this fraction of its own height
    # (median good pixel -> region peak; 0.5 = "full width at half maximum"). A fixed threshold
    # draws strong defects fat: the blurred map of a deep hole is above it far beyond the hole.
    # Pre-labels a reviewer can keep (tolerant IoU >= 0.8), 5 demo fabrics, seed 7, 40 per kind:
    # all defective 19.6 % -> 25.4 % (holes 40 -> 62 %, slubs 38 -> 55 %, stains 50 -> 52 %, lines and
    # knots unchanged); 0.4 / 0.6 / 0.7 gave 22.9 / 23.2 / 17.1 %. 0 = off.
    region_peak_fraction: float = 0.5
    refit_with_holdout: bool = False  # afterwards add the holdout patches to the bank (see fit_prelabeller)
    # Border correction. The backbone's zero padding raises and spreads the scores near the image edge:
    # on held-out good demo images the map's sd within 1 px of the edge is 1.7-1.9x the interior's, and
    # 55-70 % of good real photographs (brick / grass / gravel crops) had their maximum within 8 px of
    # the edge, so the image score measured the frame more than the fabric. Calibration learns,
    # from the held-out good maps, the mean and sd of the map at each distance d < border_px from the
    # edge, and maps at that distance are standardised to the interior's mean and sd (the units stay
    # those of the interior; 0 = off). Image AUROC over the 5 demo fabrics (seed 7, 200 good): 0.916 ->
    # 0.943 (knit 0.905 -> 0.966), pixel AUROC 0.971 -> 0.973; the same with 24 or 48 px.
    border_px: int = 32
    # --- map and mask
    blur_sigma: float = 8.0  # Gaussian blur of the anomaly map (score, heatmap, coarse mask), px after scale (4 px of the image at scale 2)
    refine: bool = True  # inside the (dilated) coarse mask keep the pixels where the less blurred map is high:
    #                      mean IoU 0.214 -> 0.248 over the 5 demo styles (better on each), thin lines get thinner
    refine_sigma: float = 2.0  # blur of that fine map, px after scale (1 px of the image at scale 2)
    # its threshold: this quantile of the holdout fine maps. At scale 2, 0.999 instead of 0.9999 kept 3 / 13 / 0
    # more pre-labels on the three draws above (mean IoU +0.02 / +0.03 / +0.01) and gave no good image a mask
    refine_quantile: float = 0.999
    # Colour refinement of compact regions (holes, stains, knots, slubs): OpenCV GrabCut on a crop around each
    # region, its colour model seeded from the region's core (see grabcut_regions). Thin, elongated regions (lines)
    # keep the map's mask: GrabCut's boundary term shaves 1-3 px lines away. Measured on the demo fabrics (twill,
    # knit, plain; 60 good images; 4 test images per kind): mean IoU holes 0.55/0.68/0.48 -> 0.66/0.71/0.58, slubs
    # 0.56/0.59/0.51 -> 0.68/0.62/0.46, stains 0.19/0.42/0.15 -> 0.18/0.45/0.20; pre-labels a reviewer can keep as
    # they are (tolerant IoU >= 0.8) 3 -> 9 of 84 defective images; no good image gained a mask.
    grabcut: bool = True
    grabcut_ring: int = 6  # px
    grabcut_iters: int = 4
    grabcut_line_width: float = 6.0  # px: regions thinner than this and 5x as long are lines (left as they are)
    # Then every region is redrawn from the difference to a matched piece of good fabric (the image itself
    # near the region, and reference crops of good images kept in the model file); see
    # annotator.ml.reference_refine. Pre-labels a reviewer can keep (tolerant IoU >= 0.8), 5 demo fabrics,
    # seed 7, 8 per kind: 26 % -> 40 % of defective images (lines 2 -> 25 of 120), mean IoU 0.360 -> 0.407;
    # real brick photographs: 4 -> 7 of 40 kept (docs/benchmarks.md). Costs ~0.1 s per defective 256 px image.
    reference_refine: bool = True
    reference_images: int = 8  # good fit images kept (centre crops <= 256 px) as references; 0 = the image only
    # Before all that, thin straight lines (elongated regions of the map's mask whose residual to matched good
    # fabric has a thin straight ridge) are drawn along their whole length (annotator.ml.line_trace): the
    # per-pixel refinements above cut a faint line into pieces. Pre-labels a reviewer can keep, 5 demo fabrics,
    # seed 0, 60 good images, 42 defective each: 102 -> 129 of 210 (lines 30 -> 57 of 90); compact kinds unchanged.
    trace_lines: bool = True
    # A second look at the image with the weave's own spectrum taken out (annotator.ml.weave_residual): the best
    # long thin line along it and the strongest spot. Each one's z-score on the held-out good images, less
    # MARGIN (1), enters the image score in the map's units: score = max(map max, mean + sd x (z - 1)) with the
    # mean and sd of the held-out map maxima; what a detector calls is drawn (a line traced along its length, a
    # spot's region). Open-width creases that cross the yarns look like the gap between two yarns to a 4-px
    # patch; their length and straightness give them away; faint stains hide in the weave's texture. Image
    # AUROC, 5 demo fabrics (docs/benchmarks.md, session 14). False = the map alone.
    weave_residual: bool = True
    min_region_area: int = 16  # px; smaller mask regions are dropped
    # A region of the final mask is kept only where the map reaches this multiple of the image threshold on it
    # (or within 2 px): each region must be a detection by itself, the rule the image decision applies to
    # the image's strongest region. The weaker regions beside a real defect (the fabric's own noise above the
    # pixel threshold) were the reviewer's work: pre-labels a reviewer can keep (tolerant IoU >= 0.8), 5 demo
    # fabrics, seed 0, 60 good images, 42 defective each: 90 -> 100 of 210 (knots 6 -> 9, slubs 18 -> 22,
    # stains 11 -> 13), good images given a mask 2 -> 1 of 100; 0.98 / 1.02 / 1.05 gave 98 / 99 / 99. 0 = off.
    region_min_peak: float = 1.0
    close_radius: int = 1  # px; morphological closing of the mask
    # --- runtime
    device: str = "auto"  # "auto": first CUDA GPU, else CPU
    seed: int = 0
    batch_size: int = 16  # tiles per forward pass
    num_threads: int = 0  # torch CPU threads while working; 0 = torch's default (physical cores)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        unknown = [name for name in self.layers if name not in STAGES]
        if not self.layers or unknown:
            raise ValueError(f"layers must be Lite0 stages {list(STAGES)}, got {self.layers}")
        if any(name not in STAGES for name in self.coarse_layers):
            raise ValueError(f"coarse_layers must be Lite0 stages {list(STAGES)}, got {self.coarse_layers}")
        if self.coarse_weight < 0:
            raise ValueError("coarse_weight must be >= 0")
        if self.tile < 32 or not 0 <= self.tile_overlap < self.tile // 2:
            raise ValueError("tile must be >= 32 and 0 <= tile_overlap < tile/2")
        if self.context < 0 or self.context % 16:
            raise ValueError("context must be a non-negative multiple of 16")
        if not 0 < self.scale <= 4:
            raise ValueError("scale must be in (0, 4]")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError("holdout_fraction must be in (0, 1)")
        if self.border_px < 0:
            raise ValueError("border_px must be >= 0")
        if self.reference_images < 0:
            raise ValueError("reference_images must be >= 0")
        if self.region_min_peak < 0:
            raise ValueError("region_min_peak must be >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["coarse_layers"] = list(self.coarse_layers)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "PrelabelConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "layers" in kwargs:
            kwargs["layers"] = tuple(kwargs["layers"])
        # a model saved before the coarse memory existed has none
        kwargs["coarse_layers"] = tuple(kwargs.get("coarse_layers", ()))
        return cls(**kwargs)

    @property
    def uses_coarse(self) -> bool:
        """Whether a fit builds the coarse memory (if its good images are also >= COARSE_MIN_PX after scale)."""
        return (self.method == "patchcore" and bool(self.coarse_layers) and self.coarse_weight > 0
                and self.tile >= COARSE_MIN_PX)


@dataclass(frozen=True)
class PrelabelResult:
    """Model 1's output for one image."""

    score: float  # image anomaly score: max of the map, or of the weave-residual detectors' (map units) if higher
    heatmap: np.ndarray  # float32 HxW, 1.0 == pixel threshold
    mask: np.ndarray  # bool HxW; empty when not is_defect
    is_defect: bool  # score > image threshold


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _torch_threads(n: int):
    """Use ``n`` intra-op threads inside the block (0: leave torch's setting)."""
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n > 0:
            torch.set_num_threads(old)


def config_for_scale(scale: float, **overrides) -> PrelabelConfig:
    """The default model at another magnification: the window and both blurs keep their
    size in px of the image (256-px window, 4-px map blur, 1-px fine blur)."""
    tile = max(64, int(round(256 * scale / 32)) * 32)
    fields_ = dict(scale=scale, tile=tile, tile_overlap=min(32, tile // 4), blur_sigma=4.0 * scale,
                   refine_sigma=1.0 * scale)
    fields_.update(overrides)
    return PrelabelConfig(**fields_)


def _check_image(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"images must be HxWx3 uint8 BGR, got {img.shape} {img.dtype}")
    return img


def _rescale(img: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return img
    h, w = img.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def _starts(n: int, t: int, step: int) -> list[int]:
    if n <= t:
        return [0]
    out = list(range(0, n - t + 1, step))
    if out[-1] + t < n:
        out.append(n - t)
    return out


def tile_grid(h: int, w: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(y, x, th, tw) windows covering an HxW image; the last row/column is shifted inwards."""
    th, tw = min(tile, h), min(tile, w)
    step = tile - overlap
    return [(y, x, th, tw) for y in _starts(h, th, step) for x in _starts(w, tw, step)]


def _ramp(n: int, overlap: int) -> np.ndarray:
    """1-D blending weights: 1 inside, a linear ramp over ``overlap`` px at both ends."""
    if overlap <= 0:
        return np.ones(n, np.float32)
    i = np.arange(n, dtype=np.float32)
    edge = np.minimum(i + 1, n - i) / float(overlap + 1)
    return np.clip(edge, 0.05, 1.0).astype(np.float32)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Rank-based area under the ROC curve (ties count half); nan when a class is missing."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(s.size, np.float64)
    # average ranks over ties
    bounds = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [s.size]))
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ------------------------------------------------------------------- feature extractor


class PatchEmbedder:
    """Lite0 stages -> 3x3 average-pooled ("locally aware") patch features, deeper maps
    upsampled bilinearly to the finest one, concatenated: (B, D, H/stride, W/stride)."""

    def __init__(self, layers: Sequence[str], weights: Optional[str], device: torch.device, grid_stride: int = 0,
                 pool: int = 3) -> None:
        self.layers = tuple(sorted(layers, key=lambda name: STAGES[name][1]))
        model = create_lite0_features(self.layers, weights=weights)
        # the features_only model runs all 7 blocks; drop the ones after the deepest stage used
        last = max(int(name.split(".")[1]) for name in self.layers)
        model.blocks = model.blocks[: last + 1]
        self.model = model.to(device).eval()
        self.device = device
        self.stride = grid_stride or STAGES[self.layers[0]][1]
        self.pad_to = max(self.stride, max(STAGES[name][1] for name in self.layers))
        self.dim = sum(STAGES[name][2] for name in self.layers)
        self.pool = torch.nn.AvgPool2d(pool, 1, pool // 2) if pool > 1 else torch.nn.Identity()

    def fingerprint(self) -> str:
        """sha256 of the backbone weights in use (a saved bank is only valid with them)."""
        h = hashlib.sha256()
        for key, tensor in self.model.state_dict().items():
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def __call__(self, tiles_u8: np.ndarray, context: int = 0) -> torch.Tensor:
        """(B, h + 2c, w + 2c, 3) uint8 BGR tiles with ``c = context`` px of surrounding image
        -> (B, D, ceil(h/stride), ceil(w/stride)) float32 features of the inner h x w."""
        x = torch.from_numpy(np.ascontiguousarray(tiles_u8)).to(self.device)
        x = normalise(x)
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.pad_to, (-w) % self.pad_to
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        feats = self.model(x)
        out_hw = (x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        parts = []
        for f in feats:
            f = self.pool(f)
            if f.shape[-2:] != out_hw:
                f = F.interpolate(f, size=out_hw, mode="bilinear", align_corners=False)
            parts.append(f)
        emb = torch.cat(parts, 1)
        off = context // self.stride
        gh, gw = math.ceil((h - 2 * context) / self.stride), math.ceil((w - 2 * context) / self.stride)
        return emb[:, :, off:off + gh, off:off + gw].float()


# ------------------------------------------------------------------------ tile stream


@dataclass
class _TileJob:
    image: int
    y: int
    x: int


def _tile_batches(images: Sequence[np.ndarray], cfg: PrelabelConfig, cancel: Optional[CancelToken]
                  ) -> Iterator[tuple[np.ndarray, list[_TileJob]]]:
    """Batches of same-shaped tiles, in image order; cancel is checked per batch."""
    buckets: dict[tuple[int, int], tuple[list[np.ndarray], list[_TileJob]]] = {}
    c = cfg.context
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        padded = np.pad(img, ((c, c), (c, c), (0, 0)), mode="symmetric") if c else img
        for y, x, th, tw in tile_grid(h, w, cfg.tile, cfg.tile_overlap):
            tiles, jobs = buckets.setdefault((th, tw), ([], []))
            tiles.append(padded[y:y + th + 2 * c, x:x + tw + 2 * c])
            jobs.append(_TileJob(i, y, x))
            if len(tiles) >= cfg.batch_size:
                check_cancel(cancel)
                yield np.stack(tiles), list(jobs)
                tiles.clear()
                jobs.clear()
    for tiles, jobs in buckets.values():
        if tiles:
            check_cancel(cancel)
            yield np.stack(tiles), list(jobs)


def _count_tiles(images: Sequence[np.ndarray], cfg: PrelabelConfig) -> int:
    return sum(len(tile_grid(im.shape[0], im.shape[1], cfg.tile, cfg.tile_overlap)) for im in images)


# --------------------------------------------------------------------------- coreset


def greedy_coreset(features: torch.Tensor, k: int, *, seed: int = 0, init_min_dist: Optional[torch.Tensor] = None,
                   proj_dim: int = 0, block: int = 512, cancel: Optional[CancelToken] = None) -> torch.Tensor:
    """Indices of ``k`` rows chosen by greedy k-center (farthest-point) selection.

    The same selection as anomalib's ``KCenterGreedy`` (each step takes the point
    farthest from all chosen ones), computed in blocks: take the ``block`` points with
    the largest current distance, run the greedy steps among them with their small
    pairwise-distance matrix, and stop the block as soon as the best candidate is no
    farther than the best point outside the candidates (distances only shrink, so up to
    then every pick is exactly the one the one-at-a-time loop would make). The distances
    of all points are then updated once per block with one matrix product instead of
    once per pick. ``init_min_dist``: squared distances to centres chosen before (to
    extend an existing bank). ``proj_dim > 0``: select in a Gaussian random projection.
    """
    n = features.shape[0]
    k = min(k, n)
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    if k == n and init_min_dist is None:
        return torch.arange(n)
    z = features
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if 0 < proj_dim < z.shape[1]:
        proj = torch.randn(z.shape[1], proj_dim, generator=gen).to(z.device) / math.sqrt(proj_dim)
        z = z @ proj
    sq = (z * z).sum(1)
    if init_min_dist is None:
        min_d = torch.full((n,), float("inf"), device=z.device)
        first = int(torch.randint(n, (1,), generator=gen))
        min_d = torch.minimum(min_d, (sq - 2 * (z @ z[first]) + sq[first]).clamp_min_(0))
        chosen = [first]
        min_d[first] = 0
    else:
        min_d = init_min_dist.to(z.device).clone()
        chosen = []
    while len(chosen) < k:
        check_cancel(cancel)
        m = min(block + 1, n)
        top_val, top_idx = torch.topk(min_d, m)
        if m < n:  # candidates, and the largest distance of any point outside them
            cand, cand_d, outside = top_idx[:-1], top_val[:-1], float(top_val[-1])
        else:
            cand, cand_d, outside = top_idx, top_val, -1.0
        zc = z[cand]
        pair_np = (sq[cand][:, None] - 2 * zc @ zc.T + sq[cand][None, :]).clamp_min_(0).cpu().numpy()
        cand_d_np = cand_d.cpu().numpy().astype(np.float64)
        picks: list[int] = []
        while len(chosen) + len(picks) < k:
            j = int(np.argmax(cand_d_np))
            if cand_d_np[j] <= outside or cand_d_np[j] <= 0:
                break
            picks.append(j)
            np.minimum(cand_d_np, pair_np[j], out=cand_d_np)
        if not picks:  # the best point lies outside the candidates: take it alone
            picks = [0]
        new = cand[picks]
        chosen.extend(int(i) for i in new)
        _update_min_dist(z, sq, min_d, z[new], sq[new])
        min_d[new] = 0
        if float(min_d.max()) <= 0:
            break
    return torch.tensor(chosen[:k], dtype=torch.long)


def _update_min_dist(z: torch.Tensor, sq: torch.Tensor, min_d: torch.Tensor, centres: torch.Tensor,
                     sq_centres: torch.Tensor, chunk: int = 16384) -> None:
    """min_d = min(min_d, squared distance to the nearest of ``centres``), in row chunks
    (one fused addmm per chunk instead of several passes over an N x b matrix)."""
    for s in range(0, z.shape[0], chunk):
        d = torch.addmm(sq_centres[None, :], z[s:s + chunk], centres.T, alpha=-2.0).min(1).values
        d += sq[s:s + chunk]
        torch.minimum(min_d[s:s + chunk], d.clamp_min_(0), out=min_d[s:s + chunk])


def _nn_sqdist(query: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Squared Euclidean distance of each query row to its nearest bank row."""
    out = torch.empty(query.shape[0], device=query.device)
    for s in range(0, query.shape[0], chunk):
        q = query[s:s + chunk]
        d = torch.addmm(bank_sq[None, :], q, bank.T, alpha=-2.0)
        out[s:s + chunk] = (d.min(1).values + (q * q).sum(1)).clamp_min_(0)
    return out


# ------------------------------------------------------------------------ the model


class Prelabeller:
    """A fitted model 1. Build with :func:`fit_prelabeller` or :meth:`load`."""

    def __init__(self, config: PrelabelConfig, state: dict[str, torch.Tensor], thresholds: dict,
                 metrics: Optional[dict] = None, embedder: Optional[PatchEmbedder] = None,
                 border: Optional[dict] = None, coarse_gain: float = 0.0,
                 coarse_embedder: Optional[PatchEmbedder] = None, weave: Optional[dict] = None) -> None:
        self.config = config
        # {"coarse": (n, 2) [mean, sd] by distance to the edge, "fine": ...} or None (no correction)
        self.border = {k: np.asarray(v, np.float64) for k, v in border.items()} if border else None
        self.device = pick_device(config.device)
        self.embedder = embedder or PatchEmbedder(config.layers, config.backbone_weights, self.device, config.grid_stride, config.pool)
        state = dict(state)
        refs = state.pop("references", None)  # good crops for reference_refine: stay on the CPU, as uint8
        self.references = refs.numpy() if isinstance(refs, torch.Tensor) else refs
        # the weave-residual detectors: the spectrum (a tensor, CPU) and their calibration (see weave_residual),
        # with the mean and sd of the held-out map maxima: the z-scores' units in the map's
        spectrum = state.pop("weave_spectrum", None)
        self.weave: Optional[WeaveResidual] = None
        self.weave_map = (0.0, 1.0)
        if spectrum is not None and weave:
            self.weave = WeaveResidual(spectrum.numpy() if isinstance(spectrum, torch.Tensor) else spectrum, weave)
            self.weave_map = (float(weave["map_mu"]), float(weave["map_sd"]))
        self.state = {k: v.to(self.device) for k, v in state.items()}
        self.thresholds = dict(thresholds)
        self.metrics = dict(metrics or {})
        for key in ("bank", "bank_coarse"):
            if key in self.state:
                self.state[f"{key}_sq"] = (self.state[key] ** 2).sum(1)
        # the coarse memory's map enters as coarse_gain x its map (0 until the fit has measured the gain)
        self.coarse_gain = float(coarse_gain)
        self.coarse_embedder = None
        if "bank_coarse" in self.state:
            self.coarse_embedder = coarse_embedder or PatchEmbedder(config.coarse_layers, config.backbone_weights,
                                                                    self.device, config.coarse_grid_stride, config.pool)

    # ---- scoring
    def _patch_scores(self, emb: torch.Tensor, bank: str = "bank") -> torch.Tensor:
        """(B, D, h, w) embeddings -> (B, h, w) patch anomaly scores (distance to the nearest patch of ``bank``)."""
        b, d, h, w = emb.shape
        q = emb.permute(0, 2, 3, 1).reshape(-1, d)
        if self.config.method == "patchcore":
            s = _nn_sqdist(q, self.state[bank], self.state[f"{bank}_sq"]).sqrt_()
        else:
            q = q[:, self.state["channels"]] - self.state["mean"]
            s = ((q @ self.state["inv_cov"]) * q).sum(1).clamp_min_(0).sqrt_()
        return s.reshape(b, h, w)

    def raw_maps(self, images: Sequence[np.ndarray], on_progress: Optional[ProgressFn] = None,
                 cancel: Optional[CancelToken] = None, what: str = "pre-labelling"
                 ) -> Iterator[tuple[int, np.ndarray, Optional[np.ndarray]]]:
        """(index, anomaly map, fine map or None), float32 at the input size, per image as it is finished."""
        for i, fine_sum, coarse_sum, out_hw, k in self._summed_maps(images, on_progress, cancel, what):
            yield (i, *self._finish_map(self._fuse(fine_sum, coarse_sum), out_hw, k, fine_src=fine_sum))

    def _fuse(self, fine_sum: np.ndarray, coarse_sum: Optional[np.ndarray]) -> np.ndarray:
        """The fine memory's map plus the coarse memory's, scaled to the fine one's units (see coarse_layers)."""
        if coarse_sum is None or self.coarse_gain <= 0:
            return fine_sum
        return fine_sum + np.float32(self.coarse_gain) * coarse_sum

    def _summed_maps(self, images: Sequence[np.ndarray], on_progress: Optional[ProgressFn],
                     cancel: Optional[CancelToken], what: str
                     ) -> Iterator[tuple[int, np.ndarray, Optional[np.ndarray], tuple[int, int], float]]:
        """Per image as it is finished: (index, fine memory's map, coarse memory's map or None, input size,
        summing size / magnified size), the tiles' patch scores blended, not yet blurred."""
        cfg = self.config
        progress = on_progress or no_progress
        originals = [_check_image(im) for im in images]
        prepped = [_rescale(im, cfg.scale) for im in originals]
        total = _count_tiles(prepped, cfg)
        remaining = [len(tile_grid(p.shape[0], p.shape[1], cfg.tile, cfg.tile_overlap)) for p in prepped]
        acc: dict[int, list] = {}
        # A magnified image's map is summed at the input size (a 12000 x 9000 scan at 2x would need
        # 3.5 GB of sums at the magnified size, 0.9 GB at its own); a reduced one's at its reduced
        # size and resized when finished.
        k = min(1.0, 1.0 / cfg.scale)  # summing size / magnified size
        coarse = self.coarse_embedder
        done = 0
        progress(0, total, what)
        with _torch_threads(cfg.num_threads), full_fp32(), torch.inference_mode():
            for tiles, jobs in _tile_batches(prepped, cfg, cancel):
                th, tw = tiles.shape[1] - 2 * cfg.context, tiles.shape[2] - 2 * cfg.context
                scores = self._patch_scores(self.embedder(tiles, cfg.context)).cpu().numpy()
                c_scores = (self._patch_scores(coarse(tiles, cfg.context), "bank_coarse").cpu().numpy()
                            if coarse is not None else None)
                win = np.outer(_ramp(th, cfg.tile_overlap), _ramp(tw, cfg.tile_overlap))
                for n, job in enumerate(jobs):
                    oh, ow = originals[job.image].shape[:2]
                    if job.image not in acc:
                        h, w = (oh, ow) if k < 1 else prepped[job.image].shape[:2]
                        acc[job.image] = [np.zeros((h, w), np.float32), np.zeros((h, w), np.float32),
                                          np.zeros((h, w), np.float32) if coarse is not None else None]
                    maps = [_upsample_patch_map(scores[n], th, tw, self.embedder.stride)]
                    if coarse is not None:
                        maps.append(_upsample_patch_map(c_scores[n], th, tw, coarse.stride))
                    a, wsum, c = acc[job.image]
                    if k < 1:
                        y0, x0 = min(oh - 1, round(job.y * k)), min(ow - 1, round(job.x * k))
                        y1 = max(y0 + 1, min(oh, round((job.y + th) * k)))
                        x1 = max(x0 + 1, min(ow, round((job.x + tw) * k)))
                        maps = [cv2.resize(m, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA) for m in maps]
                        wt = cv2.resize(win, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
                    else:
                        y0, x0, y1, x1, wt = job.y, job.x, job.y + th, job.x + tw, win
                    a[y0:y1, x0:x1] += maps[0] * wt
                    wsum[y0:y1, x0:x1] += wt
                    if c is not None:
                        c[y0:y1, x0:x1] += maps[1] * wt
                    remaining[job.image] -= 1
                    if remaining[job.image] == 0:
                        a, wsum, c = acc.pop(job.image)
                        yield job.image, a / wsum, (c / wsum if c is not None else None), (oh, ow), k
                done += len(jobs)
                progress(done, total, f"{what}: {done}/{total} tiles")

    def _finish_map(self, m: np.ndarray, out_hw: tuple[int, int], k: float = 1.0,
                    fine_src: Optional[np.ndarray] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Blurred map (and the less blurred one for mask refinement, from ``fine_src`` if given: the fine
        memory alone, whose 4-px grid draws thin lines), at the input size. ``m`` is at ``k`` times the
        magnified size; the blurs are in px of the magnified image."""
        cfg = self.config

        def blur_resize(src: np.ndarray, sigma: float) -> np.ndarray:
            sigma = sigma * k
            out = cv2.GaussianBlur(src, (0, 0), sigma, borderType=cv2.BORDER_REFLECT) if sigma > 0 else src
            if out.shape != tuple(out_hw):
                out = cv2.resize(out, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_LINEAR)
            return out.astype(np.float32, copy=False)

        coarse = blur_resize(m, cfg.blur_sigma)
        fine = blur_resize(m if fine_src is None else fine_src, cfg.refine_sigma) if cfg.refine else None
        border = getattr(self, "border", None)
        if border:
            coarse = apply_border_profile(coarse, border["coarse"])
            if fine is not None and "fine" in border:
                fine = apply_border_profile(fine, border["fine"])
        return coarse, fine

    # ---- public
    def predict(self, images: Sequence[np.ndarray], on_progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelToken] = None, workers: Optional[int] = None) -> list[PrelabelResult]:
        """Score, heatmap and mask per image (any size, HxWx3 uint8 BGR).

        An image's mask (GrabCut, reference refinement: OpenCV and NumPy, which release the GIL)
        is drawn in a pool of ``workers`` threads (None: one per CPU core, at most 8; 1: in this
        thread) while the backbone scores the next tiles, so the CPU work overlaps the GPU's, and
        several masks are drawn at once on a many-core machine.
        """
        images = list(images)
        out: list[Optional[PrelabelResult]] = [None] * len(images)
        workers = min(8, os.cpu_count() or 1) if workers is None else max(1, int(workers))
        if workers == 1 or len(images) < 2:
            for i, m, fine in self.raw_maps(images, on_progress, cancel):
                out[i] = self._result(m, fine, images[i])
            return out  # type: ignore[return-value]
        with ThreadPoolExecutor(workers, thread_name_prefix="prelabel-mask") as pool:
            pending = {}
            try:
                for i, m, fine in self.raw_maps(images, on_progress, cancel):
                    pending[i] = pool.submit(self._result, m, fine, images[i])
                for i, future in pending.items():
                    out[i] = future.result()
            except BaseException:
                for future in pending.values():
                    future.cancel()
                raise
        return out  # type: ignore[return-value]

    def _result(self, m: np.ndarray, fine: Optional[np.ndarray] = None,
                image: Optional[np.ndarray] = None) -> PrelabelResult:
        found = self.weave_findings(image) if image is not None and image.shape[:2] == m.shape else None
        line_score, spot_score = self.weave_scores(found)
        score = max(float(m.max()), line_score, spot_score)
        is_defect = score > self.thresholds["image"]
        heat = (m / self.thresholds["pixel"]).astype(np.float32)
        if is_defect:
            mask = self.mask_from_map(m, fine, image)
            # what the second look calls is drawn, and shows in the heat map at its score: the app shows it,
            # and the checkers' cross-check with model 1 (detections only) counts it
            for part_score, part in ((line_score, lambda: self.line_mask(found.line, image)),
                                     (spot_score, lambda: found.spot.region)):
                if part_score > self.thresholds["image"]:
                    region = part()
                    mask |= region
                    heat[region] = np.maximum(heat[region], part_score / self.thresholds["pixel"])
            if not mask.any():
                mask = self.peak_region(m)
        else:
            mask = np.zeros(m.shape, bool)
        return PrelabelResult(score=score, heatmap=heat, mask=mask, is_defect=bool(is_defect))

    def weave_findings(self, image: np.ndarray) -> Optional[Findings]:
        """The weave-residual detectors' best line and spot on ``image`` (see annotator.ml.weave_residual)."""
        return None if self.weave is None else self.weave.analyse(_check_image(image))

    def weave_scores(self, found: Optional[Findings]) -> tuple[float, float]:
        """(line, spot): each detector's z-score less MARGIN, in the map's units (-inf: none)."""
        mu, sd = self.weave_map
        line = spot = -np.inf
        if found is not None and found.line is not None:
            line = mu + sd * (self.weave.z_line(found.line.score) - MARGIN)
        if found is not None and found.spot is not None:
            spot = mu + sd * (self.weave.z_spot(found.spot.score) - MARGIN)
        return line, spot

    def line_mask(self, line, image: np.ndarray) -> np.ndarray:
        """The line the detector called, traced along its length on the image (annotator.ml.line_trace)
        within 6 px of its path; the path itself, 2 px wide, where the tracer finds no thin line there."""
        img = _check_image(image)
        path = self.weave.path_mask(line, img.shape[:2])
        band = cv2.dilate(path.astype(np.uint8), np.ones((13, 13), np.uint8)).astype(bool)
        traced, _ = trace_lines(img, band, self.references)
        return traced if traced.any() else path

    def peak_region(self, m: np.ndarray) -> np.ndarray:
        """The region of the map above the pixel threshold around its peak, cut at half its height
        (``region_peak_fraction``), neither refined nor dropped when small.

        An image the map calls defective gets at least this pre-label: the refinements (GrabCut, matched
        good fabric) and the gate can move a small region off the map's peak and then drop it. That left 7 of
        770 test images called defective with nothing drawn (session 13, 60 good images: 5 knots, a slub and a
        good image among 620 demo test images, seeds 0 / 7; a blob among 150 brick / grass / gravel photographs).
        A reviewer told "defective" with nothing drawn has to search the image; on all 7 defects this region
        lies on the defect (IoU 0.34-0.56 to the truth, 0.49-0.77 within 1 px).
        """
        above = m > self.thresholds["pixel"]
        y, x = np.unravel_index(int(np.argmax(m)), m.shape)
        if not above[y, x]:
            return np.zeros(m.shape, bool)
        _, cc = cv2.connectedComponents(above.astype(np.uint8), connectivity=8)
        region = cc == cc[y, x]
        if self.config.region_peak_fraction > 0 and "median" in self.thresholds:
            region = cut_regions_below_peak_fraction(m, region, self.thresholds["median"],
                                                     self.config.region_peak_fraction)
        return region

    def mask_from_map(self, m: np.ndarray, fine: Optional[np.ndarray] = None,
                      image: Optional[np.ndarray] = None) -> np.ndarray:
        """Map above the pixel threshold; with the image, its thin straight lines traced along their
        length; the other regions refined with the fine map (and with the image: its colours, matched
        good fabric); closed; small regions dropped, and regions on which the map stays below the
        image threshold (``region_min_peak``)."""
        cfg = self.config
        mask = m > self.thresholds["pixel"]
        img = _check_image(image) if image is not None else None
        if img is not None and img.shape[:2] != mask.shape:
            img = None
        lines = None
        if cfg.trace_lines and img is not None and mask.any():
            # thin straight lines are drawn along their length; the rest of the mask goes on below
            lines, traced = trace_lines(img, mask, self.references)
            mask &= ~traced
        if cfg.region_peak_fraction > 0 and "median" in self.thresholds and mask.any():
            mask = cut_regions_below_peak_fraction(m, mask, self.thresholds["median"], cfg.region_peak_fraction)
        if fine is not None and "fine" in self.thresholds and mask.any():
            # the blur of the coarse map widens a 2-px line to ~12 px; inside a 2-px dilation of
            # that region keep the pixels where the fine map is also unusually high, unless that
            # leaves almost nothing (then the coarse region is the better guess)
            region = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            sharp = region & (fine > self.thresholds["fine"])
            if sharp.sum() > 0.05 * mask.sum():
                mask = sharp
        if cfg.close_radius > 0:
            k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * cfg.close_radius + 1,) * 2)
            mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, k).astype(bool)
        mask = remove_small_regions(mask, cfg.min_region_area)
        if img is not None and cfg.grabcut and mask.any():
            mask = remove_small_regions(grabcut_regions(img, mask, cfg), cfg.min_region_area)
        if img is not None and cfg.reference_refine and mask.any():
            mask = remove_small_regions(refine_with_reference(img, mask, self.references), cfg.min_region_area)
        if lines is not None:
            mask = remove_small_regions(mask | lines, cfg.min_region_area)
        return self._gate_regions(mask, m)

    def _gate_regions(self, mask: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Drop the regions on which the map stays below ``region_min_peak`` x the image threshold."""
        if self.config.region_min_peak <= 0 or not mask.any():
            return mask
        return regions_peaking_above(mask, m, self.config.region_min_peak * self.thresholds["image"])

    # ---- persistence
    def save(self, folder: os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu() for k, v in self.state.items() if not k.endswith("_sq")}
        if self.references is not None and len(self.references):
            tensors["references"] = torch.from_numpy(np.ascontiguousarray(self.references))
        if self.weave is not None:
            tensors["weave_spectrum"] = torch.from_numpy(self.weave.spectrum)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "thresholds": self.thresholds,
            "border": {k: v.tolist() for k, v in self.border.items()} if self.border else None,
            "coarse_gain": self.coarse_gain,
            "weave": None if self.weave is None else {**self.weave.calibration(), "map_mu": self.weave_map[0],
                                                      "map_sd": self.weave_map[1]},
            "metrics": self.metrics,
            "backbone_sha256": self.embedder.fingerprint(),
            "versions": _versions(),
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        tmp_pt, tmp_js = folder / (TENSORS_FILE + ".tmp"), folder / (CONFIG_FILE + ".tmp")
        torch.save(tensors, tmp_pt)
        tmp_js.write_text(json.dumps(meta, indent=2, default=_json_default), encoding="utf-8")
        os.replace(tmp_pt, folder / TENSORS_FILE)
        os.replace(tmp_js, folder / CONFIG_FILE)
        return folder

    @classmethod
    def load(cls, folder: os.PathLike, device: Optional[str] = None) -> "Prelabeller":
        folder = Path(folder)
        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{folder} does not hold a pre-labeller this version can read")
        data = meta["config"]
        if device is not None:
            data = {**data, "device": device}
        config = PrelabelConfig.from_dict(data)
        state = torch.load(folder / TENSORS_FILE, map_location="cpu", weights_only=True)
        model = cls(config, state, meta["thresholds"], meta.get("metrics"), border=meta.get("border"),
                    coarse_gain=float(meta.get("coarse_gain", 0.0)), weave=meta.get("weave"))
        want = meta.get("backbone_sha256")
        if want and want != model.embedder.fingerprint():
            raise ValueError("the backbone weights differ from the ones this pre-labeller was fitted with")
        return model


def cut_regions_below_peak_fraction(m: np.ndarray, mask: np.ndarray, base: float, fraction: float) -> np.ndarray:
    """Keep, in each 8-connected region of ``mask``, the pixels where ``m`` reaches at least
    ``base + fraction * (peak - base)``, ``peak`` being the region's maximum of ``m``."""
    n, cc = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    peaks = np.full(n, -np.inf)
    np.maximum.at(peaks, cc.ravel(), m.ravel().astype(np.float64))
    cut = base + fraction * (peaks - base)
    return mask & (m >= cut[cc])


def _is_line(region: np.ndarray, width: float) -> bool:
    """A thin, elongated region: its minimum-area rectangle is under ``width`` px and 5x as long."""
    short, long_ = rect_sides(region)
    return short < width and long_ >= 5 * max(short, 1.0)


def grabcut_regions(image: np.ndarray, mask: np.ndarray, cfg: PrelabelConfig) -> np.ndarray:
    """Refine each compact region of ``mask`` by GrabCut on the image's colours (lines are kept).

    Per region, on a crop around it: the region's core (eroded 3 px) is sure defect, the rest of
    the region and a ``grabcut_ring`` px ring around it are undecided, the rest of the crop sure
    fabric. (A region without a core, e.g. a small knot, is all probable defect.)
    A region that GrabCut empties or more than doubles is kept as it was (the colours did not
    separate defect from fabric there), and so is one whose crop exceeds a megapixel.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    out = np.zeros(mask.shape, bool)
    h, w = mask.shape
    pad = cfg.grabcut_ring * 4
    ring_k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * cfg.grabcut_ring + 1,) * 2)
    core_k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    for r in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[r])
        y0, y1, x0, x1 = max(0, y - pad), min(h, y + bh + pad), max(0, x - pad), min(w, x + bw + pad)
        region = labels[y0:y1, x0:x1] == r
        # lines keep the map's mask; a crop over a megapixel would cost seconds: keep it too
        if _is_line(region, cfg.grabcut_line_width) or (y1 - y0) * (x1 - x0) > 1_000_000:
            out[y0:y1, x0:x1] |= region
            continue
        seed = np.full(region.shape, cv2.GC_BGD, np.uint8)
        r8 = region.astype(np.uint8)
        seed[cv2.dilate(r8, ring_k).astype(bool)] = cv2.GC_PR_BGD
        seed[region] = cv2.GC_PR_FGD
        core = cv2.erode(r8, core_k).astype(bool)
        if core.sum() >= 10:
            # the colour model of the defect starts from the core alone: the rest of a loose region
            # is fabric as often as not, and GrabCut reassigns it by colour and smoothness
            seed[region] = cv2.GC_PR_BGD
            seed[core] = cv2.GC_FGD
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        # GrabCut seeds its colour models by k-means from OpenCV's per-thread RNG: without a fixed
        # seed a region's mask would depend on what that thread cut before (the order of images,
        # the worker thread that drew it)
        cv2.setRNGSeed(0)
        try:
            cv2.grabCut(np.ascontiguousarray(image[y0:y1, x0:x1]), seed, None, bgd, fgd, cfg.grabcut_iters,
                        cv2.GC_INIT_WITH_MASK)
        except cv2.error:  # e.g. a crop whose colours are all one value: keep the region
            out[y0:y1, x0:x1] |= region
            continue
        refined = (seed == cv2.GC_FGD) | (seed == cv2.GC_PR_FGD)
        ok = 0 < refined.sum() <= 2 * area
        out[y0:y1, x0:x1] |= refined if ok else region
    return out


def _upsample_patch_map(s: np.ndarray, th: int, tw: int, stride: int) -> np.ndarray:
    """Patch grid -> pixels (bilinear, patch centres aligned), cropped to the tile."""
    gh, gw = s.shape
    up = cv2.resize(s.astype(np.float32), (gw * stride, gh * stride), interpolation=cv2.INTER_LINEAR)
    return up[:th, :tw]


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def _versions() -> dict:
    import timm

    try:
        from importlib.metadata import version

        annotator_version = version("annotator")
    except Exception:  # pragma: no cover - not installed
        annotator_version = "dev"
    return {"annotator": annotator_version, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "opencv": cv2.__version__, "python": platform.python_version()}


# -------------------------------------------------------------------------- fitting


def split_good(n: int, cfg: PrelabelConfig) -> tuple[list[int], list[int]]:
    """Seeded split of ``n`` good images into (fit, holdout) index lists."""
    n_hold = max(cfg.min_holdout, int(round(cfg.holdout_fraction * n)))
    if n - n_hold < 1:
        raise ValueError(f"need at least {cfg.min_holdout + 1} good images, got {n}")
    perm = np.random.default_rng(cfg.seed).permutation(n)
    return sorted(int(i) for i in perm[n_hold:]), sorted(int(i) for i in perm[:n_hold])


def _collect(embedder: PatchEmbedder, images: Sequence[np.ndarray], cfg: PrelabelConfig, per_tile: int,
             rng: torch.Generator, progress: Callable[[int], None], cancel: Optional[CancelToken],
             gauss: Optional[dict] = None) -> Optional[torch.Tensor]:
    """Patch features of good images: a random ``per_tile`` of each tile's patches
    (PatchCore), or running sums for the Gaussian (PaDiM, ``gauss`` dict)."""
    kept = []
    for tiles, jobs in _tile_batches(images, cfg, cancel):
        emb = embedder(tiles, cfg.context)
        b, d, h, w = emb.shape
        flat = emb.permute(0, 2, 3, 1).reshape(b, h * w, d)
        if gauss is not None:
            x = flat.reshape(-1, d)[:, gauss["channels"]].double()
            gauss["n"] += x.shape[0]
            gauss["sum"] += x.sum(0)
            gauss["outer"] += x.T @ x
        else:
            if per_tile < h * w:
                idx = torch.stack([torch.randperm(h * w, generator=rng)[:per_tile] for _ in range(b)]).to(flat.device)
                flat = torch.gather(flat, 1, idx[:, :, None].expand(-1, -1, d))
            kept.append(flat.reshape(-1, d))
        progress(len(jobs))
    return torch.cat(kept) if kept else None


def fit_prelabeller(good_images: Sequence[np.ndarray], config: PrelabelConfig = PrelabelConfig(),
                    on_progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> Prelabeller:
    """Fit model 1 on defect-free images only and calibrate its thresholds on a seeded
    holdout of them. Progress is reported per batch of tiles; ``cancel`` is checked per
    batch and raises :class:`~annotator.core.jobs.Cancelled`.

    1. bank (or Gaussian) from the fit part; 2. thresholds from the holdout part scored by
    exactly that model; 3. only with ``refit_with_holdout``: the holdout patches are added
    to the bank *on top* (a superset: every nearest-neighbour distance can only shrink, so
    the thresholds stay valid upper bounds for good images; they only become a little
    conservative). Not the default: it measured no gain on the demo fabrics and costs a
    second pass over the holdout. Re-selecting the whole coreset, or refitting PaDiM's
    Gaussian, would not have that guarantee, so neither is offered.
    """
    cfg = config
    progress = on_progress or no_progress
    t0 = time.perf_counter()
    originals = [_check_image(im) for im in good_images]
    fit_idx, hold_idx = split_good(len(originals), cfg)
    fit_imgs = [_rescale(originals[i], cfg.scale) for i in fit_idx]
    hold_orig = [originals[i] for i in hold_idx]
    hold_imgs = [_rescale(im, cfg.scale) for im in hold_orig]
    device = pick_device(cfg.device)
    n_fit_tiles, n_hold_tiles = _count_tiles(fit_imgs, cfg), _count_tiles(hold_imgs, cfg)
    use_coarse = cfg.uses_coarse and min(min(im.shape[:2]) for im in fit_imgs + hold_imgs) >= COARSE_MIN_PX
    # fit tiles (twice with the coarse memory) + holdout tiles (scored) + holdout tiles again when refitting
    total = (n_fit_tiles * (2 if use_coarse else 1)
             + n_hold_tiles * (2 if cfg.refit_with_holdout and cfg.method == "patchcore" else 1))
    done = [0]

    def step(msg: str) -> Callable[[int], None]:
        def inner(n: int) -> None:
            done[0] += n
            progress(done[0], total, msg)
        return inner

    rng = torch.Generator().manual_seed(cfg.seed)
    with _torch_threads(cfg.num_threads), full_fp32(), torch.inference_mode():
        embedder = PatchEmbedder(cfg.layers, cfg.backbone_weights, device, cfg.grid_stride, cfg.pool)
        progress(0, total, "extracting features of good images")
        # 1. the model, from the fit part only
        coarse_embedder = None
        if cfg.method == "patchcore":
            per_tile = _patches_per_tile(embedder, cfg, n_fit_tiles)
            feats = _collect(embedder, fit_imgs, cfg, per_tile, rng, step("features of good images"), cancel)
            t_feat = time.perf_counter()
            k = max(1, min(cfg.coreset_max, math.ceil(cfg.coreset_ratio * feats.shape[0])))
            progress(done[0], total, f"choosing {k} of {feats.shape[0]} patches (coreset)")
            idx = greedy_coreset(feats, k, seed=cfg.seed, proj_dim=cfg.coreset_proj_dim, cancel=cancel)
            state = {"bank": feats[idx].contiguous()}
            n_collected = int(feats.shape[0])
            del feats
            if use_coarse:
                coarse_embedder = PatchEmbedder(cfg.coarse_layers, cfg.backbone_weights, device,
                                                cfg.coarse_grid_stride, cfg.pool)
                per_tile_c = _patches_per_tile(coarse_embedder, cfg, n_fit_tiles)
                feats = _collect(coarse_embedder, fit_imgs, cfg, per_tile_c, rng,
                                 step("features of good images (coarse)"), cancel)
                k_c = max(1, min(cfg.coarse_coreset_max, math.ceil(cfg.coreset_ratio * feats.shape[0])))
                progress(done[0], total, f"choosing {k_c} of {feats.shape[0]} coarse patches (coreset)")
                idx = greedy_coreset(feats, k_c, seed=cfg.seed, proj_dim=cfg.coreset_proj_dim, cancel=cancel)
                state["bank_coarse"] = feats[idx].contiguous()
                del feats
        else:
            gen = torch.Generator().manual_seed(cfg.seed)
            n_keep = min(cfg.padim_features, embedder.dim)
            channels = torch.randperm(embedder.dim, generator=gen)[:n_keep].sort().values.to(device)
            gauss = {"channels": channels, "n": 0, "sum": torch.zeros(n_keep, dtype=torch.float64, device=device),
                     "outer": torch.zeros(n_keep, n_keep, dtype=torch.float64, device=device)}
            _collect(embedder, fit_imgs, cfg, 0, rng, step("features of good images"), cancel, gauss)
            t_feat = time.perf_counter()
            state = _gaussian_state(gauss, cfg)
            n_collected = gauss["n"]
            per_tile = 0
        t_model = time.perf_counter()
        # 2. thresholds, from the holdout part only
        model = Prelabeller(cfg, state, {"image": float("inf"), "pixel": 1.0}, embedder=embedder,
                            coarse_embedder=coarse_embedder)
        model.references = reference_crops([originals[i] for i in fit_idx], cfg.reference_images)
        base = done[0]
        summed = [None] * len(hold_imgs)
        for i, fine_sum, coarse_sum, out_hw, k_sum in model._summed_maps(
                hold_orig, lambda d, t, s: progress(base + d, total, s), cancel,
                what="calibrating on held-out good images"):
            summed[i] = (fine_sum, coarse_sum, out_hw, k_sum)
        done[0] = base + n_hold_tiles
        if model.coarse_embedder is not None:
            # the coarse map in the fine map's units: equal 0.999 quantiles on the held-out good images
            q_fine = np.quantile(np.concatenate([x[0].ravel() for x in summed]), 0.999)
            q_coarse = np.quantile(np.concatenate([x[1].ravel() for x in summed]), 0.999)
            model.coarse_gain = float(cfg.coarse_weight * q_fine / max(float(q_coarse), 1e-12))
        hold_maps: list = []
        hold_fine: list = []
        for i in range(len(summed)):  # each raw map is let go as soon as it is blurred (large scans)
            fine_sum, coarse_sum, out_hw, k_sum = summed[i]
            summed[i] = None
            m, fine = model._finish_map(model._fuse(fine_sum, coarse_sum), out_hw, k_sum, fine_src=fine_sum)
            hold_maps.append(m)
            hold_fine.append(fine)
        if cfg.border_px > 0:
            model.border = {"coarse": border_profile(hold_maps, cfg.border_px)}
            hold_maps = [apply_border_profile(m, model.border["coarse"]) for m in hold_maps]
            if cfg.refine:
                model.border["fine"] = border_profile(hold_fine, cfg.border_px)
                hold_fine = [apply_border_profile(f, model.border["fine"]) for f in hold_fine]
        scores = [float(m.max()) for m in hold_maps]
        if cfg.weave_residual and len(hold_orig) >= WEAVE_MIN_HOLDOUT:
            model.weave = WeaveResidual.fit([originals[i] for i in fit_idx])
        if model.weave is not None:
            found = [model.weave.analyse(im) for im in hold_orig]
            model.weave.calibrate([f for f in found if f is not None])
            model.weave_map = (float(np.mean(scores)), float(max(np.std(scores), 1e-9)))
            scores = [max(s, *model.weave_scores(f)) for s, f in zip(scores, found)]
        thresholds, calib = calibrate(hold_maps, hold_fine if cfg.refine else None, cfg, scores)
        model.thresholds = thresholds
        # 3. optionally extend the bank with the holdout patches (a superset bank: every
        #    score can only go down, so the thresholds stay valid upper bounds). Only the fine
        #    memory's bank grows; the coarse one's term is unchanged, so the bound holds for the sum.
        n_bank_fit = int(state["bank"].shape[0]) if "bank" in state else 0
        if cfg.refit_with_holdout and cfg.method == "patchcore":
            extra = _collect(embedder, hold_imgs, cfg, per_tile, rng, step("adding held-out patches"), cancel)
            bank = model.state["bank"]
            init = _nn_sqdist(extra, bank, model.state["bank_sq"])
            k_extra = math.ceil(n_bank_fit * n_hold_tiles / max(1, n_fit_tiles))
            idx = greedy_coreset(extra, k_extra, seed=cfg.seed + 1, init_min_dist=init, proj_dim=cfg.coreset_proj_dim,
                                 cancel=cancel)
            bank = torch.cat([bank, extra[idx]])
            model.state["bank"] = bank
            model.state["bank_sq"] = (bank ** 2).sum(1)
    t_end = time.perf_counter()
    model.metrics = {
        "n_good": len(originals), "fit_indices": fit_idx, "holdout_indices": hold_idx,
        "n_patches_collected": n_collected, "bank_size_fit": n_bank_fit,
        "bank_size": int(model.state["bank"].shape[0]) if "bank" in model.state else 0,
        "coarse_bank_size": int(model.state["bank_coarse"].shape[0]) if "bank_coarse" in model.state else 0,
        "coarse_gain": model.coarse_gain,
        # the second look (weave_residual): on, or off (config, < WEAVE_MIN_HOLDOUT held-out images, small
        # images, or a texture without a period)
        "weave_residual": model.weave is not None,
        "calibration": calib,
        "seconds": {"features": round(t_feat - t0, 3), "model": round(t_model - t_feat, 3),
                    "total": round(t_end - t0, 3)},
        "device": str(device),
    }
    progress(total, total, "pre-labeller ready")
    return model


def _patches_per_tile(embedder: PatchEmbedder, cfg: PrelabelConfig, n_tiles: int) -> int:
    """Random patches kept per tile so that about ``coreset_presample`` are collected over ``n_tiles``."""
    grid = math.ceil(cfg.tile / embedder.stride) ** 2
    return max(1, min(grid, math.ceil(cfg.coreset_presample / max(1, n_tiles))))


def _gaussian_state(g: dict, cfg: PrelabelConfig) -> dict:
    n = max(1, g["n"])
    mean = g["sum"] / n
    cov = (g["outer"] - n * torch.outer(mean, mean)) / max(1, n - 1)
    cov += cfg.padim_eps * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    inv = torch.linalg.inv(cov)
    return {"channels": g["channels"], "mean": mean.float(), "inv_cov": inv.float()}


def _frame(h: int, w: int, cap: int) -> Iterator[tuple[slice, slice, np.ndarray]]:
    """The pixels closer than ``cap`` to the edge, as (rows, cols, distance) blocks: the top and
    bottom bands across the full width, then the left and right bands between them. Everything
    else is interior. Only these blocks are touched, so a 12000 x 9000 map costs ~4 * cap * (h + w)
    pixels of work, not h * w."""
    top, bottom = min(cap, h), max(min(cap, h), h - cap)
    left, right = min(cap, w), max(min(cap, w), w - cap)
    blocks = [(slice(0, top), slice(0, w)), (slice(bottom, h), slice(0, w)),
              (slice(top, bottom), slice(0, left)), (slice(top, bottom), slice(right, w))]
    for rows, cols in blocks:
        ys, xs = np.arange(h)[rows], np.arange(w)[cols]
        if ys.size and xs.size:
            d = np.minimum.outer(np.minimum(ys, h - 1 - ys), np.minimum(xs, w - 1 - xs))
            yield rows, cols, np.minimum(d, cap)


def border_profile(maps: Sequence[np.ndarray], cap: int) -> np.ndarray:
    """(cap + 1, 2): mean and sd of the maps' values at each distance 0..cap-1 from the edge, and
    (row ``cap``) of every pixel further in. Distances no map reaches (images smaller than
    2 * cap) take the row of the nearest distance that has pixels."""
    n = np.zeros(cap + 1)
    s1 = np.zeros(cap + 1)
    s2 = np.zeros(cap + 1)
    for m in maps:
        # the interior row is every pixel minus the frame's
        n[cap] += m.size
        s1[cap] += float(np.sum(m, dtype=np.float64))
        s2[cap] += float(np.einsum("ij,ij->", m, m, dtype=np.float64))
        for rows, cols, d in _frame(*m.shape, cap):
            d = d.ravel()
            v = m[rows, cols].ravel().astype(np.float64)
            for acc, weights in ((n, None), (s1, v), (s2, v * v)):
                part = np.bincount(d, weights, minlength=cap + 1)
                acc[:cap] += part[:cap]
                acc[cap] -= part[:cap].sum()
    if not n.any():
        raise ValueError("no maps to measure the border profile on")
    n[cap] = round(n[cap])  # exact count (the subtraction above is of integers held as floats)
    prof = np.zeros((cap + 1, 2))
    have = np.flatnonzero(n > 0)
    for k in range(cap + 1):
        j = k if n[k] > 0 else have[np.argmin(np.abs(have - k))]
        mean = s1[j] / n[j]
        prof[k] = mean, math.sqrt(max(s2[j] / n[j] - mean * mean, 0.0))
    prof[:, 1] = np.maximum(prof[:, 1], 1e-6 + 1e-6 * np.abs(prof[:, 0]))
    return prof


def apply_border_profile(m: np.ndarray, prof: np.ndarray) -> np.ndarray:
    """Standardise each distance-to-edge ring of ``m`` to the interior's mean and sd (the
    interior itself is left as it is: its gain is 1 and its shift 0)."""
    prof = np.asarray(prof, np.float64)
    cap = prof.shape[0] - 1
    mean_in, sd_in = prof[cap]
    gain = (sd_in / prof[:, 1]).astype(np.float32)
    shift = (mean_in - prof[:, 0] * sd_in / prof[:, 1]).astype(np.float32)
    out = np.array(m, dtype=np.float32, copy=True)
    for rows, cols, d in _frame(*out.shape, cap):
        out[rows, cols] = np.maximum(out[rows, cols] * gain[d] + shift[d], 0.0)  # distances: >= 0
    return out


def calibrate(hold_maps: Sequence[np.ndarray], hold_fine: Optional[Sequence[np.ndarray]], cfg: PrelabelConfig,
              scores: Optional[Sequence[float]] = None) -> tuple[dict, dict]:
    """Thresholds from the anomaly maps of held-out GOOD images only (see the config comments);
    ``scores``: their image scores when not the maps' maxima (the weave-residual detectors' enter).

    anomalib's adaptive threshold would need defective validation images (with none it
    picks the minimum); here every number comes from good images the model never saw.
    """
    scores = np.array([float(m.max()) for m in hold_maps] if scores is None else scores, np.float64)
    pixels = np.concatenate([m.ravel() for m in hold_maps])
    floor = scores.mean() + cfg.image_sd_k * scores.std() if scores.size > 1 else scores.max()
    median = float(np.median(pixels))
    base = max(scores.max(), floor)
    image_thr = float((base + (base - median) * cfg.image_small_holdout / max(1, scores.size)) * cfg.image_margin)
    pixel_thr = float(min(np.quantile(pixels, cfg.pixel_quantile), image_thr))
    thresholds = {"image": image_thr, "pixel": pixel_thr, "median": median}
    if hold_fine is not None:
        thresholds["fine"] = float(np.quantile(np.concatenate([f.ravel() for f in hold_fine]), cfg.refine_quantile))
    calib = {"holdout_scores": [round(float(s), 6) for s in scores],
             "holdout_pixel_quantiles": {str(q): float(np.quantile(pixels, q)) for q in (0.5, 0.99, 0.999, 0.9999, 1.0)}}
    return thresholds, calib
