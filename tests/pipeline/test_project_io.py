import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from annotator.core import masks as M
from annotator.core.demo_fabric import write_demo_mvtec
from annotator.core.images import load_mask
from annotator.core.review import Review
from annotator.core.store import Project
from annotator.pipeline import PipelineError, project_io


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    write_demo_mvtec(root, n_train_good=3, n_test_good=2, n_per_defect=1, size=48, seed=1,
                     kinds=("hole", "mis_yarn", "stain"))
    return root


def test_import_mvtec_roles_and_paths(tmp_path, mvtec):
    with Project.create(tmp_path / "p") as p:
        report = project_io.import_mvtec(p, mvtec)
        assert report["added"] == 3 + 2 + 3 and report["labels"] == 0
        roles = {i.rel_path: i.role for i in p.images()}
        assert roles["train/good/000.png"] == "good"
        assert roles["test/hole/000.png"] == "label" and roles["test/good/001.png"] == "label"
        # importing again adds nothing and loses nothing
        again = project_io.import_mvtec(p, mvtec)
        assert again["added"] == 0 and len(again["skipped"]) == 8


def test_import_mvtec_with_labels_sets_reviewer_checked_labels(tmp_path, mvtec):
    with Project.create(tmp_path / "p") as p:
        report = project_io.import_mvtec(p, mvtec, with_labels=True)
        assert report["labels"] == 5  # 3 defective + 2 test/good
        img = p.image_by_path("test/hole/000.png")
        label = p.current_label(img.id)
        truth = load_mask(mvtec / "ground_truth/hole/000_mask.png")
        assert np.array_equal(label.mask, truth) and label.source == "import"
        assert set(label.classes) == {"hole"} and img.state == "prechecked"
        assert "stain" in {c.name for c in p.classes()}  # user-defined class added on the fly


