"""Import and export formats as pure functions over plain records.

Nothing here knows about the project store: importers return plain items, exporters take
an iterable of :class:`ExportRecord` (consumed once, so masks can be loaded lazily).

Conventions:

* ``rel_path`` is a POSIX path relative to the import root; it is the image's identity
  and every round trip (masks, MVTec, COCO, labelme) gives it back unchanged.
* A mask is a 2-D bool array of the image's size, or ``None`` = not labelled. A record
  whose ``role`` is ``"good"`` (a known defect-free training image) counts as labelled
  with an empty mask in COCO/labelme.
* ``region_classes`` holds one class name per connected region of the mask, in the order
  of :func:`annotator.core.masks.label_regions`; an empty list means "all regions are
  ``defect_kind`` (or ``"defect"``)".
* Every single file is written atomically (temp file in the same folder + ``os.replace``,
  no fsync: an export can be redone); source images are only ever read, and an export
  refuses to write over one (all sources are known up front when ``records`` is a
  sequence; with a generator, only those already seen).
* Exporters take ``on_progress(done, total, message)`` and ``cancel`` like every verb;
  ``total`` is 0 when ``records`` has no ``len()``.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import unicodedata
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Optional, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_util

from .images import (
    MAX_PIXELS,
    ImageError,
    atomic_write_bytes,
    encode_png,
    image_size,
    load_image,
    load_mask,
    sha256_file,
)
from .jobs import CancelToken, ProgressFn, check_cancel, no_progress
from .masks import as_bool, label_regions

log = logging.getLogger(__name__)

ROLE_GOOD = "good"  # defect-free image for training model 1 (MVTec train/good)
ROLE_LABEL = "label"  # image to be labelled (MVTec test/*)

#: File extensions treated as images when scanning (compared case-insensitively).
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

MVTEC_MANIFEST = "manifest.json"
MASKS_SIDECAR = "annotator_masks.json"
LABELME_VERSION = "5.5.0"
DEFAULT_CLASS = "defect"


class NotMvtecError(ValueError):
    """The folder is not an MVTec AD category folder."""


# ============================================================================ helpers


def _posix_rel(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _key(rel: str) -> str:
    """Comparison key for names on case-insensitive / NFD file systems."""
    return unicodedata.normalize("NFC", rel).casefold()


def _check_rel(rel_path: str) -> str:
    p = rel_path.replace("\\", "/")
    parts = p.split("/")
    if not p or p.startswith("/") or re.match(r"^[A-Za-z]:", p) or ".." in parts or "" in parts:
        raise ValueError(f"rel_path must be a relative POSIX path inside the project: {rel_path!r}")
    return p


def _split(rel: str) -> tuple[str, str, str, str]:
    """(parent, name, stem, ext) of a POSIX rel path."""
    parent, name = posixpath.split(rel)
    stem, ext = posixpath.splitext(name)
    return parent, name, stem, ext


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_files(root: str, exts: Optional[frozenset] = None) -> list[tuple[str, str]]:
    """(rel_path, abs_path) of files under root, sorted; skips hidden files/folders and
    does not follow folder symlinks."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for fn in sorted(filenames):
            if _is_hidden(fn):
                continue
            if exts is not None and os.path.splitext(fn)[1].lower() not in exts:
                continue
            ap = os.path.join(dirpath, fn)
            out.append((_posix_rel(ap, root), os.path.abspath(ap)))
    out.sort(key=lambda t: t[0])
    return out


def _require_dir(root: str) -> str:
    root = os.fspath(root)
    if not os.path.exists(root):
        raise FileNotFoundError(f"{root}: folder not found")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root}: not a folder")
    return root


def _total(items: Iterable) -> int:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return 0


def _write_json(path: str, obj, *, indent: Optional[int] = None) -> None:
    data = json.dumps(obj, ensure_ascii=False, indent=indent, separators=None if indent else (",", ":"))
    atomic_write_bytes(path, data.encode("utf-8"), fsync=False)


def _read_json(path: str):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None


def _copy_atomic(src: str, dst: str) -> None:
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix="." + os.path.basename(dst)[:64] + ".", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ============================================================================ folder scan


@dataclass(frozen=True)
class ImportItem:
    rel_path: str  # POSIX, relative to the scanned root
    abs_path: str
    width: int
    height: int
    sha256: str


@dataclass
class ScanReport:
    root: str
    items: list[ImportItem] = field(default_factory=list)
    #: (rel_path, reason) for image-named files that cannot be used; never raised.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: groups of rel_paths with identical content (same SHA-256); all of them are kept in
    #: ``items`` (a duplicate is still a distinct file the user chose), listed for the UI.
    duplicates: list[list[str]] = field(default_factory=list)


def _probe_item(rel: str, ap: str, verify: bool, max_pixels: Optional[int]) -> ImportItem:
    w, h = image_size(ap, max_pixels=max_pixels)
    if verify:
        img = load_image(ap, max_pixels=max_pixels)
        if (img.shape[1], img.shape[0]) != (w, h):
            raise ImageError(ap, f"header says {w}x{h} but the data is {img.shape[1]}x{img.shape[0]}")
    try:
        digest = sha256_file(ap)
    except OSError as e:
        raise ImageError(ap, f"cannot read file ({e.strerror or e})") from None
    return ImportItem(rel, ap, w, h, digest)


