"""Reading a ``POST /orders`` body within its limits, by FastAPI or by raw ASGI."""

from __future__ import annotations

from fastapi import Request
from starlette.types import Receive

from orderflow.orders.problems import Problem, invalid
from orderflow.orders.validation import MAX_BODY_BYTES


class _LimitedBody:
    """A request body read in chunks, refused (a 422 Problem) once over MAX_BODY_BYTES,
    as declared by Content-Length or as read."""

    __slots__ = ("chunks", "size")

    def __init__(self, declared: str | None) -> None:
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise _too_big()
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        """Take the next chunk."""
        self.size += len(chunk)
        if self.size > MAX_BODY_BYTES:
            raise _too_big()
        self.chunks.append(chunk)

    def value(self) -> bytes:
        """The whole body."""
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)


def _too_big() -> Problem:
    return invalid([{"field": "body", "message": f"is over {MAX_BODY_BYTES} bytes"}])


async def read_body(request: Request) -> bytes:
    """The request's body; a Problem once it is over MAX_BODY_BYTES."""
    body = _LimitedBody(request.headers.get("content-length"))
    async for chunk in request.stream():
        body.add(chunk)
    return body.value()


class Disconnected(Exception):
    """The client went away before its request's body was in."""


async def receive_body(receive: Receive, declared: str | None) -> bytes:
    """The request's body from raw ASGI messages, with ``read_body``'s limits."""
    body = _LimitedBody(declared)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        body.add(message.get("body", b""))
        if not message.get("more_body", False):
            return body.value()


def check_media_type(content_type: str | None) -> None:
    """Refuse a body that is not JSON (no content type counts as JSON)."""
    if content_type is None:
        return
    media = content_type.split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise invalid([{"field": "content-type", "message": "must be application/json"}])