def test_import_folder_lists_bad_files_and_keeps_going(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    cv2.imwrite(str(src / "a.png"), np.full((20, 30, 3), 128, np.uint8))
    cv2.imwrite(str(src / "sub" / "b.png"), np.full((20, 30), 50, np.uint8))
    (src / "broken.png").write_bytes(b"not an image at all")
    (src / "empty.jpg").write_bytes(b"")
    with Project.create(tmp_path / "p") as p:
        report = project_io.import_folder(p, src, good=True)
        assert report["added"] == 2
        assert sorted(r for r, _ in report["skipped"]) == ["broken.png", "empty.jpg"]
        assert {i.rel_path for i in p.images(role="good")} == {"a.png", "sub/b.png"}
        with pytest.raises(PipelineError, match="no folder"):
            project_io.import_folder(p, tmp_path / "missing")


def test_labels_from_mask_folder_wrong_size_is_skipped(tmp_path, mvtec):
    masks = tmp_path / "masks" / "test" / "hole"
    masks.mkdir(parents=True)
    m = np.zeros((48, 48), np.uint8)
    m[10:20, 10:20] = 255
    cv2.imwrite(str(masks / "000_mask.png"), m)
    (tmp_path / "masks" / "test" / "stain").mkdir()
    cv2.imwrite(str(tmp_path / "masks" / "test" / "stain" / "000_mask.png"), np.zeros((10, 10), np.uint8))
    with Project.create(tmp_path / "p") as p:
        project_io.import_mvtec(p, mvtec)
        report = project_io.import_masks(p, tmp_path / "masks")
        assert report["labels"] == 1
        assert len(report["skipped"]) == 1 and "test/stain/000.png" in report["skipped"][0][0]
        label = p.current_label(p.image_by_path("test/hole/000.png").id)
        assert label.area == 100


@pytest.mark.parametrize("fmt", ["masks", "mvtec", "coco", "labelme"])
def test_export_import_round_trip_loses_nothing(tmp_path, mvtec, fmt):
    with Project.create(tmp_path / "p") as p:
        project_io.import_mvtec(p, mvtec, with_labels=True)
        review = Review(p)
        img = p.image_by_path("test/hole/000.png")
        two = p.current_label(img.id).mask.copy()
        two[2:6, 2:6] = True  # a second region, with its own class
        review.replace_mask(img.id, two, None)
        regions = M.label_regions(two)[1]
        classes = ["broken_needle" if r.bbox[:2] == (2, 2) else "hole" for r in regions]
        review.set_class(img.id, 1, classes[0])
        before = {i.rel_path: (p.current_label(i.id).mask, p.current_label(i.id).classes)
                  for i in p.images(role="label")}
        out = tmp_path / "out"
        project_io.export_project(p, out, fmt)
    with Project.create(tmp_path / "q") as q:
        if fmt == "mvtec":
            project_io.import_mvtec(q, out, with_labels=True)
        else:
            project_io.import_mvtec(q, mvtec)
            if fmt == "masks":
                project_io.import_masks(q, out)
            else:
                src = out / "annotations.json" if fmt == "coco" else out
                report = project_io.import_labels(q, src, fmt)
                assert report["labels"] >= 3
        for rel, (mask, cls) in before.items():
            img = q.image_by_path(rel)
            assert img is not None, rel
            label = q.current_label(img.id)
            if not mask.any() and fmt in ("coco", "labelme") and label is None:
                continue  # formats without images for empty labels
            assert np.array_equal(label.mask, mask), rel
            if fmt != "masks" or mask.any():
                assert tuple(label.classes) == tuple(cls), (rel, label.classes, cls)


def test_status_json_shape(tmp_path, mvtec):
    with Project.create(tmp_path / "p") as p:
        project_io.import_mvtec(p, mvtec)
        st = project_io.status(p)
    assert st["round"] == 0 and st["phase"] == "precheck"
    paths = {i["path"] for i in st["images"]}
    assert "test/hole/000.png" in paths
    one = st["images"][0]
    assert set(one) >= {"path", "state", "anomaly_score", "label_area", "flags"}


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "annotator", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_cli_light_verbs_end_to_end(tmp_path, mvtec):
    proj = tmp_path / "p"
    assert run_cli("init", proj).returncode == 0
    r = run_cli("import", proj, "--mvtec", mvtec, "--with-labels")
    assert r.returncode == 0, r.stderr
    st = json.loads(run_cli("status", proj, "--json").stdout)
    assert {i["state"] for i in st["images"] if i["path"].startswith("test/")} == {"prechecked"}
    assert json.loads(run_cli("flags", proj, "--json").stdout) == []
    out = tmp_path / "masks"
    r = run_cli("export", proj, out, "--format", "masks")
    assert r.returncode == 0, r.stderr
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert "test/hole/000_mask.png" in written and not any(w.startswith("train/") for w in written)
    assert np.array_equal(load_mask(out / "test/hole/000_mask.png"), load_mask(mvtec / "ground_truth/hole/000_mask.png"))


@pytest.mark.slow
def test_cli_prelabel_scale_sets_the_magnification_window_and_blurs(tmp_path):
    data, proj = tmp_path / "data", tmp_path / "p"
    write_demo_mvtec(data, n_train_good=6, n_test_good=1, n_per_defect=1, size=48, seed=2, kinds=("hole",))
    assert run_cli("init", proj).returncode == 0
    assert run_cli("import", proj, "--mvtec", data).returncode == 0
    r = run_cli("prelabel", proj, "--scale", "9", "--quiet")
    assert r.returncode != 0 and "scale must be a number in (0, 4]" in r.stderr
    r = run_cli("prelabel", proj, "--coarse-weight", "-1", "--quiet")
    assert r.returncode != 0 and "weight must be a number in [0, 10]" in r.stderr
    r = run_cli("prelabel", proj, "--scale", "1", "--coarse-weight", "0", "--quiet")
    assert r.returncode == 0, r.stderr
    with Project.open(proj) as p:
        cfg = p.model_runs("prelabel")[-1].config
        assert (cfg["scale"], cfg["tile"], cfg["blur_sigma"], cfg["refine_sigma"]) == (1.0, 256, 4.0, 1.0)
        assert cfg["coarse_weight"] == 0.0
        assert all(i.anomaly_score is not None for i in p.images(role="label"))


def test_cli_errors_are_one_line_and_nonzero(tmp_path):
    r = run_cli("status", tmp_path / "nothing")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "error" in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "project.sqlite").write_bytes(b"garbage" * 100)
    r = run_cli("status", bad)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    r = run_cli("init", bad)
    assert r.returncode == 1 and "already" in r.stderr