def _probe_all(
    files: list[tuple[str, str]],
    verify: bool,
    max_pixels: Optional[int],
    workers: int,
    on_progress: ProgressFn,
    cancel: Optional[CancelToken],
) -> Iterator[tuple[str, object]]:
    """(rel, ImportItem | ImageError) in ``files`` order; probes run on ``workers``
    threads (file reads and hashing release the GIL), at most 2 x workers ahead."""

    def one(rel: str, ap: str):
        try:
            return _probe_item(rel, ap, verify, max_pixels)
        except ImageError as e:
            return e

    total = len(files)
    if workers <= 1:
        for i, (rel, ap) in enumerate(files):
            check_cancel(cancel)
            on_progress(i, total, rel)
            yield rel, one(rel, ap)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan") as pool:
            pending: deque = deque()
            it = iter(files)
            try:
                for i in range(total):
                    while len(pending) < 2 * workers:
                        nxt = next(it, None)
                        if nxt is None:
                            break
                        pending.append((nxt[0], pool.submit(one, *nxt)))
                    check_cancel(cancel)
                    rel, fut = pending.popleft()
                    on_progress(i, total, rel)
                    yield rel, fut.result()
            finally:
                for _, fut in pending:
                    fut.cancel()
    on_progress(total, total, "")


def _duplicates(items: Iterable) -> list[list[str]]:
    by_hash: dict[str, list[str]] = defaultdict(list)
    for it in items:
        by_hash[it.sha256].append(it.rel_path)
    return sorted(sorted(v) for v in by_hash.values() if len(v) > 1)


def scan_folder(
    root: str,
    *,
    verify: bool = False,
    max_pixels: Optional[int] = MAX_PIXELS,
    workers: int = 4,
    on_progress: ProgressFn = no_progress,
    cancel: Optional[CancelToken] = None,
) -> ScanReport:
    """List the images under ``root`` (recursively, files with an :data:`IMAGE_EXTS`
    extension, hidden files and folders ignored).

    Each readable image becomes an :class:`ImportItem` (size from the header, SHA-256
    of the bytes); each unusable one (empty, truncated, not an image, too large…) a
    ``(rel_path, reason)`` in ``skipped``. A bad file never raises. ``verify=True``
    decodes every image as well (slow, but also catches damage inside the data).
    ``workers`` threads read and hash files in parallel; results keep a sorted order.
    ``a.png`` and ``a.jpg`` are two items; identical files are all kept and listed
    in ``duplicates``.
    """
    root = _require_dir(root)
    files = _walk_files(root, IMAGE_EXTS)
    report = ScanReport(root=os.path.abspath(root))
    for rel, res in _probe_all(files, verify, max_pixels, workers, on_progress, cancel):
        if isinstance(res, ImageError):
            report.skipped.append((rel, res.reason))
        else:
            report.items.append(res)
    report.duplicates = _duplicates(report.items)
    return report


# ============================================================================ MVTec scan


@dataclass(frozen=True)
class MvtecItem:
    rel_path: str
    abs_path: str
    width: int
    height: int
    sha256: str
    role: str  # ROLE_GOOD for train/good, ROLE_LABEL for test/**
    defect_kind: Optional[str]  # test/<kind> folder name ("good" for test/good); None for train
    mask_path: Optional[str] = None  # ground-truth mask (only with_labels)
    labelled: bool = False  # with_labels and the label is known (test/good, or a mask exists)
    region_classes: Optional[tuple[str, ...]] = None  # from an annotator manifest, if any

    def load_label(self) -> Optional[tuple[np.ndarray, list[str]]]:
        """(mask, region_classes) for a labelled item, else None. test/good gives an
        empty mask; a defect mask's regions are all ``defect_kind`` unless the export
        manifest recorded per-region classes (used when the region count matches)."""
        if not self.labelled:
            return None
        if self.mask_path is None:
            return np.zeros((self.height, self.width), bool), []
        mask = load_mask(self.mask_path, (self.width, self.height))
        n = len(label_regions(mask)[1])
        if self.region_classes is not None and len(self.region_classes) == n:
            return mask, list(self.region_classes)
        return mask, [self.defect_kind or DEFAULT_CLASS] * n


@dataclass
class MvtecScan:
    root: str
    items: list[MvtecItem] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)
    defect_kinds: list[str] = field(default_factory=list)  # test/ folders other than good
    missing_masks: list[str] = field(default_factory=list)  # defect images without a mask (with_labels)
    unmatched_masks: list[str] = field(default_factory=list)  # ground_truth files matching no image
    from_manifest: bool = False  # rel_paths restored from an annotator export manifest


def _not_mvtec(root: str) -> NotMvtecError:
    subs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not _is_hidden(d))
    cats = [d for d in subs if os.path.isdir(os.path.join(root, d, "train", "good"))]
    if cats:
        shown = ", ".join(cats[:8]) + (", …" if len(cats) > 8 else "")
        return NotMvtecError(
            f"{root} is the MVTec AD dataset folder, not one category: choose one of {shown}"
        )
    found = ", ".join(subs[:8]) or "no folders"
    return NotMvtecError(
        f"{root} is not an MVTec AD category folder: expected train/good/ and/or "
        f"test/<defect kind>/ (found: {found})"
    )


def _read_manifest(root: str) -> dict[str, dict]:
    p = os.path.join(root, MVTEC_MANIFEST)
    if not os.path.isfile(p):
        return {}
    try:
        data = _read_json(p)
    except ValueError as e:
        log.warning("ignoring manifest: %s", e)
        return {}
    if not isinstance(data, dict) or data.get("format") != "annotator-mvtec":
        return {}
    return {e["path"]: e for e in data.get("items", []) if isinstance(e, dict) and "path" in e}


