"""Statements compiled once from SQLAlchemy Core, run on psycopg connections; keyset pages.

Statements are written against the tables in db.py and compiled at import to psycopg's
`%(name)s` form: the hot path pays neither statement construction nor compilation per
call, and psycopg prepares each statement on the server after a few uses."""

from __future__ import annotations

import typing

import sqlalchemy as sa
from psycopg import AsyncConnection
from sqlalchemy.dialects import postgresql

from ..domain.ids import Page

T = typing.TypeVar("T")


Conn = AsyncConnection[typing.Any]


Row = typing.Any  # psycopg's namedtuple rows


_DIALECT = postgresql.psycopg.dialect()


def compiled(statement: sa.ClauseElement) -> str:
    return str(statement.compile(dialect=_DIALECT))


def bind(column: sa.Column) -> sa.BindParameter:
    return sa.bindparam(column.name, type_=column.type)


def const(value: str | int) -> sa.ColumnElement:
    """A constant written into the SQL. A plain Python value would become a parameter with
    no name of ours; a literal also lets the planner match partial indexes."""
    return sa.literal_column(f"'{value}'" if isinstance(value, str) else str(int(value)))


async def one(conn: Conn, sql: str, params: dict[str, object]) -> Row | None:
    cursor = await conn.execute(sql, params)
    return await cursor.fetchone()


def keyset(statement: sa.Select, seq: sa.Column, after: bool) -> sa.Select:
    # Newest first. One extra row (limit is page size + 1) tells whether a page follows.
    if after:
        statement = statement.where(seq < sa.bindparam("after", type_=sa.BigInteger))
    return statement.order_by(seq.desc()).limit(sa.bindparam("limit", type_=sa.Integer))


def page_of(rows: list[Row], limit: int, convert: typing.Callable[[Row], T]) -> Page[T]:
    items = rows[:limit]
    next_after = items[-1].seq if len(rows) > limit else None
    return Page([convert(row) for row in items], next_after, [row.seq for row in items])
