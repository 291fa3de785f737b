"""The Email Service's answers on ``email-events``: ``email.sent`` and ``email.failed``.

The models are the events' contract (the AsyncAPI document's schemas come from them)
and build every such event this service publishes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from orderflow.domain import MAX_ORDER_ID

#: Longest ``reason`` an ``email.failed`` carries.
MAX_REASON = 1000


class EmailSent(BaseModel):
    """``email.sent``: the order's confirmation was accepted by the SMTP server."""

    model_config = ConfigDict(
        frozen=True,
        title="EmailSent",
        json_schema_extra={
            "examples": [
                {
                    "order_id": 101,
                    "email": "alice@example.com",
                    "message_id": "<order-101@orderflow.localhost>",
                    "at": "2026-12-02T10:00:01.250+00:00",
                }
            ]
        },
    )

    order_id: int = Field(ge=1, le=MAX_ORDER_ID)
    email: str = Field(description="The address the confirmation went to.")
    message_id: str = Field(description="The confirmation's Message-ID header.")
    at: str = Field(
        description="When it was sent (RFC 3339).", json_schema_extra={"format": "date-time"}
    )

    def data(self) -> dict[str, Any]:
        """The event's JSON payload."""
        return self.model_dump(mode="json")


class EmailFailed(BaseModel):
    """``email.failed``: the order's confirmation cannot be sent (invalid, refused, gave up)."""

    model_config = ConfigDict(
        frozen=True,
        title="EmailFailed",
        json_schema_extra={
            "examples": [
                {
                    "order_id": 102,
                    "email": "bob@example.com",
                    "reason": "550 no such user",
                    "message_id": "<order-102@orderflow.localhost>",
                    "at": "2026-12-02T10:00:02.000+00:00",
                }
            ]
        },
    )

    order_id: int = Field(ge=1, le=MAX_ORDER_ID)
    email: str | None = Field(description="The address, when it could be read.")
    reason: str = Field(max_length=MAX_REASON)
    message_id: str | None = Field(description="The Message-ID it would have had, if rendered.")
    at: str = Field(
        description="When it failed (RFC 3339).", json_schema_extra={"format": "date-time"}
    )

    def data(self) -> dict[str, Any]:
        """The event's JSON payload."""
        return self.model_dump(mode="json")
