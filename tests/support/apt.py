"""Debian packages a test needs (Chromium, a TLS-capable redis-server), installed on demand."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.install_lock import installing

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip for ``reason``; with CI=true, fail instead (CI must run every test)."""
    if IN_CI:
        pytest.fail(f"{reason} and CI=true")
    pytest.skip(reason)


def apt_install(package: str, provides: Path, *, recommends: bool = True) -> Path:
    """``provides`` (a file of Debian's ``package``), installed with apt-get when missing.

    ``recommends=False`` leaves out the packages Debian only recommends (prometheus's
    node exporter and IPMI tools, for example: a test needs only the binary).

    Needs root and apt-get: otherwise skipped (a failure with CI=true), as is a failed
    install, whose error output the message quotes.
    """
    if provides.exists():
        return provides
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        unavailable(f"{provides} is missing and cannot be installed (not root, or no apt-get)")
    # apt and dpkg take one installer at a time: the tests' own, then anyone's (a lock
    # timeout instead of failing at once on dpkg's lock).
    with installing("apt"):
        if not provides.exists():
            _install(package, recommends=recommends)
    if not provides.exists():
        unavailable(f"apt-get install {package} did not provide {provides}")
    return provides


def _install(package: str, *, recommends: bool) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", package]
    if not recommends:
        install.insert(5, "--no-install-recommends")
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        # The package lists may be missing or stale: refresh them once and try again.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            unavailable(f"apt-get install {package} failed: {done.stderr[-500:]}")
