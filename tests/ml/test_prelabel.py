"""Model 1 of spec 003 (the pre-labeller): trained on good images only, thresholds from
held-out good images only, a clear defect found and masked, save/load, cancel, progress,
images of any size. Tiny images and a small config keep the file fast on 2 CPU cores."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from annotator.core.demo_fabric import add_defect, random_spec, render_fabric
from annotator.core.jobs import Cancelled, CancelToken
from annotator.ml import prelabel as P

SIZE = 96
# CPU in CI; ANNOTATOR_TEST_DEVICE=cuda runs the same tests on a GPU
TEST_DEVICE = os.environ.get("ANNOTATOR_TEST_DEVICE", "cpu")
FAST = P.PrelabelConfig(tile=64, tile_overlap=16, coreset_max=2000, batch_size=8, device=TEST_DEVICE, num_threads=2)


@pytest.fixture(scope="module")
def spec():
    return random_spec(np.random.default_rng(3), style="plain")


def good_images(spec, n: int, seed: int, size=SIZE) -> list[np.ndarray]:
    return [render_fabric(spec, np.random.default_rng([seed, i]), size) for i in range(n)]


def with_hole(spec, seed: int, size=SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A good image with a clear defect (a hole: dark backing shows through) and its mask."""
    img = render_fabric(spec, np.random.default_rng([seed, 7]), size)
    out, mask = add_defect(img, "hole", np.random.default_rng(seed), spec)
    return out, mask > 0


@pytest.fixture(scope="module")
def goods(spec):
    return good_images(spec, 12, seed=1)


@pytest.fixture(scope="module")
def model(goods):
    return P.fit_prelabeller(goods, FAST)


def _which(img: np.ndarray, pool: list[np.ndarray]) -> int:
    hits = [i for i, g in enumerate(pool) if g.shape == img.shape and np.array_equal(g, img)]
    return hits[0] if hits else -1


def test_trains_on_good_images_only_and_calibrates_on_the_holdout(monkeypatch, goods, spec):
    """Spy on what builds the bank and what sets the thresholds: the bank gets exactly the
    fit part of the good images, the calibration exactly the held-out part, and nothing else
    (in particular no defective image) reaches the model while it is fitted."""
    seen: dict[str, list] = {"collect": [], "calibrate": [], "tiles": []}
    scaled = [P._rescale(g, FAST.scale) for g in goods]  # the fit part is magnified before the backbone
    real_collect, real_maps, real_call = P._collect, P.Prelabeller._summed_maps, P.PatchEmbedder.__call__

    def spy_collect(embedder, images, *a, **k):
        seen["collect"].append([_which(im, scaled) for im in images])
        return real_collect(embedder, images, *a, **k)

    def spy_maps(self, images, *a, **k):  # during fitting, only the calibration scores images
        seen["calibrate"].append([_which(im, goods) for im in images])
        return real_maps(self, images, *a, **k)

    def spy_call(self, tiles, context=0):
        seen["tiles"].extend(np.asarray(tiles).copy())
        return real_call(self, tiles, context)

    monkeypatch.setattr(P, "_collect", spy_collect)
    monkeypatch.setattr(P.Prelabeller, "_summed_maps", spy_maps)
    monkeypatch.setattr(P.PatchEmbedder, "__call__", spy_call)
    m = P.fit_prelabeller(goods, FAST)
    monkeypatch.undo()
    fit_idx, hold_idx = m.metrics["fit_indices"], m.metrics["holdout_indices"]
    assert sorted(fit_idx + hold_idx) == list(range(len(goods))) and not set(fit_idx) & set(hold_idx)
    assert len(hold_idx) >= 2
    assert seen["collect"] == [fit_idx]
    assert seen["calibrate"] == [hold_idx]
    # every tile the backbone saw during fitting is a window of one of the good images
    # (as the backbone sees it: magnified by ``scale``)
    windows = {g[y:y + th, x:x + tw].tobytes() for g in scaled
               for y, x, th, tw in P.tile_grid(g.shape[0], g.shape[1], FAST.tile, FAST.tile_overlap)}
    assert seen["tiles"] and all(t.tobytes() in windows for t in seen["tiles"])
    # predicting a defective image afterwards does not change the model
    banks = {k: m.state[k].clone() for k in ("bank", "bank_coarse") if k in m.state}
    m.predict([with_hole(spec, 5)[0]])
    assert all(torch.equal(b, m.state[k]) for k, b in banks.items())


