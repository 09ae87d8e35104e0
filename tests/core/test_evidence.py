import numpy as np
import pytest

from annotator.core import masks as M
from annotator.core.evidence import SupportTest, supported_by_image


def weave(h=160, w=160, seed=0, period=8, noise=12.0):
    """Vertical stripes (a period of ``period`` px, 2 dark columns each) with pixel noise, BGR uint8."""
    rng = np.random.default_rng(seed)
    cols = np.where(np.arange(w) % period < 2, 90.0, 150.0)
    grey = np.tile(cols, (h, 1)) + rng.normal(0, noise, (h, w))
    return np.clip(np.repeat(grey[..., None], 3, axis=2), 0, 255).astype(np.uint8)


def line_mask(shape, x, y0, y1, width=2):
    m = np.zeros(shape, bool)
    m[y0:y1, x:x + width] = True
    return m


def test_a_faint_line_is_supported():
    """1.5 noise sd darker: against placements in random phase of the stripes it would be lost in
    their spread (checked: this test fails when the shifts are shuffled)."""
    img = weave()
    line = line_mask(img.shape[:2], 53, 20, 140)  # on bright columns, 1.5 noise sd darker
    img[line] = np.clip(img[line].astype(float) - 18, 0, 255).astype(np.uint8)
    supported, pieces = supported_by_image(img, line, line)
    assert len(pieces) == 1 and pieces[0].supported and pieces[0].placements >= 20
    assert supported[line].all()


def test_normal_fabric_is_not_supported():
    img = weave(seed=1)
    blob = np.zeros(img.shape[:2], bool)
    blob[70:82, 60:74] = True  # a stray mark on plain fabric
    supported, pieces = supported_by_image(img, blob, blob)
    assert not supported.any() and not pieces[0].supported


def test_the_null_keeps_the_weave_phase():
    """A label on a dark column of defect-free stripes is unlike its surroundings, but so is every
    dark column."""
    img = weave(seed=2)
    on_stripe = line_mask(img.shape[:2], 64, 20, 140)  # 64 % 8 == 0: a dark column, no defect
    supported, pieces = supported_by_image(img, on_stripe, on_stripe)
    assert pieces[0].mean_distance > 30  # far from its surroundings ...
    assert not pieces[0].supported  # ... like every other dark column


def test_windows_keep_full_image_coordinates_and_ignore_tiny_pieces():
    img = weave(400, 900, seed=3)
    line = line_mask(img.shape[:2], 701, 200, 330)
    img[line] = np.clip(img[line].astype(float) - 25, 0, 255).astype(np.uint8)
    cand = line.copy()
    cand[10, 10] = True  # one stray pixel: below min_px, not tested
    supported, pieces = supported_by_image(img, line, cand)
    assert [p.bbox for p in pieces] == [(701, 200, 2, 130)]
    assert supported[line].all() and not supported[10, 10]


def test_untestable_piece_is_not_supported():
    img = weave(40, 40, seed=4)
    big = np.zeros((40, 40), bool)
    big[5:35, 5:35] = True  # no room to move it anywhere
    img[big] = 0
    supported, pieces = supported_by_image(img, big, big, test=SupportTest(min_placements=20))
    assert not supported.any() and pieces[0].placements < 20 and pieces[0].p_value == 1.0


def test_sizes_must_agree():
    with pytest.raises(ValueError, match="differ in size"):
        supported_by_image(weave(), np.zeros((10, 10), bool), np.zeros((10, 10), bool))


def test_greyscale_images_work():
    img = weave()[..., 0].copy()
    line = line_mask(img.shape, 53, 20, 140)
    img[line] = np.clip(img[line].astype(float) - 25, 0, 255).astype(np.uint8)
    assert supported_by_image(img, line, M.dilate(line, 0))[0][line].all()


def test_a_long_line_is_tested_in_parts():
    img = weave(200, 700, seed=5)
    line = np.zeros(img.shape[:2], bool)
    line[100:102, 20:680] = True  # 660 px long: three parts of at most 256 px
    img[line] = np.clip(img[line].astype(float) - 30, 0, 255).astype(np.uint8)
    supported, pieces = supported_by_image(img, line, line, test=SupportTest(max_piece=256))
    assert len(pieces) == 3 and sum(p.area for p in pieces) == line.sum()
    assert all(p.bbox[2] <= 256 for p in pieces) and supported[line].all()


def test_a_patch_that_lost_the_texture_is_supported():
    """A soft stain or a smear on a natural texture: the colour statistics compare it with places
    whose brightness varies as much (large-scale shading), but its fine texture is flattened; the
    gradient energy sees that (SupportTest.texture)."""
    import cv2

    rng = np.random.default_rng(4)
    shade = cv2.GaussianBlur(rng.standard_normal((160, 160)), (0, 0), 10)
    grey = 120 + 40 * shade / shade.std() + 25 * rng.standard_normal((160, 160))
    patch = np.zeros(grey.shape, bool)
    patch[60:80, 70:92] = True
    local = cv2.GaussianBlur(grey, (0, 0), 6)
    grey[patch] = 0.4 * grey[patch] + 0.6 * local[patch] + 30  # 60 % of the fine texture gone, a little brighter
    img = np.clip(np.repeat(grey[..., None], 3, axis=2), 0, 255).astype(np.uint8)
    with_texture = supported_by_image(img, patch, patch)[1][0]
    colour_only = supported_by_image(img, patch, patch, test=SupportTest(texture=False))[1][0]
    assert with_texture.supported and not colour_only.supported
    assert with_texture.to_dict()["gradient_log_ratio"] < -0.3  # its gradient energy is lower than its ring's
    assert "gradient_log_ratio" not in colour_only.to_dict()


def test_a_departure_too_small_to_see_does_not_support_a_piece():
    """On noise-free stripes every placement in the weave's phase is the same, so any difference
    at all lies beyond them all: 1 grey level, 1/20 of the ring's spread, is significant. Only
    min_effect keeps it from supporting the piece; 10 grey levels do."""
    xx = np.mgrid[:160, :160][1]
    grey = 100.0 + 40.0 * (xx % 4 < 2)
    patch = np.zeros(grey.shape, bool)
    patch[60:90, 60:80] = True

    def image(offset):
        return np.repeat((grey + offset * patch)[..., None], 3, axis=2).astype(np.uint8)

    significant = supported_by_image(image(1), patch, patch, test=SupportTest(min_effect=0.0))[1][0]
    assert significant.supported and significant.p_value <= 0.03 and significant.placements >= 20
    seen = supported_by_image(image(1), patch, patch)[1][0]
    assert not seen.supported and seen.p_value == significant.p_value
    assert 0 < seen.effect < SupportTest().min_effect and seen.to_dict()["effect"] == round(seen.effect, 3)
    assert supported_by_image(image(10), patch, patch)[1][0].supported
