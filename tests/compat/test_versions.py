"""The version checks that turn each fast path of orderflow._compat on or off."""

from __future__ import annotations

import logging
import os

import pytest

import orderflow._compat as compat
from orderflow._compat import aiosmtplib as compat_aiosmtplib
from orderflow._compat import redis as compat_redis

#: Each fast path: its module's tested range, versions inside it, versions outside it.
CASES = [
    (
        "redis.stream_io",
        "redis",
        compat_redis.TESTED,
        ["6.2.0", "7.4.1", "8.0.1", "8.1.0"],
        ["5.0.8", "6.1.1", "8.2.0", "9"],
    ),
    (
        "redis.cluster_transaction",
        "redis",
        compat_redis.TESTED,
        ["6.2.0", "8.1.0"],
        ["6.0.0", "8.2.0rc1"],
    ),
    ("redis.cluster_stream_routing", "redis", compat_redis.TESTED, ["8.1.0"], ["5.0.8", "8.2.0"]),
    (
        "aiosmtplib.pipelining",
        "aiosmtplib",
        compat_aiosmtplib.TESTED,
        ["3.0.0", "4.0.2", "5.1.3"],
        ["2.0.2", "5.2.0", "6.0.0"],
    ),
]


@pytest.mark.parametrize(("name", "dist", "tested", "inside", "outside"), CASES)
def test_a_version_outside_the_tested_range_picks_the_public_path(
    name: str,
    dist: str,
    tested: tuple[compat.Version, compat.Version],
    inside: list[str],
    outside: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The version alone decides here, even in the run that forces every fallback.
    monkeypatch.setattr(compat, "FORCED_OFF", frozenset())
    for version in outside:
        decision = compat.check(name, dist, tested, installed=version)
        assert not decision.enabled, version
        assert f"{dist} {version} is outside the range it was tested for" in decision.reason
    for version in inside:
        assert compat.check(name, dist, tested, installed=version).enabled, version
    monkeypatch.setattr(compat, "FORCED_OFF", frozenset([name]))
    assert not compat.check(name, dist, tested, installed=inside[0]).enabled


def test_every_fast_path_is_decided_and_the_environment_is_obeyed() -> None:
    assert set(compat.DECISIONS) == set(compat.NAMES)
    for name, decision in compat.DECISIONS.items():
        if name in compat.FORCED_OFF:
            assert not decision.enabled
            assert decision.reason == "forced off by ORDERFLOW_COMPAT"
    if os.environ.get(compat.ENV) == "fallback":
        assert not any(d.enabled for d in compat.DECISIONS.values())


def test_the_installed_versions_are_the_tested_ones() -> None:
    # The lock installs the versions the fast paths were tested on: a bump that leaves a
    # range must come with a new test run and a widened range (or a slower orderflow).
    for name in compat.NAMES:
        reason = compat.DECISIONS[name].reason
        assert "outside the range" not in reason, reason


def test_the_environment_value_is_checked() -> None:
    assert compat.parse_forced(None) == frozenset()
    assert compat.parse_forced(" auto ") == frozenset()
    assert compat.parse_forced("fallback") == frozenset(compat.NAMES)
    assert compat.parse_forced("redis.stream_io, aiosmtplib.pipelining") == {
        "redis.stream_io",
        "aiosmtplib.pipelining",
    }
    with pytest.raises(ValueError, match=r"ORDERFLOW_COMPAT='fallbak'.*unknown: fallbak"):
        compat.parse_forced("fallbak")
    with pytest.raises(ValueError, match=r"unknown fast path 'redis\.nothing'"):
        compat.check("redis.nothing", "redis", ((1,), (2,)))


def test_versions_are_compared_as_numbers() -> None:
    assert compat.parse_version("8.1.0") == (8, 1, 0)
    assert compat.parse_version("0.26.0") == (0, 26, 0)
    assert compat.parse_version("8.2.0rc1") == (8, 2, 0)
    assert compat.parse_version("10.0") > compat.parse_version("9.9")


def test_a_fast_path_off_says_so_in_the_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Each module decides once, at import: one line per fast path that is off.
    monkeypatch.setattr(compat, "FORCED_OFF", frozenset(["aiosmtplib.pipelining"]))
    monkeypatch.setattr(compat, "DECISIONS", {})
    with caplog.at_level(logging.INFO, logger="orderflow._compat"):
        off = compat.decide("aiosmtplib.pipelining", "aiosmtplib", compat_aiosmtplib.TESTED)
        on = compat.decide("redis.stream_io", "redis", compat_redis.TESTED)
    assert not off.enabled
    assert on.enabled
    assert {"aiosmtplib.pipelining": off, "redis.stream_io": on} == compat.DECISIONS
    assert [r.getMessage() for r in caplog.records] == [
        "fast path aiosmtplib.pipelining off, using the public path: forced off by ORDERFLOW_COMPAT"
    ]
