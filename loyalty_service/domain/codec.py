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


def to_json(value: object) -> object:
    """A domain object as JSON-ready data, for stored responses."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in fields(value)}
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
