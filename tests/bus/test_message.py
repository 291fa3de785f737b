"""Wire format v1: encoding, tolerant decoding, and clear errors for everything else."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
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
    decode_entry,
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


MALFORMED = [
    ({b"payload": b"{}"}, "no 'data' field"),
    ({b"data": b"not json"}, "not valid UTF-8 JSON"),
    ({b"data": b"[1, 2]"}, "must be a JSON object, got list"),
    ({b"data": b"\xff\xfe\x00junk"}, "not valid UTF-8 JSON"),
    ({b"data": b"{}", b"ce_type": b"\xff"}, "field 'ce_type' is not valid UTF-8"),
    ({b"\xff": b"x", b"data": b"{}"}, "field name is not valid UTF-8"),
    ({b"data": b"{}", b"ce_id": b"x" * 2000}, "field 'ce_id' is over"),
    ({b"data": b'{"a":"' + b"x" * MAX_ENTRY_BYTES + b'"}'}, "over the"),
    ({f"h{i}".encode(): b"v" for i in range(40)} | {b"data": b"{}"}, "fields, over"),
]


def flat(fields: dict[bytes, bytes]) -> list[bytes]:
    return [part for pair in fields.items() for part in pair]


@pytest.mark.parametrize(("fields", "error"), MALFORMED)
def test_malformed_entries_are_refused_naming_the_problem(
    fields: dict[bytes, bytes], error: str
) -> None:
    with pytest.raises(DecodeError, match=error):
        decode(fields, "1-0")
    # The consumer's flat-list decoder refuses the same, with the same words.
    with pytest.raises(DecodeError, match=error):
        decode_entry(flat(fields), "1-0")


def test_decode_entry_builds_the_headers_on_first_use_equal_to_decode() -> None:
    message = Message.event("order.created", {"id": 1}, source="orderflow/orders")
    fields = {
        k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in encode(message).items()
    }
    expected = decode(fields, "5-0")
    entry = decode_entry(flat(fields), "5-0")
    assert entry.data == {"id": 1}
    assert entry.id == message.id == expected.id
    assert entry.headers == expected.headers
    assert entry.type == "order.created"
    assert entry == expected
    assert expected == entry
    assert repr(entry) == repr(expected)
    assert copy.deepcopy(entry) == expected
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.headers = {}
    with pytest.raises(TypeError):
        hash(entry)
    # Without ce_id, the entry id.
    assert decode_entry([b"data", b"{}", b"ce_type", b"t"], "6-1").id == "6-1"


field_names = st.one_of(
    st.sampled_from([b"data", b"ce_id", b"ce_type", b"traceparent", b"x-custom"]),
    st.binary(max_size=12),
)
field_values = st.one_of(
    st.sampled_from([b"{}", b'{"a": 1}', b"data", b"[1]"]),
    st.binary(max_size=60),
    st.text(alphabet="abc\u00e9", min_size=900, max_size=1100).map(str.encode),
)


@given(st.lists(st.tuples(field_names, field_values), max_size=8))
def test_decode_entry_agrees_with_decode_on_any_fields(pairs: list[tuple[bytes, bytes]]) -> None:
    # Redis keeps repeated field names; a dict keeps the last, and so must decode_entry.
    fields = [part for pair in pairs for part in pair]
    refused: str | None = None
    try:
        expected = decode(dict(pairs), "1-0")
    except DecodeError as exc:
        refused = str(exc)
    if refused is not None:
        with pytest.raises(DecodeError) as raised:
            decode_entry(fields, "1-0")
        assert str(raised.value) == refused
        return
    entry = decode_entry(fields, "1-0")
    assert (entry.data, entry.headers, entry.id) == (expected.data, expected.headers, expected.id)


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
