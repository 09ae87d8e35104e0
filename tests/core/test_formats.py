"""Folder/MVTec import, mask matching and the four export formats, with round trips."""
from __future__ import annotations

import json
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from annotator.core.formats import (
    IMAGE_EXTS,
    ROLE_GOOD,
    ROLE_LABEL,
    ExportRecord,
    NotMvtecError,
    class_folder_name,
    export_coco,
    export_labelme,
    export_masks,
    export_mvtec,
    import_coco,
    import_labelme,
    match_masks,
    scan_folder,
    scan_mvtec,
)
from annotator.core.images import load_mask, save_png_atomic, sha256_file
from annotator.core.jobs import CancelToken, Cancelled
from annotator.core.masks import label_regions

# ----------------------------------------------------------------------------- helpers


def put(path, img=None, *, h=20, w=30, seed=0, data: bytes | None = None) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if data is None:
        if img is None:
            img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
        ok, buf = cv2.imencode(os.path.splitext(path)[1], img)
        assert ok
        data = buf.tobytes()
    with open(path, "wb") as f:
        f.write(data)
    return path


def put_mask(path, mask) -> str:
    save_png_atomic(str(path), mask)
    return str(path)


def shapes_mask(h, w, shapes):
    """Mask from (kind, params, class) shapes that do not touch; returns (mask, classes
    in label_regions order)."""
    mask = np.zeros((h, w), bool)
    owner = np.zeros((h, w), np.int32)
    for k, (kind, p, _cls) in enumerate(shapes, start=1):
        m = np.zeros((h, w), np.uint8)
        if kind == "rect":
            x, y, ww, hh = p
            m[y : y + hh, x : x + ww] = 1
        elif kind == "ring":  # a region with a hole
            cx, cy, r = p
            cv2.circle(m, (cx, cy), r, 1, -1)
            cv2.circle(m, (cx, cy), max(r - 3, 1), 0, -1)
        elif kind == "line":  # a thin diagonal defect
            x0, y0, x1, y1 = p
            cv2.line(m, (x0, y0), (x1, y1), 1, 1)
        mask |= m.astype(bool)
        owner[m.astype(bool)] = k
    labels, regions = label_regions(mask)
    classes = []
    for r in regions:
        k = np.bincount(owner[labels == r.index]).argmax()
        classes.append(shapes[k - 1][2])
    return mask, classes


@pytest.fixture
def dataset(tmp_path):
    """Source images + records: non-ASCII names, shared stems, several classes."""
    src = tmp_path / "src"
    recs = []

    def add(rel, role, shapes=None, *, h=40, w=60, empty=False, seed=0, kind=None):
        ap = put(src / rel, h=h, w=w, seed=seed)
        if shapes is not None:
            mask, classes = shapes_mask(h, w, shapes)
        elif empty:
            mask, classes = np.zeros((h, w), bool), []
        else:
            mask, classes = None, []
        recs.append(ExportRecord(rel, ap, w, h, role, mask, classes, kind))

    add("测试/布料 ü.png", ROLE_LABEL, [
        ("rect", (2, 2, 10, 6), "错纱"),
        ("ring", (40, 20, 9), "破洞"),
        ("line", (5, 35, 25, 28), "错纱"),
    ], seed=1)
    add("a/001.png", ROLE_LABEL, [("rect", (0, 0, 4, 4), "hole"), ("rect", (20, 10, 30, 20), "broken needle")], seed=2)
    add("a/001.jpg", ROLE_LABEL, empty=True, seed=3)
    add("b/001.png", ROLE_LABEL, [("rect", (50, 30, 10, 10), "broken needle")], seed=4)
    add("good/g1.png", ROLE_GOOD, seed=5)
    add("u/unlabelled.png", ROLE_LABEL, seed=6)
    add("k/kind_only.bmp", ROLE_LABEL, [("rect", (1, 1, 3, 3), None), ("rect", (9, 9, 2, 2), None)], seed=7,
        kind="stain", h=20, w=25)
    # defect_kind fills empty region_classes
    r = recs[-1]
    recs[-1] = ExportRecord(r.rel_path, r.image_path, r.width, r.height, r.role, r.mask, [], "stain")
    return src, recs