def test_config_for_scale_keeps_the_window_and_blurs_in_image_px():
    assert P.config_for_scale(2.0) == P.PrelabelConfig()  # the defaults are the 2x magnification
    one, quarter = P.config_for_scale(1.0, method="padim"), P.config_for_scale(0.25)
    assert (one.tile, one.blur_sigma, one.refine_sigma, one.method) == (256, 4.0, 1.0, "padim")
    assert (quarter.tile, quarter.tile_overlap) == (64, 16)


def test_thresholds_are_the_rule_applied_to_holdout_scores(model, goods):
    hold = [goods[i] for i in model.metrics["holdout_indices"]]
    out = sorted(model.raw_maps(hold), key=lambda t: t[0])
    expect, _ = P.calibrate([t[1] for t in out], [t[2] for t in out], model.config)
    assert model.thresholds == pytest.approx(expect)
    scores = model.metrics["calibration"]["holdout_scores"]
    base = max(max(scores), np.mean(scores) + model.config.image_sd_k * np.std(scores))
    assert model.thresholds["image"] >= base * model.config.image_margin
    assert model.thresholds["pixel"] <= model.thresholds["image"]


def test_split_is_seeded_and_keeps_two_holdout_images():
    cfg = P.PrelabelConfig(holdout_fraction=0.2, min_holdout=2, seed=4)
    fit, hold = P.split_good(5, cfg)
    assert len(hold) == 2 and len(fit) == 3 and P.split_good(5, cfg) == (fit, hold)
    with pytest.raises(ValueError):
        P.split_good(2, cfg)


def test_clear_defect_is_found_and_good_images_mostly_are_not(model, spec):
    defects = [with_hole(spec, s) for s in range(20, 24)]
    res = model.predict([d[0] for d in defects])
    for r, (_, gt) in zip(res, defects):
        assert r.is_defect and r.mask.any()
        assert (r.mask & gt).any(), "the mask must overlap the defect"
        assert r.heatmap.dtype == np.float32 and r.heatmap[gt].max() > 1.0  # 1.0 == pixel threshold
    fresh = model.predict(good_images(spec, 8, seed=50))
    flagged = sum(r.is_defect for r in fresh)
    assert flagged <= 1
    for r in fresh:
        assert r.mask.dtype == bool and (r.is_defect or not r.mask.any())


def test_save_load_round_trip_gives_identical_predictions(model, spec, tmp_path):
    imgs = [with_hole(spec, 30)[0], good_images(spec, 1, seed=60)[0]]
    before = model.predict(imgs)
    model.save(tmp_path / "m1")
    loaded = P.Prelabeller.load(tmp_path / "m1")
    after = loaded.predict(imgs)
    assert loaded.config == model.config and loaded.thresholds == model.thresholds
    # the good reference crops of reference_refine travel with the model (fit images, not holdout ones)
    assert model.references.shape[0] == min(FAST.reference_images, len(model.metrics["fit_indices"])) > 0
    np.testing.assert_array_equal(loaded.references, model.references)
    for a, b in zip(before, after):
        assert a.score == b.score and a.is_defect == b.is_defect
        np.testing.assert_array_equal(a.heatmap, b.heatmap)
        np.testing.assert_array_equal(a.mask, b.mask)


def test_cancel_raises_and_progress_is_reported(goods, model, spec):
    calls = []
    token = CancelToken()

    def progress(done, total, msg):
        calls.append((done, total))
        if done > 0:
            token.cancel()

    with pytest.raises(Cancelled):
        P.fit_prelabeller(goods, FAST, on_progress=progress, cancel=token)
    token2 = CancelToken()
    token2.cancel()
    with pytest.raises(Cancelled):
        model.predict(good_images(spec, 2, seed=70), cancel=token2)
    calls = []
    model.predict(good_images(spec, 3, seed=71), on_progress=lambda d, t, m: calls.append((d, t)))
    assert calls and calls[-1][0] == calls[-1][1] > 0
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))