def scan_mvtec(
    root: str,
    with_labels: bool = False,
    *,
    verify: bool = False,
    max_pixels: Optional[int] = MAX_PIXELS,
    workers: int = 4,
    on_progress: ProgressFn = no_progress,
    cancel: Optional[CancelToken] = None,
) -> MvtecScan:
    """Scan one MVTec AD category folder.

    ``train/good/*`` → role good; ``test/<kind>/**`` → role label with ``defect_kind``
    = ``<kind>`` (``"good"`` for test/good). With ``with_labels``, the mask of
    ``test/<kind>/<stem>.*`` is ``ground_truth/<kind>/<stem>_mask.png`` and test/good
    images count as labelled defect-free. If the folder holds an annotator
    ``manifest.json`` (written by :func:`export_mvtec`), the original rel_paths and
    per-region classes are restored. Raises :class:`NotMvtecError` for other folders.
    """
    root = os.path.abspath(_require_dir(root))
    has_train = os.path.isdir(os.path.join(root, "train", "good"))
    test_dir = os.path.join(root, "test")
    has_test = os.path.isdir(test_dir) and any(
        os.path.isdir(os.path.join(test_dir, d)) for d in os.listdir(test_dir)
    )
    if not (has_train or has_test):
        raise _not_mvtec(root)

    manifest = _read_manifest(root)
    scan = MvtecScan(root=root, from_manifest=bool(manifest))
    files = _walk_files(root, IMAGE_EXTS)
    gt_files = {rel: ap for rel, ap in files if rel.startswith("ground_truth/")}
    gt_by_key = {_key(rel): rel for rel in gt_files}
    claimed: dict[str, list[int]] = defaultdict(list)
    candidates = []
    for rel, ap in files:
        parts = rel.split("/")
        if rel.startswith("ground_truth/"):
            continue
        if len(parts) >= 3 and (parts[0] == "test" or parts[:2] == ["train", "good"]):
            candidates.append((rel, ap))
        else:
            scan.skipped.append((rel, "outside the MVTec layout (train/good/, test/<kind>/)"))
    kinds = set()
    for rel, base in _probe_all(candidates, verify, max_pixels, workers, on_progress, cancel):
        if isinstance(base, ImageError):
            scan.skipped.append((rel, base.reason))
            continue
        parts = rel.split("/")
        role, kind = (ROLE_GOOD, None) if parts[0] == "train" else (ROLE_LABEL, parts[1])
        entry = manifest.get(rel)
        out_rel = entry.get("rel_path", rel) if entry else rel
        classes = entry.get("region_classes") if entry else None
        item = MvtecItem(
            out_rel, base.abs_path, base.width, base.height, base.sha256, role, kind,
            region_classes=tuple(classes) if isinstance(classes, list) else None,
        )
        if with_labels and role == ROLE_LABEL:
            if kind == "good":
                item = _replace(item, labelled=True)
            else:
                kinds.add(kind)
                stem = posixpath.splitext("/".join(parts[2:]))[0]
                want = _key(f"ground_truth/{kind}/{stem}_mask.png")
                if want in gt_by_key:
                    claimed[gt_by_key[want]].append(len(scan.items))
        elif role == ROLE_LABEL and kind != "good":
            kinds.add(kind)
        scan.items.append(item)

    if with_labels:
        for gt_rel, idxs in claimed.items():
            if len(idxs) == 1:  # a mask claimed by two images (a.png, a.jpg) is ambiguous
                i = idxs[0]
                scan.items[i] = _replace(scan.items[i], mask_path=gt_files[gt_rel], labelled=True)
        used = {gt for gt, idxs in claimed.items() if len(idxs) == 1}
        scan.unmatched_masks = sorted(gt for gt in gt_files if gt not in used)
        scan.missing_masks = [
            it.rel_path for it in scan.items
            if it.role == ROLE_LABEL and it.defect_kind != "good" and it.mask_path is None
        ]
    scan.defect_kinds = sorted(kinds)
    scan.duplicates = _duplicates(scan.items)
    return scan


def _replace(item: MvtecItem, **kw) -> MvtecItem:
    return replace(item, **kw)


# ============================================================================ mask folders


@dataclass
class MaskMatch:
    #: rel_path → absolute path of its mask file
    matched: dict[str, str] = field(default_factory=dict)
    #: mask files (POSIX, relative to mask_dir) that matched no image
    unmatched: list[str] = field(default_factory=list)
    #: mask file → the several rel_paths it could belong to (a.png and a.jpg); not matched
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    #: per-region classes restored from an annotator export sidecar, where present
    region_classes: dict[str, list[str]] = field(default_factory=dict)


def _mask_candidates(rel: str) -> list[str]:
    parent, name, stem, _ext = _split(rel)
    pre = parent + "/" if parent else ""
    cands = [f"{pre}{name}_mask.png", f"{pre}{stem}_mask.png"]
    parts = rel.split("/")
    if "test" in parts[:-1]:  # MVTec: test/x/001.png ↔ ground_truth/x/001_mask.png
        k = len(parts) - 2 - parts[:-1][::-1].index("test")
        rest = parts[k + 1 : -1] + [f"{stem}_mask.png"]
        cands.append("/".join(parts[:k] + ["ground_truth"] + rest))
        cands.append("/".join(rest))
    cands.append(f"{pre}{stem}.png")
    return cands