def expected_labels(recs, *, include_unlabelled_as_empty=False):
    out = {}
    for r in recs:
        if r.mask is None:
            if r.role == ROLE_GOOD or include_unlabelled_as_empty:
                out[r.rel_path] = (np.zeros((r.height, r.width), bool), [])
            continue
        n = len(label_regions(r.mask)[1])
        out[r.rel_path] = (r.mask, list(r.region_classes) or [r.defect_kind or "defect"] * n)
    return out


def assert_same_labels(got, want):
    assert sorted(got) == sorted(want)
    for rel, (m, c) in want.items():
        gm, gc = got[rel]
        assert gm.dtype == bool and gm.shape == m.shape, rel
        assert np.array_equal(gm, m), rel
        assert list(gc) == list(c), rel


def records_from(labels, base_recs):
    by = {r.rel_path: r for r in base_recs}
    return [
        ExportRecord(rel, by[rel].image_path, by[rel].width, by[rel].height, by[rel].role, m, c)
        for rel, (m, c) in labels.items()
    ]


def source_hashes(recs):
    return {r.rel_path: sha256_file(r.image_path) for r in recs}


# ----------------------------------------------------------------------------- scan_folder


def _png_header_only(w, h) -> bytes:
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"x") + chunk(b"IEND", b""))


