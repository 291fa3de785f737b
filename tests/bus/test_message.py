"""Wire format v1: encoding, tolerant decoding, and clear errors for everything else."""

from __future__ import annotations

import contextlib
from decimal import Decimal

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orderflow.bus.message import (
    MAX_ENTRY_BYTES,
    DecodeError,
    Message,
    decode,
    decode_data,
    encode,
)


def test_event_round_trips_through_stream_fields() -> None:
    message = Message.event(
        "order.created", {"id": 101, "total": Decimal("100.00")}, source="orderflow/orders"
    )
    fields = encode(message)
    raw = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}
    decoded = decode(raw, "1-0")
    assert decoded.id == message.id
    assert decoded.type == "order.created"
    assert decoded.headers["ce_source"] == "orderflow/orders"
    # Wire defaults are implied, not stored: absent means CloudEvents 1.0, JSON data.
    assert "ce_specversion" not in fields
    assert "content-type" not in fields
    assert message.headers["ce_specversion"] == "1.0"
    assert decoded.data == {"id": 101, "total": "100.00"}


def test_only_data_is_required_and_the_entry_id_becomes_the_message_id() -> None:
    decoded = decode({b"data": b'{"id":101,"email":"alice@example.com","total":100}'}, "7-3")
    assert decoded.id == "7-3"
    assert decoded.type is None
    assert decoded.data["email"] == "alice@example.com"


def test_attributes_that_differ_from_the_defaults_are_kept() -> None:
    message = Message(data={}, headers={"ce_specversion": "1.1", "content-type": "text/json"})
    assert encode(message)["ce_specversion"] == "1.1"
    assert encode(message)["content-type"] == "text/json"


def test_unknown_fields_are_kept_as_headers() -> None:
    decoded = decode({b"data": b"{}", b"traceparent": b"00-abc-def-01", b"x-custom": b"1"}, "1-0")
    assert decoded.headers == {"traceparent": "00-abc-def-01", "x-custom": "1"}


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({b"payload": b"{}"}, "no 'data' field"),
        ({b"data": b"not json"}, "not valid UTF-8 JSON"),
        ({b"data": b"[1, 2]"}, "must be a JSON object, got list"),
        ({b"data": b"\xff\xfe\x00junk"}, "not valid UTF-8 JSON"),
        ({b"data": b"{}", b"ce_type": b"\xff"}, "field 'ce_type' is not valid UTF-8"),
        ({b"\xff": b"x", b"data": b"{}"}, "field name is not valid UTF-8"),
        ({b"data": b"{}", b"ce_id": b"x" * 2000}, "field 'ce_id' is over"),
        ({b"data": b'{"a":"' + b"x" * MAX_ENTRY_BYTES + b'"}'}, "over the"),
    ],
)
def test_malformed_entries_are_refused_naming_the_problem(
    fields: dict[bytes, bytes], error: str
) -> None:
    with pytest.raises(DecodeError, match=error):
        decode(fields, "1-0")


def test_too_many_fields_are_refused() -> None:
    fields = {f"h{i}".encode(): b"v" for i in range(40)} | {b"data": b"{}"}
    with pytest.raises(DecodeError, match="fields, over"):
        decode(fields, "1-0")


def test_encode_refuses_an_oversized_message() -> None:
    with pytest.raises(ValueError, match="over the"):
        encode(Message(data={"blob": "x" * MAX_ENTRY_BYTES}))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"data": [1, 2]}, "must be a mapping"),
        ({"data": {}, "id": ""}, "non-empty string"),
        ({"data": {}, "headers": {"data": "x"}}, "may not be named"),
        ({"data": {}, "headers": {"a": 1}}, "must map str to str"),
    ],
)
def test_message_validates_its_fields(kwargs: dict[str, object], error: str) -> None:
    with pytest.raises((TypeError, ValueError), match=error):
        Message(**kwargs)  # type: ignore[arg-type]


def test_floats_are_not_how_decimals_travel() -> None:
    assert orjson.loads(encode(Message(data={"total": Decimal("0.10")}))["data"]) == {
        "total": "0.10"
    }


@given(st.dictionaries(st.binary(max_size=20), st.binary(max_size=200), max_size=8))
def test_decoding_arbitrary_fields_either_succeeds_or_raises_decode_error(
    fields: dict[bytes, bytes],
) -> None:
    try:
        message = decode(fields, "1-0")
    except DecodeError:
        return
    assert isinstance(message.data, dict)
    assert b"data" in fields


@given(st.binary(max_size=500))
def test_arbitrary_payload_bytes_never_escape_as_another_error(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        assert isinstance(decode_data(raw), dict)
