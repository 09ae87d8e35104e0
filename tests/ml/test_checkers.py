"""Checkers (model 2 of spec 003): one segmenter learns an obvious defect; the ensemble
scores every image out-of-fold for both schemes; save/load, cancel and progress."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from annotator.core import masks as M
from annotator.core.jobs import Cancelled, CancelToken
from annotator.ml import checkers as C

SIZE = 64
# CPU in CI; ANNOTATOR_TEST_DEVICE=cuda runs the same tests on a GPU
TEST_DEVICE = os.environ.get("ANNOTATOR_TEST_DEVICE", "cpu")
FAST = C.CheckerConfig(crop_size=64, batch_size=8, steps=60, lr=5e-3, tile_size=64, tile_overlap=16, device=TEST_DEVICE,
                       label_input=False)
# a checker that also sees the label under check (CheckerConfig.label_input)
FAST_LABEL = dataclasses.replace(FAST, label_input=True, steps=120)


def fabric(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A plain-weave-like texture: crossed sinusoids, random phase, sensor noise."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    p = rng.uniform(5.0, 7.0)
    ph = rng.uniform(0, 2 * np.pi, 2)
    tex = 150 + 25 * np.sin(2 * np.pi * xx / p + ph[0]) * np.sin(2 * np.pi * yy / p + ph[1])
    tex += rng.normal(0, 4, tex.shape)
    return np.repeat(np.clip(tex, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def sample(rng: np.random.Generator, defect: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A fabric with a dark blob (or a dark 3-px line) and its exact mask."""
    img = fabric(rng)
    mask = np.zeros((SIZE, SIZE), bool)
    if defect:
        yy, xx = np.mgrid[:SIZE, :SIZE]
        if rng.random() < 0.5:
            cy, cx, r = *rng.integers(14, SIZE - 14, 2), rng.integers(6, 11)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            x0 = int(rng.integers(8, SIZE - 11))
            mask[:, x0:x0 + 3] = True
        img[mask] = (img[mask] * 0.3).astype(np.uint8)
    return img, mask


