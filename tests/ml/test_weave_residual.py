"""Model 1's second look (annotator.ml.weave_residual): a faint line straight across the yarns, and a
faint stain, stand out once the weave's own spectrum is taken out; the path and the region lie on
them; tiny images and small holdouts leave it off; a fitted model keeps it through save / load."""
from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch

from annotator.core.demo_fabric import add_defect, random_spec, render_fabric
from annotator.ml import prelabel as P
from annotator.ml.weave_residual import MARGIN, MIN_PERIODIC_SHARE, WeaveResidual, periodic_share, window_size

SIZE = 128


@pytest.fixture(scope="module")
def spec():
    return random_spec(np.random.default_rng(5), style="twill")


def goods(spec, n: int, seed: int, size: int = SIZE) -> list[np.ndarray]:
    return [render_fabric(spec, np.random.default_rng([seed, i]), size) for i in range(n)]


def with_line(img: np.ndarray, x0: int, shade: float, rng) -> np.ndarray:
    """A 1-px line from top to bottom, wobbling by a px, ``shade`` x the image's sd darker."""
    out = img.astype(np.float32)
    h = img.shape[0]
    lum_sd = float(img.astype(np.float32).mean(2).std())
    xs = np.round(x0 + np.sin(np.arange(h) / 17.0 + rng.uniform(0, 6))).astype(int)
    out[np.arange(h), xs] -= shade * lum_sd
    return np.clip(out, 0, 255).astype(np.uint8), xs


def test_a_faint_line_across_the_yarns_outscores_every_good_image_and_the_path_lies_on_it(spec):
    weave = WeaveResidual.fit(goods(spec, 30, seed=1))
    assert weave is not None and weave.n == SIZE
    good_scores = [weave.analyse(g).line.score for g in goods(spec, 20, seed=2)]
    rng = np.random.default_rng(0)
    for k, base in enumerate(goods(spec, 4, seed=3)):
        img, xs = with_line(base, 40 + 13 * k, 0.8, rng)
        path = weave.analyse(img).line
        assert path.score > max(good_scores)
        # the path follows the line (it is found on STEP-row bands, between its frame's ends)
        on = np.abs(path.points[:, 0] - xs[np.clip(path.points[:, 1], 0, SIZE - 1)])
        assert np.mean(on <= 2) >= 0.8 and path.points[:, 1].min() <= 8 and path.points[:, 1].max() >= SIZE - 9
        mask = weave.path_mask(path, img.shape[:2])
        assert mask[np.arange(SIZE), xs].mean() >= 0.7 and mask.sum() <= 3 * SIZE


def test_most_stains_outscore_every_good_image_and_their_region_lies_on_them(spec):
    weave = WeaveResidual.fit(goods(spec, 30, seed=1))
    good_max = max(weave.analyse(g).spot.score for g in goods(spec, 20, seed=2))
    above = 0
    for k, base in enumerate(goods(spec, 6, seed=5)):
        img, truth = add_defect(base, "stain", np.random.default_rng(k), spec)
        spot = weave.analyse(img).spot
        above += spot.score > good_max
        inside = (spot.region & (truth > 0)).sum()
        assert inside >= 0.9 * spot.region.sum() and inside >= 0.4 * (truth > 0).sum()
    assert above >= 5


def test_calibration_makes_z_scores_and_small_images_get_no_detector(spec):
    weave = WeaveResidual.fit(goods(spec, 10, seed=1))
    held = [weave.analyse(g) for g in goods(spec, 12, seed=4)]
    weave.calibrate(held)
    for z in ([weave.z_line(f.line.score) for f in held], [weave.z_spot(f.spot.score) for f in held]):
        assert np.mean(z) == pytest.approx(0, abs=1e-9) and np.std(z) == pytest.approx(1, rel=1e-6)
    again = WeaveResidual(weave.spectrum, weave.calibration())
    assert again.calibration() == weave.calibration()
    assert window_size([(200, 90), (300, 300)]) == 64 and window_size([(1000, 700)]) == 256
    assert WeaveResidual.fit(goods(spec, 3, seed=1, size=48)) is None  # below MIN_WINDOW
    # a texture without a period (smoothed noise, like gravel or grass) has no weave to take out
    rng = np.random.default_rng(0)
    noise = [np.repeat(cv2.GaussianBlur(rng.normal(128, 30, (SIZE, SIZE)).astype(np.float32), (0, 0), 1.5)
                       .clip(0, 255).astype(np.uint8)[..., None], 3, axis=2) for _ in range(8)]
    assert WeaveResidual.fit(noise) is None and periodic_share(weave.spectrum) >= MIN_PERIODIC_SHARE
    assert weave.analyse(goods(spec, 1, seed=1, size=96)[0]) is None  # smaller than its window


@pytest.mark.slow
def test_a_fitted_model_calls_the_line_draws_it_and_keeps_the_detector_through_save_and_load(spec, tmp_path):
    cfg = P.PrelabelConfig(tile=64, tile_overlap=16, coreset_max=2000, batch_size=8, device="cpu", num_threads=2)
    train = goods(spec, 60, seed=1)  # 48 fitted, 12 held out: enough to calibrate the detectors
    model = P.fit_prelabeller(train, cfg)
    assert model.weave is not None and len(model.metrics["holdout_indices"]) == P.WEAVE_MIN_HOLDOUT
    img, xs = with_line(goods(spec, 1, seed=9)[0], 70, 1.2, np.random.default_rng(1))
    res, good = model.predict([img, goods(spec, 1, seed=10)[0]])
    assert res.is_defect and not good.is_defect
    line, spot = model.weave_scores(model.weave_findings(img))
    mu, sd = model.weave_map
    assert line == pytest.approx(mu + sd * (model.weave.z_line(model.weave_findings(img).line.score) - MARGIN))
    assert res.score == pytest.approx(max(float(res.heatmap.max() * model.thresholds["pixel"]), line, spot), rel=1e-5)
    assert res.mask[np.arange(16, SIZE - 16), xs[16:SIZE - 16]].mean() >= 0.7
    # the heat map shows the line at its score (the app, and the checkers' cross-check with model 1)
    assert res.heatmap[res.mask].max() * model.thresholds["pixel"] == pytest.approx(line, rel=1e-5)
    folder = model.save(tmp_path / "m")
    loaded = P.Prelabeller.load(folder)
    assert loaded.weave.calibration() == model.weave.calibration() and loaded.weave_map == model.weave_map
    assert loaded.predict([img])[0].score == res.score
    # a file from before the second look (format 3) loads as the map alone
    meta = json.loads((folder / P.CONFIG_FILE).read_text(encoding="utf-8"))
    meta.pop("weave")
    (folder / P.CONFIG_FILE).write_text(json.dumps(dict(meta, format_version=3)), encoding="utf-8")
    tensors = torch.load(folder / P.TENSORS_FILE, weights_only=True)
    tensors.pop("weave_spectrum")
    torch.save(tensors, folder / P.TENSORS_FILE)
    old = P.Prelabeller.load(folder)
    raw_max = float(next(model.raw_maps([img]))[1].max())
    assert old.weave is None and old.predict([img])[0].score == pytest.approx(raw_max)
    off = P.fit_prelabeller(train, dataclasses.replace(cfg, weave_residual=False))
    assert off.weave is None and off.predict([img])[0].score == pytest.approx(float(off.raw_maps([img]).__next__()[1].max()))
    few = P.fit_prelabeller(train[:40], cfg)  # 8 held-out images cannot calibrate them
    assert few.weave is None
