"""The project store: one folder per project, owning images, labels, flags and review state.

Layout of a project folder::

    project.sqlite   SQLite (WAL journal, foreign keys on, schema version in PRAGMA user_version)
    masks/           label and predicted masks, PNG 0/255, content-addressed (never overwritten)
    heatmaps/        anomaly heat maps, one compressed .npz per image
    models/          model folders, ``models/<method>/<run>/``

Images are referenced, not copied. The database keeps each file's path relative to the project
folder when the file lies inside it (so a project copied or moved together with its images still
finds them), else absolute; :class:`ImageRecord` ``source`` is always the absolute path.

Safety: every database change runs in a transaction (:meth:`Project.transaction`); files
are written to a temporary file in the same folder and moved into place with
``os.replace``, *before* the row that points at them is committed. A process killed at
any point therefore leaves the previous state readable; at worst an orphan mask file.

Threads: a project holds one SQLite connection guarded by a re-entrant lock, so every
method may be called from any thread (the GUI thread reads while a worker writes); calls
are serialised. Listeners (:meth:`Project.subscribe`) run in the thread that committed the
change; a GUI must re-emit them as queued signals.

State transitions are *not* checked here: use :class:`annotator.core.review.Review`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import cv2
import numpy as np

from . import images
from .masks import as_bool, label_regions, to_u8

SCHEMA_VERSION = 1
APPLICATION_ID = 0x414E4E4F  # "ANNO": marks the SQLite file as an annotator project
DB_NAME = "project.sqlite"
ROLES = ("good", "label")
STATES = ("good", "new", "prelabelled", "prechecked", "flagged", "accepted")
LABEL_SOURCES = ("model1", "reviewer", "checker", "import")
ROUND_KINDS = ("prelabel", "check")
FLAG_RULES = ("iou", "wrong_label", "missed_label", "unlabelled_anomaly")
MODEL_KINDS = ("prelabel", "checker")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SEED_CLASSES = (  # the patent's four fabric defects (spec 003)
    ("mis_yarn", "#e6194b"),
    ("broken_needle", "#3cb44b"),
    ("open_width", "#4363d8"),
    ("hole", "#f58231"),
)
_PALETTE = ("#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#469990", "#9a6324", "#800000", "#000075")

SCHEMA = f"""
CREATE TABLE classes (
    id      INTEGER PRIMARY KEY,
    name    TEXT NOT NULL UNIQUE,
    colour  TEXT NOT NULL
);
CREATE TABLE images (
    id            INTEGER PRIMARY KEY,
    rel_path      TEXT NOT NULL UNIQUE,          -- POSIX, relative to its import root
    source        TEXT NOT NULL,                 -- the file: relative to the project folder when inside, else absolute
    width         INTEGER NOT NULL CHECK (width > 0),
    height        INTEGER NOT NULL CHECK (height > 0),
    sha256        TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('good', 'label')),
    state         TEXT NOT NULL CHECK (state IN {STATES}),
    anomaly_score REAL,                          -- model 1, image level
    is_defect     INTEGER CHECK (is_defect IN (0, 1)),
    added         TEXT NOT NULL,
    CHECK ((role = 'good') = (state = 'good'))
);
CREATE TABLE rounds (
    number   INTEGER PRIMARY KEY,                -- 1, 2, ... over both kinds
    kind     TEXT NOT NULL,                      -- prelabel | check
    started  TEXT NOT NULL,
    ended    TEXT,
    summary  TEXT NOT NULL DEFAULT '{{}}'        -- JSON counts
);
CREATE TABLE labels (                            -- every version; the latest is current
    id        INTEGER PRIMARY KEY,
    image_id  INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    mask_file TEXT NOT NULL,                     -- relative to the project folder
    source    TEXT NOT NULL,                     -- model1 | reviewer | checker | import
    round     INTEGER NOT NULL DEFAULT 0,
    area      INTEGER NOT NULL,
    created   TEXT NOT NULL
);
CREATE INDEX labels_by_image ON labels(image_id, id);
CREATE TABLE label_regions (                     -- defect class of each connected region
    label_id     INTEGER NOT NULL REFERENCES labels(id) ON DELETE CASCADE,
    region_index INTEGER NOT NULL CHECK (region_index >= 1),  -- masks.label_regions order
    class_id     INTEGER REFERENCES classes(id),             -- NULL: not classified yet
    PRIMARY KEY (label_id, region_index)
);
CREATE TABLE round_images (                      -- which images a round covered
    round    INTEGER NOT NULL REFERENCES rounds(number),
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    n_flags  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (round, image_id)
);
CREATE TABLE flags (
    id             INTEGER PRIMARY KEY,
    image_id       INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    round          INTEGER NOT NULL REFERENCES rounds(number),
    rule           TEXT NOT NULL,                -- iou | wrong_label | missed_label | unlabelled_anomaly
    numbers        TEXT NOT NULL DEFAULT '{{}}', -- JSON: iou, region_ious, votes, aggregate, ...
    suspicion      REAL NOT NULL,                -- larger = more suspicious
    pred_mask_file TEXT,
    resolved       INTEGER NOT NULL DEFAULT 0 CHECK (resolved IN (0, 1)),
    resolved_by    INTEGER REFERENCES labels(id),
    created        TEXT NOT NULL
);
CREATE INDEX flags_by_image ON flags(image_id);
CREATE INDEX flags_by_suspicion ON flags(suspicion DESC, id);
CREATE TABLE model_runs (
    id      INTEGER PRIMARY KEY,
    kind    TEXT NOT NULL,                       -- prelabel | checker
    method  TEXT NOT NULL,
    config  TEXT NOT NULL DEFAULT '{{}}',
    metrics TEXT NOT NULL DEFAULT '{{}}',
    folder  TEXT NOT NULL,                       -- relative to the project when inside it
    created TEXT NOT NULL
);
"""

#: Upgrades of older projects: ``MIGRATIONS[v]`` turns schema v into v + 1 (in a transaction).
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {}


class ProjectError(Exception):
    """A project cannot be opened, created or changed; the message is one readable line."""


Listener = Callable[[str, Optional[int]], None]
MaskLike = np.ndarray
Classes = Union[None, str, Sequence[Optional[str]]]


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class DefectClass:
    id: int
    name: str
    colour: str  # "#rrggbb"


@dataclass(frozen=True)
class ImageRecord:
    id: int
    rel_path: str
    source: str
    width: int
    height: int
    sha256: str
    role: str
    state: str
    anomaly_score: Optional[float]
    is_defect: Optional[bool]
    added: str


@dataclass(frozen=True)
class Label:
    """One label version of an image. ``mask`` (bool, H x W) loads on first access."""

    id: int  # the version id; larger = newer
    image_id: int
    classes: tuple[Optional[str], ...]  # one per region, in masks.label_regions order
    source: str
    round: int
    area: int
    created: str
    path: Path = field(repr=False)

    @property
    def version(self) -> int:
        return self.id

    @cached_property
    def mask(self) -> np.ndarray:
        return read_mask(self.path)


@dataclass(frozen=True)
class FlagSpec:
    """A flag to record; the checkers produce these."""

    rule: str  # one of FLAG_RULES
    suspicion: float  # larger = shown earlier
    numbers: Mapping[str, Any] = field(default_factory=dict)
    pred_mask: Optional[np.ndarray] = field(default=None, repr=False)


@dataclass(frozen=True)
class Flag:
    id: int
    image_id: int
    round: int
    rule: str
    numbers: dict
    suspicion: float
    resolved: bool
    resolved_by: Optional[int]
    created: str
    pred_path: Optional[Path] = field(repr=False)

    @cached_property
    def pred_mask(self) -> Optional[np.ndarray]:
        return None if self.pred_path is None else read_mask(self.pred_path)


@dataclass(frozen=True)
class Round:
    number: int
    kind: str
    started: str
    ended: Optional[str]
    summary: dict


@dataclass(frozen=True)
class ModelRun:
    id: int
    kind: str
    method: str
    config: dict
    metrics: dict
    folder: Path
    created: str


# ---------------------------------------------------------------- files


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def mask_digest(mask: np.ndarray) -> str:
    m = as_bool(mask)
    h = hashlib.sha256(f"{m.shape[0]}x{m.shape[1]}:".encode())
    h.update(np.packbits(m).tobytes())
    return h.hexdigest()[:24]


def read_mask(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ProjectError(f"mask file is missing: {path}")
    img = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ProjectError(f"mask file is not a readable PNG: {path}")
    return img > 0


def _json(obj: Any) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return json.dumps(obj, default=default, sort_keys=True)


# ---------------------------------------------------------------- the project


class Project:
    """An open project folder. Use :meth:`create` or :meth:`open`; close with :meth:`close`
    or a ``with`` block."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn: Optional[sqlite3.Connection] = conn
        self._lock = threading.RLock()
        self._depth = 0
        self._pending: list[tuple[str, Optional[int]]] = []
        self._listeners: list[Listener] = []

    # ---- open / create / close

    @classmethod
    def create(cls, path: Union[str, Path]) -> "Project":
        path = Path(path).resolve()
        if (path / DB_NAME).exists():
            raise ProjectError(f"{path} already holds a project ({DB_NAME} exists)")
        if path.exists() and not path.is_dir():
            raise ProjectError(f"{path} is a file, not a folder")
        for sub in ("", "masks", "heatmaps", "models"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        conn = _connect(path / DB_NAME)
        try:
            _configure(conn)
            seeds = ", ".join(f"('{n}', '{c}')" for n, c in SEED_CLASSES)
            conn.executescript(
                f"BEGIN; {SCHEMA} INSERT INTO classes(name, colour) VALUES {seeds};"
                f" PRAGMA application_id = {APPLICATION_ID};"
                f" PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
        except BaseException:
            conn.close()
            for suffix in ("", "-wal", "-shm"):
                Path(str(path / DB_NAME) + suffix).unlink(missing_ok=True)
            raise
        return cls(path, conn)

    @classmethod
    def open(cls, path: Union[str, Path]) -> "Project":
        path = Path(path).resolve()
        db = path / DB_NAME
        if not path.is_dir():
            raise ProjectError(f"no project folder at {path}")
        if not db.is_file():
            raise ProjectError(f"{path} is not an annotator project (no {DB_NAME})")
        conn = _connect(db)
        try:
            _check_and_migrate(conn, db)
        except BaseException:
            conn.close()
            raise
        for sub in ("masks", "heatmaps", "models"):
            (path / sub).mkdir(exist_ok=True)
        return cls(path, conn)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "Project":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Project({str(self.path)!r}{'' if self._conn else ', closed'})"

    @property
    def schema_version(self) -> int:
        return self._one("PRAGMA user_version")[0]

    # ---- transactions, queries, listeners

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All changes inside commit together or not at all. Nests (as savepoints)."""
        with self._lock:
            db = self._db()
            depth, n_pending = self._depth, len(self._pending)
            db.execute("BEGIN IMMEDIATE" if depth == 0 else f"SAVEPOINT sp{depth}")
            self._depth = depth + 1
            try:
                yield
            except BaseException:
                db.execute("ROLLBACK" if depth == 0 else f"ROLLBACK TO sp{depth}")
                if depth:
                    db.execute(f"RELEASE sp{depth}")
                del self._pending[n_pending:]
                raise
            else:
                db.execute("COMMIT" if depth == 0 else f"RELEASE sp{depth}")
            finally:
                self._depth = depth
            events, self._pending = (self._pending, []) if depth == 0 else ([], self._pending)
        self._notify(events)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event, id)`` after each commit; returns an unsubscribe function.

        Events: image_added, image_moved, image_removed (id None), role_changed, label_changed,
        state_changed, prediction_changed,
        flags_changed (id = image), round_changed (id = round), class_added,
        model_run_added (id = run), heatmap_changed (id = image).
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _notify(self, events: list[tuple[str, Optional[int]]]) -> None:
        for event, ident in dict.fromkeys(events):  # de-duplicated, in order
            for listener in list(self._listeners):
                listener(event, ident)

    def _emit(self, event: str, ident: Optional[int] = None) -> None:
        self._pending.append((event, ident))

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ProjectError(f"project {self.path} is closed")
        return self._conn

    def _all(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db().execute(sql, args).fetchall()

    def _one(self, sql: str, args: Sequence[Any] = ()) -> Optional[sqlite3.Row]:
        with self._lock:
            return self._db().execute(sql, args).fetchone()

    def _write(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one change; callers hold a :meth:`transaction`. Returns lastrowid."""
        assert self._depth > 0, "_write outside a transaction"
        return self._db().execute(sql, args).lastrowid

    # ---- defect classes

    def classes(self) -> list[DefectClass]:
        return [DefectClass(*r) for r in self._all("SELECT id, name, colour FROM classes ORDER BY id")]

    def add_class(self, name: str, colour: Optional[str] = None) -> DefectClass:
        name = name.strip()
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise ValueError(f"class name {name!r}: use letters, digits, '_' or '-'")
        if any(c.name == name for c in self.classes()):
            raise ProjectError(f"defect class {name!r} already exists")
        colour = colour or _PALETTE[len(self.classes()) % len(_PALETTE)]
        if not re.fullmatch(r"#[0-9a-fA-F]{6}", colour):
            raise ValueError(f"colour {colour!r}: expected '#rrggbb'")
        with self.transaction():
            ident = self._write("INSERT INTO classes(name, colour) VALUES (?, ?)", (name, colour))
            self._emit("class_added", ident)
        return DefectClass(ident, name, colour)

    def _class_ids(self, names: Sequence[Optional[str]]) -> list[Optional[int]]:
        known = {c.name: c.id for c in self.classes()}
        unknown = sorted({n for n in names if n is not None and n not in known})
        if unknown:
            raise ProjectError(f"unknown defect class {unknown[0]!r} (known: {', '.join(known)})")
        return [None if n is None else known[n] for n in names]

    # ---- images

    def add_image(
        self,
        source: Union[str, Path],
        rel_path: str,
        role: str = "label",
        *,
        width: Optional[int] = None,
        height: Optional[int] = None,
        sha256: Optional[str] = None,
    ) -> int:
        """Reference an image file. Missing size/checksum are read from the file."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        source = Path(source).resolve()
        if width is None or height is None or sha256 is None:
            width, height, sha256 = _probe_image(source)
        rel_path = Path(rel_path).as_posix()
        if self.image_by_path(rel_path) is not None:
            raise ProjectError(f"an image with path {rel_path!r} is already in the project")
        state = "good" if role == "good" else "new"
        with self.transaction():
            ident = self._write(
                "INSERT INTO images(rel_path, source, width, height, sha256, role, state, added)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (rel_path, _stored_source(source, self.path), width, height, sha256, role, state, now()),
            )
            self._emit("image_added", ident)
        return ident

    def import_images(
        self, root: Union[str, Path], role: str = "label", prefix: str = "", exts: Sequence[str] = IMAGE_EXTS
    ) -> list[int]:
        """Add every image file under ``root`` (recursively, sorted) with rel_path =
        ``prefix`` + path relative to ``root``. Already present paths are kept and their
        ids returned; all new ones are added in one transaction."""
        root = Path(root).resolve()
        if not root.is_dir():
            raise ProjectError(f"no image folder at {root}")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        ids = []
        with self.transaction():
            for f in files:
                rel = prefix + f.relative_to(root).as_posix()
                known = self.image_by_path(rel)
                ids.append(known.id if known else self.add_image(f, rel, role))
        return ids

    def image(self, image_id: int) -> ImageRecord:
        row = self._one("SELECT * FROM images WHERE id = ?", (image_id,))
        if row is None:
            raise ProjectError(f"no image with id {image_id} in the project")
        return _image_record(row, self.path)

    def image_by_path(self, rel_path: str) -> Optional[ImageRecord]:
        row = self._one("SELECT * FROM images WHERE rel_path = ?", (rel_path,))
        return None if row is None else _image_record(row, self.path)

    def images(self, role: Optional[str] = None, state: Optional[str] = None) -> list[ImageRecord]:
        sql, args = "SELECT * FROM images WHERE 1", []
        if role is not None:
            sql, args = sql + " AND role = ?", args + [role]
        if state is not None:
            sql, args = sql + " AND state = ?", args + [state]
        return [_image_record(r, self.path) for r in self._all(sql + " ORDER BY id", args)]

    def load_image(self, image_id: int) -> np.ndarray:
        """The original file as uint8 BGR (16-bit, alpha and grey converted; see
        :func:`annotator.core.images.load_image`)."""
        img = self.image(image_id)
        try:
            return images.load_image(img.source)
        except images.ImageError as exc:
            raise ProjectError(f"{img.rel_path}: {exc.reason} ({img.source})") from None

    def set_source(self, image_id: int, source: Union[str, Path], sha256: Optional[str] = None) -> None:
        """Point an image at its file's new place (moved or copied since the import). The file must hold
        the same image: its SHA-256 (computed here unless the caller just did: ``sha256``) is checked against
        the one recorded at the import."""
        img = self.image(image_id)
        source = Path(source).resolve()
        digest = sha256 or _probe_image(source)[2]
        if digest != img.sha256:
            raise ProjectError(f"{img.rel_path}: {source} is a different file (its content differs from the "
                               "imported one)")
        with self.transaction():
            self._write("UPDATE images SET source = ? WHERE id = ?", (_stored_source(source, self.path), image_id))
            self._emit("image_moved", image_id)

    def set_role(self, image_id: int, role: str) -> None:
        """Low level: make the image a good training image (state ``good``) or one to label (state ``new``).
        Model 1's image result and the image's open flags are dropped (they judged it in its old role); its
        label versions stay. Use :meth:`annotator.core.review.Review.set_role`, which checks the label."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        img = self.image(image_id)
        if img.role == role:
            return
        with self.transaction():
            self._write("UPDATE images SET role = ?, state = ?, anomaly_score = NULL, is_defect = NULL WHERE id = ?",
                        (role, "good" if role == "good" else "new", image_id))
            self.resolve_flags(image_id)
            self._emit("role_changed", image_id)
        (self.path / "heatmaps" / f"{image_id}.npz").unlink(missing_ok=True)

    def remove_images(self, image_ids: Iterable[int]) -> int:
        """Take images out of the project with everything recorded about them (label versions, flags,
        round coverage, heat map). Their files, wherever they lie, are not touched. Returns how many."""
        ids = sorted({self.image(i).id for i in image_ids})
        if not ids:
            return 0
        # Heat maps first: an image id can be given again to a later import, which must not inherit one. A
        # heat map is model output (the next pre-label writes it again), never a person's work.
        for i in ids:
            (self.path / "heatmaps" / f"{i}.npz").unlink(missing_ok=True)
        with self.transaction():
            for i in ids:
                # flags resolved by a label of another image cannot exist; those of this image go with it
                self._write("DELETE FROM images WHERE id = ?", (i,))
            self._emit("image_removed", None)
        return len(ids)

    def set_prediction(self, image_id: int, anomaly_score: Optional[float], is_defect: Optional[bool]) -> None:
        """Model 1's image-level result."""
        self.image(image_id)
        with self.transaction():
            self._write(
                "UPDATE images SET anomaly_score = ?, is_defect = ? WHERE id = ?",
                (None if anomaly_score is None else float(anomaly_score),
                 None if is_defect is None else int(bool(is_defect)), image_id),
            )
            self._emit("prediction_changed", image_id)

    def set_state(self, image_id: int, state: str) -> None:
        """Low level: no transition check. Use :class:`annotator.core.review.Review`."""
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        self.image(image_id)
        with self.transaction():
            self._write("UPDATE images SET state = ? WHERE id = ?", (state, image_id))
            self._emit("state_changed", image_id)

    # ---- mask files

    def save_mask(self, image_id: int, mask: MaskLike) -> str:
        """Write ``mask`` as ``masks/<image>-<digest>.png`` (content-addressed, so an
        existing file is never overwritten with other content; one that no longer reads is
        written again). Returns the relative path."""
        rel = f"masks/{image_id}-{mask_digest(mask)}.png"
        dest = self.path / rel
        if dest.exists():
            try:
                read_mask(dest)
                return rel
            except ProjectError:
                pass  # the file of this content was damaged: written again (atomically) below
        ok, png = cv2.imencode(".png", to_u8(mask))
        if not ok:
            raise ProjectError(f"could not encode mask for image {image_id}")
        images.atomic_write_bytes(dest, png.tobytes())
        return rel

    # ---- labels

    def set_label(
        self, image_id: int, mask: MaskLike, classes: Classes = None, source: str = "reviewer", round: int = 0
    ) -> Label:
        """Record a new label version; it becomes the image's current label.

        ``classes``: one class name (or None) per connected region in
        :func:`masks.label_regions` order, a single name for all regions, or None.
        """
        if source not in LABEL_SOURCES:
            raise ValueError(f"label source must be one of {LABEL_SOURCES}, got {source!r}")
        img = self.image(image_id)
        mask = as_bool(mask)
        if mask.shape != (img.height, img.width):
            raise ValueError(f"mask is {mask.shape}, image {img.rel_path} is {(img.height, img.width)}")
        names = _region_classes(mask, classes)
        class_ids = self._class_ids(names)
        with self.transaction():
            rel = self.save_mask(image_id, mask)
            label_id = self._write(
                "INSERT INTO labels(image_id, mask_file, source, round, area, created) VALUES (?, ?, ?, ?, ?, ?)",
                (image_id, rel, source, int(round), int(np.count_nonzero(mask)), now()),
            )
            self._db().executemany(
                "INSERT INTO label_regions(label_id, region_index, class_id) VALUES (?, ?, ?)",
                [(label_id, k + 1, c) for k, c in enumerate(class_ids)],
            )
            self._emit("label_changed", image_id)
            return self.label(label_id)

    def label(self, label_id: int) -> Label:
        row = self._one("SELECT * FROM labels WHERE id = ?", (label_id,))
        if row is None:
            raise ProjectError(f"no label with id {label_id}")
        return self._label(row)

    def current_label(self, image_id: int) -> Optional[Label]:
        row = self._one("SELECT * FROM labels WHERE image_id = ? ORDER BY id DESC LIMIT 1", (image_id,))
        return None if row is None else self._label(row)

    def last_readable_label(self, image_id: int) -> Optional[Label]:
        """The newest label version whose mask file still reads (its ``mask`` loaded), or None. For an
        image whose current label's file was damaged or deleted: the person sees this version again and
        saves it as a new one."""
        for label in reversed(self.label_history(image_id)):
            try:
                label.mask
            except ProjectError:
                continue
            return label
        return None

    def label_history(self, image_id: int) -> list[Label]:
        """Every label version of the image, oldest first."""
        return [self._label(r) for r in self._all("SELECT * FROM labels WHERE image_id = ? ORDER BY id", (image_id,))]

    def labels_in_round(self, number: int, source: Optional[str] = None) -> list[Label]:
        """Label versions recorded in a round (optionally of one source), oldest first."""
        rows = self._all("SELECT * FROM labels WHERE round = ? AND (? IS NULL OR source = ?) ORDER BY id",
                         (number, source, source))
        return [self._label(r) for r in rows]

    def _label(self, row: sqlite3.Row) -> Label:
        names = self._all(
            "SELECT c.name FROM label_regions r LEFT JOIN classes c ON c.id = r.class_id"
            " WHERE r.label_id = ? ORDER BY r.region_index",
            (row["id"],),
        )
        return Label(row["id"], row["image_id"], tuple(n[0] for n in names), row["source"], row["round"],
                     row["area"], row["created"], self.path / row["mask_file"])

    # ---- rounds

    def start_round(self, kind: str) -> int:
        if kind not in ROUND_KINDS:
            raise ValueError(f"round kind must be one of {ROUND_KINDS}, got {kind!r}")
        with self.transaction():
            number = self._write("INSERT INTO rounds(kind, started) VALUES (?, ?)", (kind, now()))
            self._emit("round_changed", number)
        return number

    def end_round(self, number: int, summary: Optional[Mapping[str, Any]] = None) -> None:
        if self.round(number).ended is not None:
            raise ProjectError(f"round {number} has already ended")
        with self.transaction():
            self._write("UPDATE rounds SET ended = ?, summary = ? WHERE number = ?",
                        (now(), _json(dict(summary or {})), number))
            self._emit("round_changed", number)

    def round(self, number: int) -> Round:
        row = self._one("SELECT * FROM rounds WHERE number = ?", (number,))
        if row is None:
            raise ProjectError(f"no round {number} in the project")
        return _round(row)

    def rounds(self, kind: Optional[str] = None) -> list[Round]:
        """Oldest first."""
        rows = self._all("SELECT * FROM rounds WHERE ? IS NULL OR kind = ? ORDER BY number", (kind, kind))
        return [_round(r) for r in rows]

    def add_round_images(self, number: int, n_flags_by_image: Mapping[int, int]) -> None:
        """Record which images a round covered (and how many flags each got)."""
        try:
            with self.transaction():
                self._db().executemany(
                    "INSERT INTO round_images(round, image_id, n_flags) VALUES (?, ?, ?)",
                    [(number, i, int(n)) for i, n in n_flags_by_image.items()],
                )
        except sqlite3.IntegrityError as e:
            raise ProjectError(f"round {number}: an image was already recorded or does not exist ({e})") from None

    def round_coverage(self, number: int) -> dict[int, int]:
        """image id -> number of flags, for every image the round covered."""
        rows = self._all("SELECT image_id, n_flags FROM round_images WHERE round = ?", (number,))
        return {r[0]: r[1] for r in rows}

    # ---- flags

    def add_flags(self, round: int, flags_by_image: Mapping[int, Iterable[Union[FlagSpec, Mapping]]]) -> list[int]:
        """Record flags (a :class:`FlagSpec` or a dict with its fields); returns their ids."""
        self.round(round)
        ids = []
        with self.transaction():
            for image_id, specs in flags_by_image.items():
                for spec in specs:
                    ids.append(self._add_flag(round, image_id, _flag_spec(spec)))
        return ids

    def _add_flag(self, round: int, image_id: int, spec: FlagSpec) -> int:
        self.image(image_id)
        pred = None if spec.pred_mask is None else self.save_mask(image_id, spec.pred_mask)
        ident = self._write(
            "INSERT INTO flags(image_id, round, rule, numbers, suspicion, pred_mask_file, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (image_id, round, spec.rule, _json(dict(spec.numbers)), float(spec.suspicion), pred, now()),
        )
        self._emit("flags_changed", image_id)
        return ident

    def flags(
        self, round: Optional[int] = None, unresolved_only: bool = False, image_id: Optional[int] = None
    ) -> list[Flag]:
        """Most suspicious first (ties: oldest first)."""
        sql = ("SELECT * FROM flags WHERE (? IS NULL OR round = ?) AND (? = 0 OR resolved = 0)"
               " AND (? IS NULL OR image_id = ?) ORDER BY suspicion DESC, id")
        rows = self._all(sql, (round, round, int(unresolved_only), image_id, image_id))
        return [self._flag(r) for r in rows]

    def flag(self, flag_id: int) -> Flag:
        row = self._one("SELECT * FROM flags WHERE id = ?", (flag_id,))
        if row is None:
            raise ProjectError(f"no flag with id {flag_id}")
        return self._flag(row)

    def resolve_flags(self, image_id: int, by_label: Optional[int] = None) -> int:
        """Mark the image's open flags resolved (by a label version, or superseded)."""
        with self.transaction():
            n = self._db().execute(
                "UPDATE flags SET resolved = 1, resolved_by = ? WHERE image_id = ? AND resolved = 0",
                (by_label, image_id),
            ).rowcount
            if n:
                self._emit("flags_changed", image_id)
        return n

    def _flag(self, r: sqlite3.Row) -> Flag:
        pred = None if r["pred_mask_file"] is None else self.path / r["pred_mask_file"]
        return Flag(r["id"], r["image_id"], r["round"], r["rule"], json.loads(r["numbers"]), r["suspicion"],
                    bool(r["resolved"]), r["resolved_by"], r["created"], pred)

    # ---- model runs

    def new_model_dir(self, method: str) -> Path:
        """Create and return a fresh ``models/<method>/<timestamp>[-n]/`` folder."""
        base = self.path / "models" / method
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            folder = base / (stamp if n == 0 else f"{stamp}-{n}")
            try:
                folder.mkdir(parents=True)
                return folder
            except FileExistsError:
                continue
        raise ProjectError(f"could not create a model folder under {base}")

    def add_model_run(
        self, kind: str, method: str, folder: Union[str, Path],
        config: Optional[Mapping] = None, metrics: Optional[Mapping] = None,
    ) -> ModelRun:
        if kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
        folder = Path(folder).resolve()
        stored = folder.relative_to(self.path).as_posix() if folder.is_relative_to(self.path) else str(folder)
        with self.transaction():
            ident = self._write(
                "INSERT INTO model_runs(kind, method, config, metrics, folder, created) VALUES (?, ?, ?, ?, ?, ?)",
                (kind, method, _json(dict(config or {})), _json(dict(metrics or {})), stored, now()),
            )
            self._emit("model_run_added", ident)
        return self.model_runs(run_id=ident)[0]

    def set_model_metrics(self, run_id: int, metrics: Mapping) -> None:
        with self.transaction():
            self._write("UPDATE model_runs SET metrics = ? WHERE id = ?", (_json(dict(metrics)), run_id))

    def model_runs(self, kind: Optional[str] = None, run_id: Optional[int] = None) -> list[ModelRun]:
        """Newest first."""
        rows = self._all(
            "SELECT * FROM model_runs WHERE (? IS NULL OR kind = ?) AND (? IS NULL OR id = ?) ORDER BY id DESC",
            (kind, kind, run_id, run_id),
        )
        return [ModelRun(r["id"], r["kind"], r["method"], json.loads(r["config"]), json.loads(r["metrics"]),
                         self.path / r["folder"], r["created"]) for r in rows]

    # ---- heat maps

    def set_heatmap(self, image_id: int, heatmap: np.ndarray) -> None:
        """Save a float heat map (stored as float32 in ``heatmaps/<id>.npz``)."""
        self.image(image_id)
        buf = io.BytesIO()
        np.savez_compressed(buf, heatmap=np.asarray(heatmap, dtype=np.float32))
        images.atomic_write_bytes(self.path / "heatmaps" / f"{image_id}.npz", buf.getvalue())
        with self.transaction():  # nothing to write; announces the change after commit
            self._emit("heatmap_changed", image_id)

    def heatmap(self, image_id: int) -> Optional[np.ndarray]:
        path = self.path / "heatmaps" / f"{image_id}.npz"
        if not path.is_file():
            return None
        with np.load(path) as data:
            return data["heatmap"]

    # ---- consistency

    def problems(self) -> list[str]:
        """Integrity report: SQLite checks, foreign keys, missing mask files. Empty = fine."""
        out = [r[0] for r in self._all("PRAGMA integrity_check") if r[0] != "ok"]
        out += [f"foreign key broken: {tuple(r)}" for r in self._all("PRAGMA foreign_key_check")]
        files = self._all("SELECT mask_file FROM labels UNION SELECT pred_mask_file FROM flags"
                          " WHERE pred_mask_file IS NOT NULL")
        out += [f"missing mask file {f[0]}" for f in files if not (self.path / f[0]).is_file()]
        return out


# ---------------------------------------------------------------- helpers


def _connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(db), timeout=10, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


def _check_and_migrate(conn: sqlite3.Connection, db: Path) -> None:
    try:
        app_id, version = conn.execute("PRAGMA application_id").fetchone()[0], conn.execute(
            "PRAGMA user_version").fetchone()[0]
        damage = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall() if r[0] != "ok"]
    except sqlite3.DatabaseError as e:
        raise ProjectError(f"{db} is not a readable annotator project ({e})") from None
    if damage:
        raise ProjectError(f"{db} is damaged ({damage[0]})")
    if app_id != APPLICATION_ID or version == 0:
        raise ProjectError(f"{db} is an SQLite file but not an annotator project")
    if version > SCHEMA_VERSION:
        raise ProjectError(f"{db.name} was written by a newer annotator "
                           f"(schema {version}; this version reads up to {SCHEMA_VERSION})")
    _configure(conn)
    while version < SCHEMA_VERSION:
        if version not in MIGRATIONS:
            raise ProjectError(f"{db.name} has schema {version}; no upgrade to {version + 1} is known")
        conn.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[version](conn)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        version += 1


def _configure(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: consistent after a crash


def _probe_image(source: Path) -> tuple[int, int, str]:
    try:
        width, height = images.image_size(source)
        return width, height, images.sha256_file(source)
    except images.ImageError as exc:
        raise ProjectError(str(exc)) from None
    except OSError as exc:
        raise ProjectError(f"{source}: cannot read file ({exc.strerror or exc})") from None


def _stored_source(source: Path, root: Path) -> str:
    """How the database keeps an image's (resolved) path: POSIX, relative to the project folder ``root`` when
    the file lies inside it (a project moved or copied with its images, such as the demo's, keeps them),
    else absolute."""
    try:
        return source.relative_to(root).as_posix()
    except ValueError:
        return str(source)


def _image_record(r: sqlite3.Row, root: Path) -> ImageRecord:
    source = r["source"]
    if not os.path.isabs(source):
        source = str(root / source)
    return ImageRecord(r["id"], r["rel_path"], source, r["width"], r["height"], r["sha256"], r["role"],
                       r["state"], r["anomaly_score"], None if r["is_defect"] is None else bool(r["is_defect"]),
                       r["added"])


def _round(r: sqlite3.Row) -> Round:
    return Round(r["number"], r["kind"], r["started"], r["ended"], json.loads(r["summary"]))


def _region_classes(mask: np.ndarray, classes: Classes) -> list[Optional[str]]:
    n = len(label_regions(mask)[1])
    if classes is None or isinstance(classes, str):
        return [classes] * n
    classes = list(classes)
    if len(classes) != n:
        raise ValueError(f"{len(classes)} classes given for a mask with {n} regions")
    return classes


def _flag_spec(spec: Union[FlagSpec, Mapping]) -> FlagSpec:
    spec = spec if isinstance(spec, FlagSpec) else FlagSpec(**spec)
    if spec.rule not in FLAG_RULES:
        raise ValueError(f"flag rule must be one of {FLAG_RULES}, got {spec.rule!r}")
    return spec
