"""``/api/images/<id>/annotations`` and ``/api/annotations/<id>``: saved objects as COCO RLE.

An annotation body (POST, or the fields to change in a PUT)::

    {"category_id": 3,
     "segmentation": {"size": [h, w], "counts": "<compressed>" | [run, run, ...]},
     "score": 0.93,                         # predicted IoU, optional
     "level": "subpart" | "part" | "whole" | "single",   # optional
     "prompt": {"points": [[x, y], ...], "labels": [1, 0, ...], "box": [x0, y0, x1, y1] | null}}

Responses carry the stored annotation (``id``, ``image_id``, canonical compressed
``segmentation``, ``area``, ``bbox``, ``iscrowd``, ``score``, ``level``, ``prompt``,
``version``, ``created_at``, ``updated_at``) and an ``ETag`` of its version. A PUT or
DELETE based on an outdated ``version`` is answered 409.
"""
from __future__ import annotations

import math
from typing import Any

from flask import Blueprint, Response, jsonify, request

from trimask.errors import TrimaskError
from trimask.service import rle, security, storage
from trimask.service.state import PreconditionRequired, current, db

bp = Blueprint("annotations", __name__, url_prefix="/api")

MAX_PROMPT_POINTS = 1000
WRITABLE = {"category_id", "segmentation", "score", "level", "prompt"}
# Fields of the response form: a client may send an annotation back as it got it.
READ_ONLY = {"id", "image_id", "area", "bbox", "iscrowd", "version", "created_at", "updated_at"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _validate_prompt(prompt: Any) -> dict[str, Any] | None:
    if prompt is None:
        return None
    if not isinstance(prompt, dict):
        raise TrimaskError('"prompt" must be an object {"points": [[x, y], ...], "labels": [...], "box": ...} or null.')
    unknown = set(prompt) - {"points", "labels", "box"}
    if unknown:
        raise TrimaskError(f'"prompt" has unexpected keys: {", ".join(sorted(unknown))}.')
    points = prompt.get("points", [])
    labels = prompt.get("labels", [])
    box = prompt.get("box")
    if not isinstance(points, list) or len(points) > MAX_PROMPT_POINTS or not all(
        isinstance(p, list) and len(p) == 2 and all(_is_number(c) for c in p) for p in points
    ):
        raise TrimaskError(f'"prompt.points" must be a list of at most {MAX_PROMPT_POINTS} [x, y] number pairs.')
    if not isinstance(labels, list) or len(labels) != len(points) or not all(
        _is_int(v) and v in (0, 1) for v in labels
    ):
        raise TrimaskError('"prompt.labels" must hold one label per point: 1 foreground, 0 background.')
    if box is not None and (not isinstance(box, list) or len(box) != 4 or not all(_is_number(c) for c in box)):
        raise TrimaskError('"prompt.box" must be [x0, y0, x1, y1] or null.')
    return {"points": points, "labels": labels, "box": box}


def parse_annotation(
    body: Any, image_id: int, *, base: dict[str, Any] | None = None
) -> storage.AnnotationFields:
    """Validate a request body into storage fields.

    Args:
        body: the parsed JSON.
        image_id: the image the annotation belongs to (its size checks the mask).
        base: for an update, the stored annotation whose fields the body may leave out.
    """
    if not isinstance(body, dict):
        raise TrimaskError("the request body must be a JSON object describing the annotation.")
    unknown = set(body) - WRITABLE - READ_ONLY
    if unknown:
        raise TrimaskError(f"unexpected fields in the annotation: {', '.join(sorted(unknown))}.")
    if "image_id" in body and body["image_id"] != image_id:
        raise TrimaskError(f"the body's image_id {body['image_id']!r} does not match the image {image_id}.")
    merged = {k: v for k, v in (base or {}).items() if k in WRITABLE}
    merged.update({k: v for k, v in body.items() if k in WRITABLE})

    category_id = merged.get("category_id")
    if not _is_int(category_id):
        raise TrimaskError('"category_id" must be the integer id of a category (see /api/categories).')
    try:
        storage.get_category(db(), category_id)
    except storage.NotFoundError:
        raise TrimaskError(f"there is no category with id {category_id}; create it with POST /api/categories.") from None
    if "segmentation" not in merged:
        raise TrimaskError('"segmentation" is required: a COCO RLE {"size": [h, w], "counts": ...}.')
    image = current().index.get(image_id) if base is None else None
    hw = (image.height, image.width) if image else _stored_image_hw(image_id)
    mask = rle.normalize_rle(merged["segmentation"], hw)
    score = merged.get("score")
    if score is not None and not _is_number(score):
        raise TrimaskError('"score" must be a finite number (the predicted IoU) or null.')
    level = merged.get("level")
    if level is not None and level not in storage.LEVELS:
        raise TrimaskError(f'"level" must be one of {", ".join(storage.LEVELS)} or null.')
    return storage.AnnotationFields(
        image_id=image_id,
        category_id=category_id,
        height=mask.height,
        width=mask.width,
        counts=mask.counts,
        area=mask.area,
        bbox=mask.bbox,
        score=float(score) if score is not None else None,
        level=level,
        prompt=_validate_prompt(merged.get("prompt")),
    )


def _stored_image_hw(image_id: int) -> tuple[int, int]:
    """An edited annotation's image size: from the folder if present, else as recorded."""
    try:
        record = current().index.get(image_id)
        return record.height, record.width
    except storage.NotFoundError:
        row = storage.get_image(db(), image_id)
        return row["height"], row["width"]


def _json_body() -> Any:
    return security.parse_json_body(request.get_data(cache=False))


def _annotation_response(ann: dict[str, Any], status: int = 200) -> Response:
    response = jsonify(ann)
    response.status_code = status
    response.headers["ETag"] = f'"{ann["version"]}"'
    return response


def _version_from_request(body: Any) -> int | None:
    """The version a change is based on: body ``version``, ``?version=``, or ``If-Match: "N"``."""
    if isinstance(body, dict) and "version" in body:
        v = body["version"]
        if not _is_int(v) or v < 1:
            raise TrimaskError('"version" must be a positive integer (the version the change is based on).')
        return v
    raw = request.args.get("version")
    if raw is None and request.headers.get("If-Match"):
        raw = request.headers["If-Match"].strip().removeprefix("W/").strip('"')
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 1 or len(raw) > 18:
        raise TrimaskError("the version must be a positive integer (If-Match: \"N\" or ?version=N).")
    return int(raw)


@bp.get("/images/<int:image_id>/annotations")
def list_image_annotations(image_id: int) -> Response:
    current().index.get(image_id)
    return jsonify(storage.list_annotations(db(), image_id))


@bp.post("/images/<int:image_id>/annotations")
def create_annotation(image_id: int) -> Response:
    current().index.get(image_id)
    body = _json_body()
    fields = parse_annotation(body, image_id)
    ann = storage.insert_annotation(db(), fields)
    response = _annotation_response(ann, 201)
    response.headers["Location"] = f"/api/annotations/{ann['id']}"
    return response


@bp.get("/annotations/<int:ann_id>")
def get_annotation(ann_id: int) -> Response:
    return _annotation_response(storage.get_annotation(db(), ann_id))


@bp.put("/annotations/<int:ann_id>")
@bp.patch("/annotations/<int:ann_id>")
def update_annotation(ann_id: int) -> Response:
    body = _json_body()
    if not isinstance(body, dict):
        raise TrimaskError("the request body must be a JSON object with the fields to change and the version.")
    existing = storage.get_annotation(db(), ann_id)
    version = _version_from_request(body)
    if version is None:
        raise PreconditionRequired(
            'an update must name the version it is based on ("version" in the body, or If-Match: "N").'
        )
    fields = parse_annotation(body, existing["image_id"], base=existing)
    return _annotation_response(storage.update_annotation(db(), ann_id, version, fields))


@bp.delete("/annotations/<int:ann_id>")
def delete_annotation(ann_id: int) -> Response:
    body = security.parse_json_body(request.get_data(cache=False)) if request.content_length else None
    storage.delete_annotation(db(), ann_id, _version_from_request(body))
    return jsonify({"id": ann_id, "deleted": True})
