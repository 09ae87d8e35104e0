"""Synthetic fabric generator: determinism, shapes, styles, exact defect masks, MVTec tree."""
from __future__ import annotations

import ast
from pathlib import Path

import cv2
import numpy as np
import pytest

from annotator.core import demo_fabric as df
from annotator.core.demo_fabric import (
    DEFECT_KINDS,
    PALETTES,
    STYLES,
    THIN_LINE_KINDS,
    FabricSpec,
    add_defect,
    random_spec,
    render_fabric,
    render_fabric_info,
    render_sample,
    write_demo_mvtec,
)

# the style each defect is most at home on (broken needles happen in knits)
HOME_STYLE = {
    "mis_yarn": "plain",
    "broken_needle": "knit",
    "open_width": "rib",
    "hole": "twill",
    "stain": "satin",
    "knot": "knit",
    "slub": "twill",
}


def spec_for(style: str, seed: int = 0, palette: str | None = None) -> FabricSpec:
    return random_spec(np.random.default_rng(seed), style=style, palette=palette)


def grey(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32)


# ------------------------------------------------------------------ spec / API


def test_constants():
    assert set(STYLES) >= {"plain", "twill", "satin", "knit", "rib"}
    assert DEFECT_KINDS == ("mis_yarn", "broken_needle", "open_width", "hole", "stain", "knot", "slub")
    assert set(THIN_LINE_KINDS) <= set(DEFECT_KINDS)
    assert len(PALETTES) >= 5


@pytest.mark.parametrize("style", STYLES)
def test_random_spec_is_deterministic_and_valid(style):
    a = spec_for(style, 3)
    b = spec_for(style, 3)
    assert a == b and hash(a) == hash(b)
    assert a.style == style and a.palette in PALETTES
    assert a.period > 2 and a.period_weft > 2
    assert all(0 <= v <= 255 for v in a.warp_bgr + a.weft_bgr)
    if style in ("plain", "twill", "satin"):
        assert len(a.weave) >= 2
    d = a.to_dict()
    assert d["style"] == style and isinstance(d["weave"], list)


def test_random_spec_rejects_unknowns():
    with pytest.raises(ValueError):
        random_spec(0, style="velvet")
    with pytest.raises(ValueError):
        random_spec(0, style="twill", palette="plaid")


def test_random_spec_without_style_picks_one():
    styles = {random_spec(np.random.default_rng(i)).style for i in range(40)}
    assert styles <= set(STYLES) and len(styles) >= 3


# ------------------------------------------------------------------- rendering


def test_render_is_deterministic_per_seed():
    spec = spec_for("twill")
    a = render_fabric(spec, np.random.default_rng(7), 64)
    b = render_fabric(spec, np.random.default_rng(7), 64)
    c = render_fabric(spec, np.random.default_rng(8), 64)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # an int seed works like a generator seeded with it
    assert np.array_equal(render_fabric(spec, 7, 64), a)


@pytest.mark.parametrize("size,shape", [(64, (64, 64)), ((48, 96), (48, 96)), ((100, 37), (100, 37)),
                                        (8, (8, 8))])
@pytest.mark.parametrize("style", ["twill", "knit"])
def test_render_shapes_and_dtype(style, size, shape):
    img = render_fabric(spec_for(style), 0, size)
    assert img.shape == shape + (3,)
    assert img.dtype == np.uint8
    assert 20 < img.mean() < 240


def test_render_info_angle_within_limits():
    spec = spec_for("plain")
    angles = [render_fabric_info(spec, i, 32).angle_deg for i in range(10)]
    assert all(abs(a) <= spec.rotation_deg + 1e-9 for a in angles)
    assert np.std(angles) > 0.2


def test_render_rejects_tiny_size():
    with pytest.raises(ValueError):
        render_fabric(spec_for("plain"), 0, 4)


def _texture(img: np.ndarray, r: int = 12) -> np.ndarray:
    """Normalised autocorrelation over +-r px lags: the weave's repeat, blind to its phase."""
    g = grey(img)
    g = g - cv2.GaussianBlur(g, (0, 0), 8)  # drop lighting gradients
    g = (g - g.mean()) / (g.std() + 1e-6)
    f = np.fft.fft2(g)
    acf = np.fft.fftshift(np.real(np.fft.ifft2(f * np.conj(f)))) / g.size
    cy, cx = acf.shape[0] // 2, acf.shape[1] // 2
    return acf[cy - r:cy + r + 1, cx - r:cx + r + 1]


