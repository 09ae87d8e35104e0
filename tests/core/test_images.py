"""Robust image I/O: every odd input a fabric folder can hold."""
from __future__ import annotations

import hashlib
import os
import struct
import time
import zlib

import cv2
import numpy as np
import pytest

try:
    import resource  # Unix only
except ImportError:  # pragma: no cover
    resource = None

from annotator.core import images
from annotator.core.images import (
    ImageError,
    image_size,
    load_image,
    load_mask,
    probe_image,
    save_png_atomic,
    sha256_file,
)


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _enc(ext: str, img: np.ndarray, params=()) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


def _chunk(t: bytes, d: bytes) -> bytes:
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)


def _png(w, h, color_type, bit_depth, idat: bytes, extra: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _texture(h=40, w=60, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tif", ".tiff", ".webp"])
def test_lossless_formats_load_exactly(tmp_path, ext):
    img = _texture()
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else []
    p = _write(str(tmp_path / f"a{ext}"), _enc(ext, img, params))
    assert image_size(p) == (60, 40)
    out = load_image(p)
    assert out.dtype == np.uint8 and out.shape == (40, 60, 3)
    assert np.array_equal(out, img)


def test_jpeg_loads_and_sniffs_content_not_extension(tmp_path):
    img = cv2.resize(_texture(4, 6), (60, 40), interpolation=cv2.INTER_LINEAR)  # smooth
    p = _write(str(tmp_path / "really_a_jpeg.png"), _enc(".jpg", img))
    assert probe_image(p).format == "jpeg"
    out = load_image(p)
    assert out.shape == (40, 60, 3)
    assert np.abs(out.astype(int) - img).mean() < 8


def test_grayscale_becomes_three_equal_channels(tmp_path):
    g = np.arange(12 * 7, dtype=np.uint8).reshape(7, 12)
    p = _write(str(tmp_path / "g.png"), _enc(".png", g))
    out = load_image(p)
    assert out.shape == (7, 12, 3)
    assert all(np.array_equal(out[:, :, c], g) for c in range(3))


def test_16bit_scaled_by_full_range_or_stretched(tmp_path):
    g = np.array([[0, 257, 65535], [1000, 4095, 32768]], dtype=np.uint16)
    p = _write(str(tmp_path / "d16.png"), _enc(".png", g))
    out = load_image(p)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert out[:, :, 0].tolist() == [[0, 1, 255], [4, 16, 128]]  # value / 257, rounded
    st = load_image(p, stretch_16bit=True)[:, :, 0]
    assert st[0, 0] == 0 and st[0, 2] == 255


def test_16bit_colour_tiff(tmp_path):
    img = (np.random.default_rng(1).integers(0, 65536, (5, 6, 3))).astype(np.uint16)
    p = _write(str(tmp_path / "c16.tif"), _enc(".tif", img))
    out = load_image(p)
    assert out.shape == (5, 6, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - np.round(img / 257)).max() <= 1


def test_float_tiff_in_unit_range(tmp_path):
    f = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
    p = _write(str(tmp_path / "f.tif"), _enc(".tif", f))
    out = load_image(p)
    assert out.shape == (4, 5, 3) and out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_rgba_alpha_is_dropped(tmp_path):
    img = _texture(6, 8)
    rgba = np.dstack([img, np.zeros((6, 8), np.uint8)])  # fully transparent
    p = _write(str(tmp_path / "rgba.png"), _enc(".png", rgba))
    assert np.array_equal(load_image(p), img)


def test_palette_png_and_palette_with_transparency(tmp_path):
    plte = _chunk(b"PLTE", bytes([255, 0, 0, 0, 255, 0, 0, 0, 255]))
    raw = zlib.compress(b"\x00" + bytes([0, 1, 2]) + b"\x00" + bytes([2, 1, 0]))
    p = _write(str(tmp_path / "pal.png"), _png(3, 2, 3, 8, raw, plte))
    out = load_image(p)
    assert out.shape == (2, 3, 3)
    assert out[0].tolist() == [[0, 0, 255], [0, 255, 0], [255, 0, 0]]  # BGR of red, green, blue
    p2 = _write(str(tmp_path / "pal_trns.png"), _png(3, 2, 3, 8, raw, plte + _chunk(b"tRNS", bytes([0, 128]))))
    assert np.array_equal(load_image(p2), out)


def test_one_bit_and_gray_alpha_png(tmp_path):
    p = _write(str(tmp_path / "bit.png"), _png(8, 1, 0, 1, zlib.compress(b"\x00" + bytes([0b10100000]))))
    assert load_image(p)[0, :, 0].tolist() == [255, 0, 255, 0, 0, 0, 0, 0]
    p = _write(str(tmp_path / "la.png"), _png(2, 1, 4, 8, zlib.compress(b"\x00" + bytes([10, 255, 20, 0]))))
    assert load_image(p)[0].tolist() == [[10, 10, 10], [20, 20, 20]]


# ----------------------------------------------------------------------------- bad files


def test_zero_byte_file(tmp_path):
    p = _write(str(tmp_path / "empty.png"), b"")
    for fn in (load_image, image_size, load_mask):
        with pytest.raises(ImageError) as e:
            fn(p)
        assert "empty.png" in str(e.value) and "empty file" in str(e.value)
        assert "\n" not in str(e.value)


def test_text_file_named_png(tmp_path):
    p = _write(str(tmp_path / "notes.png"), b"this is not an image\n" * 10)
    for fn in (load_image, image_size):
        with pytest.raises(ImageError, match="not an image file"):
            fn(p)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(str(tmp_path / "nope.png"))
    with pytest.raises(ImageError, match="folder"):
        load_image(str(tmp_path))
    with pytest.raises(ImageError, match="folder"):
        image_size(str(tmp_path))


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif", ".webp"])
def test_truncated_files(tmp_path, ext):
    data = _enc(ext, _texture(64, 64))
    p = _write(str(tmp_path / f"cut{ext}"), data[: len(data) // 2])
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert f"cut{ext}" in str(e.value)
    if ext != ".tif":  # TIFF: the header alone cannot tell, decoding does
        with pytest.raises(ImageError, match="truncated"):
            image_size(p)


def test_corrupt_inside_png_detected_on_load(tmp_path):
    data = bytearray(_enc(".png", _texture(64, 64)))
    mid = len(data) // 2
    data[mid : mid + 50] = bytes(50)
    p = _write(str(tmp_path / "bad.png"), bytes(data))
    assert image_size(p) == (64, 64)  # header and end chunk are intact
    with pytest.raises(ImageError, match="corrupt"):
        load_image(p)


def test_damaged_header(tmp_path):
    p = _write(str(tmp_path / "h.png"), b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ImageError, match="damaged PNG header"):
        image_size(p)
    p = _write(str(tmp_path / "h.jpg"), b"\xff\xd8\xff\xe0\x00")
    with pytest.raises(ImageError):
        image_size(p)


def test_jpeg_with_long_trailer_is_complete(tmp_path):
    data = _enc(".jpg", _texture()) + b"\x00" * (200 * 1024)
    p = _write(str(tmp_path / "trailer.jpg"), data)
    assert image_size(p) == (60, 40)
    assert load_image(p).shape == (40, 60, 3)


# ----------------------------------------------------------------------------- big images


def _big_png(path, w, h) -> str:
    """A w x h grey PNG written row by row: never holds the image in memory."""
    comp = zlib.compressobj(1)
    row = b"\x00" + b"\x80" * w
    parts, left = [], h
    while left:
        n = min(left, 1000)
        parts.append(comp.compress(row * n))
        left -= n
    parts.append(comp.flush())
    return _write(path, _png(w, h, 0, 8, b"".join(parts)))


def test_large_image_12000x9000(tmp_path):
    p = _big_png(str(tmp_path / "big.png"), 12000, 9000)
    assert os.path.getsize(p) < 2_000_000
    t = time.perf_counter()
    assert image_size(p) == (12000, 9000)
    assert time.perf_counter() - t < 0.1  # header only
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if resource else 0  # KiB on Linux
    t = time.perf_counter()
    img = load_image(p)
    assert time.perf_counter() - t < 10
    assert img.shape == (9000, 12000, 3) and img.dtype == np.uint8
    assert img[4500, 6000].tolist() == [128, 128, 128]
    # 324 MB of BGR output + 108 MB decoded grey; nothing like a float copy on top
    if resource and os.uname().sysname == "Linux":
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 700 * 1024


def test_absurd_size_refused_before_decoding(tmp_path):
    # header claims 20000 x 20000 (400 MP); the data is garbage but is never decoded
    p = _write(str(tmp_path / "huge.png"), _png(20000, 20000, 2, 8, b"x" * 100))
    t = time.perf_counter()
    for fn in (image_size, load_image, load_mask):
        with pytest.raises(ImageError, match=r"too large: 20000x20000 = 400 MP \(limit 300 MP\)"):
            fn(p)
    assert time.perf_counter() - t < 0.5
    small = _big_png(str(tmp_path / "s.png"), 100, 100)
    with pytest.raises(ImageError, match="too large"):
        load_image(small, max_pixels=5000)
    assert image_size(p, max_pixels=None) == (20000, 20000)


def test_header_sizes_match_decoder(tmp_path):
    img = _texture(33, 71)
    cases = {
        ".png": [], ".jpg": [], ".bmp": [], ".tif": [], ".webp": [],
        "_lossless.webp": [cv2.IMWRITE_WEBP_QUALITY, 101],
        "_progressive.jpg": [cv2.IMWRITE_JPEG_PROGRESSIVE, 1],
    }
    for suffix, params in cases.items():
        ext = os.path.splitext(suffix)[1] or suffix
        p = _write(str(tmp_path / f"x{suffix}"), _enc(ext, img, params))
        assert image_size(p) == (71, 33), suffix
    gray_bmp = _write(str(tmp_path / "g.bmp"), _enc(".bmp", img[:, :, 0]))
    assert image_size(gray_bmp) == (71, 33)


# ----------------------------------------------------------------------------- masks


def test_load_mask_any_nonzero_and_colour(tmp_path):
    m = np.zeros((10, 12, 3), np.uint8)
    m[1, 1] = (0, 0, 200)  # red
    m[2, 3] = (1, 0, 0)
    m[5:7, 5:9] = 255
    p = _write(str(tmp_path / "m.png"), _enc(".png", m))
    mask = load_mask(p, expected_size=(12, 10))
    assert mask.dtype == bool and mask.shape == (10, 12)
    assert mask.sum() == 2 + 8 and mask[1, 1] and mask[2, 3]
    g = np.zeros((10, 12), np.uint8)
    g[3, 4] = 1
    p = _write(str(tmp_path / "g.png"), _enc(".png", g))
    assert load_mask(p).sum() == 1


def test_load_mask_rgba_needs_opaque_colour(tmp_path):
    m = np.zeros((4, 4, 4), np.uint8)
    m[0, 0] = (255, 255, 255, 255)
    m[1, 1] = (255, 255, 255, 0)  # transparent
    m[2, 2] = (0, 0, 0, 255)  # opaque black
    p = _write(str(tmp_path / "a.png"), _enc(".png", m))
    assert np.argwhere(load_mask(p)).tolist() == [[0, 0]]


def test_load_mask_wrong_size_names_both(tmp_path):
    p = _write(str(tmp_path / "m.png"), _enc(".png", np.zeros((10, 12), np.uint8)))
    with pytest.raises(ImageError) as e:
        load_mask(p, expected_size=(13, 10))
    msg = str(e.value)
    assert "m.png" in msg and "12x10" in msg and "13x10" in msg


# ----------------------------------------------------------------------------- non-ASCII + writing


def test_non_ascii_paths(tmp_path):
    p = str(tmp_path / "测试" / "布料 ü.png")
    img = _texture()
    save_png_atomic(p, img)
    assert os.path.isfile(p)
    assert image_size(p) == (60, 40)
    assert np.array_equal(load_image(p), img)
    mp = str(tmp_path / "测试" / "布料 ü_mask.png")
    mask = np.zeros((40, 60), bool)
    mask[3:9, 4:20] = True
    save_png_atomic(mp, mask)
    assert np.array_equal(load_mask(mp, (60, 40)), mask)
    raw = cv2.imdecode(np.fromfile(mp, np.uint8), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint8 and set(np.unique(raw)) == {0, 255}
    with open(p, "rb") as f:
        assert sha256_file(p) == hashlib.sha256(f.read()).hexdigest()


def test_save_png_atomic_replaces_and_leaves_no_temp(tmp_path):
    p = str(tmp_path / "sub" / "x.png")
    save_png_atomic(p, np.zeros((3, 3), np.uint8))
    save_png_atomic(p, np.full((3, 3), 7, np.uint8), fsync=False)
    assert load_image(p)[0, 0, 0] == 7
    assert os.listdir(tmp_path / "sub") == ["x.png"]
    save_png_atomic(str(tmp_path / "d16.png"), np.full((2, 2), 4000, np.uint16))
    assert cv2.imdecode(np.fromfile(str(tmp_path / "d16.png"), np.uint8), cv2.IMREAD_UNCHANGED).dtype == np.uint16


def test_save_png_atomic_failure_keeps_old_file(tmp_path, monkeypatch):
    p = str(tmp_path / "keep.png")
    save_png_atomic(p, np.full((3, 3), 9, np.uint8))

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(images.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_png_atomic(p, np.zeros((3, 3), np.uint8))
    monkeypatch.undo()
    assert load_image(p)[0, 0, 0] == 9
    assert os.listdir(tmp_path) == ["keep.png"]


def test_sha256_file_streams(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    p = _write(str(tmp_path / "blob.bin"), data)
    assert sha256_file(p, chunk_size=65536) == hashlib.sha256(data).hexdigest()
