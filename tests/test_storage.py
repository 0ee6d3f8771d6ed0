"""SQLite storage: schema versions, transactions, versioned updates."""
from __future__ import annotations

import sqlite3

import pytest

from trimask.errors import TrimaskError
from trimask.service import storage


def _fields(image_id: int, category_id: int, counts: str = "05=0") -> storage.AnnotationFields:
    return storage.AnnotationFields(
        image_id=image_id, category_id=category_id, height=4, width=5, counts=counts, area=5,
        bbox=[1.0, 0.0, 1.0, 4.0], score=0.5, level="part", prompt={"points": [[1, 2]], "labels": [1], "box": None},
    )


@pytest.fixture
def conn(tmp_path):
    c = storage.connect(tmp_path / storage.DB_FILENAME)
    storage.upsert_images(c, [storage.ImageFile("a.png", 5, 4, 1, 10), storage.ImageFile("b.png", 5, 4, 1, 10)])
    yield c
    c.close()


def test_new_database_is_at_the_latest_schema_version_in_wal_mode(tmp_path):
    c = storage.connect(tmp_path / "db.sqlite3")
    assert storage.schema_version(c) == storage.SCHEMA_VERSION
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert storage.migrate(c) == storage.SCHEMA_VERSION  # nothing left to do
    c.close()


def test_migrations_run_from_version_zero_on_an_old_file(tmp_path, monkeypatch):
    path = tmp_path / "db.sqlite3"
    monkeypatch.setattr(storage, "MIGRATIONS", storage.MIGRATIONS[:1])
    monkeypatch.setattr(storage, "SCHEMA_VERSION", 1)
    c = storage.connect(path)
    storage.upsert_images(c, [storage.ImageFile("a.png", 5, 4, 1, 10)])
    c.close()
    # A later release adds a column; the existing data is kept and the version moves on.
    monkeypatch.setattr(storage, "MIGRATIONS", [*storage.MIGRATIONS, "ALTER TABLE images ADD COLUMN note TEXT"])
    monkeypatch.setattr(storage, "SCHEMA_VERSION", 2)
    c = storage.connect(path)
    assert storage.schema_version(c) == 2
    assert [r["file_name"] for r in storage.list_images(c)] == ["a.png"]
    assert "note" in [r[1] for r in c.execute("PRAGMA table_info(images)")]
    c.close()


def test_database_from_a_newer_trimask_is_refused(tmp_path):
    path = tmp_path / "db.sqlite3"
    c = storage.connect(path)
    c.execute("UPDATE schema_version SET version = 99")
    c.close()
    with pytest.raises(TrimaskError, match="newer than this trimask"):
        storage.connect(path)


def test_a_file_that_is_not_a_database_gives_a_clear_error(tmp_path):
    path = tmp_path / "db.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(TrimaskError, match="not a usable trimask database"):
        storage.connect(path)


def test_image_ids_are_stable_when_files_are_added(conn):
    before = {r["file_name"]: r["id"] for r in storage.list_images(conn)}
    ids = storage.upsert_images(conn, [storage.ImageFile("0.png", 5, 4, 1, 10), storage.ImageFile("a.png", 5, 4, 2, 11)])
    assert ids["a.png"] == before["a.png"] and ids["b.png"] == before["b.png"]
    assert ids["0.png"] not in before.values()


def test_category_names_are_unique_and_creating_twice_returns_the_first(conn):
    first, created = storage.create_category(conn, "cat", "#ff0000")
    again, created_again = storage.create_category(conn, "cat", "#00ff00")
    assert created and not created_again and again == first
    storage.create_category(conn, "dog", "#00ff00")
    with pytest.raises(storage.ConflictError):
        storage.update_category(conn, first["id"], {"name": "dog"})


def test_update_needs_the_current_version_and_bumps_it(conn):
    cat, _ = storage.create_category(conn, "cat", "#ff0000")
    ann = storage.insert_annotation(conn, _fields(1, cat["id"]))
    assert ann["version"] == 1
    updated = storage.update_annotation(conn, ann["id"], 1, _fields(1, cat["id"], counts="0e0"))
    assert updated["version"] == 2 and updated["segmentation"]["counts"] == "0e0"
    with pytest.raises(storage.ConflictError, match="version 2"):
        storage.update_annotation(conn, ann["id"], 1, _fields(1, cat["id"], counts="05=0"))
    assert storage.get_annotation(conn, ann["id"])["segmentation"]["counts"] == "0e0"
    with pytest.raises(storage.ConflictError):
        storage.delete_annotation(conn, ann["id"], expected_version=1)
    storage.delete_annotation(conn, ann["id"], expected_version=2)
    with pytest.raises(storage.NotFoundError):
        storage.get_annotation(conn, ann["id"])


def test_ids_of_deleted_annotations_are_never_reused(conn):
    cat, _ = storage.create_category(conn, "cat", "#ff0000")
    a = storage.insert_annotation(conn, _fields(1, cat["id"]))
    storage.delete_annotation(conn, a["id"])
    b = storage.insert_annotation(conn, _fields(1, cat["id"]))
    assert b["id"] > a["id"]


def test_a_failed_transaction_leaves_nothing_behind(conn):
    cat, _ = storage.create_category(conn, "cat", "#ff0000")
    good = _fields(1, cat["id"])
    bad = _fields(999, cat["id"])  # no such image: the foreign key fails
    with pytest.raises(sqlite3.IntegrityError):
        storage.insert_annotations(conn, [good, good, bad])
    assert conn.execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == 0


def test_references_to_missing_rows_are_not_found_errors(conn):
    cat, _ = storage.create_category(conn, "cat", "#ff0000")
    with pytest.raises(storage.NotFoundError, match="image"):
        storage.insert_annotation(conn, _fields(42, cat["id"]))
    with pytest.raises(storage.NotFoundError, match="category"):
        storage.insert_annotation(conn, _fields(1, 42))
    with pytest.raises(storage.NotFoundError):
        storage.update_annotation(conn, 42, 1, _fields(1, cat["id"]))


def test_a_category_in_use_cannot_be_deleted(conn):
    cat, _ = storage.create_category(conn, "cat", "#ff0000")
    ann = storage.insert_annotation(conn, _fields(1, cat["id"]))
    with pytest.raises(storage.ConflictError, match="still labels 1"):
        storage.delete_category(conn, cat["id"])
    storage.delete_annotation(conn, ann["id"])
    storage.delete_category(conn, cat["id"])
    assert storage.list_categories(conn) == []


def test_annotation_json_round_trips_prompt_and_bbox(conn):
    cat, _ = storage.create_category(conn, "cat", "#ff0000")
    ann = storage.insert_annotation(conn, _fields(2, cat["id"]))
    assert ann["prompt"] == {"points": [[1, 2]], "labels": [1], "box": None}
    assert ann["bbox"] == [1.0, 0.0, 1.0, 4.0]
    assert ann["segmentation"] == {"size": [4, 5], "counts": "05=0"}
    assert ann["created_at"].endswith("Z") and ann["created_at"] == ann["updated_at"]
    assert storage.annotation_counts(conn) == {2: 1}