def test_every_style_renders_and_differs_from_the_others():
    """Same palette, different construction: each pair of styles differs in texture more
    than two images of one style differ from each other."""
    tex = {}
    for style in STYLES:
        spec = spec_for(style, 1, palette="greige")
        tex[style] = [_texture(render_fabric(spec, s, 96)) for s in (0, 1)]
    within = {s: np.abs(a - b).mean() for s, (a, b) in tex.items()}
    for i, s in enumerate(STYLES):
        for t in STYLES[i + 1:]:
            between = np.abs(tex[s][0] - tex[t][0]).mean()
            assert between > 1.2 * max(within[s], within[t]), (s, t)


def test_good_images_vary_but_have_similar_statistics():
    spec = spec_for("twill", 2)
    imgs = [render_fabric(spec, np.random.default_rng(i), 96) for i in range(6)]
    means = np.array([im.reshape(-1, 3).mean(0) for im in imgs])
    stds = np.array([grey(im).std() for im in imgs])
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert np.abs(imgs[i].astype(int) - imgs[j].astype(int)).mean() > 3  # not copies
    assert (means.max(0) / means.min(0)).max() < 1.3  # brightness within the +-8 % (+ lighting)
    assert stds.max() / stds.min() < 1.5  # same texture contrast


# --------------------------------------------------------------------- defects


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_defect_mask_is_exact(kind, seed):
    spec = spec_for(HOME_STYLE[kind], seed)
    info = render_fabric_info(spec, np.random.default_rng(100 + seed), (96, 112))
    img = info.image
    out, mask = add_defect(img, kind, np.random.default_rng(seed), spec, angle_deg=info.angle_deg)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert mask.shape == img.shape[:2] and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 255}
    inside = mask > 0
    # outside the mask nothing changed, bit for bit
    assert np.array_equal(out[~inside], img[~inside])
    # inside it the change is measurable (a few grey levels on average at least) ...
    diff = np.abs(out.astype(np.int16) - img.astype(np.int16)).max(axis=2)
    assert diff[inside].mean() >= 4.0, diff[inside].mean()
    # ... and nearly every mask pixel was actually changed
    assert np.count_nonzero(diff[inside]) >= 0.85 * np.count_nonzero(inside)
    # the input is not modified in place
    assert np.array_equal(img, info.image)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_is_deterministic(kind):
    spec = spec_for(HOME_STYLE[kind])
    img = render_fabric(spec, 0, 64)
    a = add_defect(img, kind, 5, spec)
    b = add_defect(img, kind, 5, spec)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_without_spec_on_a_foreign_image(kind):
    rng = np.random.default_rng(0)
    img = np.clip(128 + 20 * rng.standard_normal((80, 64, 3)), 0, 255).astype(np.uint8)
    out, mask = add_defect(img, kind, 1)
    assert mask.any()
    assert np.array_equal(out[mask == 0], img[mask == 0])


THIN_WIDTH = {"mis_yarn": (1, 4), "broken_needle": (2, 4), "open_width": (1, 3)}


