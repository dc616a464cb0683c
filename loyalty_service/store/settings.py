"""The service's settings kept in the database."""

from __future__ import annotations

import sqlalchemy as sa

from ..db import service_settings
from .sql import Conn, compiled, const, one

_PAGE_TOKEN_KEY = compiled(
    sa.select(service_settings.c.value).where(service_settings.c.name == const("page_token_key"))
)


async def page_token_key(conn: Conn) -> bytes:
    row = await one(conn, _PAGE_TOKEN_KEY, {})
    assert row is not None, "the page token key is created by migration 0001"
    return row.value.encode()