def test_scan_folder_reports_bad_files_and_keeps_going(tmp_path):
    root = tmp_path / "imgs"
    put(root / "ok.png", seed=1)
    put(root / "a.png", seed=2)
    put(root / "a.jpg", seed=3)
    put(root / "sub" / "c1.png", seed=4)
    put(root / "sub" / "c2.PNG", data=(root / "sub" / "c1.png").read_bytes())  # same content
    put(root / "测试" / "布料 ü.png", seed=5)
    put(root / "gray16.tif", np.full((5, 7), 40000, np.uint16))
    put(root / "empty.png", data=b"")
    put(root / "notes.png", data=b"just text\n")
    good_jpg = cv2.imencode(".jpg", np.zeros((50, 50, 3), np.uint8))[1].tobytes()
    put(root / "cut.jpg", data=good_jpg[: len(good_jpg) // 2])
    put(root / "huge.png", data=_png_header_only(20000, 20000))
    put(root / ".hidden.png", data=b"junk")
    put(root / "._a.png", data=b"AppleDouble junk")
    put(root / "readme.txt", data=b"not an image extension")
    put(root / "labels.json", data=b"{}")

    seen = []
    rep = scan_folder(str(root), on_progress=lambda d, t, m: seen.append((d, t)))
    rels = [it.rel_path for it in rep.items]
    assert rels == sorted(rels)
    assert set(rels) == {"ok.png", "a.png", "a.jpg", "sub/c1.png", "sub/c2.PNG", "测试/布料 ü.png", "gray16.tif"}
    by = {it.rel_path: it for it in rep.items}
    assert (by["a.png"].width, by["a.png"].height) == (30, 20)
    assert (by["gray16.tif"].width, by["gray16.tif"].height) == (7, 5)
    assert by["a.png"].sha256 != by["a.jpg"].sha256
    assert os.path.isabs(by["测试/布料 ü.png"].abs_path)
    assert os.path.isfile(by["测试/布料 ü.png"].abs_path)
    skipped = dict(rep.skipped)
    assert set(skipped) == {"empty.png", "notes.png", "cut.jpg", "huge.png"}
    assert "empty" in skipped["empty.png"]
    assert "not an image" in skipped["notes.png"]
    assert "truncated" in skipped["cut.jpg"]
    assert "too large" in skipped["huge.png"]
    assert rep.duplicates == [["sub/c1.png", "sub/c2.PNG"]]
    assert seen[-1] == (11, 11)
    assert {e.lower() for e in IMAGE_EXTS} >= {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def test_scan_folder_verify_catches_damage_inside(tmp_path):
    data = bytearray(cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8))[1])
    data[len(data) // 2 : len(data) // 2 + 40] = bytes(40)
    put(tmp_path / "bad.png", data=bytes(data))
    put(tmp_path / "fine.png")
    assert len(scan_folder(str(tmp_path)).items) == 2  # header-only check passes
    rep = scan_folder(str(tmp_path), verify=True)
    assert [it.rel_path for it in rep.items] == ["fine.png"]
    assert rep.skipped[0][0] == "bad.png" and "corrupt" in rep.skipped[0][1]


def test_scan_folder_threads_do_not_change_the_result(tmp_path):
    for k in range(12):
        put(tmp_path / f"d{k % 3}" / f"{k:03d}.png", seed=k)
    put(tmp_path / "bad.png", data=b"")
    one = scan_folder(str(tmp_path), workers=1)
    many = scan_folder(str(tmp_path), workers=8)
    assert one.items == many.items and one.skipped == many.skipped and len(one.items) == 12


def test_scan_folder_cancel_and_bad_root(tmp_path):
    put(tmp_path / "x.png")
    tok = CancelToken()
    tok.cancel()
    for workers in (1, 4):
        with pytest.raises(Cancelled):
            scan_folder(str(tmp_path), cancel=tok, workers=workers)
    with pytest.raises(FileNotFoundError):
        scan_folder(str(tmp_path / "missing"))
    with pytest.raises(NotADirectoryError):
        scan_folder(str(tmp_path / "x.png"))


# ----------------------------------------------------------------------------- MVTec


@pytest.fixture
def mvtec(tmp_path):
    root = tmp_path / "bottle"
    put(root / "train" / "good" / "000.png", seed=1)
    put(root / "train" / "good" / "001.png", seed=2)
    put(root / "test" / "good" / "000.png", seed=3)
    put(root / "test" / "hole" / "000.png", seed=4)
    put(root / "test" / "hole" / "002.png", seed=5)  # no mask
    put(root / "test" / "错纱" / "000.png", seed=6)
    m1, _ = shapes_mask(20, 30, [("rect", (1, 1, 4, 4), "hole"), ("rect", (15, 5, 6, 9), "hole")])
    m2, _ = shapes_mask(20, 30, [("line", (0, 19, 29, 0), "错纱")])
    put_mask(root / "ground_truth" / "hole" / "000_mask.png", m1)
    put_mask(root / "ground_truth" / "错纱" / "000_mask.png", m2)
    put_mask(root / "ground_truth" / "hole" / "999_mask.png", m1)  # no image
    (root / "license.txt").write_text("CC BY-NC-SA")
    put(root / "preview.png", seed=7)  # an image outside the layout
    return root, {"test/hole/000.png": m1, "test/错纱/000.png": m2}


def test_scan_mvtec_without_labels(mvtec):
    root, _ = mvtec
    scan = scan_mvtec(str(root))
    by = {it.rel_path: it for it in scan.items}
    assert set(by) == {"train/good/000.png", "train/good/001.png", "test/good/000.png",
                       "test/hole/000.png", "test/hole/002.png", "test/错纱/000.png"}
    assert by["train/good/000.png"].role == ROLE_GOOD and by["train/good/000.png"].defect_kind is None
    assert by["test/good/000.png"].role == ROLE_LABEL and by["test/good/000.png"].defect_kind == "good"
    assert by["test/错纱/000.png"].defect_kind == "错纱"
    assert all(it.mask_path is None and not it.labelled and it.load_label() is None for it in scan.items)
    assert scan.defect_kinds == ["hole", "错纱"]
    assert scan.missing_masks == [] and scan.unmatched_masks == []
    assert [rel for rel, _ in scan.skipped] == ["preview.png"]
    assert (by["test/hole/000.png"].width, by["test/hole/000.png"].height) == (30, 20)


def test_scan_mvtec_with_labels(mvtec):
    root, masks = mvtec
    scan = scan_mvtec(str(root), with_labels=True)
    by = {it.rel_path: it for it in scan.items}
    assert by["test/hole/000.png"].mask_path == str(root / "ground_truth" / "hole" / "000_mask.png")
    m, c = by["test/hole/000.png"].load_label()
    assert np.array_equal(m, masks["test/hole/000.png"]) and c == ["hole", "hole"]
    m, c = by["test/错纱/000.png"].load_label()
    assert np.array_equal(m, masks["test/错纱/000.png"]) and c == ["错纱"]
    m, c = by["test/good/000.png"].load_label()
    assert not m.any() and m.shape == (20, 30) and c == []
    assert by["train/good/000.png"].load_label() is None
    assert scan.missing_masks == ["test/hole/002.png"]
    assert not by["test/hole/002.png"].labelled
    assert scan.unmatched_masks == ["ground_truth/hole/999_mask.png"]


def test_scan_mvtec_rejects_other_folders(tmp_path, mvtec):
    root, _ = mvtec
    put(tmp_path / "plain" / "x.png")
    with pytest.raises(NotMvtecError, match="not an MVTec AD category folder"):
        scan_mvtec(str(tmp_path / "plain"))
    with pytest.raises(NotMvtecError, match="choose one of bottle"):
        scan_mvtec(str(tmp_path))  # the dataset root, one level too high


def test_mvtec_import_export_import(tmp_path, mvtec):
    root, _ = mvtec
    first = scan_mvtec(str(root), with_labels=True)
    labels, recs = {}, []
    for it in first.items:
        lab = it.load_label()
        m, c = lab if lab else (None, [])
        recs.append(ExportRecord(it.rel_path, it.abs_path, it.width, it.height, it.role, m, c, it.defect_kind))
        if lab:
            labels[it.rel_path] = lab
    before = source_hashes(recs)
    s = export_mvtec(recs, str(tmp_path / "out"))
    assert (s.images, s.skipped, s.unlabelled) == (5, 1, 1)  # test/hole/002.png has no label
    again = scan_mvtec(str(tmp_path / "out"), with_labels=True)
    assert again.from_manifest
    assert sorted(it.rel_path for it in again.items) == sorted(r.rel_path for r in recs if r.rel_path != "test/hole/002.png")
    got = {it.rel_path: it.load_label() for it in again.items if it.labelled}
    assert_same_labels(got, labels)
    roles = {it.rel_path: it.role for it in again.items}
    assert roles["train/good/001.png"] == ROLE_GOOD and roles["test/good/000.png"] == ROLE_LABEL
    assert source_hashes(recs) == before


def test_export_mvtec_leaves_out_an_image_deleted_since_the_import_and_lists_it(tmp_path, dataset):
    src, recs = dataset
    os.remove(src / "a/001.png")  # defective, 2 regions
    out = tmp_path / "mv"
    s = export_mvtec(recs, str(out))
    assert (s.images, s.defective, s.defect_free, s.regions, s.skipped) == (5, 3, 2, 6, 2)
    assert len(s.unreadable) == 1 and s.unreadable[0].startswith("a/001.png: cannot copy the image")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "test/broken needle/001.png" in files  # b/001.png, the name a/001.png would have taken first
    assert not any(f.endswith(".tmp") for f in files) and len([f for f in files if f.startswith("ground_truth/")]) == 3
    scan = scan_mvtec(str(out), with_labels=True)
    assert "a/001.png" not in {it.rel_path for it in scan.items}


def test_export_mvtec_round_trip_multiclass(tmp_path, dataset):
    src, recs = dataset
    before = source_hashes(recs)
    out = tmp_path / "mv"
    s = export_mvtec(recs, str(out))
    assert (s.images, s.defective, s.defect_free, s.unlabelled) == (6, 4, 2, 1)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "train/good/g1.png" in files and "test/good/001.jpg" in files
    # a/001.png: its largest region is "broken needle"; b/001.png gets a unique name
    assert "test/broken needle/001.png" in files and "test/broken needle/001_2.png" in files
    assert "ground_truth/broken needle/001_2_mask.png" in files
    assert "test/破洞/布料 ü.png" in files and "ground_truth/破洞/布料 ü_mask.png" in files  # the ring is largest
    assert "test/stain/kind_only.bmp" in files
    assert not any(f.endswith(".tmp") for f in files)
    # copies are byte-identical
    assert sha256_file(str(out / "test/stain/kind_only.bmp")) == before["k/kind_only.bmp"]

    scan = scan_mvtec(str(out), with_labels=True)
    got = {it.rel_path: it.load_label() for it in scan.items if it.labelled}
    assert_same_labels(got, {k: v for k, v in expected_labels(recs).items() if k != "good/g1.png"})
    assert {it.rel_path for it in scan.items if it.role == ROLE_GOOD} == {"good/g1.png"}
    assert source_hashes(recs) == before

    # second cycle from the re-import: same manifest
    recs2 = []
    for it in scan.items:
        lab = it.load_label()
        m, c = lab if lab else (None, [])
        recs2.append(ExportRecord(it.rel_path, it.abs_path, it.width, it.height, it.role, m, c))
    export_mvtec(recs2, str(tmp_path / "mv2"))
    man1 = json.loads((out / "manifest.json").read_text("utf-8"))["items"]
    man2 = json.loads((tmp_path / "mv2" / "manifest.json").read_text("utf-8"))["items"]
    key = lambda e: e["rel_path"]  # noqa: E731
    strip = lambda es: [{k: e[k] for k in ("rel_path", "mask", "region_classes", "role")} for e in sorted(es, key=key)]  # noqa: E731
    assert strip(man1) == strip(man2)

    with pytest.raises(FileExistsError):
        export_mvtec(recs, str(out))


def test_class_folder_name():
    assert class_folder_name("broken needle") == "broken needle"
    assert class_folder_name("a/b:c") == "a_b_c"
    assert class_folder_name("good") == "defect_good"
    assert class_folder_name(" . ") == "defect"
    assert class_folder_name("CON") == "CON_"


# ----------------------------------------------------------------------------- mask matching


def test_match_masks_patterns(tmp_path):
    md = tmp_path / "masks"
    z = np.zeros((4, 4), bool)
    put_mask(md / "a" / "001_mask.png", z)  # <stem>_mask.png
    put_mask(md / "b" / "002.png", z)  # <stem>.png
    put_mask(md / "c" / "x.jpg_mask.png", z)  # full-name form for shared stems
    put_mask(md / "c" / "x_mask.png", z)
    put_mask(md / "D" / "Upper_MASK.png", z)  # case differs
    put_mask(md / "e" / "s_mask.png", z)  # e/s.png and e/s.bmp: ambiguous
    put_mask(md / "测试" / "布料 ü_mask.png", z)
    put_mask(md / "stray_mask.png", z)
    (md / "notes.txt").write_text("ignored")
    rels = ["a/001.png", "b/002.jpg", "c/x.jpg", "c/x.png", "d/upper.png", "e/s.png", "e/s.bmp",
            "测试/布料 ü.png", "nomask.png"]
    r = match_masks(str(md), rels)
    assert r.matched == {
        "a/001.png": str(md / "a" / "001_mask.png"),
        "b/002.jpg": str(md / "b" / "002.png"),
        "c/x.jpg": str(md / "c" / "x.jpg_mask.png"),
        "c/x.png": str(md / "c" / "x_mask.png"),
        "d/upper.png": str(md / "D" / "Upper_MASK.png"),
        "测试/布料 ü.png": str(md / "测试" / "布料 ü_mask.png"),
    }
    assert r.ambiguous == {"e/s_mask.png": ["e/s.bmp", "e/s.png"]}
    assert r.unmatched == ["stray_mask.png"]


def test_match_masks_mvtec_layouts(mvtec):
    root, _ = mvtec
    rels = ["test/hole/000.png", "test/错纱/000.png", "test/hole/002.png", "train/good/000.png"]
    want = {
        "test/hole/000.png": str(root / "ground_truth" / "hole" / "000_mask.png"),
        "test/错纱/000.png": str(root / "ground_truth" / "错纱" / "000_mask.png"),
    }
    r = match_masks(str(root / "ground_truth"), rels)  # mask_dir = ground_truth
    assert r.matched == want and r.unmatched == ["hole/999_mask.png"]
    r = match_masks(str(root), rels, image_root=str(root))  # mask_dir = category root
    assert r.matched == want
    assert "ground_truth/hole/999_mask.png" in r.unmatched


# ----------------------------------------------------------------------------- export: masks


def test_export_masks_round_trip(tmp_path, dataset):
    src, recs = dataset
    before = source_hashes(recs)
    out = tmp_path / "masks"
    s = export_masks(recs, str(out))
    assert (s.images, s.skipped, s.unlabelled, s.defective, s.defect_free) == (6, 1, 1, 4, 1)
    assert (out / "a" / "001_mask.png").is_file() and (out / "a" / "001.jpg_mask.png").is_file()
    assert not (out / "good").exists()
    raw = cv2.imdecode(np.fromfile(str(out / "b" / "001_mask.png"), np.uint8), cv2.IMREAD_UNCHANGED)
    assert raw.ndim == 2 and set(np.unique(raw)) == {0, 255}

    rels = [r.rel_path for r in recs if r.role != ROLE_GOOD]
    match = match_masks(str(out), rels)
    assert set(match.matched) == set(rels) and match.unmatched == [] and match.ambiguous == {}
    sizes = {r.rel_path: (r.width, r.height) for r in recs}
    got = {rel: (load_mask(p, sizes[rel]), match.region_classes[rel]) for rel, p in match.matched.items()}
    want = {k: v for k, v in expected_labels(recs, include_unlabelled_as_empty=True).items() if k != "good/g1.png"}
    assert_same_labels(got, want)
    assert source_hashes(recs) == before

    # import -> export -> import again: identical files
    export_masks(records_from(got, recs), str(tmp_path / "masks2"))
    for rel, p in match.matched.items():
        q = tmp_path / "masks2" / os.path.relpath(p, out)
        assert np.array_equal(load_mask(p), load_mask(str(q)))


def test_export_refuses_to_overwrite_a_source_image(tmp_path):
    src = tmp_path / "src"
    a = put(src / "a.png")
    put(src / "a_mask.png", seed=9)  # an *image* that happens to have a mask-like name
    recs = [ExportRecord("a.png", a, 30, 20, ROLE_LABEL, np.zeros((20, 30), bool), [])]
    before = sha256_file(str(src / "a_mask.png"))
    with pytest.raises(ValueError, match="source image"):
        export_masks(recs + [ExportRecord("a_mask.png", str(src / "a_mask.png"), 30, 20, ROLE_GOOD)], str(src))
    assert sha256_file(str(src / "a_mask.png")) == before


def test_export_validates_records(tmp_path, dataset):
    _, recs = dataset
    r = recs[1]
    bad_size = ExportRecord(r.rel_path, r.image_path, r.width, r.height, r.role, np.zeros((3, 3), bool), [])
    with pytest.raises(ValueError, match="mask is 3x3 px but the image is 60x40"):
        export_coco([bad_size], str(tmp_path / "c.json"))
    bad_classes = ExportRecord(r.rel_path, r.image_path, r.width, r.height, r.role, r.mask, ["only one"])
    with pytest.raises(ValueError, match="1 region classes for 2 regions"):
        export_labelme([bad_classes], str(tmp_path / "lm"))
    escape = ExportRecord("../evil.png", r.image_path, r.width, r.height, r.role, r.mask, r.region_classes)
    with pytest.raises(ValueError, match="relative"):
        export_masks([escape], str(tmp_path / "m"))
    assert not (tmp_path / "evil_mask.png").exists()


# ----------------------------------------------------------------------------- export: COCO


def test_export_coco_round_trip(tmp_path, dataset):
    _, recs = dataset
    before = source_hashes(recs)
    out = tmp_path / "coco" / "instances.json"
    s = export_coco(recs, str(out), class_names=["stain", "oil spot"])
    n_regions = sum(len(c) for _, c in expected_labels(recs).values())
    assert (s.images, s.unlabelled, s.regions) == (6, 1, n_regions) and n_regions == 8
    coco = json.loads(out.read_text("utf-8"))
    names = [c["name"] for c in coco["categories"]]
    assert names[:2] == ["stain", "oil spot"]  # known classes first, even if unused
    assert set(names) == {"stain", "oil spot", "错纱", "破洞", "hole", "broken needle"}
    assert [c["id"] for c in coco["categories"]] == list(range(1, len(names) + 1))
    files = [im["file_name"] for im in coco["images"]]
    assert "测试/布料 ü.png" in files and "u/unlabelled.png" not in files and "good/g1.png" in files
    img_of = {im["id"]: im for im in coco["images"]}
    for a in coco["annotations"]:
        assert isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0
        im = img_of[a["image_id"]]
        m = mask_util.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
        assert m.shape == (im["height"], im["width"]) and int(m.sum()) == a["area"]
        x, y, w, h = a["bbox"]
        ys, xs = np.nonzero(m)
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)

    got = import_coco(str(out))
    assert_same_labels(got, expected_labels(recs))
    assert source_hashes(recs) == before

    # import -> export -> import: same JSON
    out2 = tmp_path / "coco" / "again.json"
    export_coco(records_from(got, recs), str(out2), class_names=["stain", "oil spot"])
    assert json.loads(out2.read_text("utf-8")) == coco
    assert sorted(os.listdir(tmp_path / "coco")) == ["again.json", "instances.json"]


def test_import_coco_polygons_and_uncompressed_rle(tmp_path):
    h, w = 10, 12
    m = np.zeros((h, w), np.uint8)
    m[2:5, 3:9] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    # uncompressed RLE: column-major run lengths starting with zeros
    flat = m.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v == cur:
            n += 1
        else:
            runs.append(n)
            cur, n = v, 1
    runs.append(n)
    coco = {
        "images": [{"id": 1, "file_name": "./x\\a.png", "width": w, "height": h},
                   {"id": 2, "file_name": "y.png", "width": w, "height": h}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "segmentation": {"size": [h, w], "counts": runs}},
            {"id": 2, "image_id": 2, "category_id": 8, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]},
        ],
        "categories": [{"id": 7, "name": "hole"}, {"id": 8, "name": "oil"}],
    }
    p = tmp_path / "c.json"
    p.write_text(json.dumps(coco))
    got = import_coco(str(p))
    assert set(got) == {"x/a.png", "y.png"}
    assert np.array_equal(got["x/a.png"][0], mask_util.decode(rle).astype(bool)) and got["x/a.png"][1] == ["hole"]
    assert got["y.png"][0][3, 3] and got["y.png"][1] == ["oil"]
    p.write_text("{not json")
    with pytest.raises(ValueError, match="c.json"):
        import_coco(str(p))