def match_masks(mask_dir: str, rel_paths: Iterable[str], *, image_root: Optional[str] = None) -> MaskMatch:
    """Match a folder of PNG masks to images by relative path.

    For image ``d/001.jpg`` the mask is the first that exists of ``d/001.jpg_mask.png``
    (written by :func:`export_masks` when two images share a stem), ``d/001_mask.png``,
    ``d/001.png``; for MVTec-style ``…/test/x/001.png`` also ``…/ground_truth/x/001_mask.png``
    (mask_dir = the category folder) and ``x/001_mask.png`` (mask_dir = ground_truth).
    Names are compared exactly, then ignoring case and Unicode normalisation.

    Pass ``image_root`` (the folder the rel_paths are relative to) whenever the masks may
    live in or under it (e.g. an MVTec category folder): the images themselves are then
    never taken for masks (``d/001.png`` would otherwise be its own ``<stem>.png`` mask).
    """
    mask_dir = _require_dir(mask_dir)
    rel_paths = [r.replace("\\", "/") for r in rel_paths]
    files = dict(_walk_files(mask_dir, frozenset({".png"})))
    if image_root is not None:
        images = {os.path.normcase(os.path.realpath(os.path.join(image_root, *r.split("/")))) for r in rel_paths}
        files = {m: p for m, p in files.items() if os.path.normcase(os.path.realpath(p)) not in images}
    by_key = {_key(rel): rel for rel in files}
    proposals: dict[str, list[str]] = defaultdict(list)
    for rel in rel_paths:
        for cand in _mask_candidates(rel):
            hit = cand if cand in files else by_key.get(_key(cand))
            if hit is not None:
                proposals[hit].append(rel)
                break
    result = MaskMatch()
    for mrel, rels in proposals.items():
        if len(rels) == 1:
            result.matched[rels[0]] = files[mrel]
        else:
            result.ambiguous[mrel] = sorted(rels)
    result.unmatched = sorted(m for m in files if m not in proposals)

    side = os.path.join(mask_dir, MASKS_SIDECAR)
    if os.path.isfile(side):
        try:
            data = _read_json(side)
        except ValueError as e:
            log.warning("ignoring %s", e)
            data = None
        if isinstance(data, dict) and data.get("format") == "annotator-masks":
            for rel, entry in (data.get("masks") or {}).items():
                mp = result.matched.get(rel)
                if mp and isinstance(entry, dict) and _posix_rel(mp, mask_dir) == entry.get("mask"):
                    result.region_classes[rel] = list(entry.get("region_classes") or [])
    return result


# ============================================================================ export


@dataclass(frozen=True, eq=False)
class ExportRecord:
    rel_path: str
    image_path: str
    width: int
    height: int
    role: str  # ROLE_GOOD or ROLE_LABEL
    mask: Optional[np.ndarray] = None  # bool H x W; None = not labelled
    region_classes: Sequence[str] = ()  # one per region of label_regions(mask); may be empty
    defect_kind: Optional[str] = None  # class for all regions when region_classes is empty


@dataclass
class ExportSummary:
    out: str
    images: int = 0  # images written (a mask PNG, a JSON entry/file, a copied image)
    defective: int = 0  # of which with at least one region
    defect_free: int = 0  # of which labelled with an empty mask (or role good)
    regions: int = 0  # connected regions written
    unlabelled: int = 0  # records with mask None (masks: written all-zero; others: skipped)
    skipped: int = 0  # records not written (unlabelled; role good for export_masks; unreadable)
    # MVTec: images whose file could not be copied (moved, deleted or unreadable since the import), one line
    # each; they are left out, the rest is written
    unreadable: list = field(default_factory=list)


def _mask_of(rec: ExportRecord) -> Optional[np.ndarray]:
    """The record's mask (validated), an empty mask for role good, None if unlabelled."""
    _check_rel(rec.rel_path)
    if rec.mask is None:
        return np.zeros((rec.height, rec.width), bool) if rec.role == ROLE_GOOD else None
    m = as_bool(rec.mask)
    if m.shape != (rec.height, rec.width):
        raise ValueError(
            f"{rec.rel_path}: mask is {m.shape[1]}x{m.shape[0]} px but the image is "
            f"{rec.width}x{rec.height} px"
        )
    return m


def _classes(rec: ExportRecord, n: int) -> list[str]:
    classes = [str(c) for c in rec.region_classes]
    if not classes:
        return [rec.defect_kind or DEFAULT_CLASS] * n
    if len(classes) != n:
        raise ValueError(f"{rec.rel_path}: {len(classes)} region classes for {n} regions")
    return classes


class _Guard:
    """Refuses to write over a source image, whatever the output folder. Knows every
    source up front when ``records`` is a sequence, else the records seen so far."""

    def __init__(self, records: Iterable[ExportRecord] = ()) -> None:
        self.sources: set[str] = set()
        if isinstance(records, Sequence):
            for rec in records:
                self.add(rec)

    def add(self, rec: ExportRecord) -> None:
        self.sources.add(os.path.normcase(os.path.realpath(rec.image_path)))

    def check(self, dst: str) -> None:
        if os.path.normcase(os.path.realpath(dst)) in self.sources:
            raise ValueError(f"{dst}: refusing to overwrite a source image")


