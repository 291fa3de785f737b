"""RFC 9457 problems: how the Order Service's API says what is wrong."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import sqlalchemy as sa
from fastapi.responses import Response

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    """An RFC 9457 problem answered as ``application/problem+json``."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        kind: str = "about:blank",
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors
        self.kind = kind

    def body(self, instance: str | None = None) -> bytes:
        """The problem as JSON."""
        body: dict[str, Any] = {
            "type": self.kind,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        if self.errors is not None:
            body["errors"] = self.errors
        return orjson.dumps(body)

    def response(self, instance: str | None = None) -> Response:
        """The HTTP response of this problem."""
        return Response(self.body(instance), status_code=self.status, media_type=PROBLEM_JSON)


def invalid(errors: list[dict[str, str]]) -> Problem:
    """422 naming every invalid field."""
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return Problem(
        422, "Invalid request", detail, errors=errors, kind="urn:orderflow:problem:validation"
    )


def database_problem(method: str, path: str, exc: sa.exc.SQLAlchemyError) -> Problem:
    """503, logging the database's error (the client learns nothing of it)."""
    log.error("database error on %s %s", method, path, exc_info=exc)
    return Problem(
        503,
        "Database unavailable",
        "the database failed; nothing was stored, retry later (with the same Idempotency-Key)",
    )
