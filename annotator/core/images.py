"""Robust image and mask I/O (stdlib + numpy + OpenCV only).

Decisions (one place, so the GUI, the CLI and the models all see the same pixels):

* **Bytes first.** Files are read with ``open()`` and decoded with ``cv2.imdecode``,
  never ``cv2.imread``: the latter fails on non-ASCII paths on some platforms.
  Writes go through ``cv2.imencode`` and a temp file + ``os.replace`` for the same reason.
* **The format is sniffed from the content**, not the extension: a JPEG named ``.png``
  loads, a text file named ``.png`` is an :class:`ImageError`.
* **Output is uint8 H x W x 3 BGR**, pixel data as stored:
  - 16-bit samples are scaled by the full 16-bit range (value / 257, rounded), so the
    same sample value maps to the same 8-bit value in every image; a per-image stretch
    would make a flat, dark fabric look like a high-contrast one to the anomaly model.
    ``stretch_16bit=True`` stretches by the image's actual min..max instead (useful for
    12-bit sensors stored in 16-bit containers, which otherwise look dark).
  - float images: values in [0, 1] are scaled by 255, anything else is clipped to 0..255.
  - alpha is **dropped** (not composited): the colour samples are what the camera
    recorded; alpha in fabric photos is an exporter artefact, and there is no right
    background to composite on.
  - grayscale, gray+alpha, palette and 1/2/4-bit PNGs become 3 identical / expanded channels.
  - EXIF orientation is **ignored**, so the array always has the size written in the
    file header, which is the size of its mask (JPEGs from fabric cameras carry none).
* **Size from the header.** :func:`image_size` parses PNG/JPEG/BMP/TIFF/WebP headers
  (a few hundred bytes) and checks cheaply that the file is complete (PNG ``IEND``,
  JPEG ``EOI`` after the scan, BMP/WebP declared sizes), so scanning 10,000 images does
  not decode them. Images over ``max_pixels`` (default 300 MP) are refused before decoding.
"""
from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable, Optional, Union

import cv2
import numpy as np

from .masks import to_u8

PathLike = Union[str, "os.PathLike[str]"]

#: Refuse images larger than this many pixels (300 MP) before decoding them.
MAX_PIXELS = 300_000_000

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
_TAIL = 64 * 1024  # how far from the end to look for an end marker before streaming


class ImageError(Exception):
    """An image or mask file that cannot be used; ``str()`` is one human-readable line
    naming the file and the reason."""

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str  # "png", "jpeg", "bmp", "tiff", "webp" or "other"


# ----------------------------------------------------------------------------- reading