def _unique_name(used: set[str], folder: str, stem: str, ext: str) -> str:
    """``stem+ext`` or ``stem_2+ext``…, unique by stem (case-insensitive) within folder."""
    cand, k = stem, 1
    while _key(f"{folder}/{cand}") in used:
        k += 1
        cand = f"{stem}_{k}"
    used.add(_key(f"{folder}/{cand}"))
    return cand + ext


_BAD_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
_RESERVED = {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(10)} | {f"lpt{i}" for i in range(10)}


def class_folder_name(cls: str) -> str:
    """A folder name for a class that is safe on every OS and never ``good``."""
    s = _BAD_CHARS.sub("_", str(cls)).strip(" .")
    if not s:
        s = DEFAULT_CLASS
    if s.casefold() == "good":
        s = "defect_good"
    if s.split(".")[0].casefold() in _RESERVED:
        s += "_"
    return s


def export_masks(
    records: Iterable[ExportRecord],
    out: str,
    *,
    on_progress: ProgressFn = no_progress,
    cancel: Optional[CancelToken] = None,
) -> ExportSummary:
    """Write ``out/<rel parent>/<stem>_mask.png`` (0/255) for every record whose role is
    not good; unlabelled and defect-free images get an all-zero mask. When two images
    share a stem in one folder (a.png, a.jpg) the later one (in record order) is
    ``a.jpg_mask.png``; :func:`match_masks` tries that form first, so either order
    matches back.
    Also writes ``annotator_masks.json`` (rel_path → mask file, region classes), which
    :func:`match_masks` reads back. Existing files are overwritten atomically."""
    out = os.path.abspath(os.fspath(out))
    os.makedirs(out, exist_ok=True)
    summary, guard, used = ExportSummary(out), _Guard(records), set()
    sidecar: dict[str, dict] = {}
    total = _total(records)
    for i, rec in enumerate(records):
        check_cancel(cancel)
        on_progress(i, total, rec.rel_path)
        guard.add(rec)
        if rec.role == ROLE_GOOD:
            _check_rel(rec.rel_path)
            summary.skipped += 1
            continue
        mask = _mask_of(rec)
        if mask is None:
            summary.unlabelled += 1
            mask = np.zeros((rec.height, rec.width), bool)
            classes: list[str] = []
        else:
            n = len(label_regions(mask)[1])
            classes = _classes(rec, n)
            summary.regions += n
            if n:
                summary.defective += 1
            else:
                summary.defect_free += 1
        rel = _check_rel(rec.rel_path)
        parent, name, stem, _ = _split(rel)
        pre = parent + "/" if parent else ""
        k = _key(pre + stem)
        mrel = f"{pre}{stem}_mask.png" if k not in used else f"{pre}{name}_mask.png"
        used.add(k)
        dst = os.path.join(out, *mrel.split("/"))
        guard.check(dst)
        atomic_write_bytes(dst, encode_png(mask), fsync=False)
        sidecar[rel] = {"mask": mrel, "region_classes": classes, "labelled": rec.mask is not None}
        summary.images += 1
    _write_json(os.path.join(out, MASKS_SIDECAR), {"format": "annotator-masks", "version": 1, "masks": sidecar}, indent=1)
    on_progress(summary.images + summary.skipped, total, "")
    return summary


def export_mvtec(
    records: Iterable[ExportRecord],
    out: str,
    *,
    on_progress: ProgressFn = no_progress,
    cancel: Optional[CancelToken] = None,
) -> ExportSummary:
    """Export an MVTec AD category folder (``out`` must be empty or not exist).

    role good → ``train/good/`` (its mask, if any, is ignored: good means defect-free);
    labelled with an empty mask → ``test/good/``;
    defective → ``test/<class of the largest region>/`` plus
    ``ground_truth/<class>/<stem>_mask.png``. Unlabelled label images are skipped (MVTec
    has no place for them; test/good would claim they are defect-free). Images are
    copied byte for byte (``shutil.copy2``), keeping their extension; names are made
    unique per folder (``001.png``, ``001_2.png``). An image whose file cannot be copied
    (moved or deleted since the import) is left out and listed in ``unreadable``.
    ``manifest.json`` maps every exported file back to its rel_path and region classes so
    :func:`scan_mvtec` restores both.
    """
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out}: the MVTec export folder must be empty or not exist")
    os.makedirs(out, exist_ok=True)
    summary, guard, used = ExportSummary(out), _Guard(records), set()
    entries = []
    total = _total(records)
    for i, rec in enumerate(records):
        check_cancel(cancel)
        on_progress(i, total, rec.rel_path)
        guard.add(rec)
        mask = _mask_of(rec)
        if mask is None:
            summary.unlabelled += 1
            summary.skipped += 1
            continue
        _, _, stem, ext = _split(_check_rel(rec.rel_path))
        mrel = None
        classes: Optional[list[str]] = None
        regions: list = []
        if rec.role == ROLE_GOOD:
            folder = "train/good"
        else:
            _labels, regions = label_regions(mask)
            classes = _classes(rec, len(regions))
            if not regions:
                folder = "test/good"
            else:
                big = max(range(len(regions)), key=lambda k: (regions[k].area, -k))
                folder = f"test/{class_folder_name(classes[big])}"
        name = _unique_name(used, folder, stem, ext)
        irel = f"{folder}/{name}"
        dst = os.path.join(out, *irel.split("/"))
        guard.check(dst)
        try:
            _copy_atomic(rec.image_path, dst)
        except OSError as e:
            summary.unreadable.append(f"{rec.rel_path}: cannot copy the image ({e.strerror or e}) ({rec.image_path})")
            summary.skipped += 1
            used.discard(_key(f"{folder}/{name[:len(name) - len(ext)]}"))  # the name is free for the next one
            continue
        if regions:
            summary.defective += 1
            summary.regions += len(regions)
        else:
            summary.defect_free += 1
        if folder.startswith("test/") and folder != "test/good":
            mrel = f"ground_truth/{folder[5:]}/{posixpath.splitext(name)[0]}_mask.png"
            mdst = os.path.join(out, *mrel.split("/"))
            guard.check(mdst)
            atomic_write_bytes(mdst, encode_png(mask), fsync=False)
        entries.append({
            "rel_path": rec.rel_path, "path": irel, "role": rec.role, "mask": mrel,
            "region_classes": classes, "defect_kind": rec.defect_kind,
        })
        summary.images += 1
    _write_json(os.path.join(out, MVTEC_MANIFEST), {"format": "annotator-mvtec", "version": 1, "items": entries}, indent=1)
    on_progress(summary.images + summary.skipped, total, "")
    return summary


