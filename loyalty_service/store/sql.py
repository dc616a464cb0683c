"""Statements compiled once from SQLAlchemy Core, run on psycopg connections; keyset pages.

Statements are written against the tables in db.py and compiled at import to psycopg's
`%(name)s` form: the hot path pays neither statement construction nor compilation per
call, and psycopg prepares each statement on the server after a few uses."""

from __future__ import annotations

import functools
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


def jsonb_object(values: dict[str, str], keys: tuple[str, ...]) -> str:
    """A JSON object as SQL, each of `keys` given as an SQL expression in `values` (exactly
    those keys): a JSON argument as a statement's caller builds it, for make bench's pgbench
    baseline."""
    if set(values) != set(keys):
        raise ValueError(f"keys {sorted(set(values) ^ set(keys))} differ from the store's")
    return "jsonb_build_object(" + ", ".join(f"'{k}', {values[k]}" for k in keys) + ")"


async def one(conn: Conn, sql: str, params: dict[str, object]) -> Row | None:
    cursor = await conn.execute(sql, params)
    return await cursor.fetchone()


@functools.cache
def _filtered_page_sql(
    table: sa.Table,
    columns: tuple[sa.Column, ...],
    filtered: tuple[tuple[str, bool], ...],
    after: bool,
) -> str:
    statement = sa.select(*columns, table.c.seq)
    for name, any_of in filtered:
        column = table.c[name]
        if any_of:
            kind = postgresql.ARRAY(column.type)
            statement = statement.where(column == sa.any_(sa.bindparam(name, type_=kind)))
        else:
            statement = statement.where(column == bind(column))
    # Newest first. One extra row (limit is page size + 1) tells whether a page follows.
    if after:
        statement = statement.where(table.c.seq < sa.bindparam("after", type_=sa.BigInteger))
    statement = statement.order_by(table.c.seq.desc())
    return compiled(statement.limit(sa.bindparam("limit", type_=sa.Integer)))


async def filtered_page(
    conn: Conn,
    table: sa.Table,
    columns: list[sa.Column],
    filters: dict[str, object],
    after: int | None,
    limit: int,
    convert: typing.Callable[[Row], T],
    params: dict[str, object] | None = None,
) -> Page[T]:
    """A page of `table`'s rows, newest first (by seq) after the keyset position `after`,
    where each column named in `filters` equals its value, or one of them (a frozenset); a
    filter of None is no filter; `params` are what `columns` take (a read's time). One
    statement per combination of filters, compiled on first use."""
    given = tuple(name for name, value in filters.items() if value is not None)
    sets = tuple((name, isinstance(filters[name], frozenset)) for name in given)
    sql = _filtered_page_sql(table, tuple(columns), sets, after is not None)
    params = {**(params or {}), "after": after, "limit": limit + 1}
    for name in given:
        value = filters[name]
        params[name] = sorted(value) if isinstance(value, frozenset) else value
    rows = await (await conn.execute(sql, params)).fetchall()
    items = rows[:limit]
    next_after = items[-1].seq if len(rows) > limit else None
    return Page([convert(row) for row in items], next_after, [row.seq for row in items])
