"""Durations and sizes read the same in the console and the CLI."""

from __future__ import annotations

import pytest

from orderflow.formatting import human_duration, human_size


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (850, "850ms"),
        (4_200, "4.2s"),
        (185_000, "3m05s"),
        (7_620_000, "2h07m"),
        (47 * 3_600_000, "47h00m"),
        (76 * 3_600_000, "3d04h"),
    ],
)
def test_durations(ms: int, text: str) -> None:
    assert human_duration(ms) == text


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (3 * 2**20, "3.0 MiB"),
        (2**40, "1024.0 GiB"),
    ],
)
def test_sizes(size: int, text: str) -> None:
    assert human_size(size) == text
