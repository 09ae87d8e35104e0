"""Benchmarks on the user's own MVTec AD folder (``annotator bench … --data DIR``)."""
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from annotator.bench import checkers as bench_checkers
from annotator.bench import loop as bench_loop
from annotator.bench import prelabel as bench_prelabel
from annotator.bench.data import categories, load_category
from annotator.core.label_noise import ERROR_KINDS
from annotator.core.demo_fabric import write_demo_mvtec
from annotator.ml.checkers import CheckerConfig
from annotator.ml.prelabel import config_for_scale

FAST_CHECKER = CheckerConfig(crop_size=64, batch_size=8, steps=30, tile_size=64, tile_overlap=16, device="cpu",
                             label_input=False)


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    """A small category in the user's formats: a JPEG, a 16-bit grey image, and four broken entries."""
    root = tmp_path_factory.mktemp("data") / "cloth"
    write_demo_mvtec(root, n_train_good=12, n_test_good=3, n_per_defect=2, size=64, seed=3, kinds=("hole", "stain"))
    img = cv2.imread(str(root / "test/hole/001.png"))
    (root / "test/hole/001.png").unlink()
    cv2.imwrite(str(root / "test/hole/001.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])  # mask 001_mask.png still fits
    grey = cv2.cvtColor(cv2.imread(str(root / "test/good/002.png")), cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257
    (root / "test/good/002.png").unlink()
    cv2.imwrite(str(root / "test/good/002.png"), grey)
    shutil.copy(root / "test/stain/000.png", root / "test/stain/007.png")  # no mask: cannot be measured
    (root / "test/stain/008.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # corrupt
    shutil.copy(root / "test/stain/001.png", root / "test/stain/009.png")
    cv2.imwrite(str(root / "ground_truth/stain/009_mask.png"), np.zeros((10, 10), np.uint8))  # wrong size
    return root


def test_categories_are_the_folder_itself_or_its_category_subfolders(tmp_path, category):
    assert categories(category) == {"cloth": category}
    assert categories(category.parent) == {"cloth": category}
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(ValueError, match="no MVTec AD category"):
        categories(tmp_path / "empty")
    with pytest.raises(ValueError, match="no such folder"):
        categories(tmp_path / "missing")


def test_load_category_reads_what_the_importer_reads_and_lists_what_it_skips(category):
    cat = load_category(category, max_good=5)
    assert len(cat.good) == 5
    paths = {rel: (kind, img, mask) for kind, rel, img, mask in cat.test}
    assert set(paths) == {f"test/good/00{i}.png" for i in range(3)} | {"test/hole/000.png", "test/hole/001.jpg",
                                                                       "test/stain/000.png", "test/stain/001.png"}
    kind, img, mask = paths["test/hole/001.jpg"]
    assert kind == "hole" and img.shape == (64, 64, 3) and img.dtype == np.uint8 and mask.any()
    kind, img, mask = paths["test/good/002.png"]  # 16-bit grey -> 8-bit BGR, no defect
    assert kind == "good" and img.shape == (64, 64, 3) and img.dtype == np.uint8 and not mask.any()
    reasons = dict(cat.skipped)
    assert "without a ground-truth mask" in reasons["test/stain/007.png"]
    assert "test/stain/008.png" in reasons  # corrupt
    assert "10x10" in reasons["test/stain/009.png"]  # a mask of the wrong size is not stretched
    assert "test/stain/009.png" not in paths and "test/stain/007.png" not in paths


def test_checkers_benchmark_measures_a_folder(category):
    r = bench_checkers.run(data_root=category, folds=2, checker_config=FAST_CHECKER, seed=1)
    assert r["styles"] == ["cloth"] and r["data_root"] == str(category)
    assert r["images"] == 7  # the readable test images with their truth
    assert set(r["skipped"]) == {"cloth/test/stain/007.png", "cloth/test/stain/008.png", "cloth/test/stain/009.png"}
    overall = r["overall"]["iou_tol1"]
    assert overall["errors"] >= 1 and 0 <= overall["caught"] <= overall["errors"]
    text = bench_checkers.format_report(r)
    assert str(category) in text and "skipped 3" in text


def test_prelabel_benchmark_measures_every_category_of_a_folder(category):
    r = bench_prelabel.run(category.parent, n_good=12, with_anomalib=False, with_b24=False, compare_full_bank=False,
                           config=config_for_scale(1.0, reference_images=2))
    (name, ds), = r["datasets"].items()
    assert name == "cloth" and ds["n_good"] == 12 and ds["n_test"] == 7
    assert set(ds["skipped"]) == {"test/stain/007.png", "test/stain/008.png", "test/stain/009.png"}
    assert 0.0 <= ds["ours"]["image_auroc"] <= 1.0
    lines = bench_prelabel.format_report(r).splitlines()
    assert lines[0].startswith(f"pre-labeller benchmark on {category.parent}")
    row = next(x for x in lines if x.startswith("cloth"))
    assert row.split()[1] == "ours" and float(row.split()[2]) == pytest.approx(ds["ours"]["image_auroc"], abs=6e-4)
    assert any("skipped 3" in x for x in lines)


def test_loop_benchmark_runs_on_one_category_and_refuses_several(tmp_path, category):
    clean = tmp_path / "clean"
    shutil.copytree(category, clean)
    for name in ("007.png", "008.png", "009.png"):
        (clean / "test/stain" / name).unlink()
    r = bench_loop.run(data_root=clean, max_rounds=1, folds=2, checker_config=FAST_CHECKER, error_rate=1.0,
                       prelabel_config=config_for_scale(1.0, reference_images=2))
    assert r["style"] == "clean" and r["images_to_label"] == 7 and r["defective"] == 4
    assert r["from_scratch"]["edited"] == 4 and len(r["rounds"]) == 2
    # every redraw leaves an error (rate 1): the ones the flow left are named, with the reviewer's kind
    left = r["full_flow"]["errors_left"]
    assert len(left) == r["full_flow"]["label_errors"]
    assert all(e["path"].startswith("test/") and e["kind"] in ERROR_KINDS for e in left)
    assert ("errors left: " in bench_loop.format_report(r)) == bool(left)
    with pytest.raises(ValueError, match="without a readable ground-truth mask"):
        bench_loop.run(data_root=category, max_rounds=1, folds=2, checker_config=FAST_CHECKER)
    with pytest.raises(ValueError, match="one category"):
        shutil.copytree(clean, tmp_path / "two" / "a")
        shutil.copytree(clean, tmp_path / "two" / "b")
        bench_loop.run(data_root=tmp_path / "two")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "annotator", *map(str, args)], capture_output=True, text=True)


def test_cli_bench_data_errors_are_one_line(tmp_path, category):
    r = run_cli("bench", "prelabel", "--data", tmp_path / "missing")
    assert r.returncode == 1 and "no such folder" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("bench", "ui", "--data", category)
    assert r.returncode == 1 and "--data" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("bench", "checkers", "--data", category, "--quick")
    assert r.returncode == 1 and "--quick" in r.stderr and r.stderr.count("\n") == 1


def test_prelabel_summary_averages_the_ratios_every_data_set_has():
    side = {"image_auroc": 0.9, "pixel_auroc": 0.9, "mean_iou": 0.2, "good_with_mask": 0.0, "fit_seconds": 1.0,
            "images_per_s": 2.0}
    datasets = {"a": {"ours": side, "ours_vs_anomalib": {"image_auroc": 1.2, "mean_iou": 2.0}},
                "b": {"ours": side, "ours_vs_anomalib": {"image_auroc": 0.8}}}  # anomalib drew no mask on b
    summary = bench_prelabel._summary(datasets)
    assert summary["ours_vs_anomalib"] == {"image_auroc": 1.0}
    assert summary["ours"]["image_auroc"] == 0.9


def test_prelabel_benchmark_counts_the_masks_a_reviewer_can_keep():
    truth = np.zeros((32, 32), bool)
    truth[10:20, 10:20] = True
    shifted = np.roll(truth, 1, axis=1)  # 1 px off: within the reviewer's tolerance
    half = truth.copy()
    half[15:] = False  # half the defect: redrawn
    good = np.zeros_like(truth)
    test = [("hole", None, truth), ("hole", None, truth), ("stain", None, truth), ("good", None, good)]
    masks = [shifted, half, truth, good]
    maps = [m.astype(np.float32) for m in masks]
    out = bench_prelabel.score_maps(test, [1.0, 1.0, 1.0, 0.0], maps, masks, [True, True, True, False])
    assert out["kept"] == pytest.approx(2 / 3, abs=1e-4)
    assert out["per_kind"]["hole"]["kept"] == 0.5 and out["per_kind"]["stain"]["kept"] == 1.0
    summary = bench_prelabel._summary({"a": {"ours": out}, "b": {"ours": {**out, "kept": 0.0}}})
    assert summary["ours"]["kept"] == pytest.approx(1 / 3, abs=1e-4)
