"""Who may talk to the service and how much they may send.

- On loopback the server trusts the local user. Bound to any other address it
  requires a token on every ``/api`` request: ``Authorization: Bearer <token>``,
  ``?token=<token>`` (for the page's first load and ``<img src>``), or the
  ``trimask_token`` cookie that the server sets when a request carried a valid
  ``?token=`` (so the page's own fetches and image loads need nothing more).
- Request bodies are bounded (``MAX_CONTENT_LENGTH``) and JSON is parsed strictly:
  no NaN/Infinity, no nesting deeper than ``MAX_JSON_DEPTH``.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any

from trimask.errors import TrimaskError

MAX_CONTENT_LENGTH = 16 * 1024 * 1024  # an uncompressed RLE of a large photo fits easily
MAX_JSON_DEPTH = 32
TOKEN_COOKIE = "trimask_token"
TOKEN_ENV = "TRIMASK_TOKEN"


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_token_for_host(host: str, token: str | None) -> None:
    """Refuse to serve on a non-loopback address without a token."""
    if not is_loopback_host(host) and not token:
        raise TrimaskError(
            f"serving on {host} makes the annotations reachable from other machines; "
            f"pass --token TOKEN (or set {TOKEN_ENV}) so only holders of the token get in."
        )


def token_matches(expected: str, *candidates: str | None) -> bool:
    """Constant-time comparison of the expected token against each offered one."""
    want = expected.encode()
    return any(c is not None and hmac.compare_digest(want, c.encode()) for c in candidates)


def bearer_token(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


class BadRequestBody(TrimaskError):
    """The request body is not acceptable JSON (HTTP 400)."""


def _reject_constant(name: str) -> Any:
    raise BadRequestBody(f"the JSON body contains {name}, which is not a number JSON allows.")


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """True when ``value`` nests lists/dicts deeper than ``limit`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse a request body as strict JSON or raise ``BadRequestBody`` saying why."""
    if not raw:
        raise BadRequestBody("the request needs a JSON body.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestBody("the request body is not UTF-8 text.") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequestBody(f"the JSON body nests deeper than {max_depth} levels.") from None
    except json.JSONDecodeError as exc:
        raise BadRequestBody(f"the request body is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).") from None
    if json_depth_exceeds(value, max_depth):
        raise BadRequestBody(f"the JSON body nests deeper than {max_depth} levels.")
    return value
