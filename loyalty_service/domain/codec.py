"""Domain objects as JSON and back: stored responses, rule versions, event snapshots."""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import types
import typing
from dataclasses import fields, is_dataclass
from datetime import datetime

T = typing.TypeVar("T")


# Values that are JSON as they are (exact types: a StrEnum is a str, and is written as its
# value below).
_PLAIN = frozenset({str, int, float, bool, type(None)})


@functools.cache
def _field_names(kind: type) -> tuple[str, ...] | None:
    """A dataclass's field names, once per class (None for any other class): to_json runs
    for every stored response, fingerprint and event snapshot."""
    return tuple(f.name for f in fields(kind)) if is_dataclass(kind) else None


def to_json(value: object) -> object:
    """A domain object as JSON-ready data, for stored responses."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    names = _field_names(kind)
    if names is not None:
        return {name: to_json(getattr(value, name)) for name in names}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_json(item) for item in value]
    return value


@functools.cache
def _type_hints(kind: type) -> dict[str, typing.Any]:
    # Resolving the annotations is most of from_json's cost, and every program read (each
    # payment's) rebuilds its earning rules with it.
    return typing.get_type_hints(kind)


def from_json(kind: type[T], data: object) -> T:
    """The inverse of to_json for the domain's dataclasses."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return None  # type: ignore[return-value]
        (inner,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return from_json(inner, data)
    if origin is list:
        (item,) = typing.get_args(kind)
        return [from_json(item, value) for value in data]  # type: ignore[return-value,union-attr]
    if is_dataclass(kind):
        hints = _type_hints(kind)
        return kind(**{name: from_json(hints[name], value) for name, value in data.items()})  # type: ignore[union-attr]
    if kind is datetime:
        return datetime.fromisoformat(data)  # type: ignore[return-value,arg-type]
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return kind(data)
    return data  # type: ignore[return-value]


def digest(value: object) -> str:
    """The SHA-256 of a JSON-ready value, written with sorted keys: equal values, equal
    digests (request fingerprints, page tokens' queries)."""
    body = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(body).hexdigest()
