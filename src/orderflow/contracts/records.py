"""Models of what travels on the bus without being a JSON payload of its own: the
CloudEvents fields of a stream entry, and a dead letter."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

#: A decimal count, as every stream field is text.
_COUNT = r"^[0-9]+$"


class CloudEventFields(BaseModel):
    """The CloudEvents attributes of a stream entry (binary mode, Kafka binding names);
    all optional: a bare ``XADD orders * data '{...}'`` is a valid event."""

    model_config = ConfigDict(extra="allow", title="CloudEventFields", populate_by_name=True)

    ce_id: str | None = Field(None, description="Unique event id; else the stream entry id.")
    ce_type: str | None = Field(None, description="The event type.")
    ce_source: str | None = Field(None, description="The service that published it.")
    ce_specversion: str | None = Field(None, description="CloudEvents version: 1.0.")
    ce_time: str | None = Field(None, description="When it happened (RFC 3339).")
    ce_dataschema: str | None = Field(
        None,
        description="The payload's version, urn:orderflow:schema:<type>:<N>; absent: 1.",
        pattern=r"^urn:orderflow:schema:[a-z][a-z0-9._-]*:[1-9][0-9]*$",
    )
    content_type: str | None = Field(
        None, alias="content-type", description="Of data: application/json."
    )
    traceparent: str | None = Field(None, description="W3C trace context, passed on.")
    tracestate: str | None = Field(None, description="W3C trace context, with traceparent.")


class DeadLetter(BaseModel):
    """An entry the Email Service gave up on, in ``<stream>:dlq``: the entry's own
    fields (``data`` and its headers) plus ``dlq_*`` fields saying why, when and where."""

    model_config = ConfigDict(
        extra="allow",
        title="DeadLetter",
        json_schema_extra={
            "examples": [
                {
                    "data": '{"id":104,"customer":{"email":"d@example.com"},"total":"1.00"}',
                    "ce_dataschema": "urn:orderflow:schema:order.created:3",
                    "dlq_reason": "permanent failure: unsupported schema version: "
                    "order.created version 3 (this Email Service reads [1, 2])",
                    "dlq_time": "2026-12-02T10:00:03.000+00:00",
                    "dlq_stream": "orders",
                    "dlq_group": "email-service",
                    "dlq_consumer": "host-1234-ab12cd",
                    "dlq_deliveries": "1",
                    "dlq_source_id": "1764669603000-0",
                }
            ]
        },
    )

    data: str | None = Field(
        None,
        description="The entry's payload as it was (JSON text, maybe invalid; absent if none).",
    )
    dlq_reason: str = Field(max_length=1000, description="Why it was given up.")
    dlq_time: str = Field(description="When (RFC 3339).", json_schema_extra={"format": "date-time"})
    dlq_stream: str = Field(description="The stream (or partition) it came from.")
    dlq_group: str = Field(description="The consumer group that gave up.")
    dlq_consumer: str = Field(description="The consumer that gave up.")
    dlq_deliveries: str = Field(pattern=_COUNT, description="Deliveries made, as text.")
    dlq_source_id: str = Field(description="The entry's id in its stream.")
