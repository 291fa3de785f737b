"""Wire format v1 at its edges: the exact limits, the exact words of each error, and the
consumer's lazy decoding path (each test kills mutants the round-trip tests let live:
see docs/MUTATION.md)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest

from orderflow.bus.message import (
    MAX_ENTRY_BYTES,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    DecodeError,
    Message,
    _EntryMessage,
    decode,
    decode_data,
    decode_entry,
    dumps,
    encode,
)


def test_the_message_errors_say_exactly_what_is_wrong() -> None:
    with pytest.raises(TypeError, match=r"^Message\.data must be a mapping, got list$"):
        Message(data=[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^Message\.id must be a non-empty string$"):
        Message(data={}, id="")


def test_a_value_json_cannot_carry_is_named() -> None:
    with pytest.raises(TypeError) as raised:
        dumps({"x": object()})
    assert str(raised.value.__cause__) == "cannot encode object as JSON"


def test_an_event_carries_exactly_the_v1_attributes() -> None:
    first = Message.event("order.created", {"id": 1}, source="orderflow/orders")
    second = Message.event("order.created", {"id": 1}, source="orderflow/orders")
    assert set(first.headers) == {
        "ce_id",
        "ce_type",
        "ce_source",
        "ce_specversion",
        "ce_time",
        "content-type",
    }
    assert first.headers["content-type"] == "application/json"
    # A fresh UUID each time, which is also the message id.
    assert uuid.UUID(first.headers["ce_id"]) != uuid.UUID(second.headers["ce_id"])
    assert first.id == first.headers["ce_id"]
    # The time is UTC, to the millisecond.
    at = first.headers["ce_time"]
    assert len(at.split(".")[1]) == len("123+00:00")
    assert datetime.fromisoformat(at).utcoffset() == timedelta(0)


def test_encode_writes_the_message_id_as_ce_id_unless_a_header_gives_one() -> None:
    plain = Message(data={}, id="m-1")
    assert encode(plain)["ce_id"] == "m-1"
    assert set(encode(plain)) == {"data", "ce_id"}
    given = Message(data={}, headers={"ce_id": "from-header"}, id="m-2")
    assert encode(given)["ce_id"] == "from-header"


def test_encode_accepts_an_entry_of_exactly_the_limit() -> None:
    # size = len("data") + len('{"b":"' + n + '"}') + len("ce_id") + len("x") = n + 18
    exact = Message(data={"b": "x" * (MAX_ENTRY_BYTES - 18)}, id="x")
    assert sum(len(k) + len(v) for k, v in encode(exact).items()) == MAX_ENTRY_BYTES
    with pytest.raises(ValueError, match=rf"message x is {MAX_ENTRY_BYTES + 1} bytes, over"):
        encode(Message(data={"b": "x" * (MAX_ENTRY_BYTES - 17)}, id="x"))


def test_a_payload_of_exactly_the_limit_decodes() -> None:
    raw = b'{"b":"' + b"x" * (MAX_ENTRY_BYTES - 8) + b'"}'
    assert len(raw) == MAX_ENTRY_BYTES
    assert decode_data(raw) == {"b": "x" * (MAX_ENTRY_BYTES - 8)}
    assert decode({b"data": raw}, "1-0").data == decode_data(raw)
    assert decode_entry([b"data", raw], "1-0").data == decode_data(raw)


def test_an_entry_of_exactly_the_field_limit_decodes() -> None:
    fields = {f"h{i}".encode(): b"v" for i in range(MAX_HEADERS)} | {b"data": b"{}"}
    assert len(fields) == MAX_HEADERS + 1
    assert len(decode(fields, "1-0").headers) == MAX_HEADERS
    flat = [part for pair in fields.items() for part in pair]
    assert len(decode_entry(flat, "1-0").headers) == MAX_HEADERS
    over = fields | {b"one-more": b"v"}
    error = rf"^entry has {MAX_HEADERS + 2} fields, over the {MAX_HEADERS + 1} limit$"
    with pytest.raises(DecodeError, match=error):
        decode(over, "1-0")
    with pytest.raises(DecodeError, match=error):
        decode_entry([*flat, b"one-more", b"v"], "1-0")


def test_a_header_of_exactly_the_byte_limit_decodes() -> None:
    value = b"v" * MAX_HEADER_BYTES
    assert decode({b"data": b"{}", b"x": value}, "1-0").headers["x"] == value.decode()
    with pytest.raises(DecodeError, match="field 'x' is over"):
        decode({b"data": b"{}", b"x": value + b"v"}, "1-0")


def test_fields_as_str_decode_the_same_as_bytes() -> None:
    assert decode({"data": '{"a":1}', "ce_id": "e"}, "1-0") == Message(
        {"a": 1}, {"ce_id": "e"}, "e"
    )
    with pytest.raises(DecodeError, match="no 'data' field"):
        decode({"ce_type": "t"}, "1-0")


USUAL = [
    pytest.param([b"data", b'{"a":1}', b"ce_type", b"t"], id="data-first"),
    pytest.param([b"ce_type", b"t", b"data", b'{"a":1}', b"x-custom", b"1"], id="data-later"),
    pytest.param([b"ce_type", b"t", b"x-custom", b"1", b"data", b'{"a":1}'], id="data-last"),
    pytest.param(
        [b"data", b"{}", *(p for i in range(MAX_HEADERS) for p in (f"h{i:02}".encode(), b"v"))],
        id="field-limit",
    ),
    pytest.param([b"data", b"{}", b"x", b"v" * (MAX_HEADER_BYTES - 1)], id="header-bytes-limit"),
]


@pytest.mark.parametrize("fields", USUAL)
def test_usual_entries_take_the_lazy_path_and_decode_as_decode_does(fields: list[bytes]) -> None:
    # The consumer's hot path: headers are built only when read. Not taking it is
    # no error, but the cost the decoder exists to save (bench/).
    entry = decode_entry(fields, "3-0")
    assert type(entry) is _EntryMessage
    expected = decode(dict(zip(fields[::2], fields[1::2], strict=True)), "3-0")
    assert (entry.data, dict(entry.headers), entry.id) == (
        expected.data,
        expected.headers,
        expected.id,
    )


UNUSUAL = [
    pytest.param([b"x", b"data", b"data", b"{}"], id="data-as-a-value"),
    pytest.param([b"data", b"{}", b"x", "é".encode()], id="non-ascii-header"),
    pytest.param([b"data", b"{}", b"x", b"v" * MAX_HEADER_BYTES], id="headers-over-the-join-limit"),
    pytest.param([b"data", b"{}", b"data", b'{"a":1}'], id="data-twice"),
]


@pytest.mark.parametrize("fields", UNUSUAL)
def test_unusual_entries_are_decoded_by_decode(fields: list[bytes]) -> None:
    entry = decode_entry(fields, "4-0")
    expected = decode(dict(zip(fields[::2], fields[1::2], strict=True)), "4-0")
    assert type(entry) is Message
    assert (entry.data, entry.headers, entry.id) == (expected.data, expected.headers, "4-0")


def test_a_truncated_reply_is_refused_not_half_decoded() -> None:
    with pytest.raises(ValueError, match=r"shorter|longer"):
        decode_entry([b"data", b"{}", b"ce_type"], "1-0")