# ----------------------------------------------------------------------------- export: labelme


def test_export_labelme_round_trip(tmp_path, dataset):
    src, recs = dataset
    before = source_hashes(recs)
    out = tmp_path / "lm"
    s = export_labelme(recs, str(out))
    assert (s.images, s.unlabelled) == (6, 1)
    assert (out / "a" / "001.json").is_file() and (out / "a" / "001.jpg.json").is_file()
    doc = json.loads((out / "测试" / "布料 ü.json").read_text("utf-8"))
    assert doc["imageData"] is None and (doc["imageWidth"], doc["imageHeight"]) == (60, 40)
    assert doc["version"] and doc["flags"] == {}
    img_path = os.path.normpath(os.path.join(out, "测试", doc["imagePath"]))
    assert not os.path.isabs(doc["imagePath"]) and os.path.samefile(img_path, src / "测试" / "布料 ü.png")
    assert [sh["shape_type"] for sh in doc["shapes"]] == ["mask"] * 3
    assert sorted(sh["label"] for sh in doc["shapes"]) == ["破洞", "错纱", "错纱"]
    sh = doc["shapes"][0]
    (x1, y1), (x2, y2) = sh["points"]
    import base64

    crop = cv2.imdecode(np.frombuffer(base64.b64decode(sh["mask"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert crop.shape == (int(y2 - y1 + 1), int(x2 - x1 + 1))
    assert json.loads((out / "good" / "g1.json").read_text("utf-8"))["shapes"] == []

    got = import_labelme(str(out))
    assert_same_labels(got, expected_labels(recs))
    assert source_hashes(recs) == before

    export_labelme(records_from(got, recs), str(tmp_path / "lm2"))
    assert_same_labels(import_labelme(str(tmp_path / "lm2")), expected_labels(recs))
    # file names of shared stems (a/001.png, a/001.jpg) follow record order; content must match
    def docs(folder):
        ds = [json.loads(p.read_text("utf-8")) for p in folder.rglob("*.json")]
        return {d["annotatorRelPath"]: (d["shapes"], d["imageWidth"], d["imageHeight"]) for d in ds}

    assert docs(out) == docs(tmp_path / "lm2")


def test_import_labelme_foreign_files(tmp_path):
    d = tmp_path / "ann"
    put(d / "img" / "p.png", h=20, w=30)
    doc = {
        "version": "5.2.1", "flags": {}, "imagePath": "img/p.png", "imageData": None,
        "imageHeight": 20, "imageWidth": 30,
        "shapes": [
            {"label": "hole", "points": [[2, 2], [10, 2], [10, 8], [2, 8]], "shape_type": "polygon"},
            {"label": "stain", "points": [[20, 10], [25, 15]], "shape_type": "rectangle"},
            {"label": "x", "points": [[1, 1]], "shape_type": "point"},
        ],
    }
    (d / "p.json").write_text(json.dumps(doc))
    (d / "coco.json").write_text(json.dumps({"images": []}))  # not labelme: ignored
    (d / "broken.json").write_text("{")
    errors: list = []
    got = import_labelme(str(d), errors)
    assert set(got) == {"img/p.png"}
    m, c = got["img/p.png"]
    assert c == ["hole", "stain"]
    assert m[5, 5] and m[12, 22] and not m[0, 0] and not m[15, 5]
    reasons = dict(errors)
    assert "broken.json" in reasons and "point" in reasons["p.json"]
    with pytest.raises(ValueError, match="broken.json"):
        import_labelme(str(d))


def test_exports_accept_generators_and_report_progress(tmp_path, dataset):
    _, recs = dataset
    seen = []
    s = export_coco((r for r in recs), str(tmp_path / "g.json"), on_progress=lambda d, t, m: seen.append(t))
    assert s.images == 6 and set(seen) == {0}  # total unknown for a generator
    tok = CancelToken()
    tok.cancel()
    with pytest.raises(Cancelled):
        export_labelme(recs, str(tmp_path / "x"), cancel=tok)