@pytest.mark.parametrize("kind", THIN_LINE_KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_thin_line_masks_are_thin_and_long(kind, seed):
    spec = spec_for(HOME_STYLE[kind], seed)
    info = render_fabric_info(spec, seed, 128)
    _, mask = add_defect(info.image, kind, seed, spec, angle_deg=info.angle_deg)
    m = mask > 0
    horizontal = kind == "mis_yarn"
    counts = m.sum(axis=0) if horizontal else m.sum(axis=1)  # pixels across the line
    covered = counts[counts > 0]
    lo, hi = THIN_WIDTH[kind]
    assert covered.max() <= hi
    assert lo <= np.median(covered) <= hi
    # all pixels of one line have the same width except its tapered ends
    assert np.mean(covered == np.median(covered)) > 0.85
    assert covered.size >= 0.65 * m.shape[1 if horizontal else 0]  # spans most of the image
    n, _ = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
    assert n == 2  # one line


@pytest.mark.parametrize("kind,lo,hi", [("hole", 6, 36), ("knot", 3, 16), ("slub", 10, 60), ("stain", 8, 80)])
def test_local_defect_sizes(kind, lo, hi):
    spec = spec_for(HOME_STYLE[kind])
    for seed in range(4):
        img = render_fabric(spec, seed, 128)
        _, mask = add_defect(img, kind, seed, spec)
        ys, xs = np.nonzero(mask)
        extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        assert lo <= extent <= hi, (kind, extent)


def test_defect_rejects_bad_input():
    img = render_fabric(spec_for("plain"), 0, 64)
    with pytest.raises(ValueError):
        add_defect(img, "tear", 0)
    with pytest.raises(ValueError):
        add_defect(img[..., 0], "hole", 0)
    with pytest.raises(ValueError):
        add_defect(img[:16, :16], "hole", 0)


def test_render_sample():
    spec = spec_for("knit")
    img, mask = render_sample(spec, 3, 64)
    assert img.shape == (64, 64, 3) and not mask.any()
    img, mask = render_sample(spec, 3, 64, kind="broken_needle")
    assert mask.any()


# ------------------------------------------------------------------ MVTec tree


def test_write_demo_mvtec(tmp_path: Path):
    kinds = ("hole", "mis_yarn", "stain")
    man = write_demo_mvtec(tmp_path / "d", style="knit", n_train_good=4, n_test_good=2, n_per_defect=2,
                           size=48, seed=3, kinds=kinds)
    root = tmp_path / "d"
    assert sorted(p.name for p in (root / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png",
                                                                            "003.png"]
    assert sorted(p.name for p in (root / "test").iterdir()) == sorted(("good",) + kinds)
    assert len(list((root / "test" / "good").glob("*.png"))) == 2
    for k in kinds:
        assert sorted(p.name for p in (root / "test" / k).iterdir()) == ["000.png", "001.png"]
        assert sorted(p.name for p in (root / "ground_truth" / k).iterdir()) == ["000_mask.png", "001_mask.png"]
        img = cv2.imread(str(root / "test" / k / "000.png"), cv2.IMREAD_UNCHANGED)
        m = cv2.imread(str(root / "ground_truth" / k / "000_mask.png"), cv2.IMREAD_UNCHANGED)
        assert img.shape == (48, 48, 3) and m.shape == (48, 48) and m.dtype == np.uint8
        assert set(np.unique(m).tolist()) == {0, 255}
    assert not (root / "ground_truth" / "good").exists()
    assert man["counts"] == {"train/good": 4, "test/good": 2, "test/hole": 2, "test/mis_yarn": 2,
                             "test/stain": 2}
    assert man["style"] == "knit" and man["spec"]["style"] == "knit" and man["seed"] == 3

    # deterministic for a seed, and an image does not depend on the counts
    man2 = write_demo_mvtec(tmp_path / "e", style="knit", n_train_good=2, n_test_good=1, n_per_defect=1,
                            size=48, seed=3, kinds=("stain",))
    assert man2["spec"] == man["spec"]
    for rel in ("train/good/001.png", "test/good/000.png", "test/stain/000.png",
                "ground_truth/stain/000_mask.png"):
        a = cv2.imread(str(root / rel), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / "e" / rel), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(a, b), rel
    # training images of one product differ from each other
    a = cv2.imread(str(root / "train/good/000.png"))
    b = cv2.imread(str(root / "train/good/001.png"))
    assert not np.array_equal(a, b)


def test_write_demo_mvtec_rejects_unknown_kind(tmp_path: Path):
    with pytest.raises(ValueError):
        write_demo_mvtec(tmp_path, n_train_good=1, n_test_good=1, n_per_defect=1, size=32, kinds=("tear",))


# ----------------------------------------------------------------- layering rule


def test_module_imports_only_stdlib_numpy_cv2():
    import sys

    tree = ast.parse(Path(df.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    third_party = roots - set(sys.stdlib_module_names)
    assert third_party <= {"numpy", "cv2"}, third_party


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("style", ["twill", "knit"])
def test_visibility_floor_lifts_faint_defects_without_moving_the_mask(kind, style):
    spec = spec_for(style, 3)
    info = render_fabric_info(spec, np.random.default_rng(7), 128)
    img = info.image
    faint, m0 = add_defect(img, kind, np.random.default_rng(1), spec, angle_deg=info.angle_deg, min_visibility=0.0)
    shown, m1 = add_defect(img, kind, np.random.default_rng(1), spec, angle_deg=info.angle_deg, min_visibility=1.0)
    assert np.array_equal(m0, m1)  # same defect, same pixel-exact mask
    inside = m1 > 0
    assert np.array_equal(shown[~inside], img[~inside])
    line = kind in THIN_LINE_KINDS
    v0 = df.visibility(img, faint[inside].astype(np.float32) - img[inside], inside, line)
    v1 = df.visibility(img, shown[inside].astype(np.float32) - img[inside], inside, line)
    # lifted to the floor (up to uint8 rounding and clipping at black / white), never lowered
    assert v1 >= min(v0, 1.0) - 0.02
    if v0 < 0.9:
        assert v1 > v0  # a faint one got stronger


def _stripes(h: int = 64, w: int = 64) -> np.ndarray:
    """Fabric of 2-px dark gaps (luma 60) between 3-px bright yarns (luma 180), running down the image."""
    img = np.full((h, w, 3), 180, np.uint8)
    for x in range(0, w, 5):
        img[:, x:x + 2] = 60
    return img


def test_line_visibility_is_its_shade_against_the_fabric_beside_it():
    img = _stripes()
    mask = np.zeros(img.shape[:2], bool)
    mask[:, 20] = True  # a 1-px line down a dark gap
    # beside it, 2-4 px away: one gap column and five yarn columns, mean luma 160
    filled = np.full((int(mask.sum()), 3), 100.0, np.float32)  # the gap brightened to that ...
    # ... changes it by 1.7 std of the image, and leaves it as bright as the fabric beside it
    assert df._mean_change(img, filled) > 1.5
    assert df.visibility(img, filled, mask, line=True) < 0.01
    lit = np.full((int(mask.sum()), 3), 190.0, np.float32)  # 250: far above everything beside it
    std = float((img.astype(np.float32) @ np.array([0.114, 0.587, 0.299], np.float32)).std())
    assert df.visibility(img, lit, mask, line=True) == pytest.approx((250 - 160) / std, rel=1e-3)


def test_a_line_lost_in_the_weave_is_lifted_until_it_stands_out():
    img = _stripes()
    mask = np.zeros(img.shape[:2], bool)
    mask[:, 20] = True
    change = np.full((int(mask.sum()), 3), 100.0, np.float32)
    gain = df._line_gain(img, change, mask, 1.0)
    assert gain > 1.0
    shown = change * np.float32(gain)
    assert df.visibility(img, shown, mask, line=True) == pytest.approx(1.0, abs=1e-3)
    # a fold down the gap at x 20-21, lit on its left (60 -> 100) and shadowed on its right (60 -> 10); beside
    # it (x 16-18, 23-25) the mean luma is 140: the lit side stands out by 40, the shadow by 130 (2.2 std)
    fold = np.zeros(img.shape[:2], bool)
    fold[:, 20:22] = True
    d = np.zeros((64, 2, 3), np.float32)
    d[:, 0] = 40.0
    d[:, 1] = -50.0
    d = d.reshape(-1, 3)
    std = float((img.astype(np.float32) @ np.array([0.114, 0.587, 0.299], np.float32)).std())
    groups, flank = df._line_shades(img, d, fold)
    assert flank == pytest.approx(140.0) and len(groups) == 2
    assert df._line_gain(img, d, fold, 1.0) == 1.0  # its stronger side is plain to see ...
    # ... but its mean change (-5) is not: that measure lifts it, as before the shade was measured
    assert df.visibility(img, d, fold, line=True) == pytest.approx(5.0 / std, rel=1e-3)


def test_demo_tree_records_its_visibility_floor(tmp_path: Path):
    man = write_demo_mvtec(tmp_path / "a", n_train_good=1, n_test_good=0, n_per_defect=1, size=64, kinds=["stain"])
    assert man["min_visibility"] == df.VISIBILITY_FLOOR
    man = write_demo_mvtec(tmp_path / "b", n_train_good=1, n_test_good=0, n_per_defect=1, size=64, kinds=["stain"],
                           min_visibility=0.0)
    assert man["min_visibility"] == 0.0
    a = cv2.imread(str(tmp_path / "a/test/stain/000.png"))
    b = cv2.imread(str(tmp_path / "b/test/stain/000.png"))
    assert np.array_equal(cv2.imread(str(tmp_path / "a/ground_truth/stain/000_mask.png")),
                          cv2.imread(str(tmp_path / "b/ground_truth/stain/000_mask.png")))
    assert a.shape == b.shape
