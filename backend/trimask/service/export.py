"""``GET /api/export/coco``: the dataset as a COCO file, also written to <annotations>/coco.json."""
from __future__ import annotations

from flask import Blueprint, Response, request

from trimask.coco_export import COCO_FILENAME, export_coco
from trimask.service.state import current, db

bp = Blueprint("export", __name__, url_prefix="/api/export")


@bp.get("/coco")
def coco() -> Response:
    """The COCO JSON; ``?download=1`` asks the browser to save it as coco.json."""
    _, data = export_coco(db(), current().annotations_dir / COCO_FILENAME)
    response = Response(data, mimetype="application/json")
    response.headers["Cache-Control"] = "no-store"
    if request.args.get("download") in ("1", "true"):
        response.headers["Content-Disposition"] = f'attachment; filename="{COCO_FILENAME}"'
    return response
