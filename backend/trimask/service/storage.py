"""SQLite storage of images, categories and annotations: plain functions, explicit transactions.

The database lives in the annotations folder (``trimask.sqlite3``), in WAL mode with
``synchronous=FULL`` so that a change acknowledged to a client survives a killed
process and a power cut. Every change is one ``BEGIN IMMEDIATE`` transaction, so two
processes (a server and ``trimask import-coco``) serialize instead of failing.

The schema carries a version (table ``schema_version``); ``MIGRATIONS[i]`` brings a
database from version ``i`` to ``i + 1``. Add new migrations at the end, never edit
old ones: databases in users' annotation folders were made by them.

Annotations carry a ``version`` that every update bumps: an update names the version
it was based on and is refused (``ConflictError``) when someone else changed it first,
so two tabs never silently overwrite each other.
"""
from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trimask.errors import TrimaskError

DB_FILENAME = "trimask.sqlite3"
LEVELS = ("subpart", "part", "whole", "single")
# Distinct colours given to new categories in turn (Sasha Trubetskoy's list of 20).
PALETTE = (
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
    "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3",
    "#808000", "#ffd8b1", "#000075", "#a9a9a9",
)


class NotFoundError(TrimaskError):
    """The named image, category or annotation does not exist (HTTP 404)."""


SQLITE_MAX_INT = 2**63 - 1


def _existing_id(kind: str, value: int) -> int:
    """Ids beyond SQLite's integers cannot exist; say so rather than overflow in the query."""
    if not 0 <= value <= SQLITE_MAX_INT:
        raise NotFoundError(f"there is no {kind} with id {value}.")
    return value


class ConflictError(TrimaskError):
    """The change is based on an outdated version or clashes with existing data (HTTP 409)."""


