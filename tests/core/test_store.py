"""The project store: schema, round trips, ordering, clear errors, crash safety."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from annotator.core import store
from annotator.core.masks import label_regions
from annotator.core.store import SCHEMA_VERSION, FlagSpec, Project, ProjectError

H, W = 24, 32


def write_png(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((H, W, 3), value, np.uint8)
    img[3:6, 4:9] = 255 - value
    assert cv2.imwrite(str(path), img)
    return path


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def proj(tmp_path):
    with Project.create(tmp_path / "proj") as p:
        yield p


@pytest.fixture
def img(proj, tmp_path):
    return proj.add_image(write_png(tmp_path / "data" / "test" / "hole" / "003.png"), "test/hole/003.png")


# ---------------------------------------------------------------- schema and opening


def test_create_makes_folder_schema_wal_and_foreign_keys(proj):
    for sub in ("masks", "models", "heatmaps"):
        assert (proj.path / sub).is_dir()
    raw = sqlite3.connect(proj.path / "project.sqlite")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == proj.schema_version
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"images", "classes", "labels", "label_regions", "rounds", "round_images", "flags", "model_runs"} <= tables
    raw.close()
    assert proj._one("PRAGMA foreign_keys")[0] == 1
    assert [c.name for c in proj.classes()] == ["mis_yarn", "broken_needle", "open_width", "hole"]


def test_foreign_keys_are_enforced(proj):
    with pytest.raises(sqlite3.IntegrityError):
        with proj.transaction():
            proj._write("INSERT INTO labels(image_id, mask_file, source, area, created) VALUES (99, 'x', 'import', 0, '')")


def test_create_refuses_an_existing_project(proj):
    with pytest.raises(ProjectError, match="already holds a project"):
        Project.create(proj.path)


def test_reopen_keeps_everything(tmp_path, proj, img):
    proj.set_label(img, box(2, 6, 3, 9), "hole", "model1", 1)
    proj.close()
    with Project.open(proj.path) as again:
        label = again.current_label(img)
        assert label.classes == ("hole",) and label.area == 24
        assert again.image(img).rel_path == "test/hole/003.png"


def one_line_error(path) -> str:
    with pytest.raises(ProjectError) as err:
        Project.open(path)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_open_missing_folder_or_missing_db(tmp_path):
    assert "no project folder" in one_line_error(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "not an annotator project (no project.sqlite)" in one_line_error(tmp_path / "empty")


def test_open_corrupt_or_foreign_files(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "project.sqlite").write_bytes(b"this is not SQLite at all" * 100)
    assert "not a readable annotator project" in one_line_error(bad)
    (bad / "project.sqlite").write_bytes(b"")
    assert "not an annotator project" in one_line_error(bad)
    (bad / "project.sqlite").unlink()
    sqlite3.connect(bad / "project.sqlite").execute("CREATE TABLE t (x)").connection.close()
    assert "not an annotator project" in one_line_error(bad)


def test_open_newer_schema_is_refused_clearly(proj):
    proj.close()
    raw = sqlite3.connect(proj.path / "project.sqlite")
    raw.execute("PRAGMA user_version = 7")
    raw.close()
    msg = one_line_error(proj.path)
    assert msg.endswith(f"project.sqlite was written by a newer annotator (schema 7; this version reads up to {SCHEMA_VERSION})")


def test_migrations_hook_upgrades_older_projects(proj, monkeypatch):
    proj.close()
    monkeypatch.setattr(store, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    assert "no upgrade" in one_line_error(proj.path)
    add_note = lambda conn: conn.execute("ALTER TABLE images ADD COLUMN note TEXT")  # noqa: E731
    monkeypatch.setitem(store.MIGRATIONS, SCHEMA_VERSION, add_note)
    with Project.open(proj.path) as p:
        assert p.schema_version == SCHEMA_VERSION + 1
        assert "note" in [r[1] for r in p._all("PRAGMA table_info(images)")]


def test_closed_project_raises(proj):
    proj.close()
    with pytest.raises(ProjectError, match="is closed"):
        proj.images()


# ---------------------------------------------------------------- images and classes


def test_add_image_reads_size_checksum_and_role(proj, tmp_path, img):
    rec = proj.image(img)
    assert (rec.width, rec.height, rec.role, rec.state) == (W, H, "label", "new")
    assert len(rec.sha256) == 64 and Path(rec.source).is_absolute()
    assert proj.load_image(img).shape == (H, W, 3)
    good = proj.add_image(write_png(tmp_path / "g.png"), "train/good/000.png", role="good")
    assert proj.image(good).state == "good"
    assert [i.id for i in proj.images(role="good")] == [good]
    with pytest.raises(ProjectError, match="already in the project"):
        proj.add_image(tmp_path / "g.png", "train/good/000.png")
    with pytest.raises(ProjectError, match="no image with id 999"):
        proj.image(999)


def test_import_images_uses_posix_paths_relative_to_root_and_is_idempotent(proj, tmp_path):
    root = tmp_path / "mvtec"
    for rel in ("test/hole/003.png", "test/hole/001.png", "train/good/000.png"):
        write_png(root / rel)
    (root / "readme.txt").write_text("not an image")
    ids = proj.import_images(root)
    assert [proj.image(i).rel_path for i in ids] == ["test/hole/001.png", "test/hole/003.png", "train/good/000.png"]
    assert proj.import_images(root) == ids


def test_prediction_and_state(proj, img):
    proj.set_prediction(img, np.float32(0.75), True)
    proj.set_state(img, "prelabelled")
    rec = proj.image(img)
    assert (rec.anomaly_score, rec.is_defect, rec.state) == (0.75, True, "prelabelled")
    with pytest.raises(ValueError):
        proj.set_state(img, "nonsense")


def test_user_classes(proj):
    c = proj.add_class("stain")
    assert c.name == "stain" and c.colour.startswith("#")
    assert proj.classes()[-1] == c
    with pytest.raises(ProjectError, match="already exists"):
        proj.add_class("stain")
    with pytest.raises(ValueError):
        proj.add_class("bad name!")


# ---------------------------------------------------------------- labels


def test_label_round_trip_with_region_classes(proj, img):
    mask = box(2, 5, 2, 5) | box(10, 12, 20, 30)
    label = proj.set_label(img, mask, ["hole", "open_width"], "model1", 1)
    got = proj.current_label(img)
    assert got == label
    assert got.mask.dtype == bool and np.array_equal(got.mask, mask)
    assert got.classes == ("hole", "open_width") and got.area == 9 + 20
    assert (got.source, got.round, got.version) == ("model1", 1, label.id)
    assert proj.set_label(img, mask, None).classes == (None, None)
    assert proj.set_label(img, mask, "hole").classes == ("hole", "hole")


def test_label_errors(proj, img):
    with pytest.raises(ValueError, match="regions"):
        proj.set_label(img, box(1, 3, 1, 3), ["hole", "hole"])
    with pytest.raises(ProjectError, match="unknown defect class 'stain'"):
        proj.set_label(img, box(1, 3, 1, 3), ["stain"])
    with pytest.raises(ValueError, match="mask is"):
        proj.set_label(img, np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match="source"):
        proj.set_label(img, box(1, 3, 1, 3), source="someone")
    assert proj.current_label(img) is None and proj.label_history(img) == []


def test_label_history_keeps_every_version_and_file(proj, img):
    masks = [box(1, 3, 1, 3), box(1, 4, 1, 4), np.zeros((H, W), bool), box(1, 3, 1, 3)]
    labels = [proj.set_label(img, m, None, s, r) for m, s, r in
              zip(masks, ["model1", "reviewer", "reviewer", "checker"], [1, 1, 2, 3])]
    history = proj.label_history(img)
    assert [h.id for h in history] == [lab.id for lab in labels] and history[-1] == proj.current_label(img)
    assert [h.source for h in history] == ["model1", "reviewer", "reviewer", "checker"]
    for h, m in zip(history, masks):
        assert np.array_equal(h.mask, m)
    assert history[0].path == history[3].path  # content-addressed: same mask, same file
    assert len({h.path for h in history}) == 3
    assert proj.current_label(img).area == 4 and history[2].classes == ()


# ---------------------------------------------------------------- rounds, flags, model runs, heat maps


def test_rounds(proj):
    r1, r2 = proj.start_round("prelabel"), proj.start_round("check")
    assert (r1, r2) == (1, 2)
    proj.end_round(r2, {"checked": 3})
    assert proj.round(r2).summary == {"checked": 3} and proj.round(r2).ended
    assert [r.number for r in proj.rounds("check")] == [r2]
    with pytest.raises(ProjectError, match="already ended"):
        proj.end_round(r2)
    with pytest.raises(ProjectError, match="no round 9"):
        proj.round(9)


def test_flags_are_ordered_most_suspicious_first_and_keep_their_numbers(proj, img, tmp_path):
    other = proj.add_image(write_png(tmp_path / "b.png"), "b.png")
    r = proj.start_round("check")
    pred = box(5, 9, 5, 9)
    numbers = {"iou": np.float64(0.42), "region_ious": [0.4, 0.5], "votes": {"m1": np.float32(0.25)},
               "aggregate": 0.5, "operation": "sum", "threshold": 4.0, "predicted_area": np.int64(16)}
    ids = proj.add_flags(r, {
        img: [FlagSpec("iou", 0.58, numbers, pred), {"rule": "wrong_label", "suspicion": 0.2}],
        other: [FlagSpec("missed_label", 0.9)],
    })
    flags = proj.flags()
    assert [f.suspicion for f in flags] == [0.9, 0.58, 0.2]
    f = proj.flag(ids[0])
    assert f.numbers["iou"] == 0.42 and f.numbers["votes"] == {"m1": 0.25} and f.numbers["predicted_area"] == 16
    assert np.array_equal(f.pred_mask, pred) and proj.flag(ids[1]).pred_mask is None
    assert [x.id for x in proj.flags(image_id=img)] == [ids[0], ids[1]]
    assert proj.resolve_flags(img, by_label=None) == 2
    assert [x.id for x in proj.flags(unresolved_only=True)] == [ids[2]]
    assert proj.flags(round=r + 1) == []
    with pytest.raises(ValueError, match="rule"):
        proj.add_flags(r, {img: [FlagSpec("gut_feeling", 1.0)]})


def test_round_coverage(proj, img):
    r = proj.start_round("check")
    proj.add_round_images(r, {img: 2})
    assert proj.round_coverage(r) == {img: 2}
    with pytest.raises(ProjectError, match="already recorded"):
        proj.add_round_images(r, {img: 0})


def test_model_runs(proj, tmp_path):
    folder = proj.new_model_dir("patchcore")
    assert folder.is_dir() and folder.parent == proj.path / "models" / "patchcore"
    assert proj.new_model_dir("patchcore") != folder
    run = proj.add_model_run("prelabel", "patchcore", folder, {"backbone": "wide_resnet50"}, {"auroc": 0.9})
    proj.add_model_run("checker", "unet", tmp_path / "elsewhere")
    proj.set_model_metrics(run.id, {"auroc": 0.95})
    got = proj.model_runs(kind="prelabel")[0]
    assert (got.folder, got.config, got.metrics) == (folder, {"backbone": "wide_resnet50"}, {"auroc": 0.95})
    assert proj._one("SELECT folder FROM model_runs WHERE id = ?", (run.id,))[0].startswith("models/")
    assert [r.kind for r in proj.model_runs()] == ["checker", "prelabel"]


def test_heatmap_round_trip(proj, img):
    assert proj.heatmap(img) is None
    heat = np.random.default_rng(0).random((H, W))
    proj.set_heatmap(img, heat)
    got = proj.heatmap(img)
    assert got.dtype == np.float32 and np.allclose(got, heat, atol=1e-6)
    assert (proj.path / "heatmaps" / f"{img}.npz").is_file()


# ---------------------------------------------------------------- atomicity, crashes, threads, events


def test_exception_inside_a_multi_step_save_rolls_back(proj, img):
    before = proj.set_label(img, box(1, 3, 1, 3), "hole", "model1", 1)
    r = proj.start_round("check")
    with pytest.raises(RuntimeError):
        with proj.transaction():
            proj.set_label(img, box(5, 9, 5, 9), None, "reviewer", 1)
            proj.add_flags(r, {img: [FlagSpec("iou", 0.3)]})
            proj.set_state(img, "flagged")
            raise RuntimeError("power cut in the middle")
    assert proj.current_label(img) == before and len(proj.label_history(img)) == 1
    assert proj.flags() == [] and proj.image(img).state == "new"


def test_nested_transaction_rolls_back_only_its_part(proj, img):
    with proj.transaction():
        proj.set_state(img, "prelabelled")
        with pytest.raises(KeyError):
            with proj.transaction():
                proj.set_label(img, box(1, 3, 1, 3))
                raise KeyError("inner")
    assert proj.image(img).state == "prelabelled" and proj.current_label(img) is None


def test_failed_file_write_leaves_previous_label_and_no_temp_file(proj, img, monkeypatch):
    before = proj.set_label(img, box(1, 3, 1, 3))

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(store.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        proj.set_label(img, box(4, 8, 4, 8))
    monkeypatch.undo()
    assert proj.current_label(img) == before
    assert sorted(p.name for p in (proj.path / "masks").iterdir()) == [before.path.name]


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from annotator.core.store import FlagSpec, Project
    p = Project.open(sys.argv[1])
    ids = [i.id for i in p.images()]
    r = p.start_round("check")
    rng = np.random.default_rng(int(sys.argv[2]))
    k = 0
    while True:
        for i in ids:
            m = np.zeros((24, 32), bool)
            y, x = rng.integers(0, 20), rng.integers(0, 28)
            m[y:y + 4, x:x + 4] = True
            m[rng.integers(0, 24), :] = k % 2 == 0
            with p.transaction():
                label = p.set_label(i, m, "hole", "reviewer", k)
                p.add_flags(r, {i: [FlagSpec("iou", float(k), {"k": k}, ~m)]})
                p.set_heatmap(i, rng.random((24, 32)))
            print(label.id, flush=True)
            k += 1
""")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_mid_save_leaves_a_readable_consistent_project(proj, tmp_path, seed):
    for k in range(3):
        proj.add_image(write_png(tmp_path / f"i{k}.png"), f"i{k}.png")
    proj.close()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    child = subprocess.Popen([sys.executable, str(script), str(proj.path), str(seed)], stdout=subprocess.PIPE, text=True)
    committed = [int(child.stdout.readline()) for _ in range(15 + 7 * seed)]
    time.sleep(0.001 * seed)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()
    with Project.open(proj.path) as p:
        assert p.problems() == []
        assert max(lab.id for i in p.images() for lab in p.label_history(i.id)) >= committed[-1]
        for i in p.images():
            for label in p.label_history(i.id):
                assert int(label.mask.sum()) == label.area
                assert len(label.classes) == len(label_regions(label.mask)[1])
            assert p.heatmap(i.id).shape == (H, W)
        assert all(f.pred_mask is not None for f in p.flags())
        assert len(p.flags()) == sum(len(p.label_history(i.id)) for i in p.images())