def test_any_size_non_square_and_larger_than_tile(model, spec):
    img = render_fabric(spec, np.random.default_rng(80), (70, 150))
    big, gt = with_hole(spec, 81, size=(130, 200))
    small = render_fabric(spec, np.random.default_rng(82), (40, 52))
    res = model.predict([img, big, small])
    for r, im in zip(res, (img, big, small)):
        assert r.heatmap.shape == im.shape[:2] == r.mask.shape
        assert np.isfinite(r.heatmap).all()
    assert res[1].is_defect and (res[1].mask & gt).any()
    grid = P.tile_grid(130, 200, 64, 16)
    covered = np.zeros((130, 200), bool)
    for y, x, th, tw in grid:
        covered[y:y + th, x:x + tw] = True
    assert covered.all()


def test_scale_and_padim_options_run(goods, spec):
    cfg = dataclasses.replace(FAST, method="padim", scale=0.75)
    m = P.fit_prelabeller(goods[:6], cfg)
    res = m.predict([with_hole(spec, 90)[0]])
    assert res[0].heatmap.shape == (SIZE, SIZE)
    assert "mean" in m.state and "bank" not in m.state


def test_greedy_coreset_is_exact_farthest_point_selection():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 12, generator=g) @ torch.randn(12, 12, generator=g)
    got = P.greedy_coreset(x, 200, seed=0, block=64).tolist()
    # the one-at-a-time loop, from the same seeded first point
    first = int(torch.randint(x.shape[0], (1,), generator=torch.Generator().manual_seed(0)))
    d = ((x - x[first]) ** 2).sum(1)
    want = [first]
    d[first] = 0
    while len(want) < 200:
        c = int(d.argmax())
        want.append(c)
        d = torch.minimum(d, ((x - x[c]) ** 2).sum(1))
        d[c] = 0
    assert got == want


def test_auroc_matches_definition():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9])
    pairs = [(p, n) for p in scores[labels == 1] for n in scores[labels == 0]]
    want = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert P.auroc(labels, scores) == pytest.approx(want)