def dataset(n: int, seed: int, good_every: int = 4) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    pairs = [sample(rng, defect=i % good_every != 0) for i in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@pytest.fixture(scope="module")
def trained() -> C.Checker:
    images, masks = dataset(12, seed=1)
    return C.train_checker(images, masks, FAST)


@pytest.fixture(scope="module")
def held_out() -> tuple[list, list]:
    rng = np.random.default_rng(99)
    pairs = [sample(rng) for _ in range(6)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def test_checker_learns_an_obvious_defect(trained, held_out):
    images, truths = held_out
    outs = trained.predict(images)
    ious = [M.iou(o.mask, t) for o, t in zip(outs, truths)]
    assert np.mean(ious) > 0.8, ious
    assert all(o.prob_map.dtype == np.float32 and o.prob_map.shape == (SIZE, SIZE) for o in outs)
    assert all(o.area == int(o.mask.sum()) for o in outs)
    assert min(o.defect_prob for o in outs) > 0.5
    good = trained.predict([fabric(np.random.default_rng(5))])[0]
    assert good.defect_prob < 0.5 and good.area < 15


def test_dilated_label_scores_lower_than_the_exact_one(trained, held_out):
    images, truths = held_out
    outs = trained.predict(images)
    exact = [M.iou(t, o.mask) for o, t in zip(outs, truths)]
    ringed = [M.iou(M.dilate(t, 4), o.mask) for o, t in zip(outs, truths)]
    assert all(r < e for r, e in zip(ringed, exact)), (exact, ringed)
    assert np.mean(ringed) < 0.8


def test_prediction_on_larger_and_odd_sized_images_uses_tiles(trained):
    rng = np.random.default_rng(7)
    big = np.concatenate([np.concatenate([sample(rng)[0] for _ in range(2)], 1) for _ in range(2)], 0)[:117, :101]
    out = trained.predict([big, big[:, :, 0]])
    assert out[0].prob_map.shape == (117, 101)
    np.testing.assert_allclose(out[0].prob_map, out[1].prob_map, atol=1e-6)  # grey == 3 equal channels


def test_save_load_gives_identical_predictions(trained, held_out, tmp_path):
    trained.save(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted([C.WEIGHTS_FILE, C.CONFIG_FILE])
    loaded = C.Checker.load(tmp_path / "ck")
    assert loaded.config == trained.config
    a, b = trained.predict(held_out[0][:2]), loaded.predict(held_out[0][:2])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.prob_map, y.prob_map)
        assert x.defect_prob == y.defect_prob


def test_cancel_raises_and_progress_is_reported():
    images, masks = dataset(3, seed=2)
    calls, token = [], CancelToken()

    def progress(done, total, msg):
        calls.append((done, total))
        if done == 3:
            token.cancel()

    with pytest.raises(Cancelled):
        C.train_checker(images, masks, FAST, on_progress=progress, cancel=token)
    assert calls[:3] == [(1, FAST.steps), (2, FAST.steps), (3, FAST.steps)] and len(calls) == 3


def test_config_roundtrips_and_rejects_nonsense():
    cfg = C.CheckerConfig(encoder_layers=["blocks.1", "blocks.2"], threshold=0.4)
    assert C.CheckerConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError):
        C.CheckerConfig(encoder_layers=("blocks.9",))
    with pytest.raises(ValueError):
        C.CheckerConfig(loss="mse")
    with pytest.raises(ValueError):
        C.CheckerConfig(augment="flip+blur")


def test_augment_names_and_checkers_saved_with_a_bool():
    assert C.CheckerConfig().augmentations == {"flip", "rot90", "jitter"}
    assert C.CheckerConfig(augment="flip+jitter").augmentations == {"flip", "jitter"}
    assert C.CheckerConfig.from_json({"augment": False}).augmentations == set()
    # a checker saved before label_input existed saw the image only
    assert C.CheckerConfig.from_json({"augment": True}) == C.CheckerConfig(label_input=False)


def test_no_rot90_keeps_the_orientation_of_every_training_crop():
    img = np.zeros((96, 96, 3), np.uint8)
    mask = np.zeros((96, 96), bool)
    mask[40:42, :] = True  # a horizontal line across the whole image
    cfg = C.CheckerConfig(crop_size=64, augment="flip")
    sampler = C._CropSampler([img], [mask], cfg, np.random.default_rng(0))
    crops = [sampler._crop(0)[1] for _ in range(40)]
    assert all(c.any(axis=1).sum() <= 2 for c in crops if c.any())  # still horizontal: at most 2 rows
    turned = C._CropSampler([img], [mask], dataclasses.replace(cfg, augment="rot90"), np.random.default_rng(0))
    assert any(c.any(axis=0).sum() <= 2 for c in (turned._crop(0)[1] for _ in range(40)) if c.any())


def test_mask_grows_by_hysteresis_into_connected_weaker_pixels():
    pm = np.zeros((30, 30), np.float32)
    pm[10, 5:25] = 0.3  # a weak line ...
    pm[10, 12:14] = 0.9  # ... with a confident core
    pm[20, 5:10] = 0.3  # weak and not connected to anything confident: dropped
    grown = C.make_output(pm, threshold=0.5, topk_px=4, threshold_low=0.15)
    assert grown.area == 20 and grown.mask[10, 5:25].all() and not grown.mask[20].any()
    plain = C.make_output(pm, threshold=0.5, topk_px=4)
    assert plain.area == 2
    assert not C.make_output(np.full((5, 5), 0.3, np.float32), 0.5, 4, 0.15).mask.any()


def test_image_probability_is_the_top_k_mean():
    pm = np.zeros((20, 20), np.float32)
    pm[0, :4] = 1.0
    out = C.make_output(pm, threshold=0.5, topk_px=8)
    assert out.defect_prob == pytest.approx(0.5) and out.area == 4


# ----------------------------------------------------------------------------- label input

@pytest.fixture(scope="module")
def label_checker() -> C.Checker:
    images, masks = dataset(12, seed=1)
    return C.train_checker(images, masks, FAST_LABEL)


def test_label_checker_leaves_right_labels_alone_and_redraws_wrong_ones(label_checker, held_out):
    images, truths = held_out
    n = len(images)
    exact = label_checker.predict(images, labels=truths)
    assert all(M.iou(o.mask, t) >= 0.8 for o, t in zip(exact, truths)), [M.iou(o.mask, t) for o, t in zip(exact, truths)]
    # expanded by a ring: the prediction goes back to the defect, away from the wrong label
    ringed = [M.dilate(t, 4) for t in truths]
    outs = label_checker.predict(images, labels=ringed)
    assert np.mean([M.iou(o.mask, r) for o, r in zip(outs, ringed)]) < 0.8
    assert all(M.iou(o.mask, t) > M.iou(o.mask, r) for o, t, r in zip(outs, truths, ringed))
    # missed: an empty label on a defective image -> the defect is predicted anyway
    missed = label_checker.predict(images, labels=[np.zeros_like(t) for t in truths])
    assert sum(M.iou(o.mask, t) > 0.5 for o, t in zip(missed, truths)) >= n - 1
    # false: a blob on defect-free fabric is not predicted
    good = fabric(np.random.default_rng(5))
    blob = np.zeros((SIZE, SIZE), bool)
    blob[20:32, 24:36] = True
    out = label_checker.predict([good], labels=[blob])[0]
    assert out.area < 15 and out.defect_prob < 0.5


def test_label_checker_needs_a_label_of_the_image_size(label_checker, held_out):
    img = held_out[0][0]
    with pytest.raises(ValueError, match="label shape"):
        label_checker.prob_map(img, np.zeros((SIZE, SIZE + 1), bool))
    with pytest.raises(ValueError, match="one label per image"):
        label_checker.predict([img, img], labels=[np.zeros((SIZE, SIZE), bool)])
    with pytest.raises(ValueError, match="takes the label"):
        label_checker.net(torch.zeros(1, 3, 32, 32))


def test_label_checker_save_load_and_tiles(label_checker, held_out, tmp_path):
    loaded = C.Checker.load(label_checker.save(tmp_path / "ck"))
    assert loaded.config == label_checker.config and loaded.config.label_input
    images, truths = held_out
    for a, b in zip(label_checker.predict(images[:2], labels=truths[:2]), loaded.predict(images[:2], labels=truths[:2])):
        np.testing.assert_array_equal(a.prob_map, b.prob_map)
    # tiles: the label is cut into the same tiles as the image
    rng = np.random.default_rng(8)
    pairs = [sample(rng) for _ in range(4)]
    big = np.concatenate([np.concatenate([p[0] for p in pairs[:2]], 1), np.concatenate([p[0] for p in pairs[2:]], 1)], 0)
    truth = np.concatenate([np.concatenate([p[1] for p in pairs[:2]], 1), np.concatenate([p[1] for p in pairs[2:]], 1)], 0)
    out = label_checker.predict([big], labels=[truth])[0]
    assert out.prob_map.shape == big.shape[:2] and M.iou(out.mask, truth) >= 0.8


def test_training_inputs_carry_the_patents_label_anomalies_in_the_set_share():
    img = np.zeros((96, 96, 3), np.uint8)
    mask = np.zeros((96, 96), bool)
    mask[30:60, 30:60] = True
    cfg = C.CheckerConfig(crop_size=96, label_input=True, label_noise=0.5, augment="none")
    sampler = C._CropSampler([img], [mask], cfg, np.random.default_rng(0))
    target = sampler.data[0][1]
    seen = [sampler._label_input(target) for _ in range(400)]
    changed = [s for s in seen if not np.array_equal(s, target)]
    assert 0.4 < len(changed) / len(seen) < 0.6
    areas = {int(s.sum()) for s in changed}
    assert 0 in areas  # missed
    assert any(a > 900 + 2 * 30 * 4 for a in areas)  # expanded by a ring of >= 2 px
    assert any(0 < a < 900 - 2 * 28 * 2 for a in areas)  # shrunk
    far = ~M.dilate(mask, 6)  # beyond the largest ring
    assert any(s[far].any() and s[mask].all() for s in changed)  # a false region added
    assert all(s.dtype == np.float32 and s.shape == target.shape for s in seen)
    x, y, lab = sampler.batch(6, torch.device("cpu"))
    assert lab.shape == y.shape == (6, 1, 96, 96)
    off = C._CropSampler([img], [mask], dataclasses.replace(cfg, label_input=False), np.random.default_rng(0))
    assert off.batch(2, torch.device("cpu"))[2] is None


# ----------------------------------------------------------------------------- ensemble

class _SpyChecker:
    def __init__(self, model: int, log: dict) -> None:
        self.model, self.log = model, log

    def predict(self, images, on_progress=None, cancel=None, labels=None):
        self.log["scored"].setdefault(self.model, []).extend(int(i[0, 0, 0]) for i in images)
        # each image is checked against its own label (labels[k][0, 0] encodes k's id too)
        assert labels is not None and [int(m[0, 0]) for m in labels] == [int(i[0, 0, 0]) for i in images]
        return [C.make_output(np.full(i.shape[:2], 0.1 * (self.model + 1), np.float32), 0.5, 16) for i in images]


@pytest.mark.parametrize("scheme,n_models", [("disjoint", 3), ("disjoint", 2), ("kfold", 3), ("kfold", 4)])
def test_out_of_fold_every_image_is_scored_only_by_models_that_did_not_train_on_it(monkeypatch, scheme, n_models):
    log = {"trained": [], "scored": {}}

    def spy_train(images, masks, config, on_progress=None, cancel=None):
        log["trained"].append([int(i[0, 0, 0]) for i in images])  # pixel (0,0) encodes the image id
        return _SpyChecker(len(log["trained"]) - 1, log)

    monkeypatch.setattr(C, "train_checker", spy_train)
    n = 11
    images = {f"img{i}": np.full((8, 8, 3), i, np.uint8) for i in range(n)}
    labels = {k: np.full((8, 8), int(k[3:]), np.int32) for k in images}
    run = C.run_checkers(images, labels, n_models=n_models, scheme=scheme, config=FAST, seed=3)

    # the subsets are pairwise disjoint and cover all images
    flat = [k for s in run.subsets for k in s]
    assert len(flat) == len(set(flat)) == n and set(flat) == set(images)
    assert len(log["trained"]) == n_models
    for key, check in run.checks.items():
        i = int(key[3:])
        assert check.voters and set(check.probs) == set(check.voters)
        for m in check.voters:
            assert i not in log["trained"][m] and i in log["scored"][m]
        assert key in run.subsets[check.subset]
        expected = n_models - 1 if scheme == "disjoint" else 1
        assert len(check.voters) == expected
        assert check.pred_prob_map.shape == (8, 8)
        np.testing.assert_allclose(check.pred_prob_map, np.mean([0.1 * (m + 1) for m in check.voters]), rtol=1e-6)
    for m in range(n_models):  # a model scores exactly the images it did not train on and votes for
        assert not set(log["scored"][m]) & set(log["trained"][m])
        assert sorted(log["scored"][m]) == sorted(int(k[3:]) for k, c in run.checks.items() if m in c.voters)
    if scheme == "kfold":  # each model trains on every fold but its own
        for m in range(n_models):
            assert sorted(log["trained"][m]) == sorted(int(k[3:]) for j, s in enumerate(run.subsets) if j != m for k in s)
    else:
        assert [sorted(t) for t in log["trained"]] == [sorted(int(k[3:]) for k in s) for s in run.subsets]


def test_plan_guard_rejects_an_in_fold_voter():
    with pytest.raises(RuntimeError):
        C._check_plan(["a", "b"], [["a"], ["b"]], [["a"], ["b"]], {"a": [0], "b": [0]})


def test_run_checkers_end_to_end_with_progress_and_cancel():
    images, masks = dataset(6, seed=4)
    keys = [f"k{i}" for i in range(6)]
    cfg = dataclasses.replace(FAST, steps=3)
    calls = []
    run = C.run_checkers(dict(zip(keys, images)), dict(zip(keys, masks)), n_models=2, config=cfg,
                         on_progress=lambda d, t, m: calls.append((d, t)))
    total = 2 * cfg.steps + 6
    assert calls[-1] == (total, total) and [d for d, _ in calls] == list(range(1, total + 1))
    assert len(run.checkers) == 2 and set(run.checks) == set(keys)
    check = run.checks["k0"]
    assert check.pred_mask.dtype == bool and check.pred_area == int(check.pred_mask.sum())

    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        C.run_checkers(dict(zip(keys, images)), dict(zip(keys, masks)), n_models=2, config=cfg, cancel=token)
    with pytest.raises(ValueError):
        C.run_checkers(dict(zip(keys, images)), {"k0": masks[0]}, config=cfg)


def test_label_views_average_the_predictions_of_dilated_and_eroded_labels(label_checker, held_out):
    img, truth = held_out[0][0], held_out[1][0]
    single = {v: dataclasses.replace(label_checker.config, label_views=(v,)) for v in (0, 3, -3)}
    maps = []
    for v, cfg in single.items():
        label_checker.config = cfg
        maps.append(label_checker.prob_map(img, truth))
    try:
        label_checker.config = dataclasses.replace(cfg, label_views=(0, 3, -3))
        np.testing.assert_allclose(label_checker.prob_map(img, truth), np.mean(maps, axis=0), atol=1e-6)
        label_checker.config = dataclasses.replace(cfg, label_views=(0,))  # view +3 == the label dilated by 3
        np.testing.assert_allclose(label_checker.prob_map(img, M.dilate(truth, 3)), maps[1], atol=1e-6)
    finally:
        label_checker.config = dataclasses.replace(cfg, label_views=(0,))
    assert not np.allclose(maps[0], maps[1])
    with pytest.raises(ValueError):
        C.CheckerConfig(label_views=())
    with pytest.raises(ValueError):
        C.CheckerConfig(label_noise=1.5)
    with pytest.raises(ValueError):
        C.CheckerConfig(label_noise_rings=(3, 1))


def test_run_checkers_feeds_each_image_its_own_label_end_to_end():
    images, masks = dataset(6, seed=4)
    keys = [f"k{i}" for i in range(6)]
    run = C.run_checkers(dict(zip(keys, images)), dict(zip(keys, masks)), n_models=2,
                         config=dataclasses.replace(FAST_LABEL, steps=3))
    assert all(c.config.label_input for c in run.checkers) and set(run.checks) == set(keys)
    for k, img, mask in zip(keys, images, masks):
        check = run.checks[k]
        (voter,) = check.voters
        want = run.checkers[voter].prob_map(img, mask)
        np.testing.assert_allclose(check.pred_prob_map, want, atol=1e-6)
        assert not np.allclose(run.checkers[voter].prob_map(img, ~mask), want)