def _read_bytes(path: PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise ImageError(path, "is a folder, not an image file") from None
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except PermissionError:
        raise ImageError(path, "permission denied") from None
    except OSError as e:
        raise ImageError(path, f"cannot read file ({e.strerror or e})") from None
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    return data


def _sniff(head: bytes) -> Optional[str]:
    if head.startswith(_PNG_SIG):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


# A reader is read(offset, n) -> bytes (shorter at EOF); used for both files and bytes.
_Reader = Callable[[int, int], bytes]


def _u16be(b: bytes, o: int) -> int:
    return struct.unpack_from(">H", b, o)[0]


def _parse_png(read: _Reader, size: int) -> tuple[int, int]:
    h = read(0, 33)
    if len(h) < 24 or h[12:16] != b"IHDR":
        raise ValueError("damaged PNG header")
    w, hh = struct.unpack_from(">II", h, 16)
    tail_at = max(8, size - 1024)
    if _PNG_IEND not in read(tail_at, size - tail_at):
        raise ValueError("truncated PNG (no end chunk)")
    return w, hh


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _parse_jpeg(read: _Reader, size: int) -> Optional[tuple[int, int]]:
    pos, wh = 2, None
    while True:
        b = read(pos, 2)
        if len(b) < 2:
            raise ValueError("truncated JPEG (header)")
        if b[0] != 0xFF:
            raise ValueError("damaged JPEG (bad marker)")
        marker = b[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xD9:
            raise ValueError("damaged JPEG (no image data)")
        seg = read(pos + 2, 7)
        if len(seg) < 2:
            raise ValueError("truncated JPEG (header)")
        seglen = _u16be(seg, 0)
        if marker in _SOF:
            if len(seg) < 7:
                raise ValueError("truncated JPEG (header)")
            hh, w = _u16be(seg, 3), _u16be(seg, 5)
            wh = (w, hh) if hh > 0 and w > 0 else None  # height 0: DNL, decode to learn it
        if marker == 0xDA:  # start of scan: header done, check the file ends with EOI
            if wh is None:
                return None
            break
        pos += 2 + seglen
    sos = pos
    start = max(sos, size - _TAIL)
    if b"\xff\xd9" in read(start, size - start):
        return wh
    # End marker not in the tail (trailing data?): stream from the scan start.
    off, prev = sos, b""
    while off < size:
        chunk = read(off, 1 << 20)
        if not chunk:
            break
        if b"\xff\xd9" in prev + chunk:
            return wh
        prev, off = chunk[-1:], off + len(chunk)
    raise ValueError("truncated JPEG (no end marker)")


def _parse_bmp(read: _Reader, size: int) -> tuple[int, int]:
    h = read(0, 34)
    if len(h) < 26:
        raise ValueError("truncated BMP header")
    bfsize, off, dib = struct.unpack_from("<I4xII", h, 2)
    if dib == 12:
        w, hh = struct.unpack_from("<HH", h, 18)
        bpp, comp = struct.unpack_from("<H", h, 24)[0], 0
    else:
        if len(h) < 34:
            raise ValueError("truncated BMP header")
        w, hh, _planes, bpp, comp = struct.unpack_from("<iiHHI", h, 18)
    hh = abs(hh)
    if w <= 0 or hh == 0:
        raise ValueError("damaged BMP header (bad size)")
    need = 0
    if comp in (0, 3) and bpp in (1, 4, 8, 16, 24, 32):
        need = off + ((w * bpp + 31) // 32) * 4 * hh
    elif 0 < bfsize:
        need = bfsize
    if size < need:
        raise ValueError(f"truncated BMP ({size} of {need} bytes)")
    return w, hh


def _parse_tiff(read: _Reader, size: int) -> Optional[tuple[int, int]]:
    h = read(0, 8)
    if len(h) < 8:
        raise ValueError("truncated TIFF header")
    if h[2:4] in (b"+\x00", b"\x00+"):
        return None  # BigTIFF: let the decoder find the size
    e = "<" if h[:2] == b"II" else ">"
    ifd = struct.unpack_from(e + "I", h, 4)[0]
    if ifd < 8 or ifd + 2 > size:
        raise ValueError("truncated TIFF (directory outside the file)")
    n = struct.unpack_from(e + "H", read(ifd, 2), 0)[0]
    entries = read(ifd + 2, 12 * n)
    if len(entries) < 12 * n:
        raise ValueError("truncated TIFF (directory)")
    w = hh = None
    for k in range(n):
        tag, typ, _cnt = struct.unpack_from(e + "HHI", entries, 12 * k)
        if tag in (256, 257):
            if typ == 3:
                v = struct.unpack_from(e + "H", entries, 12 * k + 8)[0]
            elif typ == 4:
                v = struct.unpack_from(e + "I", entries, 12 * k + 8)[0]
            else:
                return None
            if tag == 256:
                w = v
            else:
                hh = v
    if not w or not hh:
        return None
    return w, hh


def _parse_webp(read: _Reader, size: int) -> Optional[tuple[int, int]]:
    h = read(0, 30)
    if len(h) < 30:
        raise ValueError("truncated WebP header")
    riff = struct.unpack_from("<I", h, 4)[0]
    if size < riff + 8:
        raise ValueError(f"truncated WebP ({size} of {riff + 8} bytes)")
    kind = h[12:16]
    if kind == b"VP8X":
        w = 1 + int.from_bytes(h[24:27], "little")
        hh = 1 + int.from_bytes(h[27:30], "little")
        return w, hh
    if kind == b"VP8 " and h[23:26] == b"\x9d\x01\x2a":
        w, hh = struct.unpack_from("<HH", h, 26)
        return w & 0x3FFF, hh & 0x3FFF
    if kind == b"VP8L" and h[20] == 0x2F:
        bits = int.from_bytes(h[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


_PARSERS = {"png": _parse_png, "jpeg": _parse_jpeg, "bmp": _parse_bmp, "tiff": _parse_tiff, "webp": _parse_webp}


def _header_info(path: PathLike, fmt: Optional[str], read: _Reader, size: int) -> Optional[tuple[int, int]]:
    """(w, h) from the header, None when only decoding can tell. Raises ImageError."""
    if fmt is None:
        return None
    try:
        return _PARSERS[fmt](read, size)
    except (ValueError, struct.error, IndexError) as e:
        msg = str(e) if isinstance(e, ValueError) else f"damaged {fmt.upper()} header"
        raise ImageError(path, msg) from None


def _guard(path: PathLike, w: int, h: int, max_pixels: Optional[int]) -> None:
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            path,
            f"image too large: {w}x{h} = {w * h / 1e6:.0f} MP (limit {max_pixels / 1e6:.0f} MP)",
        )


def probe_image(path: PathLike, *, max_pixels: Optional[int] = MAX_PIXELS) -> ImageInfo:
    """Size and format from the file header, plus a cheap completeness check.

    Reads a few hundred bytes (and the file's tail); decodes only formats whose header
    does not give the size (BigTIFF, rare JPEG/TIFF variants, unknown signatures).
    Raises :class:`ImageError` for empty, truncated, non-image and too-large files.
    A file damaged in the middle passes; :func:`load_image` will then fail on it.
    """
    try:
        f = open(path, "rb")
    except IsADirectoryError:
        raise ImageError(path, "is a folder, not an image file") from None
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as e:
        raise ImageError(path, f"cannot read file ({e.strerror or e})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ImageError(path, "empty file (0 bytes)")

        def read(off: int, n: int) -> bytes:
            f.seek(off)
            return f.read(max(0, n))

        fmt = _sniff(read(0, 16))
        wh = _header_info(path, fmt, read, size)
    if wh is None:  # decode to learn the size
        img = _decode(path, _read_bytes(path), fmt, max_pixels)
        wh = (img.shape[1], img.shape[0])
    if wh[0] <= 0 or wh[1] <= 0:
        raise ImageError(path, f"bad image size {wh[0]}x{wh[1]}")
    _guard(path, wh[0], wh[1], max_pixels)
    return ImageInfo(wh[0], wh[1], fmt or "other")


def image_size(path: PathLike, *, max_pixels: Optional[int] = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) read from the header where possible (see :func:`probe_image`)."""
    info = probe_image(path, max_pixels=max_pixels)
    return info.width, info.height


def _decode(path: PathLike, data: bytes, fmt: Optional[str], max_pixels: Optional[int]) -> np.ndarray:
    """Raw decode (cv2.IMREAD_UNCHANGED) after header and size checks."""
    if fmt is not None:
        wh = _header_info(path, fmt, lambda o, n: data[o : o + max(0, n)], len(data))
        if wh is not None:
            _guard(path, wh[0], wh[1], max_pixels)
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "decoder error"
        raise ImageError(path, f"cannot decode image ({msg})") from None
    if img is None or img.size == 0:
        if fmt is None:
            raise ImageError(path, "not an image file (unrecognised content)")
        raise ImageError(path, f"corrupt or unsupported {fmt.upper()} data")
    if fmt is None:
        _guard(path, img.shape[1], img.shape[0], max_pixels)
    return img


def _to_u8(path: PathLike, img: np.ndarray, stretch_16bit: bool) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        if stretch_16bit:
            lo, hi = float(img.min()), float(img.max())
            if hi <= lo:
                return np.zeros(img.shape, np.uint8)
            return cv2.convertScaleAbs(img, alpha=255.0 / (hi - lo), beta=-lo * 255.0 / (hi - lo))
        return cv2.convertScaleAbs(img, alpha=1.0 / 257.0)
    if img.dtype in (np.float32, np.float64):
        img = np.nan_to_num(img.astype(np.float32, copy=False), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if float(img.max(initial=0.0)) <= 1.0 else 1.0
        return np.clip(img * scale + 0.5, 0, 255).astype(np.uint8)
    if img.dtype == np.int8 or img.dtype == np.int16 or img.dtype == np.int32:
        return np.clip(img, 0, 255).astype(np.uint8)
    raise ImageError(path, f"unsupported pixel type {img.dtype}")


def load_image(
    path: PathLike, *, max_pixels: Optional[int] = MAX_PIXELS, stretch_16bit: bool = False
) -> np.ndarray:
    """Load any supported image as uint8 H x W x 3 BGR (see the module docstring).

    Raises :class:`ImageError` (one line: file and reason) for missing, empty,
    truncated, corrupt, non-image and too-large files.
    """
    data = _read_bytes(path)
    img = _decode(path, data, _sniff(data[:16]), max_pixels)
    img = _to_u8(path, img, stretch_16bit)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim != 3:
        raise ImageError(path, f"unsupported image layout {img.shape}")
    ch = img.shape[2]
    if ch == 3:
        return img
    if ch == 4:  # BGRA: drop alpha
        return np.ascontiguousarray(img[:, :, :3])
    if ch == 2:  # gray + alpha
        return cv2.cvtColor(np.ascontiguousarray(img[:, :, 0]), cv2.COLOR_GRAY2BGR)
    raise ImageError(path, f"unsupported number of channels ({ch})")


def load_mask(
    path: PathLike,
    expected_size: Optional[tuple[int, int]] = None,
    *,
    max_pixels: Optional[int] = MAX_PIXELS,
) -> np.ndarray:
    """Load a mask image as a 2-D bool array: any non-zero pixel is defect.

    Colour masks collapse to "not black" (any colour channel non-zero); with an alpha
    channel a pixel must also be non-transparent. ``expected_size`` is ``(width,
    height)``; a mask of another size raises :class:`ImageError` naming both sizes.
    """
    data = _read_bytes(path)
    img = _decode(path, data, _sniff(data[:16]), max_pixels)
    if img.ndim == 2:
        mask = img != 0
    elif img.ndim == 3 and img.shape[2] in (1, 3):
        mask = np.any(img != 0, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4:
        mask = np.any(img[:, :, :3] != 0, axis=2) & (img[:, :, 3] != 0)
    elif img.ndim == 3 and img.shape[2] == 2:
        mask = (img[:, :, 0] != 0) & (img[:, :, 1] != 0)
    else:
        raise ImageError(path, f"unsupported mask layout {img.shape}")
    if expected_size is not None:
        ew, eh = int(expected_size[0]), int(expected_size[1])
        if (mask.shape[1], mask.shape[0]) != (ew, eh):
            raise ImageError(
                path, f"mask is {mask.shape[1]}x{mask.shape[0]} px but the image is {ew}x{eh} px"
            )
    return mask


# ----------------------------------------------------------------------------- writing


def atomic_write_bytes(path: PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to a temp file in the same folder, then ``os.replace`` it over
    ``path``: readers see the old file or the new one, never half a file. Creates the
    parent folder. ``fsync=False`` skips the flush to disk (exports of many files)."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix="." + os.path.basename(path)[:64] + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an image; a bool array becomes a 0/255 mask."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = to_u8(a)
    ok, buf = cv2.imencode(".png", a)
    if not ok:
        raise ValueError(f"cannot encode array of shape {a.shape} and type {a.dtype} as PNG")
    return buf.tobytes()


def save_png_atomic(path: PathLike, array: np.ndarray, *, fsync: bool = True) -> None:
    """Save ``array`` as PNG via temp file + ``os.replace`` (works with non-ASCII paths).
    bool arrays are written as 0/255 uint8 masks; uint8/uint16 images as they are."""
    atomic_write_bytes(path, encode_png(array), fsync=fsync)


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk_size)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
