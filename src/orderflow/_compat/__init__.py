"""Fast paths that reach into a dependency's internals, each fenced to the versions it
was tested on, with the library's public path as the fallback.

Every private attribute of redis-py or aiosmtplib that orderflow touches lives in this
package, one module per library (prometheus_client had one, a bulk observe, measured at
under 10% of a consumer's CPU and removed: see bench/case_compat.py). Each fast path is
decided once, when its module is imported: on, when the installed version lies in the
range the fast path was written and tested for; otherwise off, and one log line says
why. Off means the public path, which gives the same results, only slower.

``ORDERFLOW_COMPAT=fallback`` turns every fast path off (tests run the suite that way);
a comma-separated list of fast path names (:data:`NAMES`) turns off only those (the
bench measures each one against its fallback); unset or ``auto``: decided by version.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from importlib import metadata

log = logging.getLogger(__name__)

#: The environment variable that forces fallbacks.
ENV = "ORDERFLOW_COMPAT"

#: Every fast path, by name.
NAMES = (
    "redis.stream_io",
    "redis.cluster_transaction",
    "redis.cluster_stream_routing",
    "aiosmtplib.pipelining",
)

Version = tuple[int, ...]


def parse_forced(value: str | None) -> frozenset[str]:
    """The fast paths an ``ORDERFLOW_COMPAT`` value turns off; ValueError if it is not one."""
    text = (value or "").strip()
    if text in ("", "auto"):
        return frozenset()
    if text == "fallback":
        return frozenset(NAMES)
    names = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(names - set(NAMES))
    if unknown:
        raise ValueError(
            f"{ENV}={text!r}: must be 'auto', 'fallback' or fast path names "
            f"({', '.join(NAMES)}); unknown: {', '.join(unknown)}"
        )
    return names


#: Read once, here: which fast paths the environment turns off.
FORCED_OFF = parse_forced(os.environ.get(ENV))


def parse_version(text: str) -> Version:
    """``"8.1.0"`` -> ``(8, 1, 0)``; pre-release tags are dropped (``"8.2.0rc1"`` -> 8.2.0)."""
    parts: list[int] = []
    for part in text.split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() != len(part):
            break
    return tuple(parts)


def _shown(version: Version) -> str:
    return ".".join(map(str, version))


@dataclass(frozen=True, slots=True)
class FastPath:
    """One fast path's decision: on or off, and why."""

    name: str
    enabled: bool
    reason: str


#: Every decision taken so far, by name (for health reports and tests).
DECISIONS: dict[str, FastPath] = {}


def check(
    name: str,
    distribution: str,
    tested: tuple[Version, Version],
    *,
    installed: str | None = None,
) -> FastPath:
    """Whether fast path ``name`` may be on: ``distribution``'s installed version (or
    ``installed``) in ``tested`` (lowest tested, first untested), and not forced off."""
    if name not in NAMES:
        raise ValueError(f"unknown fast path {name!r}; known: {', '.join(NAMES)}")
    low, below = tested
    if installed is None:
        try:
            installed = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            installed = "0"
    version = parse_version(installed)
    if name in FORCED_OFF:
        return FastPath(name, False, f"forced off by {ENV}")
    if low <= version < below:
        return FastPath(name, True, f"{distribution} {installed} is in the tested range")
    return FastPath(
        name,
        False,
        f"{distribution} {installed} is outside the range it was tested for "
        f"(>={_shown(low)},<{_shown(below)})",
    )


def decide(name: str, distribution: str, tested: tuple[Version, Version]) -> FastPath:
    """:func:`check` for the installed version, recorded in :data:`DECISIONS`; when the
    fast path is off, one INFO log line says why (modules decide once, at import)."""
    decision = check(name, distribution, tested)
    if not decision.enabled:
        log.info("fast path %s off, using the public path: %s", name, decision.reason)
    DECISIONS[name] = decision
    return decision