def test_cli_bench_prelabel_quick_json_and_subtle_flag():
    r = run_cli("bench", "prelabel", "--quick", "--json", "--subtle")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["min_visibility"] == 0.0 and report["size"] == 128
    (name, ds), = report["datasets"].items()
    ours = ds["ours"]
    assert 0.0 <= ours["image_auroc"] <= 1.0 and 0.0 <= ours["pixel_auroc"] <= 1.0
    assert ours["fit_seconds"] > 0 and "anomalib" not in ds
    r = run_cli("bench", "ui", "--subtle")
    assert r.returncode == 1 and "--subtle" in r.stderr and r.stderr.count("\n") == 1


def test_cli_check_passes_the_checker_choice(monkeypatch, tmp_path):
    import annotator.pipeline.check as check
    from annotator import cli

    seen, rules = [], []
    monkeypatch.setattr(check, "check_project",
                        lambda p, **kw: seen.append(kw["checker_config"]) or rules.append(kw["rules"]) or {"flagged": 0})
    proj = tmp_path / "p"
    assert cli.main(["init", str(proj)]) == 0
    for flag in ([], ["--no-label-input"], ["--label-input"], ["--no-image-evidence"], ["--no-model1-check"]):
        assert cli.main(["check", str(proj), "--quiet", *flag]) == 0
    assert [c if c is None else c.label_input for c in seen] == [None, False, True, None, None]
    assert [r.image_support for r in rules] == [True, True, True, False, True]
    assert [r.unlabelled_check for r in rules] == [True, True, True, True, False]


def test_cli_bench_scale_sets_model1s_magnification(monkeypatch, capsys):
    import annotator.bench.loop as bench_loop
    import annotator.bench.prelabel as bench_prelabel
    from annotator import cli
    from annotator.ml.prelabel import PrelabelConfig, config_for_scale

    assert config_for_scale(2.0) == PrelabelConfig()  # the default is the 2x setting
    seen = []
    for module in (bench_prelabel, bench_loop):
        monkeypatch.setattr(module, "run", lambda **kw: seen.append(kw) or {})
    assert cli.main(["bench", "prelabel", "--scale", "1", "--seed", "3", "--json"]) == 0
    assert cli.main(["bench", "loop", "--scale", "1", "--json"]) == 0
    assert cli.main(["bench", "prelabel", "--json"]) == 0
    assert seen[0]["config"] == config_for_scale(1.0, seed=3) and seen[0]["seed"] == 3
    assert seen[0]["config"].tile == 256 and seen[0]["config"].blur_sigma == 4.0
    assert seen[1]["prelabel_config"] == config_for_scale(1.0)
    assert "config" not in seen[2]  # without --scale the benchmark keeps its own default
    capsys.readouterr()
    assert cli.main(["bench", "checkers", "--scale", "1"]) == 1
    assert "--scale applies to the prelabel and loop" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "prelabel", "--scale", "0"])


