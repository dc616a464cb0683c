"""Idempotency keys: request ids claimed in the change's transaction, and their responses."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from psycopg.types.json import Jsonb
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ..db import idempotency_keys
from .sql import Conn, bind, compiled, one

_CLAIM_REQUEST = compiled(
    pg_insert(idempotency_keys)
    .values(
        key=bind(idempotency_keys.c.key),
        fingerprint=bind(idempotency_keys.c.fingerprint),
        create_time=bind(idempotency_keys.c.create_time),
    )
    .on_conflict_do_nothing(index_elements=["key"])
    .returning(idempotency_keys.c.key)
)


_STORED_RESPONSE = compiled(
    sa.select(idempotency_keys.c.fingerprint, idempotency_keys.c.response).where(
        idempotency_keys.c.key == bind(idempotency_keys.c.key)
    )
)


_SAVE_RESPONSE = compiled(
    sa.update(idempotency_keys)
    .where(idempotency_keys.c.key == bind(idempotency_keys.c.key))
    .values(response=bind(idempotency_keys.c.response))
)


_PRUNE_REQUESTS = compiled(
    sa.delete(idempotency_keys).where(
        idempotency_keys.c.create_time < sa.bindparam("before", type_=sa.DateTime(timezone=True))
    )
)


@dataclass(frozen=True)
class StoredResponse:
    fingerprint: str
    response: typing.Any  # JSON: the response, or what rebuilds it


async def claim_request(
    conn: Conn, key: str, fingerprint: str, now: datetime
) -> StoredResponse | None:
    """Claims a request key for this transaction, or returns the response stored for it.

    A concurrent claim of the same key waits on the primary key until the first transaction
    ends: if that one commits, this returns its response; if it rolls back, this one claims.
    """
    params = {"key": key, "fingerprint": fingerprint, "create_time": now}
    if await one(conn, _CLAIM_REQUEST, params) is not None:
        return None
    stored = await stored_response(conn, key)
    assert stored is not None, "a conflicting key is committed before the conflict shows"
    return stored


async def stored_response(conn: Conn, key: str) -> StoredResponse | None:
    row = await one(conn, _STORED_RESPONSE, {"key": key})
    return StoredResponse(row.fingerprint, row.response) if row else None


async def save_response(conn: Conn, key: str, response: object) -> None:
    await conn.execute(_SAVE_RESPONSE, {"key": key, "response": Jsonb(response)})


async def prune_request_keys(conn: Conn, before: datetime) -> int:
    cursor = await conn.execute(_PRUNE_REQUESTS, {"before": before})
    return cursor.rowcount
