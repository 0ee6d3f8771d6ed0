"""No acknowledged save is lost: real `trimask serve` processes, SIGKILL, restarts, concurrent writers."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from service_helpers import ServerProcess, annotation_body, make_images, tiny_checkpoint  # noqa: F401
from trimask.service import rle


def _mask(i: int) -> np.ndarray:
    """A distinct mask per i on the 40x30 image."""
    m = np.zeros((30, 40), np.uint8)
    m[i % 30, :] = 1
    m[:, (i * 7) % 40] = 1
    m[(i // 30) % 30, (i // 40) % 40] = 0
    return m


@pytest.fixture
def folders(tmp_path):
    return make_images(tmp_path / "images"), tmp_path / "annotations"


def test_a_save_acknowledged_right_before_sigkill_is_there_after_restart(folders, tiny_checkpoint):  # noqa: F811
    images, annotations = folders
    server = ServerProcess(images, annotations, tiny_checkpoint)
    try:
        status, cat = server.request("POST", "/api/categories", {"name": "cat"})
        assert status == 201
        saved = []
        for i in range(20):
            status, ann = server.request("POST", "/api/images/1/annotations", annotation_body(_mask(i), cat["id"]))
            assert status == 201
            saved.append(ann)
        status, updated = server.request("PUT", f"/api/annotations/{saved[0]['id']}", {"level": "whole", "version": 1})
        assert status == 200
    finally:
        server.kill()  # SIGKILL straight after the last acknowledgement: no clean shutdown
    server = ServerProcess(images, annotations, tiny_checkpoint)
    try:
        status, listed = server.request("GET", "/api/images/1/annotations")
        assert status == 200
        assert [a["id"] for a in listed] == [a["id"] for a in saved]
        assert listed[0] == updated
        for ann, i in zip(listed, range(20)):
            np.testing.assert_array_equal(rle.decode_mask(ann["segmentation"]), _mask(i))
    finally:
        server.kill()


def test_concurrent_writers_on_one_server_and_across_two_processes_lose_nothing(folders, tiny_checkpoint):  # noqa: F811
    images, annotations = folders
    first = ServerProcess(images, annotations, tiny_checkpoint)
    second = ServerProcess(images, annotations, tiny_checkpoint)  # a second process on the same database
    try:
        _, cat = first.request("POST", "/api/categories", {"name": "cat"})
        acknowledged: list[int] = []
        failures: list[object] = []
        lock = threading.Lock()

        def writer(server: ServerProcess, worker: int) -> None:
            for j in range(10):
                status, ann = server.request(
                    "POST", "/api/images/1/annotations", annotation_body(_mask(worker * 10 + j), cat["id"])
                )
                with lock:
                    (acknowledged.append(ann["id"]) if status == 201 else failures.append((status, ann)))

        threads = [threading.Thread(target=writer, args=(first if w % 2 else second, w)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        assert len(acknowledged) == 80 and len(set(acknowledged)) == 80
        for server in (first, second):
            _, listed = server.request("GET", "/api/images/1/annotations")
            assert sorted(a["id"] for a in listed) == sorted(acknowledged)
    finally:
        first.kill()
        second.kill()


def test_concurrent_updates_of_one_object_let_exactly_one_win(folders, tiny_checkpoint):  # noqa: F811
    images, annotations = folders
    server = ServerProcess(images, annotations, tiny_checkpoint)
    try:
        _, cat = server.request("POST", "/api/categories", {"name": "cat"})
        _, ann = server.request("POST", "/api/images/1/annotations", annotation_body(_mask(0), cat["id"]))
        statuses: list[int] = []

        def edit(i: int) -> None:
            status, _ = server.request("PUT", f"/api/annotations/{ann['id']}", {"score": i / 10, "version": 1})
            statuses.append(status)

        threads = [threading.Thread(target=edit, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(statuses) == [200] + [409] * 5
        _, final = server.request("GET", f"/api/annotations/{ann['id']}")
        assert final["version"] == 2
    finally:
        server.kill()


def test_the_database_survives_restarts_with_stable_ids(folders, tiny_checkpoint):  # noqa: F811
    images, annotations = folders
    seen = None
    for round_ in range(3):
        server = ServerProcess(images, annotations, tiny_checkpoint)
        try:
            if round_ == 0:
                _, cat = server.request("POST", "/api/categories", {"name": "cat"})
                server.request("POST", "/api/images/3/annotations", annotation_body(np.ones((16, 24), np.uint8), cat["id"]))
            _, listed_images = server.request("GET", "/api/images")
            _, coco = server.request("GET", "/api/export/coco")
            state = (listed_images, coco["annotations"], coco["categories"])
            assert seen is None or state == seen
            seen = state
        finally:
            server.kill()
    assert seen[0][2]["num_annotations"] == 1
