"""The bus's message and the stream wire format v1 (CloudEvents binary mode, Kafka names)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson

#: The stream field holding the JSON payload; the only required one.
DATA_FIELD = "data"
#: The same, as the bytes a Redis client returns for it.
DATA_FIELD_BYTES = DATA_FIELD.encode()
#: Fields of wire format v1 besides ``data``; other fields are kept as headers too.
KNOWN_HEADERS = (
    "ce_id",
    "ce_type",
    "ce_source",
    "ce_specversion",
    "ce_time",
    "content-type",
    "traceparent",
    "tracestate",
)
#: Attributes whose absence means exactly this value in wire format v1.
WIRE_DEFAULTS = {"ce_specversion": "1.0", "content-type": "application/json"}
#: Upper bound of one encoded entry; larger entries are refused by publishers and
#: dead-lettered by consumers.
MAX_ENTRY_BYTES = 256 * 1024
MAX_HEADERS = 32
MAX_HEADER_BYTES = 1024


class DecodeError(ValueError):
    """A stream entry or payload that is not a valid wire format v1 message."""


@dataclass(frozen=True, slots=True)
class Message:
    """An event: a unique id, string headers and a JSON-object payload."""

    data: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        if not isinstance(self.data, Mapping):
            raise TypeError(f"Message.data must be a mapping, got {type(self.data).__name__}")
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("Message.id must be a non-empty string")
        for key, value in self.headers.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"Message header {key!r} must map str to str")
            if key == DATA_FIELD:
                raise ValueError(f"Message header may not be named {DATA_FIELD!r}")

    @classmethod
    def _trusted(cls, data: dict[str, Any], headers: dict[str, str], id: str) -> Message:
        # For decode(), whose output already holds what __post_init__ checks: skipping
        # the checks (and the frozen dataclass's generic setattr) makes this a fifth of
        # the cost of Message(...).
        message = _new(cls)
        _set_data(message, data)
        _set_headers(message, headers)
        _set_id(message, id)
        return message

    @property
    def type(self) -> str | None:
        """The CloudEvents type, if the producer gave one."""
        return self.headers.get("ce_type")

    @classmethod
    def event(
        cls,
        type: str,
        data: Mapping[str, Any],
        *,
        source: str,
        id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Message:
        """A message with the CloudEvents attributes of wire format v1 filled in."""
        event_id = id or str(uuid.uuid4())
        attributes = {
            "ce_id": event_id,
            "ce_type": type,
            "ce_source": source,
            "ce_specversion": "1.0",
            "ce_time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "content-type": "application/json",
        }
        attributes.update(headers or {})
        return cls(data=data, headers=attributes, id=event_id)


# The slots' own setters: what a frozen dataclass's __init__ reaches the slow way.
_new = object.__new__
_set_data: Callable[[Message, Any], None] = Message.__dict__["data"].__set__
_set_headers: Callable[[Message, Any], None] = Message.__dict__["headers"].__set__
_set_id: Callable[[Message, Any], None] = Message.__dict__["id"].__set__


def dumps(data: Mapping[str, Any]) -> bytes:
    """Encode a payload as compact UTF-8 JSON (decimals and datetimes as strings)."""
    return orjson.dumps(data, default=_json_default)


def _json_default(value: object) -> object:
    # Decimal is the one non-native type the project puts in payloads; keep it exact.
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def encode(message: Message) -> dict[str, bytes | str]:
    """The stream entry fields of a message; raises ValueError when it is too large."""
    fields: dict[str, bytes | str] = {DATA_FIELD: dumps(message.data)}
    for name, value in message.headers.items():
        # Attributes that only restate wire format v1's defaults are left out: they
        # cost Redis ~50 bytes an entry, and a consumer reads their absence the same.
        if WIRE_DEFAULTS.get(name) != value:
            fields[name] = value
    if "ce_id" not in fields:
        fields["ce_id"] = message.id
    size = sum(len(k) + len(v) for k, v in fields.items())
    if size > MAX_ENTRY_BYTES:
        raise ValueError(f"message {message.id} is {size} bytes, over the {MAX_ENTRY_BYTES} limit")
    return fields


def decode_data(raw: bytes | str) -> dict[str, Any]:
    """Parse a JSON-object payload, raising DecodeError naming what is wrong."""
    if len(raw) > MAX_ENTRY_BYTES:
        raise DecodeError(f"payload is {len(raw)} bytes, over the {MAX_ENTRY_BYTES} limit")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"data is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(value, dict):
        raise DecodeError(f"data must be a JSON object, got {type(value).__name__}")
    return value


def decode(fields: Mapping[bytes, bytes] | Mapping[str, str], entry_id: str) -> Message:
    """Decode stream entry fields tolerantly: only ``data`` is required.

    The message id is ``ce_id`` when present, else the stream entry id.
    """
    if len(fields) > MAX_HEADERS + 1:
        raise DecodeError(f"entry has {len(fields)} fields, over the {MAX_HEADERS + 1} limit")
    try:
        # The consumer's hot path, for the bytes replies of a Redis client: one
        # comprehension, known names from a table. Anything unusual (str fields, bad
        # UTF-8) takes the slow path, which says what is wrong.
        raw: Mapping[bytes, bytes] = fields  # type: ignore[assignment]
        raw_data: bytes | str | None = raw.get(DATA_FIELD_BYTES)
        headers = {
            _FIELD_NAMES.get(key) or key.decode(): value.decode()
            for key, value in raw.items()
            if key != DATA_FIELD_BYTES
        }
    except (AttributeError, UnicodeDecodeError):
        raw_data, headers = _decode_slowly(fields)
    if raw_data is None:
        raise DecodeError(f"entry has no {DATA_FIELD!r} field")
    for name, text in headers.items():
        if len(text) > MAX_HEADER_BYTES:
            raise DecodeError(f"field {name!r} is over {MAX_HEADER_BYTES} bytes")
    data = decode_data(raw_data)
    return Message._trusted(data, headers, headers.get("ce_id") or entry_id)


def decode_entry(fields: list[bytes], entry_id: str) -> Message:
    """:func:`decode` for an entry's fields as Redis replies them (flat: name, value ...).

    The consumer's hot path. It checks all :func:`decode` checks, parses the payload,
    and raises the same DecodeError for a malformed entry; but for the common entry
    (one ``data`` field, ASCII headers, short enough) it does so with a few C calls on
    the whole entry, and leaves building the ``headers`` dict (and finding the id in
    it) to their first use: a handler that never reads them does not pay for them.
    Anything unusual takes :func:`decode`'s way.
    """
    try:
        if fields[0] == DATA_FIELD_BYTES:
            # orderflow's encoder puts data first.
            raw_data, headers = fields[1], fields[2:]
        else:
            at = fields.index(DATA_FIELD_BYTES)
            if at % 2:
                raise ValueError("'data' is a value here, not a field name")
            raw_data, headers = fields[at + 1], fields[:at] + fields[at + 2 :]
        count = len(fields)
        usual = (
            DATA_FIELD_BYTES not in headers and count <= 2 * (MAX_HEADERS + 1) and count % 2 == 0
        )
        if usual:
            joined = b"".join(headers)
            usual = joined.isascii() and len(joined) <= MAX_HEADER_BYTES
    except (ValueError, TypeError, IndexError):
        usual = False
    if not usual:
        return decode(dict(zip(fields[::2], fields[1::2], strict=True)), entry_id)
    try:
        data = orjson.loads(raw_data)
    except orjson.JSONDecodeError:
        data = None
    if type(data) is not dict or len(raw_data) > MAX_ENTRY_BYTES:
        # decode_data() raises the error that says what is wrong.
        data = decode_data(raw_data)
    message: _EntryMessage = _new(_EntryMessage)
    _set_data(message, data)
    _set_fields(message, headers)
    _set_entry_id(message, entry_id)
    return message


class _EntryMessage(Message):
    """A :class:`Message` from :func:`decode_entry`: checked, its headers built on first use."""

    __slots__ = ("_entry_id", "_fields")
    _fields: Sequence[bytes]
    _entry_id: str

    def _load(self) -> None:
        # Cannot fail: decode_entry checked the fields are ASCII, few and short.
        fields = self._fields
        headers = {
            _FIELD_NAMES.get(key) or key.decode(): value.decode()
            for key, value in zip(fields[::2], fields[1::2], strict=True)
        }
        _set_headers(self, headers)
        _set_id(self, headers.get("ce_id") or self._entry_id)

    @property
    def headers(self) -> Mapping[str, str]:
        try:
            return _get_headers(self)
        except AttributeError:
            self._load()
            return _get_headers(self)

    @property
    def id(self) -> str:
        try:
            return _get_id(self)
        except AttributeError:
            self._load()
            return _get_id(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Message):
            return (self.data, self.headers, self.id) == (other.data, other.headers, other.id)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Message(data={self.data!r}, headers={self.headers!r}, id={self.id!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Message, (self.data, self.headers, self.id))


_get_headers: Callable[[Message], Mapping[str, str]] = Message.__dict__["headers"].__get__
_get_id: Callable[[Message], str] = Message.__dict__["id"].__get__
_set_fields: Callable[[_EntryMessage, Any], None] = _EntryMessage.__dict__["_fields"].__set__
_set_entry_id: Callable[[_EntryMessage, str], None] = _EntryMessage.__dict__["_entry_id"].__set__


def _decode_slowly(
    fields: Mapping[bytes, bytes] | Mapping[str, str],
) -> tuple[bytes | str | None, dict[str, str]]:
    raw_data: bytes | str | None = None
    headers: dict[str, str] = {}
    for key, value in fields.items():
        name = _text(key, "field name")
        if name == DATA_FIELD:
            raw_data = value
        else:
            headers[name] = _text(value, f"field {name!r}")
    return raw_data, headers


_FIELD_NAMES = {name.encode(): name for name in KNOWN_HEADERS}


def _text(value: bytes | str, what: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise DecodeError(f"{what} is not valid UTF-8") from None
