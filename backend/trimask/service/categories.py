"""``/api/categories``: labels with a unique name and a display colour.

``POST {"name": "cat", "color": "#e6194b"?, "supercategory": ""?}`` answers 201 with
the new category, or 200 with the existing one when the name is taken (so a client
can "ensure" a label without a lookup first). ``PUT/PATCH /api/categories/<id>``
renames or recolours; ``DELETE`` removes a category no annotation uses (else 409).
"""
from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Response, jsonify, request

from trimask.errors import TrimaskError
from trimask.service import security, storage
from trimask.service.state import db

bp = Blueprint("categories", __name__, url_prefix="/api/categories")

MAX_NAME_LENGTH = 200
COLOR_PATTERN = re.compile(r"^#[0-9a-fA-F]{6}$")
def parse_category(body: Any, *, partial: bool) -> dict[str, Any]:
    """Validate a category body; with ``partial`` every field is optional."""
    if not isinstance(body, dict):
        raise TrimaskError('the request body must be a JSON object like {"name": "cat", "color": "#ff0000"}.')
    unknown = set(body) - {"name", "color", "supercategory", "id"}
    if unknown:
        raise TrimaskError(f"unexpected fields in the category: {', '.join(sorted(unknown))}.")
    fields: dict[str, Any] = {}
    if "name" in body or not partial:
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH:
            raise TrimaskError(f'"name" must be a non-empty string of at most {MAX_NAME_LENGTH} characters.')
        fields["name"] = name.strip()
    if body.get("color") is not None:
        color = body["color"]
        if not isinstance(color, str) or not COLOR_PATTERN.match(color):
            raise TrimaskError('"color" must be a hex colour like "#ff8800".')
        fields["color"] = color.lower()
    if body.get("supercategory") is not None:
        sup = body["supercategory"]
        if not isinstance(sup, str) or len(sup) > MAX_NAME_LENGTH:
            raise TrimaskError(f'"supercategory" must be a string of at most {MAX_NAME_LENGTH} characters.')
        fields["supercategory"] = sup
    return fields


@bp.get("")
def list_categories() -> Response:
    return jsonify(storage.list_categories(db()))


@bp.post("")
def create_category() -> Response:
    fields = parse_category(security.parse_json_body(request.get_data(cache=False)), partial=False)
    conn = db()
    color = fields.get("color") or storage.default_color(conn)
    category, created = storage.create_category(conn, fields["name"], color, fields.get("supercategory", ""))
    response = jsonify(category)
    response.status_code = 201 if created else 200
    return response


@bp.get("/<int:category_id>")
def get_category(category_id: int) -> Response:
    return jsonify(storage.get_category(db(), category_id))


@bp.put("/<int:category_id>")
@bp.patch("/<int:category_id>")
def update_category(category_id: int) -> Response:
    fields = parse_category(security.parse_json_body(request.get_data(cache=False)), partial=True)
    return jsonify(storage.update_category(db(), category_id, fields))


@bp.delete("/<int:category_id>")
def delete_category(category_id: int) -> Response:
    storage.delete_category(db(), category_id)
    return jsonify({"id": category_id, "deleted": True})
