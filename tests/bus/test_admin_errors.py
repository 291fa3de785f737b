"""The bus's operator tools say what is wrong, not which CLI flag to change (the CLI adds it)."""

from __future__ import annotations

import pytest

from orderflow.bus import admin
from orderflow.bus.admin.errors import AmbiguousDeadLetter


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("yesterday", "'yesterday' is not an entry id"),
        ("1-2-3", "'1-2-3' is not an entry id"),
        ("18446744073709551616-0", "out of range for a stream entry id"),
        ("1969-12-31T00:00:00Z", "is before 1970"),
        ("99999999999999999999", "is after the year 9999"),
    ],
)
def test_a_bad_position_is_named_without_a_flag(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error) as refused:
        admin.parse_position(text)
    assert "--" not in str(refused.value)


def test_a_dead_letter_stream_named_as_a_source_is_refused_without_a_flag() -> None:
    with pytest.raises(ValueError, match="names a dead-letter stream") as refused:
        admin.dead_letter_stream("orders:dlq")
    assert "--" not in str(refused.value)


def test_an_ambiguous_dead_letter_carries_where_it_is() -> None:
    places = {"1-1": ["{orders:0}:dlq", "{orders:1}:dlq"]}
    error = AmbiguousDeadLetter(places)
    assert error.places == places
    assert str(error) == (
        "dead letter 1-1 is in {orders:0}:dlq and {orders:1}:dlq: name its partition; "
        "nothing was done"
    )