MIGRATIONS: list[str] = [
    # 0 -> 1: the first schema.
    """
    CREATE TABLE images (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        file_name TEXT NOT NULL UNIQUE,          -- path relative to the images folder, '/'-separated
        width INTEGER NOT NULL,                  -- after EXIF orientation
        height INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL DEFAULT 0,     -- to re-read the size only when the file changed
        file_size INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE categories (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        color TEXT NOT NULL,
        supercategory TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL
    );
    CREATE TABLE annotations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,    -- AUTOINCREMENT: ids of deleted objects are never reused
        image_id INTEGER NOT NULL REFERENCES images(id),
        category_id INTEGER NOT NULL REFERENCES categories(id),
        height INTEGER NOT NULL,
        width INTEGER NOT NULL,
        counts TEXT NOT NULL,                    -- canonical compressed COCO RLE
        area INTEGER NOT NULL,
        bbox TEXT NOT NULL,                      -- JSON [x, y, w, h]
        score REAL,
        level TEXT,
        prompt TEXT,                             -- JSON {"points", "labels", "box"} or NULL
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        version INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX annotations_by_image ON annotations(image_id);
    CREATE INDEX annotations_by_category ON annotations(category_id);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def now_iso() -> str:
    """The current UTC time as ISO 8601 with milliseconds, e.g. 2026-01-02T03:04:05.678Z."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def db_path(annotations_dir: Path) -> Path:
    return Path(annotations_dir) / DB_FILENAME


def connect(path: Path, *, migrate_schema: bool = True) -> sqlite3.Connection:
    """Open the database (creating and migrating it unless ``migrate_schema`` is False).

    The connection is in autocommit mode; changes go through ``transaction``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        raise TrimaskError(f"cannot open the annotations database {path}: {exc}.") from exc
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        if migrate_schema:
            # WAL is a property of the file: set once, then every connection uses it.
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            migrate(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise TrimaskError(f"{path} is not a usable trimask database: {exc}.") from exc
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: committed when the block ends, rolled back on any exception.

    ``BEGIN IMMEDIATE`` takes the write lock up front so concurrent writers wait
    (busy timeout) rather than failing half-way.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if row is None:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to ``SCHEMA_VERSION``; returns the version found before."""
    if schema_version(conn) == SCHEMA_VERSION:
        return SCHEMA_VERSION
    with transaction(conn):
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        found = schema_version(conn)  # re-read under the write lock: another process may have migrated
        if found > SCHEMA_VERSION:
            raise TrimaskError(
                f"the annotations database has schema version {found}, newer than this trimask "
                f"understands ({SCHEMA_VERSION}); upgrade trimask."
            )
        for i in range(found, SCHEMA_VERSION):
            for statement in MIGRATIONS[i].split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
    return found


# ---------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageFile:
    """An image file as the folder scan finds it."""

    file_name: str
    width: int
    height: int
    mtime_ns: int
    file_size: int


def image_stats(conn: sqlite3.Connection) -> dict[str, tuple[int, int, int, int, int]]:
    """file_name -> (id, width, height, mtime_ns, file_size) for every known image."""
    return {
        r["file_name"]: (r["id"], r["width"], r["height"], r["mtime_ns"], r["file_size"])
        for r in conn.execute("SELECT id, file_name, width, height, mtime_ns, file_size FROM images")
    }


def upsert_images(conn: sqlite3.Connection, files: Iterable[ImageFile]) -> dict[str, int]:
    """Record scanned files (new ones get the next ids, in the given order); returns file_name -> id.

    A file whose size changed keeps its id; its annotations keep their own sizes and
    are checked against the new size only when edited.
    """
    with transaction(conn):
        for f in files:
            conn.execute(
                "INSERT INTO images (file_name, width, height, mtime_ns, file_size) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(file_name) DO UPDATE SET width = excluded.width, height = excluded.height, "
                "mtime_ns = excluded.mtime_ns, file_size = excluded.file_size",
                (f.file_name, f.width, f.height, f.mtime_ns, f.file_size),
            )
        return {r["file_name"]: r["id"] for r in conn.execute("SELECT id, file_name FROM images")}


def list_images(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("SELECT id, file_name, width, height FROM images ORDER BY id").fetchall()


def get_image(conn: sqlite3.Connection, image_id: int) -> sqlite3.Row:
    row = conn.execute(
        "SELECT id, file_name, width, height FROM images WHERE id = ?", (_existing_id("image", image_id),)
    ).fetchone()
    if row is None:
        raise NotFoundError(f"there is no image with id {image_id}.")
    return row


def annotation_counts(conn: sqlite3.Connection) -> dict[int, int]:
    """image_id -> number of annotations on it."""
    return {
        r[0]: r[1] for r in conn.execute("SELECT image_id, COUNT(*) FROM annotations GROUP BY image_id")
    }


# ---------------------------------------------------------------- categories


def category_to_json(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "color": row["color"], "supercategory": row["supercategory"]}


def list_categories(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [category_to_json(r) for r in conn.execute("SELECT * FROM categories ORDER BY id")]


def get_category(conn: sqlite3.Connection, category_id: int) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM categories WHERE id = ?", (_existing_id("category", category_id),)).fetchone()
    if row is None:
        raise NotFoundError(f"there is no category with id {category_id}.")
    return category_to_json(row)


def default_color(conn: sqlite3.Connection) -> str:
    """The palette colour for the next new category."""
    n = conn.execute("SELECT COUNT(*) FROM categories").fetchone()[0]
    return PALETTE[n % len(PALETTE)]


def find_category(conn: sqlite3.Connection, name: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM categories WHERE name = ?", (name,)).fetchone()
    return category_to_json(row) if row else None


def insert_category_row(conn: sqlite3.Connection, name: str, color: str, supercategory: str) -> dict[str, Any]:
    """Insert a category inside the caller's transaction."""
    cur = conn.execute(
        "INSERT INTO categories (name, color, supercategory, created_at) VALUES (?, ?, ?, ?)",
        (name, color, supercategory, now_iso()),
    )
    return get_category(conn, int(cur.lastrowid))


def create_category(
    conn: sqlite3.Connection, name: str, color: str, supercategory: str = ""
) -> tuple[dict[str, Any], bool]:
    """Create a category, or return the existing one of that name; returns (category, created)."""
    with transaction(conn):
        existing = find_category(conn, name)
        if existing is not None:
            return existing, False
        return insert_category_row(conn, name, color, supercategory), True


def update_category(conn: sqlite3.Connection, category_id: int, fields: dict[str, Any]) -> dict[str, Any]:
    """Rename / recolour a category (``fields`` holds any of name, color, supercategory)."""
    with transaction(conn):
        get_category(conn, category_id)
        if "name" in fields:
            other = find_category(conn, fields["name"])
            if other is not None and other["id"] != category_id:
                raise ConflictError(f"a category named {fields['name']!r} already exists.")
        for key in ("name", "color", "supercategory"):
            if key in fields:
                conn.execute(f"UPDATE categories SET {key} = ? WHERE id = ?", (fields[key], category_id))
        return get_category(conn, category_id)


def delete_category(conn: sqlite3.Connection, category_id: int) -> None:
    """Delete an unused category; one still labelling annotations is a conflict."""
    with transaction(conn):
        get_category(conn, category_id)
        used = conn.execute("SELECT COUNT(*) FROM annotations WHERE category_id = ?", (category_id,)).fetchone()[0]
        if used:
            raise ConflictError(f"category {category_id} still labels {used} annotation(s); relabel or delete them first.")
        conn.execute("DELETE FROM categories WHERE id = ?", (category_id,))


# ---------------------------------------------------------------- annotations


@dataclass(frozen=True)
class AnnotationFields:
    """A validated annotation as stored (the mask already normalized)."""

    image_id: int
    category_id: int
    height: int
    width: int
    counts: str
    area: int
    bbox: list[float]
    score: float | None
    level: str | None
    prompt: dict[str, Any] | None


def coco_annotation(row: sqlite3.Row) -> dict[str, Any]:
    """The COCO fields of a stored annotation (plus trimask's ``level``)."""
    return {
        "id": row["id"],
        "image_id": row["image_id"],
        "category_id": row["category_id"],
        "segmentation": {"size": [row["height"], row["width"]], "counts": row["counts"]},
        "area": row["area"],
        "bbox": json.loads(row["bbox"]),
        "iscrowd": 0,
        "score": row["score"],
        "level": row["level"],
    }


def annotation_to_json(row: sqlite3.Row) -> dict[str, Any]:
    """The API form of a stored annotation: its COCO fields, the prompt, version and timestamps."""
    return {
        **coco_annotation(row),
        "prompt": json.loads(row["prompt"]) if row["prompt"] is not None else None,
        "version": row["version"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def _check_refs(conn: sqlite3.Connection, image_id: int, category_id: int) -> None:
    get_image(conn, image_id)
    get_category(conn, category_id)


def _get_annotation_row(conn: sqlite3.Connection, ann_id: int) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM annotations WHERE id = ?", (_existing_id("annotation", ann_id),)).fetchone()
    if row is None:
        raise NotFoundError(f"there is no annotation with id {ann_id}.")
    return row


def get_annotation(conn: sqlite3.Connection, ann_id: int) -> dict[str, Any]:
    return annotation_to_json(_get_annotation_row(conn, ann_id))


def list_annotations(conn: sqlite3.Connection, image_id: int) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT * FROM annotations WHERE image_id = ? ORDER BY id", (image_id,))
    return [annotation_to_json(r) for r in rows]


def iter_annotations(conn: sqlite3.Connection) -> Iterator[sqlite3.Row]:
    """Every annotation row, ordered by id (for export)."""
    yield from conn.execute("SELECT * FROM annotations ORDER BY id")


def insert_annotation_row(conn: sqlite3.Connection, f: AnnotationFields) -> int:
    """Insert an annotation inside the caller's transaction; returns its id."""
    ts = now_iso()
    cur = conn.execute(
        "INSERT INTO annotations (image_id, category_id, height, width, counts, area, bbox, score, level, "
        "prompt, created_at, updated_at, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)",
        (
            f.image_id, f.category_id, f.height, f.width, f.counts, f.area, json.dumps(f.bbox), f.score,
            f.level, json.dumps(f.prompt) if f.prompt is not None else None, ts, ts,
        ),
    )
    return int(cur.lastrowid)


def insert_annotation(conn: sqlite3.Connection, f: AnnotationFields) -> dict[str, Any]:
    with transaction(conn):
        _check_refs(conn, f.image_id, f.category_id)
        return get_annotation(conn, insert_annotation_row(conn, f))


def insert_annotations(conn: sqlite3.Connection, items: Iterable[AnnotationFields]) -> int:
    """Insert many annotations in one transaction (all or none); returns how many."""
    n = 0
    with transaction(conn):
        for f in items:
            insert_annotation_row(conn, f)
            n += 1
    return n


def update_annotation(
    conn: sqlite3.Connection, ann_id: int, expected_version: int, f: AnnotationFields
) -> dict[str, Any]:
    """Replace an annotation's content if it is still at ``expected_version``; bumps the version."""
    with transaction(conn):
        row = _get_annotation_row(conn, ann_id)
        if row["version"] != expected_version:
            raise ConflictError(
                f"annotation {ann_id} was changed elsewhere (it is at version {row['version']}, "
                f"this change was based on version {expected_version}); reload it and try again."
            )
        _check_refs(conn, f.image_id, f.category_id)
        conn.execute(
            "UPDATE annotations SET category_id = ?, height = ?, width = ?, counts = ?, area = ?, bbox = ?, "
            "score = ?, level = ?, prompt = ?, updated_at = ?, version = version + 1 WHERE id = ?",
            (
                f.category_id, f.height, f.width, f.counts, f.area, json.dumps(f.bbox), f.score, f.level,
                json.dumps(f.prompt) if f.prompt is not None else None, now_iso(), ann_id,
            ),
        )
        return get_annotation(conn, ann_id)


def delete_annotation(conn: sqlite3.Connection, ann_id: int, expected_version: int | None = None) -> None:
    """Delete an annotation; with ``expected_version`` only if nobody changed it since."""
    with transaction(conn):
        row = _get_annotation_row(conn, ann_id)
        if expected_version is not None and row["version"] != expected_version:
            raise ConflictError(
                f"annotation {ann_id} was changed elsewhere (it is at version {row['version']}); "
                "reload it before deleting."
            )
        conn.execute("DELETE FROM annotations WHERE id = ?", (ann_id,))
