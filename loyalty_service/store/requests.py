"""Idempotency keys: request ids claimed in the change's transaction, and their responses."""

from __future__ import annotations

import typing
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from psycopg.types.json import Jsonb
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ..db import idempotency_keys
from .sql import Conn, bind, compiled, one


@dataclass(frozen=True)
class StoredResponse:
    fingerprint: str
    response: typing.Any  # JSON: the response, or what rebuilds it


class Claims:
    """A table of exactly-once keys (request keys here; payment and refund ids): a row claims
    its key, with the fingerprint of what was asked, and later keeps the response.

    A concurrent claim of the same key waits on the primary key until the first transaction
    ends: if that one commits, the claim returns its response; if it rolls back, it claims.
    """

    def __init__(self, table: sa.Table, key: str, claimed: Iterable[str]) -> None:
        self.key = key
        column = table.c[key]
        self.claim_sql = compiled(
            pg_insert(table)
            .values({name: bind(table.c[name]) for name in claimed})
            .on_conflict_do_nothing(index_elements=[key])
            .returning(column)
        )
        self.stored_sql = compiled(
            sa.select(table.c.fingerprint, table.c.response).where(column == bind(column))
        )
        self.save_sql = compiled(
            sa.update(table).where(column == bind(column)).values(response=bind(table.c.response))
        )

    async def claim(self, conn: Conn, params: dict[str, object]) -> StoredResponse | None:
        """Inserts the row that claims `params[key]`, or returns what is stored for it."""
        if await one(conn, self.claim_sql, params) is not None:
            return None
        stored = await self.stored(conn, params[self.key])
        assert stored is not None, "a conflicting claim is committed before the conflict shows"
        return stored

    async def stored(self, conn: Conn, key: object) -> StoredResponse | None:
        row = await one(conn, self.stored_sql, {self.key: key})
        return StoredResponse(row.fingerprint, row.response) if row else None

    async def save(self, conn: Conn, key: object, response: object) -> None:
        await conn.execute(self.save_sql, {self.key: key, "response": Jsonb(response)})


_REQUESTS = Claims(idempotency_keys, "key", ("key", "fingerprint", "create_time"))


_PRUNE_REQUESTS = compiled(
    sa.delete(idempotency_keys).where(
        idempotency_keys.c.create_time < sa.bindparam("before", type_=sa.DateTime(timezone=True))
    )
)


async def claim_request(
    conn: Conn, key: str, fingerprint: str, now: datetime
) -> StoredResponse | None:
    """Claims a request key for this transaction, or returns the response stored for it."""
    return await _REQUESTS.claim(conn, {"key": key, "fingerprint": fingerprint, "create_time": now})


async def stored_response(conn: Conn, key: str) -> StoredResponse | None:
    return await _REQUESTS.stored(conn, key)


async def save_response(conn: Conn, key: str, response: object) -> None:
    await _REQUESTS.save(conn, key, response)


async def prune_request_keys(conn: Conn, before: datetime) -> int:
    cursor = await conn.execute(_PRUNE_REQUESTS, {"before": before})
    return cursor.rowcount