def _rle_counts(full: np.ndarray) -> str:
    rle = mask_util.encode(np.asfortranarray(full.astype(np.uint8)))
    c = rle["counts"]
    return c.decode("ascii") if isinstance(c, bytes) else c


def export_coco(
    records: Iterable[ExportRecord],
    out_json: str,
    *,
    class_names: Sequence[str] = (),
    on_progress: ProgressFn = no_progress,
    cancel: Optional[CancelToken] = None,
) -> ExportSummary:
    """Write a COCO instances JSON: one annotation per connected region, its
    segmentation a compressed RLE (``counts`` as str), ``bbox`` [x, y, w, h], ``area``
    (pixels), ``iscrowd`` 0. ``images[].file_name`` is the rel_path. Categories: the
    ``class_names`` given (in order) then any other class used, ids from 1.
    Unlabelled label images are left out (COCO cannot say "unknown"); role good and
    empty masks are images without annotations."""
    out_json = os.path.abspath(os.fspath(out_json))
    summary = ExportSummary(out_json)
    cat_ids: dict[str, int] = {}
    for c in class_names:
        cat_ids.setdefault(str(c), len(cat_ids) + 1)
    images, anns = [], []
    total = _total(records)
    guard = _Guard(records)
    for i, rec in enumerate(records):
        check_cancel(cancel)
        on_progress(i, total, rec.rel_path)
        guard.add(rec)
        mask = _mask_of(rec)
        if mask is None:
            summary.unlabelled += 1
            summary.skipped += 1
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": rec.rel_path, "width": rec.width, "height": rec.height})
        labels, regions = label_regions(mask)
        classes = _classes(rec, len(regions))
        for r, cls in zip(regions, classes):
            x, y, w, h = r.bbox
            full = np.zeros(mask.shape, np.uint8)
            full[y : y + h, x : x + w] = labels[y : y + h, x : x + w] == r.index
            cid = cat_ids.setdefault(cls, len(cat_ids) + 1)
            anns.append({
                "id": len(anns) + 1, "image_id": image_id, "category_id": cid,
                "segmentation": {"size": [rec.height, rec.width], "counts": _rle_counts(full)},
                "area": r.area, "bbox": [x, y, w, h], "iscrowd": 0,
            })
        summary.images += 1
        summary.regions += len(regions)
        if regions:
            summary.defective += 1
        else:
            summary.defect_free += 1
    guard.check(out_json)
    coco = {
        "info": {"description": "annotator export", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": cid, "name": n, "supercategory": DEFAULT_CLASS} for n, cid in cat_ids.items()],
    }
    _write_json(out_json, coco)
    on_progress(total, total, "")
    return summary


# One labelled part of an image: (x0, y0, bool crop, class).
_Part = tuple[int, int, np.ndarray, str]


def _assemble(h: int, w: int, parts: list[_Part]) -> tuple[np.ndarray, list[str]]:
    """Union of the parts; each connected region takes the class of the part that
    covers most of it (ties: the earlier part)."""
    union = np.zeros((h, w), bool)
    for x0, y0, crop, _ in parts:
        union[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] |= crop
    labels, regions = label_regions(union)
    n = len(regions)
    best = np.zeros(n + 1, np.int64)
    best_cls = [DEFAULT_CLASS] * (n + 1)
    for x0, y0, crop, cls in parts:
        sub = labels[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]][crop]
        cnt = np.bincount(sub, minlength=n + 1)
        for k in np.nonzero(cnt[1:] > best[1:])[0] + 1:
            best[k], best_cls[k] = cnt[k], cls
    return union, best_cls[1:]


def _clip_part(x0: int, y0: int, crop: np.ndarray, h: int, w: int) -> Optional[tuple[int, int, np.ndarray]]:
    x1, y1 = x0 + crop.shape[1], y0 + crop.shape[0]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if cx0 >= cx1 or cy0 >= cy1:
        return None
    return cx0, cy0, crop[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]


def _crop_of(full: np.ndarray) -> Optional[tuple[int, int, np.ndarray]]:
    x, y, w, h = cv2.boundingRect(full.astype(np.uint8))
    if w == 0 or h == 0:
        return None
    return x, y, full[y : y + h, x : x + w].astype(bool)