def test_listeners_hear_only_committed_changes(proj, img):
    heard = []
    unsubscribe = proj.subscribe(lambda event, ident: heard.append((event, ident)))
    with proj.transaction():
        proj.set_label(img, box(1, 3, 1, 3))
        proj.set_state(img, "prelabelled")
        assert heard == []
    assert heard == [("label_changed", img), ("state_changed", img)]
    with pytest.raises(RuntimeError):
        with proj.transaction():
            proj.set_state(img, "flagged")
            raise RuntimeError
    assert len(heard) == 2
    unsubscribe()
    proj.set_state(img, "new")
    assert len(heard) == 2


def test_worker_thread_writes_while_gui_thread_reads(proj, img):
    errors = []

    def worker():
        try:
            for k in range(30):
                proj.set_label(img, box(1, 3 + k % 5, 1, 3), "hole", "model1", k)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    while t.is_alive():
        label = proj.current_label(img)
        assert label is None or label.classes == ("hole",)
    t.join()
    assert errors == [] and len(proj.label_history(img)) == 30


def test_problems_reports_a_missing_mask_file(proj, img):
    label = proj.set_label(img, box(1, 3, 1, 3))
    assert proj.problems() == []
    label.path.unlink()
    assert proj.problems() == [f"missing mask file masks/{label.path.name}"]
    with pytest.raises(ProjectError, match="mask file is missing"):
        proj.current_label(img).mask


def test_a_damaged_mask_file_is_written_again_and_the_last_readable_version_is_found(tmp_path):
    with Project.create(tmp_path / "p") as p:
        src = tmp_path / "img.png"
        cv2.imwrite(str(src), np.full((20, 30, 3), 100, np.uint8))
        image_id = p.add_image(src, "img.png")
        a = np.zeros((20, 30), bool)
        a[2:5, 2:5] = True
        b = a.copy()
        b[10:15, 10:15] = True
        first = p.set_label(image_id, a)
        second = p.set_label(image_id, b)
        second.path.write_bytes(b"junk")
        older = p.last_readable_label(image_id)
        assert older.id == first.id and older.mask.sum() == 9
        third = p.set_label(image_id, b)  # the same content: same file name, written again
        assert third.path == second.path
        np.testing.assert_array_equal(p.current_label(image_id).mask, b)
        first.path.unlink()
        second.path.write_bytes(b"junk")
        assert p.last_readable_label(image_id) is None
