"""Does a new schema of an event version break a party built on the recorded one?

An event version is a promise to both sides: a consumer relies on each field it
reads being there with its type, and a producer on each event it sends staying
valid. So, comparing the recorded schema with the generated one, these break it: a
field removed or retyped, a new required field, an enum or a bound narrowed, a
pattern changed. A new optional field does not. A breaking change is made as a new
version (a new model, a new ``ce_dataschema``), never as an edit.
"""

from __future__ import annotations

from typing import Any

#: Bounds a new schema may only widen: (keyword, True when larger is narrower).
_BOUNDS = (
    ("minimum", True),
    ("exclusiveMinimum", True),
    ("minLength", True),
    ("minItems", True),
    ("maximum", False),
    ("exclusiveMaximum", False),
    ("maxLength", False),
    ("maxItems", False),
)


def breaking_changes(recorded: dict[str, Any], generated: dict[str, Any]) -> list[str]:
    """What in ``generated`` breaks a party relying on ``recorded`` (empty: compatible)."""
    problems: list[str] = []
    _compare(recorded, generated, "", recorded, generated, problems, set())
    return problems


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    seen = 0
    while "$ref" in schema and seen < 32:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"only local $refs are compared, got {ref}")
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        seen += 1
    return schema


def _branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return list(schema.get("anyOf") or schema.get("oneOf") or [])


def _types(schema: dict[str, Any], root: dict[str, Any]) -> frozenset[str]:
    schema = _resolve(schema, root)
    if "type" in schema:
        declared = schema["type"]
        found = {declared} if isinstance(declared, str) else set(declared)
        if "integer" in found and "number" in found:
            found.discard("integer")
        return frozenset(found)
    branches = _branches(schema)
    if branches:
        return frozenset().union(*(_types(branch, root) for branch in branches))
    return frozenset({"any"})


def _values(schema: dict[str, Any]) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    enum = schema.get("enum")
    return list(enum) if enum is not None else None


def _where(path: str) -> str:
    return path or "the payload"


def _compare(
    old: dict[str, Any],
    new: dict[str, Any],
    path: str,
    old_root: dict[str, Any],
    new_root: dict[str, Any],
    problems: list[str],
    seen: set[tuple[str, str, str]],
) -> None:
    key = (path, old.get("$ref", ""), new.get("$ref", ""))
    if key in seen:  # a recursive model: compared once
        return
    seen.add(key)
    old = _resolve(old, old_root)
    new = _resolve(new, new_root)
    old_types, new_types = _types(old, old_root), _types(new, new_root)
    if old_types != new_types and "any" not in old_types:
        problems.append(
            f"{_where(path)}: retyped from {'|'.join(sorted(old_types))} "
            f"to {'|'.join(sorted(new_types))}"
        )
        return
    old_values, new_values = _values(old), _values(new)
    if new_values is not None:
        lost = [v for v in old_values or [] if v not in new_values]
        if old_values is None or lost:
            what = f"{lost} no longer allowed" if lost else f"now only {new_values}"
            problems.append(f"{_where(path)}: enum narrowed: {what}")
    for keyword, larger_is_narrower in _BOUNDS:
        before, after = old.get(keyword), new.get(keyword)
        if after is None or before == after:
            continue
        if before is None or (after > before) == larger_is_narrower:
            problems.append(f"{_where(path)}: {keyword} narrowed from {before} to {after}")
    if new.get("pattern") is not None and new.get("pattern") != old.get("pattern"):
        problems.append(f"{_where(path)}: pattern changed to {new['pattern']!r}")
    old_properties = old.get("properties", {})
    new_properties = new.get("properties", {})
    for name, old_property in old_properties.items():
        where = f"{path}.{name}" if path else name
        if name not in new_properties:
            problems.append(f"{where}: field removed")
        else:
            _compare(old_property, new_properties[name], where, old_root, new_root, problems, seen)
    for name in sorted(set(new.get("required", ())) - set(old.get("required", ()))):
        where = f"{path}.{name}" if path else name
        problems.append(f"{where}: new required field")
    if isinstance(old.get("items"), dict) and isinstance(new.get("items"), dict):
        _compare(old["items"], new["items"], f"{path}[]", old_root, new_root, problems, seen)
    old_branches = [b for b in _branches(old) if _types(b, old_root) != {"null"}]
    new_branches = [b for b in _branches(new) if _types(b, new_root) != {"null"}]
    if len(old_branches) == len(new_branches):
        for old_branch, new_branch in zip(old_branches, new_branches, strict=True):
            _compare(old_branch, new_branch, path, old_root, new_root, problems, seen)