def _norm_file_name(name: str) -> str:
    p = str(name).replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return p


def _coco_seg_mask(seg, h: int, w: int) -> np.ndarray:
    if isinstance(seg, list):  # polygons
        polys = [p for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((h, w), bool)
        rle = mask_util.merge(mask_util.frPyObjects(polys, h, w))
    elif isinstance(seg, dict):
        size = [int(v) for v in seg.get("size", [h, w])]
        if size != [h, w]:
            raise ValueError(f"RLE size {size} differs from the image size {[h, w]}")
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            rle = mask_util.frPyObjects(seg, h, w)
        else:
            rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"unsupported segmentation {type(seg).__name__}")
    return mask_util.decode(rle).astype(bool)


def iter_coco(json_path: str) -> Iterator[tuple[str, np.ndarray, list[str]]]:
    """Yield ``(rel_path, mask, region_classes)`` per COCO image (streaming masks;
    the JSON itself is read at once). ``rel_path`` is ``file_name`` (``\\`` → ``/``,
    leading ``./`` dropped). Accepts compressed and uncompressed RLE and polygons.
    Raises ValueError (naming the file) for an unreadable or inconsistent file."""
    json_path = os.fspath(json_path)
    data = _read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path}: not a COCO file (no images list)")
    cats = {c["id"]: str(c["name"]) for c in data.get("categories", [])}
    by_image: dict = defaultdict(list)
    for a in data.get("annotations", []):
        by_image[a["image_id"]].append(a)
    for img in data["images"]:
        rel = _norm_file_name(img["file_name"])
        h, w = int(img["height"]), int(img["width"])
        parts: list[_Part] = []
        for a in by_image.get(img["id"], []):
            try:
                full = _coco_seg_mask(a.get("segmentation", []), h, w)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{json_path}: annotation {a.get('id')} of {rel}: {e}") from None
            c = _crop_of(full)
            if c is not None:
                parts.append((c[0], c[1], c[2], cats.get(a.get("category_id"), DEFAULT_CLASS)))
        mask, classes = _assemble(h, w, parts)
        yield rel, mask, classes


def import_coco(json_path: str) -> dict[str, tuple[np.ndarray, list[str]]]:
    """``{rel_path: (mask, region_classes)}`` for every image of a COCO file (see
    :func:`iter_coco`, which streams instead of holding every mask)."""
    return {rel: (m, c) for rel, m, c in iter_coco(json_path)}


def export_labelme(
    records: Iterable[ExportRecord],
    out: str,
    *,
    on_progress: ProgressFn = no_progress,
    cancel: Optional[CancelToken] = None,
) -> ExportSummary:
    """Write one labelme JSON per labelled image at ``out/<rel parent>/<stem>.json``
    (``<name>.json`` for the later of two images sharing a stem, in record order).

    Shapes use labelme ≥ 5.5's ``shape_type: "mask"`` — one per connected region, with
    ``points`` = the inclusive bbox corners ``[[x1, y1], [x2, y2]]`` and ``mask`` = a
    base64 PNG of the region's bbox crop — because it is pixel-exact; polygons from
    ``cv2.findContours`` lose holes and rasterise differently. ``imagePath`` is relative
    to the JSON, ``imageData`` null; the extra key ``annotatorRelPath`` (kept by labelme
    on save) records the rel_path. Unlabelled label images are skipped."""
    out = os.path.abspath(os.fspath(out))
    os.makedirs(out, exist_ok=True)
    summary, guard, used = ExportSummary(out), _Guard(records), set()
    total = _total(records)
    for i, rec in enumerate(records):
        check_cancel(cancel)
        on_progress(i, total, rec.rel_path)
        guard.add(rec)
        mask = _mask_of(rec)
        if mask is None:
            summary.unlabelled += 1
            summary.skipped += 1
            continue
        labels, regions = label_regions(mask)
        classes = _classes(rec, len(regions))
        shapes = []
        for r, cls in zip(regions, classes):
            x, y, w, h = r.bbox
            crop = labels[y : y + h, x : x + w] == r.index
            shapes.append({
                "label": cls,
                "points": [[float(x), float(y)], [float(x + w - 1), float(y + h - 1)]],
                "group_id": None,
                "description": "",
                "shape_type": "mask",
                "flags": {},
                "mask": base64.b64encode(encode_png(crop)).decode("ascii"),
            })
        parent, name, stem, _ = _split(rec.rel_path)
        pre = parent + "/" if parent else ""
        k = _key(pre + stem)
        jrel = f"{pre}{stem}.json" if k not in used else f"{pre}{name}.json"
        used.add(k)
        dst = os.path.join(out, *jrel.split("/"))
        guard.check(dst)
        try:
            image_ref = os.path.relpath(os.path.abspath(rec.image_path), os.path.dirname(dst)).replace(os.sep, "/")
        except ValueError:  # another drive on Windows
            image_ref = os.path.abspath(rec.image_path)
        doc = {
            "version": LABELME_VERSION,
            "flags": {},
            "shapes": shapes,
            "imagePath": image_ref,
            "imageData": None,
            "imageHeight": rec.height,
            "imageWidth": rec.width,
            "annotatorRelPath": rec.rel_path,
        }
        _write_json(dst, doc, indent=2)
        summary.images += 1
        summary.regions += len(regions)
        if regions:
            summary.defective += 1
        else:
            summary.defect_free += 1
    on_progress(total, total, "")
    return summary