def test_grabcut_tightens_a_loose_blob_and_keeps_lines():
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(150, 12, (96, 96, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:96, :96]
    blob = (yy - 40) ** 2 + (xx - 40) ** 2 <= 8 ** 2
    img[blob] = (40, 40, 160)  # a red stain on grey fabric
    line = np.zeros((96, 96), bool)
    line[10:90, 80:82] = True  # a 2-px line, left as the map drew it
    img[line] = 60
    loose = ((yy - 40) ** 2 + (xx - 40) ** 2 <= 11 ** 2)  # the blurred map's region: 3 px too wide
    cfg = P.PrelabelConfig()
    out = P.grabcut_regions(img, loose | line, cfg)
    blob_out = out & ((yy - 40) ** 2 + (xx - 40) ** 2 <= 20 ** 2)
    assert (blob_out & ~blob).sum() < 0.1 * blob.sum() and (blob & ~blob_out).sum() < 0.1 * blob.sum()
    assert np.array_equal(out[:, 70:], line[:, 70:])


def test_grabcut_keeps_a_region_whose_colours_do_not_separate():
    img = np.full((64, 64, 3), 128, np.uint8)  # flat: nothing to separate
    mask = np.zeros((64, 64), bool)
    mask[20:40, 20:40] = True
    out = P.grabcut_regions(img, mask, P.PrelabelConfig())
    assert out.sum() > 0 and out.sum() <= 2 * mask.sum()


def _edge_distance(h: int, w: int, cap: int) -> np.ndarray:
    """Reference: every pixel's distance to the nearest image edge, capped at ``cap``."""
    y = np.minimum(np.arange(h), np.arange(h)[::-1])
    x = np.minimum(np.arange(w), np.arange(w)[::-1])
    return np.minimum(np.minimum.outer(y, x), cap)


@pytest.mark.parametrize("h,w,cap", [(40, 50, 6), (9, 30, 6), (5, 7, 8), (64, 3, 4)])
def test_border_correction_touches_only_the_frame_and_matches_the_whole_image_rule(h, w, cap):
    rng = np.random.default_rng(h * w)
    maps = [rng.gamma(2.0, 1.0, (h, w)).astype(np.float32) * 3 for _ in range(5)]
    d = _edge_distance(h, w, cap)
    stack = np.stack(maps).astype(np.float64)
    prof = P.border_profile(maps, cap)
    for k in range(cap + 1):
        if (d == k).any():
            vals = stack[:, d == k]
            assert prof[k] == pytest.approx([vals.mean(), vals.std()], rel=1e-6, abs=1e-9)
    mean_in, sd_in = prof[cap]
    expect = np.maximum(mean_in + (maps[0] - prof[d, 0]) * sd_in / prof[d, 1], 0)
    assert P.apply_border_profile(maps[0], prof) == pytest.approx(expect, rel=1e-5, abs=1e-5)


def test_border_profile_standardises_each_edge_ring_to_the_interior():
    rng = np.random.default_rng(0)
    h, w, cap = 40, 50, 6
    d = _edge_distance(h, w, cap)
    assert d[0, 0] == 0 and d[1, 5] == 1 and d[20, 25] == cap and d[-1, 10] == 0 and d[10, -3] == 2
    # a frame whose values are higher and noisier the closer they lie to the edge
    mean = np.where(d < cap, 3.0 - 0.3 * d, 1.0)
    sd = np.where(d < cap, 2.0 - 0.2 * d, 0.5)
    maps = [(mean + sd * rng.standard_normal((h, w))).astype(np.float32) for _ in range(200)]
    prof = P.border_profile(maps, cap)
    assert prof.shape == (cap + 1, 2)
    assert prof[0] == pytest.approx([3.0, 2.0], rel=0.05) and prof[cap] == pytest.approx([1.0, 0.5], rel=0.05)
    fixed = np.stack([P.apply_border_profile(m, prof) for m in maps])
    for k in range(cap + 1):
        ring = fixed[:, d == k]
        assert ring.mean() == pytest.approx(1.0, abs=0.03) and ring.std() == pytest.approx(0.5, rel=0.05)


def test_border_profile_copes_with_images_smaller_than_the_border():
    maps = [np.full((5, 7), 2.0, np.float32)]  # distances 0..2 only: rows 3.. borrow row 2
    prof = P.border_profile(maps, 8)
    assert prof[:, 0] == pytest.approx(2.0) and np.all(prof[:, 1] > 0)
    assert P.apply_border_profile(maps[0], prof) == pytest.approx(maps[0])


def test_fitted_model_corrects_its_border_and_keeps_the_profile(model, goods, tmp_path):
    assert model.border is not None and model.border["coarse"].shape == (FAST.border_px + 1, 2)
    off = P.fit_prelabeller(goods, dataclasses.replace(FAST, border_px=0))
    assert off.border is None
    img = goods[model.metrics["holdout_indices"][0]]
    raw = next(off.raw_maps([img]))[1]  # same bank (same seed and split), no correction
    fixed = next(model.raw_maps([img]))[1]
    assert fixed == pytest.approx(P.apply_border_profile(raw, model.border["coarse"]), rel=1e-5, abs=1e-5)
    loaded = P.Prelabeller.load(model.save(tmp_path / "m"))
    assert loaded.border["coarse"] == pytest.approx(model.border["coarse"])


def test_model_files_from_before_the_border_profile_still_load_and_newer_ones_are_refused(model, goods, tmp_path):
    import json

    folder = model.save(tmp_path / "m")
    meta_file = folder / P.CONFIG_FILE
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    assert meta["format_version"] == P.FORMAT_VERSION and meta["border"] is not None
    # a version-1 file: no border profile, thresholds calibrated on uncorrected maps
    old = dict(meta, format_version=1)
    old.pop("border")
    meta_file.write_text(json.dumps(old), encoding="utf-8")
    loaded = P.Prelabeller.load(folder)
    assert loaded.border is None
    img = goods[model.metrics["holdout_indices"][0]]
    raw = next(loaded.raw_maps([img]))[1]
    assert P.apply_border_profile(raw, model.border["coarse"]) == pytest.approx(next(model.raw_maps([img]))[1], rel=1e-5, abs=1e-5)
    meta_file.write_text(json.dumps(dict(meta, format_version=P.FORMAT_VERSION + 1)), encoding="utf-8")
    with pytest.raises(ValueError, match="can read"):
        P.Prelabeller.load(folder)


def test_each_region_is_cut_at_half_its_own_height():
    m = np.zeros((40, 60), np.float32)
    yy, xx = np.mgrid[:40, :60]
    m += 10.0 * np.exp(-((yy - 20) ** 2 + (xx - 15) ** 2) / (2 * 4.0 ** 2))  # a strong, wide peak
    m += 2.0 * np.exp(-((yy - 20) ** 2 + (xx - 45) ** 2) / (2 * 4.0 ** 2))  # a weak one
    mask = m > 1.0
    cut = P.cut_regions_below_peak_fraction(m, mask, 0.0, 0.5)
    strong, weak = cut[:, :30], cut[:, 30:]
    # half maximum of a Gaussian: radius sigma * sqrt(2 ln 2) = 4.7 px for both peaks
    for half in (strong, weak):
        r = np.sqrt(half.sum() / np.pi)
        assert 4.0 < r < 5.5
    assert mask[:, :30].sum() > 2 * strong.sum()  # the fixed threshold drew the strong one fat
    assert not (cut & ~mask).any()
    assert P.cut_regions_below_peak_fraction(m, np.zeros_like(mask), 0.0, 0.5).sum() == 0


def test_thresholds_carry_the_median_and_old_models_skip_the_cut(model, spec):
    assert model.thresholds["median"] < model.thresholds["pixel"]
    img, _ = with_hole(spec, 31)
    m, fine = next(model.raw_maps([img]))[1:]
    old = P.Prelabeller(model.config, model.state, {k: v for k, v in model.thresholds.items() if k != "median"},
                        embedder=model.embedder, border={k: v for k, v in model.border.items()})
    off = P.Prelabeller(dataclasses.replace(model.config, region_peak_fraction=0.0), model.state, model.thresholds,
                        embedder=model.embedder, border={k: v for k, v in model.border.items()})
    assert np.array_equal(old.mask_from_map(m, fine, img), off.mask_from_map(m, fine, img))


def test_features_are_computed_without_tf32_and_the_flags_are_restored(monkeypatch, goods):
    """On CUDA, TF32 convolutions moved anomaly scores by up to 8 % (see backbone.full_fp32):
    fitting and predicting must run the backbone in plain float32, and leave the flags as found."""
    seen = []
    real_call = P.PatchEmbedder.__call__

    def spy_call(self, tiles, context=0):
        seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return real_call(self, tiles, context)

    monkeypatch.setattr(P.PatchEmbedder, "__call__", spy_call)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # (torch's flag objects
    try:  # cannot be monkeypatched: they are properties of module proxies)
        m = P.fit_prelabeller(goods[:6], FAST)
        m.predict(goods[:1])
        assert seen and set(seen) == {(False, False)}
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_grabcut_does_not_depend_on_what_was_cut_before(spec):
    """OpenCV's per-thread RNG seeds GrabCut's colour models: a region's mask must not change with
    its state (the images cut before it, or the worker thread that cuts it)."""
    import cv2

    img, gt = with_hole(spec, 5, size=128)
    yy, xx = np.mgrid[:128, :128]
    ys, xs = np.nonzero(gt)
    loose = (yy - ys.mean()) ** 2 + (xx - xs.mean()) ** 2 <= (np.sqrt(gt.sum() / np.pi) + 4) ** 2
    rng = np.random.default_rng(9)
    noisy = np.clip(img.astype(np.int16) + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
    outs = []
    for state in (1, 2, 3, 4):
        cv2.setRNGSeed(state)
        outs.append(P.grabcut_regions(noisy, loose, P.PrelabelConfig()))
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_masks_drawn_in_parallel_equal_the_sequential_ones(model, spec):
    imgs = [with_hole(spec, s)[0] for s in range(40, 46)] + good_images(spec, 2, seed=80)
    one = model.predict(imgs, workers=1)
    many = model.predict(imgs, workers=3)
    assert sum(r.is_defect for r in one) >= 5
    for a, b in zip(one, many):
        assert a.score == b.score and a.is_defect == b.is_defect
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.heatmap, b.heatmap)


def test_a_region_is_kept_only_where_the_map_reaches_the_image_threshold(model):
    """Each mask region must be a detection by itself: a second region of the map above the pixel
    threshold but below the image threshold is the fabric's noise and is not drawn."""
    t_img, t_pix = model.thresholds["image"], model.thresholds["pixel"]
    assert t_pix < t_img
    m = np.full((64, 96), 0.5 * t_pix, np.float32)
    m[20:30, 10:20] = 1.5 * t_img  # a defect
    m[20:30, 60:70] = 0.5 * (t_pix + t_img)  # above the pixel threshold only
    cfg = dataclasses.replace(model.config, reference_refine=False, grabcut=False, refine=False)
    kw = dict(embedder=model.embedder, border={k: v for k, v in model.border.items()})
    gated = P.Prelabeller(cfg, model.state, model.thresholds, **kw).mask_from_map(m)
    assert gated[20:30, 10:20].all() and not gated[:, 40:].any()
    ungated = P.Prelabeller(dataclasses.replace(cfg, region_min_peak=0.0), model.state, model.thresholds,
                            **kw).mask_from_map(m)
    assert ungated[20:30, 60:70].all()
    with pytest.raises(ValueError, match="region_min_peak"):
        P.PrelabelConfig(region_min_peak=-1)


def test_a_defective_call_always_draws_the_region_around_the_map_peak(model):
    """When the refinements and the gate leave nothing (here: the peak's region is smaller than
    min_region_area), the image still gets the region above the pixel threshold around the peak."""
    t_img, t_pix = model.thresholds["image"], model.thresholds["pixel"]
    m = np.full((64, 96), 0.5 * t_pix, np.float32)
    m[30:33, 40:43] = 0.5 * (t_pix + t_img)  # 9 px above the pixel threshold ...
    m[31, 41] = 1.5 * t_img  # ... around a peak above the image threshold
    m[5:15, 80:90] = 0.5 * (t_pix + t_img)  # elsewhere: above the pixel threshold only
    cfg = dataclasses.replace(model.config, reference_refine=False, grabcut=False, refine=False,
                              region_peak_fraction=0.0)
    kw = dict(embedder=model.embedder, border={k: v for k, v in model.border.items()})
    pre = P.Prelabeller(cfg, model.state, model.thresholds, **kw)
    assert not pre.mask_from_map(m).any()  # 9 px < min_region_area
    r = pre._result(m)
    assert r.is_defect
    expect = np.zeros(m.shape, bool)
    expect[30:33, 40:43] = True
    np.testing.assert_array_equal(r.mask, expect)
    quiet = np.full((64, 96), 0.5 * t_pix, np.float32)
    assert not pre._result(quiet).is_defect and not pre._result(quiet).mask.any()


# 128-px images magnified 2x fill one 256-px tile: large enough for the coarse memory (COARSE_MIN_PX)
COARSE = dataclasses.replace(FAST, tile=256)


@pytest.fixture(scope="module")
def coarse_goods(spec):
    return good_images(spec, 10, seed=1, size=128)


@pytest.fixture(scope="module")
def coarse_model(coarse_goods):
    return P.fit_prelabeller(coarse_goods, COARSE)


def test_coarse_memory_is_fitted_on_the_fit_part_only_and_needs_large_enough_images(monkeypatch, coarse_goods, goods):
    assert COARSE.uses_coarse and not FAST.uses_coarse  # FAST's 64-px tiles are too small for it
    seen = []
    scaled = [P._rescale(g, COARSE.scale) for g in coarse_goods]
    real_collect = P._collect

    def spy_collect(embedder, images, *a, **k):
        seen.append((embedder.layers, [_which(im, scaled) for im in images]))
        return real_collect(embedder, images, *a, **k)

    monkeypatch.setattr(P, "_collect", spy_collect)
    m = P.fit_prelabeller(coarse_goods, COARSE)
    monkeypatch.undo()
    fit_idx = m.metrics["fit_indices"]
    assert seen == [(COARSE.layers, fit_idx), (COARSE.coarse_layers, fit_idx)]
    assert m.coarse_embedder is not None and m.metrics["coarse_bank_size"] > 0
    capped = P.fit_prelabeller(coarse_goods, dataclasses.replace(COARSE, coarse_coreset_max=100))
    assert capped.metrics["coarse_bank_size"] == 100 and capped.metrics["bank_size"] == m.metrics["bank_size"]
    # 96-px images (192 px magnified) are too small: the same settings fit the fine memory only
    small = P.fit_prelabeller(goods, COARSE)
    assert small.coarse_embedder is None and "bank_coarse" not in small.state and small.coarse_gain == 0


def test_coarse_memory_is_scaled_to_the_fine_map_on_the_holdout_and_added(coarse_model, coarse_goods):
    model = coarse_model
    assert model.coarse_embedder is not None and "bank_coarse" in model.state and model.coarse_gain > 0
    hold = [coarse_goods[i] for i in model.metrics["holdout_indices"]]
    summed = {i: (f, c) for i, f, c, _, _ in model._summed_maps(hold, None, None, "test")}
    # the gain gives the coarse map coarse_weight x the fine map's 0.999 quantile on the held-out good images
    q_fine = np.quantile(np.concatenate([summed[i][0].ravel() for i in summed]), 0.999)
    q_coarse = np.quantile(np.concatenate([summed[i][1].ravel() for i in summed]), 0.999)
    assert model.coarse_gain == pytest.approx(COARSE.coarse_weight * q_fine / q_coarse, rel=1e-5)
    fine_sum, coarse_sum = summed[0]
    assert coarse_sum.shape == fine_sum.shape and not np.allclose(coarse_sum, fine_sum)
    m, fine = next(model.raw_maps([hold[0]]))[1:]
    want_m, want_fine = model._finish_map(fine_sum + np.float32(model.coarse_gain) * coarse_sum, fine_sum.shape,
                                          min(1.0, 1.0 / COARSE.scale), fine_src=fine_sum)
    assert m == pytest.approx(want_m, rel=1e-5, abs=1e-6)
    # the fine map (mask refinement) is the fine memory's alone: the same as a model without the coarse one
    assert fine == pytest.approx(want_fine, rel=1e-5, abs=1e-6)
    off = P.fit_prelabeller(coarse_goods, dataclasses.replace(COARSE, coarse_layers=()))
    assert off.coarse_embedder is None and "bank_coarse" not in off.state
    assert next(off.raw_maps([hold[0]]))[2] == pytest.approx(fine, rel=1e-5, abs=1e-6)  # same fine bank and split
    with pytest.raises(ValueError, match="coarse_layers"):
        dataclasses.replace(COARSE, coarse_layers=("blocks.9",))


def test_coarse_memory_round_trips_and_files_from_before_it_load_without_it(coarse_model, coarse_goods, spec,
                                                                              tmp_path):
    import json

    model = coarse_model
    folder = model.save(tmp_path / "m")
    images = [with_hole(spec, 30, size=128)[0], coarse_goods[0]]
    again = P.Prelabeller.load(folder)
    assert again.coarse_gain == model.coarse_gain
    for a, b in zip(model.predict(images), again.predict(images)):
        assert a.score == pytest.approx(b.score, rel=1e-6) and np.array_equal(a.mask, b.mask)
    meta_file = folder / P.CONFIG_FILE
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    assert meta["format_version"] == P.FORMAT_VERSION and meta["coarse_gain"] == pytest.approx(model.coarse_gain)
    old = dict(meta, format_version=2)  # a version-2 file: no coarse memory in config, tensors or meta
    old.pop("coarse_gain")
    old["config"] = {k: v for k, v in meta["config"].items() if k not in ("coarse_layers", "coarse_weight")}
    meta_file.write_text(json.dumps(old), encoding="utf-8")
    tensors = torch.load(folder / P.TENSORS_FILE, weights_only=True)
    tensors.pop("bank_coarse")
    torch.save(tensors, folder / P.TENSORS_FILE)
    loaded = P.Prelabeller.load(folder)
    assert loaded.config.coarse_layers == () and loaded.coarse_embedder is None
    fine_sum = next(model._summed_maps(images[:1], None, None, "test"))[1]
    raw = next(loaded._summed_maps(images[:1], None, None, "test"))
    assert raw[2] is None and raw[1] == pytest.approx(fine_sum, rel=1e-5, abs=1e-6)