def test_cli_progress_keeps_one_bar_per_stretch_and_is_terse_off_a_terminal(capsys):
    from annotator.cli import _Bar

    bar = _Bar()
    for i in range(1, 801):  # a message that changes every step keeps the same bar
        bar(i, 800, f"training checker: step {i}/800")
    first = bar.bar
    assert first.n == 800 and bar.message == "training checker: step 800/800"
    bar(1, 50, "pre-labelling")  # a new total: a new bar
    assert bar.bar is not first and bar.bar.n == 1
    second = bar.bar
    bar(0, 50, "again")  # the count starts again: a new bar too
    assert bar.bar is not second
    bar.close()
    lines = [ln for ln in capsys.readouterr().err.replace("\r", "\n").split("\n") if ln.strip()]
    assert len(lines) < 20, len(lines)  # not one line per update when stderr is not a terminal
    quiet = _Bar(quiet=True)
    quiet(1, 2, "x")
    assert quiet.bar is None


def test_flags_print_one_line_per_flag_for_every_rule(tmp_path, mvtec):
    """`annotator flags P` (no --json) words every rule the checkers store, as the desktop app does."""
    from annotator.core.flag_text import flag_reason
    from annotator.core.store import FlagSpec

    proj = tmp_path / "p"
    with Project.create(proj) as p:
        project_io.import_mvtec(p, mvtec)
        ids = {i.rel_path: i.id for i in p.images()}
        rnd = p.start_round("check")
        p.add_flags(rnd, {
            ids["test/hole/000.png"]: [FlagSpec("iou", 0.58, {
                "iou": 0.42, "iou_exact": 0.4, "threshold": 0.8, "tolerance_px": 1, "label_area": 120, "pred_area": 80,
                "voters": [0, 2], "regions": [{"index": 1, "iou": 0.42, "area": 120}]})],
            ids["test/stain/000.png"]: [
                FlagSpec("missed_label", 0.9, {"votes": {"0": 0.9, "1": 0.7}, "operation": "mean", "aggregate": 0.8,
                                               "threshold": 0.5, "area_threshold": 15, "pred_area": 40}),
                FlagSpec("unlabelled_anomaly", 0.97, {
                    "unlabelled_px": 358, "label_area": 0, "gap_px": 2, "area_threshold": 15,
                    "regions": [{"index": 1, "area": 358, "bbox": [59, 203, 20, 24]}],
                    "support": [{"p": 0.0297, "supported": True, "area": 358}]})],
            ids["test/mis_yarn/000.png"]: [FlagSpec("wrong_label", 0.7, {
                "votes": {"0": 0.3}, "operation": "sum", "aggregate": 0.3, "threshold": 1.0, "pred_area": 0})],
        })
    r = run_cli("flags", proj)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [ln.split()[1] for ln in lines] == ["unlabelled_anomaly", "missed_label", "wrong_label", "iou"]
    assert "358 px" in lines[0] and "test/stain/000.png" in lines[0]
    assert "mean of the checkers' probabilities is 0.80" in lines[1]
    assert "sum of the checkers' defect probabilities is 0.30" in lines[2]
    assert "IoU 0.42, below the threshold 0.80" in lines[3] and "test/hole/000.png" in lines[3]
    # a rule this version has no words for (a project from a newer version) is named, not a crash
    reason, rows = flag_reason("some_new_rule", {"score": 0.5, "regions": []})
    assert "some_new_rule" in reason and rows == [("score", "0.5")]