def _labelme_part(shape: dict, h: int, w: int) -> Optional[_Part]:
    st = shape.get("shape_type") or "polygon"
    cls = str(shape.get("label") or DEFAULT_CLASS)
    pts = np.asarray(shape.get("points") or [], dtype=np.float64).reshape(-1, 2)
    if st == "mask":
        b64 = shape.get("mask")
        if not b64 or len(pts) < 1:
            raise ValueError("mask shape without mask data or points")
        raw = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise ValueError("mask shape with undecodable PNG data")
        crop = raw != 0 if raw.ndim == 2 else np.any(raw[:, :, :3] != 0, axis=2)
        x0, y0 = (int(round(v)) for v in pts[0])
        c = _clip_part(x0, y0, crop, h, w)
        return None if c is None else (c[0], c[1], c[2], cls)
    full = np.zeros((h, w), np.uint8)
    p = np.round(pts).astype(np.int32)
    if st == "polygon" and len(p) >= 3:
        cv2.fillPoly(full, [p], 1)
    elif st == "rectangle" and len(p) == 2:
        cv2.rectangle(full, tuple(p[0].tolist()), tuple(p[1].tolist()), 1, thickness=-1)
    elif st == "circle" and len(p) == 2:
        r = int(round(float(np.hypot(*(pts[1] - pts[0])))))
        cv2.circle(full, tuple(p[0].tolist()), r, 1, thickness=-1)
    else:
        raise ValueError(f"unsupported shape type {st!r} with {len(p)} points")
    c = _crop_of(full)
    return None if c is None else (c[0], c[1], c[2], cls)


def _labelme_rel(doc: dict, jrel: str) -> str:
    own = doc.get("annotatorRelPath")
    if isinstance(own, str) and own:
        return own
    jdir = posixpath.dirname(jrel)
    ip = _norm_file_name(doc.get("imagePath") or "")
    if not ip:
        raise ValueError("no imagePath")
    if posixpath.isabs(ip) or re.match(r"^[A-Za-z]:", ip):
        return posixpath.join(jdir, posixpath.basename(ip))
    p = posixpath.normpath(posixpath.join(jdir, ip))
    return posixpath.join(jdir, posixpath.basename(ip)) if p.startswith("../") or p == ".." else p


def iter_labelme(
    folder: str, errors: Optional[list[tuple[str, str]]] = None
) -> Iterator[tuple[str, np.ndarray, list[str]]]:
    """Yield ``(rel_path, mask, region_classes)`` for each labelme JSON under ``folder``.

    rel_path: the ``annotatorRelPath`` we wrote, else the JSON's folder joined with
    ``imagePath`` (labelme keeps it relative to the JSON). ``mask`` shapes are exact;
    polygon/rectangle/circle are rasterised with OpenCV (close to, not identical with,
    labelme's PIL drawing); point/line shapes carry no area and are reported. JSON
    files that are not labelme files (no ``shapes``) are ignored. Problems go to
    ``errors`` as (json rel path, reason) when a list is given, else raise ValueError.
    """
    folder = _require_dir(folder)

    def problem(jrel: str, reason: str, fatal: bool = True) -> None:
        if errors is not None:
            errors.append((jrel, reason))
        elif fatal:
            raise ValueError(f"{os.path.join(folder, jrel)}: {reason}")
        else:
            log.warning("%s: %s", jrel, reason)

    for jrel, jp in _walk_files(folder, frozenset({".json"})):
        try:
            doc = _read_json(jp)
        except ValueError as e:
            problem(jrel, str(e).split(": ", 1)[-1])
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
            continue  # not a labelme file (COCO, our sidecars…)
        try:
            rel = _labelme_rel(doc, jrel)
            h, w = doc.get("imageHeight"), doc.get("imageWidth")
            if not h or not w:
                w, h = image_size(os.path.join(os.path.dirname(jp), doc.get("imagePath") or ""))
            h, w = int(h), int(w)
        except (ValueError, ImageError, TypeError) as e:
            problem(jrel, f"cannot tell the image or its size ({e})")
            continue
        parts: list[_Part] = []
        for k, shape in enumerate(doc["shapes"]):
            try:
                part = _labelme_part(shape, h, w)
            except (ValueError, TypeError, KeyError, cv2.error, binascii.Error) as e:
                problem(jrel, f"shape {k} ignored: {e}", fatal=False)
                continue
            if part is not None:
                parts.append(part)
        mask, classes = _assemble(h, w, parts)
        yield rel, mask, classes


def import_labelme(
    folder: str, errors: Optional[list[tuple[str, str]]] = None
) -> dict[str, tuple[np.ndarray, list[str]]]:
    """``{rel_path: (mask, region_classes)}`` for a folder of labelme JSONs (see
    :func:`iter_labelme`)."""
    return {rel: (m, c) for rel, m, c in iter_labelme(folder, errors)}


__all__ = [
    "IMAGE_EXTS", "ROLE_GOOD", "ROLE_LABEL", "NotMvtecError",
    "ImportItem", "ScanReport", "scan_folder",
    "MvtecItem", "MvtecScan", "scan_mvtec",
    "MaskMatch", "match_masks",
    "ExportRecord", "ExportSummary", "export_masks", "export_mvtec", "export_coco", "export_labelme",
    "iter_coco", "import_coco", "iter_labelme", "import_labelme", "class_folder_name",
]
