"""The recorded schemas: ``contracts/<type>/v<N>.json``, one per event type and version,
written once by ``orderflow asyncapi --write-contracts contracts/`` and compared with
what the code generates (see :mod:`orderflow.contracts.compat`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orderflow.contracts.asyncapi import MESSAGES, MessageSpec


def payload_schema(spec: MessageSpec) -> dict[str, Any]:
    """``spec``'s payload schema, self-contained (its models under ``$defs``)."""
    return spec.model.model_json_schema()


def contract_path(root: Path, spec: MessageSpec) -> Path:
    """Where ``spec``'s schema is recorded under ``root``."""
    return root / spec.event_type / f"v{spec.version}.json"


def write_contracts(root: Path, *, overwrite: bool = False) -> list[Path]:
    """Record every message's schema under ``root``; returns the files written.

    A recorded version is a promise: it is not overwritten unless ``overwrite`` (a
    change to it is a new version, not an edit).
    """
    written = []
    for spec in MESSAGES:
        path = contract_path(root, spec)
        if path.exists() and not overwrite:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload_schema(spec), indent=2, ensure_ascii=False) + "\n")
        written.append(path)
    return written


def read_contract(root: Path, spec: MessageSpec) -> dict[str, Any] | None:
    """The recorded schema of ``spec``, or None if it was never recorded."""
    path = contract_path(root, spec)
    if not path.exists():
        return None
    recorded: dict[str, Any] = json.loads(path.read_text())
    return recorded