def test_a_reader_that_stops_early_is_not_an_error(tmp_path):
    """`annotator status P --json | head`: the closed pipe ends the command quietly (exit 141, no traceback)."""
    src = tmp_path / "imgs"
    src.mkdir()
    img = np.full((8, 8, 3), 128, np.uint8)
    for i in range(700):  # ~150 bytes of status each: more than a pipe's 64 KB buffer
        img[0, 0, 0] = i % 256
        img[0, 1, 0] = i // 256
        cv2.imwrite(str(src / f"{i:04d}.png"), img)
    proj = tmp_path / "p"
    assert run_cli("init", proj).returncode == 0
    assert run_cli("import", proj, src).returncode == 0
    p = subprocess.Popen([sys.executable, "-m", "annotator", "status", str(proj), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.read(10).startswith(b"{")
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err, err


def test_labels_of_good_images_agree_quietly_unless_they_mark_a_defect(tmp_path, mvtec):
    """Re-importing a COCO export (it lists the good images, defect-free) lists nothing for them; a label that
    marks a defect on a good image is listed and not set."""
    with Project.create(tmp_path / "p") as p:
        project_io.import_mvtec(p, mvtec, with_labels=True)
        project_io.export_project(p, tmp_path / "coco", "coco")
        report = project_io.import_labels(p, tmp_path / "coco/annotations.json", "coco")
        assert report["labels"] == 5 and report["skipped"] == [] and report["good_agreed"] == 3
        masks = tmp_path / "masks"
        (masks / "train/good").mkdir(parents=True)
        mark = np.zeros((48, 48), np.uint8)
        cv2.imwrite(str(masks / "train/good/001_mask.png"), mark)
        mark[5:9, 5:9] = 255
        cv2.imwrite(str(masks / "train/good/000_mask.png"), mark)
        report = project_io.import_masks(p, masks)
        assert report["good_agreed"] == 1 and report["labels"] == 0
        assert report["skipped"] == [["train/good/000.png", "a good (defect-free) training image takes no label, "
                                                            "but this one marks 16 px as a defect"]]
        assert {i.role for i in p.images() if i.rel_path.startswith("train/")} == {"good"}


def test_cli_file_errors_are_one_line_without_a_traceback(tmp_path, mvtec):
    proj = tmp_path / "p"
    assert run_cli("init", proj).returncode == 0
    assert run_cli("import", proj, "--mvtec", mvtec, "--with-labels").returncode == 0
    full = tmp_path / "full"
    full.mkdir()
    (full / "x.txt").write_text("x")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for args, says in (((full, "--format", "mvtec"), "must be empty or not exist"),
                       ((a_file, "--format", "masks"), f"{a_file}: File exists")):
        r = run_cli("export", proj, *args)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("annotator export: error: ") and says in lines[0]


def test_a_second_batch_with_the_same_file_names_goes_under_a_prefix(tmp_path, mvtec):
    first, second = tmp_path / "day1", tmp_path / "day2"
    for folder, value in ((first, 80), (second, 160)):
        folder.mkdir()
        cv2.imwrite(str(folder / "001.png"), np.full((24, 24, 3), value, np.uint8))
    with Project.create(tmp_path / "p") as p:
        project_io.import_folder(p, first)
        clash = project_io.import_folder(p, second)
        assert clash["added"] == 0 and "--prefix" in clash["skipped"][0][1]
        report = project_io.import_folder(p, second, prefix="day2")
        assert report["added"] == 1 and {i.rel_path for i in p.images()} == {"001.png", "day2/001.png"}
        report = project_io.import_mvtec(p, mvtec, with_labels=True, prefix="batch/7")
        assert report["labels"] == 5 and p.image_by_path("batch/7/test/hole/000.png") is not None
        assert p.current_label(p.image_by_path("batch/7/test/hole/000.png").id).area > 0
        for bad in ("../up", "/abs", "..", "C:/x"):
            with pytest.raises(PipelineError, match="--prefix"):
                project_io.import_folder(p, second, prefix=bad)


def test_a_project_moved_with_its_images_inside_still_finds_them(tmp_path, mvtec):
    import shutil

    proj = tmp_path / "p"
    with Project.create(proj) as p:
        shutil.copytree(mvtec, proj / "data")
        project_io.import_mvtec(p, proj / "data")
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        cv2.imwrite(str(outside / "x.png"), np.full((24, 24, 3), 90, np.uint8))
        project_io.import_folder(p, outside, prefix="more")
    moved = tmp_path / "copied" / "p2"
    shutil.move(str(proj), str(moved))
    with Project.open(moved) as p:
        for img in p.images():
            assert p.load_image(img.id).shape[:2] == (img.height, img.width)
        assert p.image_by_path("test/hole/000.png").source == str(moved / "data/test/hole/000.png")
        assert p.image_by_path("more/x.png").source == str(outside / "x.png")  # outside: kept where it lies
        assert project_io.relink(p)["looked_for"] == 0


def test_relink_finds_moved_images_by_content_and_never_takes_another_file(tmp_path, mvtec):
    import shutil

    src = tmp_path / "incoming"
    shutil.copytree(mvtec, src)
    with Project.create(tmp_path / "p") as p:
        project_io.import_mvtec(p, src)
        hole = p.image_by_path("test/hole/000.png")
        # the images move to a new disk, one of them into another folder; a file of another image takes a
        # lost file's name
        new = tmp_path / "disk2" / "fabric"
        shutil.move(str(src), str(new))
        (new / "test/stain/000.png").rename(new / "test/stain/renamed.png")
        (new / "test/hole/000.png").rename(new / "000.png")
        shutil.copy(new / "test/mis_yarn/000.png", new / "test/stain/000.png")
        (new / "000.png").rename(tmp_path / "disk2" / "000.png")
        with pytest.raises(Exception, match="different file"):
            p.set_source(hole.id, new / "test/stain/000.png")
        report = project_io.relink(p, tmp_path / "disk2")
        assert report["looked_for"] == 8
        assert project_io.missing_files(p) == ["test/stain/000.png"]
        st = project_io.status(p)
        assert st["missing_files"] == ["test/stain/000.png"] and "annotator relink" in project_io.format_status(st)
        relinked = dict(report["relinked"])
        assert relinked["test/hole/000.png"] == str(tmp_path / "disk2" / "000.png")  # found by name and content
        assert relinked["train/good/000.png"] == str(new / "train/good/000.png")
        assert report["missing"] == ["test/stain/000.png"]  # renamed: not found; the same-named file differs
        assert report["different"] == [["test/stain/000.png", str(new / "test/stain/000.png")]]
        assert len(relinked) == 7
        assert np.array_equal(p.load_image(hole.id), cv2.imread(str(tmp_path / "disk2" / "000.png")))
        text = project_io.format_relink_report(report)
        assert "7 of 8 images found" in text and "still missing: test/stain/000.png" in text
        assert project_io.relink(p, tmp_path / "disk2")["looked_for"] == 1  # only the one still missing
        # --all moves images that still read to copies under the folder
        copy = tmp_path / "copy"
        shutil.copytree(new, copy)
        again = project_io.relink(p, copy, every=True)
        assert dict(again["relinked"])["train/good/000.png"] == str(copy / "train/good/000.png")
    with pytest.raises(PipelineError, match="no folder"):
        with Project.open(tmp_path / "p") as p:
            project_io.relink(p, tmp_path / "nowhere")


def test_relink_repairs_a_project_that_kept_absolute_paths_inside_its_folder(tmp_path, mvtec):
    """Projects before relative paths (the demo's among them) kept absolute paths of files inside the
    project folder: moved, they need one ``annotator relink P``, which looks in the project folder."""
    import shutil
    import sqlite3

    proj = tmp_path / "old"
    with Project.create(proj) as p:
        shutil.copytree(mvtec, proj / "data")
        project_io.import_mvtec(p, proj / "data")
    db = sqlite3.connect(proj / "project.sqlite")
    db.execute("UPDATE images SET source = ? || '/' || source", (str(proj),))
    db.commit()
    db.close()
    shutil.move(str(proj), str(tmp_path / "new"))
    r = run_cli("relink", tmp_path / "new")
    assert r.returncode == 0, r.stderr
    assert "8 of 8 images found under" in r.stdout
    with Project.open(tmp_path / "new") as p:
        assert all(p.load_image(i.id) is not None for i in p.images())
    raw = sqlite3.connect(tmp_path / "new" / "project.sqlite").execute("SELECT source FROM images").fetchall()
    assert {s for (s,) in raw} == {f"data/{i}" for i in ["train/good/000.png", "train/good/001.png",
                                                         "train/good/002.png", "test/good/000.png",
                                                         "test/good/001.png", "test/hole/000.png",
                                                         "test/mis_yarn/000.png", "test/stain/000.png"]}


def _labelled_project(tmp_path, mvtec) -> Path:
    """The tiny MVTec tree with its ground truth as labels, one model-1 pre-label, a heat map and a flag."""
    with Project.create(tmp_path / "p") as p:
        project_io.import_mvtec(p, mvtec, with_labels=True)
        review = Review(p)
        stain = p.image_by_path("test/stain/000.png")
        r = review.start_check_round()
        review.record_check_results(r, {stain.id: [{"rule": "iou", "suspicion": 0.5, "numbers": {"iou": 0.4}}]})
        p.set_heatmap(stain.id, np.ones((stain.height, stain.width), np.float32))
    return tmp_path / "p"


def test_remove_takes_images_out_with_their_history_and_leaves_the_files(tmp_path, mvtec):
    proj = _labelled_project(tmp_path, mvtec)
    r = run_cli("remove", proj, "test/stain/000.png", "train/good/")
    assert r.returncode == 1 and "--yes" in r.stderr and "would remove 4 images, 1 with a label a person made" in r.stdout
    with Project.open(proj) as p:
        assert len(p.images()) == 8  # nothing went
        stain = p.image_by_path("test/stain/000.png")
        assert p.flags(image_id=stain.id) and p.heatmap(stain.id) is not None
    r = run_cli("remove", proj, "test/stain/000.png", "train/good/", "--yes")
    assert r.returncode == 0, r.stderr
    with Project.open(proj) as p:
        assert {i.rel_path for i in p.images()} == {"test/good/000.png", "test/good/001.png", "test/hole/000.png",
                                                     "test/mis_yarn/000.png"}
        assert p.problems() == [] and not p.flags() and p.heatmap(stain.id) is None
        assert p.current_label(stain.id) is None and p.label_history(stain.id) == []
        assert (mvtec / "test/stain/000.png").is_file()  # the file itself is untouched
        # an image imported later may get the removed image's id: it inherits nothing
        extra = tmp_path / "extra"
        extra.mkdir()
        cv2.imwrite(str(extra / "new.png"), np.full((48, 48, 3), 120, np.uint8))
        project_io.import_folder(p, extra)
        new = p.image_by_path("new.png")
        assert p.heatmap(new.id) is None and p.current_label(new.id) is None and not p.flags(image_id=new.id)
        for bad in (["test/nothing.png"], ["nope/*"], ["zzz/"]):
            with pytest.raises(PipelineError, match="no image in the project matches"):
                project_io.remove_images(p, bad)
        assert sorted(project_io.remove_images(p, ["test/*/000.png"], dry_run=True)["removed"]) == [
            "test/good/000.png", "test/hole/000.png", "test/mis_yarn/000.png"]


def test_roles_change_both_ways_but_a_defect_a_person_labelled_never_becomes_good_fabric(tmp_path, mvtec):
    proj = _labelled_project(tmp_path, mvtec)
    with Project.open(proj) as p:
        with pytest.raises(PipelineError, match=r"nothing changed: test/hole/000.png: its label marks a defect"):
            project_io.set_roles(p, ["test/good/000.png", "test/hole/000.png"], "good")
        assert p.image_by_path("test/good/000.png").role == "label"  # all or nothing
        # a test image a person marked defect-free becomes a training image; its open flags are dropped
        stain = p.image_by_path("test/stain/000.png")
        Review(p).mark_good(stain.id)
        good = p.image_by_path("test/good/001.png")
        Review(p).start_check_round()
        p.add_flags(p.rounds()[-1].number, {good.id: [{"rule": "missed_label", "suspicion": 0.9}]})
        report = project_io.set_roles(p, ["test/good/*", "test/stain/000.png"], "good")
        assert sorted(report["changed"]) == ["test/good/000.png", "test/good/001.png", "test/stain/000.png"]
        for rel in report["changed"]:
            img = p.image_by_path(rel)
            assert (img.role, img.state, img.anomaly_score) == ("good", "good", None)
            assert not p.flags(image_id=img.id, unresolved_only=True)
        assert p.heatmap(stain.id) is None and len(p.label_history(stain.id)) == 2  # history kept
        # and back: a training image becomes one to label, waiting for model 1
        back = project_io.set_roles(p, ["train/good/000.png", "test/good/000.png"], "label")
        assert sorted(back["changed"]) == ["test/good/000.png", "train/good/000.png"]
        assert {p.image_by_path(r).state for r in back["changed"]} == {"new"}
        assert not Review(p).loop_finished()
        # model 1's own pre-label does not stop an image from becoming good: the person overrules it
        img = p.image_by_path("train/good/000.png")
        review = Review(p)
        rnd = review.start_prelabel_round()
        mask = np.zeros((img.height, img.width), bool)
        mask[5:15, 5:15] = True
        review.record_prelabel(rnd, img.id, mask, None, 9.0, True)
        assert project_io.set_roles(p, ["train/good/000.png"], "good")["changed"] == ["train/good/000.png"]
    r = run_cli("role", proj, "test/hole/000.png", "--good")
    assert r.returncode != 0 and "marks a defect" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("role", proj, "test/good/", "--to-label")
    assert r.returncode == 0 and "1 image now to label (1 already were)" in r.stdout, r.stderr


def test_the_apps_import_puts_a_batch_under_its_folder_name_only_when_its_paths_are_taken(tmp_path):
    day1, day2, again = tmp_path / "day1", tmp_path / "in" / "day2", tmp_path / "again" / "day2"
    for folder, values in ((day1, (80, 90)), (day2, (80, 160, 170)), (again, (200,))):
        folder.mkdir(parents=True)
        for k, v in enumerate(values):
            cv2.imwrite(str(folder / f"00{k}.png"), np.full((24, 24, 3), v, np.uint8))
    with Project.create(tmp_path / "p") as p:
        first = project_io.import_folder(p, day1, prefix=project_io.AUTO)
        assert first["added"] == 2 and "prefix" not in first  # nothing taken: paths as they are
        report = project_io.import_folder(p, day2, prefix=project_io.AUTO)
        # 001.png differs from day 1's: the batch goes under day2/, except the file day 1 already brought
        assert report["prefix"] == "day2" and "1 of its file paths were taken" in report["prefix_reason"]
        assert report["added"] == 2 and report["skipped"] == [["000.png", "already in the project"]]
        assert {i.rel_path for i in p.images()} == {"000.png", "001.png", "day2/001.png", "day2/002.png"}
        assert "went under day2/" in project_io.format_import_report(report)
        # another folder of the same name whose paths are taken again: day2-2/
        third = project_io.import_folder(p, again, prefix=project_io.AUTO, good=True)
        assert third["prefix"] == "day2-2" and p.image_by_path("day2-2/000.png").role == "good"
        # importing the same batches again adds nothing and picks no new name
        assert project_io.import_folder(p, day1, prefix=project_io.AUTO)["added"] == 0
        repeat = project_io.import_folder(p, day2, prefix=project_io.AUTO)
        assert repeat["added"] == 0 and repeat["prefix"] == "day2" and len(p.images()) == 5


def test_the_demo_reopened_after_its_folder_moved_finds_its_images(tmp_path):
    """A demo project built before paths inside the project were kept relative, then moved."""
    import shutil
    import sqlite3

    from annotator.pipeline.demo import build_demo

    build_demo(tmp_path / "demo", size=32).close()
    db = sqlite3.connect(tmp_path / "demo" / "project.sqlite")
    db.execute("UPDATE images SET source = ? || '/' || source", (str(tmp_path / "demo"),))
    db.commit()
    db.close()
    shutil.move(str(tmp_path / "demo"), str(tmp_path / "moved"))
    with Project.open(tmp_path / "moved") as p:
        assert len(project_io.missing_files(p)) == len(p.images()) > 0
    with build_demo(tmp_path / "moved", size=32) as p:
        assert project_io.missing_files(p) == []
