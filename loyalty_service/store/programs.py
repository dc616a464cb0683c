"""Programs and the versions of their earning rules."""

from __future__ import annotations

import typing

import sqlalchemy as sa
from psycopg.types.json import Jsonb
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ..db import accounts, earning_rule_versions, programs
from ..domain.codec import from_json, to_json
from ..domain.ids import Page
from ..domain.programs import EarningRule, HoldPolicy, Program, ProgramStatus, Tier
from .sql import Conn, Row, bind, compiled, const, filtered_page, one

PROGRAM_COLUMNS = [c for c in programs.c if c.name != "seq"]


_PROGRAM_ID = sa.bindparam("id", type_=sa.Text)


_INSERT_PROGRAM = compiled(
    pg_insert(programs)
    .values({c.name: bind(c) for c in PROGRAM_COLUMNS})
    .on_conflict_do_nothing(index_elements=["id"])
    .returning(programs.c.id)
)


_SELECT_PROGRAM = sa.select(*PROGRAM_COLUMNS).where(programs.c.id == _PROGRAM_ID)


# KEY SHARE, as the accounts' foreign key takes anyway: enrollments do not wait for each
# other, but wait for an UpdateProgram (FOR UPDATE) and then see what it committed.
SHARE_PROGRAM = compiled(_SELECT_PROGRAM.with_for_update(read=True, key_share=True))


# The locks get_program may take on the row, each held until the transaction ends.
ProgramLock = typing.Literal["update", "key share"] | None
_GET_PROGRAM: dict[ProgramLock, str] = {
    None: compiled(_SELECT_PROGRAM),
    "update": compiled(_SELECT_PROGRAM.with_for_update()),
    "key share": SHARE_PROGRAM,
}


_SAVE_PROGRAM = compiled(
    sa.update(programs)
    .where(programs.c.id == _PROGRAM_ID)
    .values({c.name: bind(c) for c in PROGRAM_COLUMNS if c.name not in ("id", "create_time")})
)


_PROGRAM_HAS_ACCOUNTS = compiled(
    sa.select(
        sa.exists().where(accounts.c.program_id == bind(accounts.c.program_id)).label("found")
    )
)


def program_of(row: Row) -> Program:
    return Program(
        id=row.id,
        name=row.name,
        currency=row.currency,
        auto_enroll=row.auto_enroll,
        tiers=[Tier(t["name"], int(t["lifetime_points"])) for t in row.tiers],
        status=ProgramStatus(row.status),
        create_time=row.create_time,
        update_time=row.update_time,
        earning_rules=from_json(list[EarningRule], row.earning_rules),
        actor=row.actor,
        hold_policy=HoldPolicy(row.hold_default_ttl_seconds, row.hold_max_ttl_seconds),
    )


def _program_params(program: Program) -> dict[str, object]:
    return {
        "id": program.id,
        "name": program.name,
        "currency": program.currency,
        "auto_enroll": program.auto_enroll,
        "tiers": Jsonb([to_json(tier) for tier in program.tiers]),
        "status": program.status.value,
        "create_time": program.create_time,
        "update_time": program.update_time,
        "earning_rules": Jsonb(to_json(program.earning_rules)),
        "actor": program.actor,
        "hold_default_ttl_seconds": program.hold_policy.default_ttl_seconds,
        "hold_max_ttl_seconds": program.hold_policy.max_ttl_seconds,
    }


async def insert_program(conn: Conn, program: Program) -> bool:
    """Inserts the program; False if one with its id exists (a racing insert of the same id
    waits for the first to commit, and then gets False)."""
    return await one(conn, _INSERT_PROGRAM, _program_params(program)) is not None


async def get_program(conn: Conn, program_id: str, lock: ProgramLock = None) -> Program | None:
    """The program; with a `lock`, its row held FOR UPDATE or FOR KEY SHARE (see
    SHARE_PROGRAM) until the transaction ends."""
    row = await one(conn, _GET_PROGRAM[lock], {"id": program_id})
    return program_of(row) if row else None


async def save_program(conn: Conn, program: Program) -> None:
    await conn.execute(_SAVE_PROGRAM, _program_params(program))


_INSERT_RULE_VERSIONS = compiled(
    sa.text("""
    INSERT INTO earning_rule_versions (rule_id, version, program_id, rule, create_time, actor)
    SELECT r.rule ->> 'id', CAST(r.rule ->> 'version' AS int), :program_id, r.rule, :create_time,
        :actor
    FROM jsonb_array_elements(:rules) AS r(rule)
    ON CONFLICT DO NOTHING
    """)
)


_rule_version = earning_rule_versions.c


_GET_RULE_VERSION = compiled(
    sa.select(_rule_version.rule, _rule_version.program_id)
    .where(_rule_version.rule_id == bind(_rule_version.rule_id))
    .order_by(_rule_version.version.desc())
    .limit(const(1))
)


_GET_RULE_VERSION_OF = compiled(
    sa.select(_rule_version.rule, _rule_version.program_id).where(
        _rule_version.rule_id == bind(_rule_version.rule_id),
        _rule_version.version == bind(_rule_version.version),
    )
)


async def save_rule_versions(conn: Conn, program: Program) -> None:
    """Keeps the program's rules' versions, as of its update and by its actor (those
    already kept stay as they were)."""
    params = {
        "program_id": program.id,
        "rules": Jsonb(to_json(program.earning_rules)),
        "create_time": program.update_time,
        "actor": program.actor,
    }
    await conn.execute(_INSERT_RULE_VERSIONS, params)


async def get_rule_version(
    conn: Conn, rule_id: str, version: int | None
) -> tuple[str, EarningRule] | None:
    """A version of a rule, or its latest (also of a rule since removed) when None; with
    the id of its program."""
    if version is None:
        row = await one(conn, _GET_RULE_VERSION, {"rule_id": rule_id})
    else:
        row = await one(conn, _GET_RULE_VERSION_OF, {"rule_id": rule_id, "version": version})
    return (row.program_id, from_json(EarningRule, row.rule)) if row else None


async def program_has_accounts(conn: Conn, program_id: str) -> bool:
    row = await one(conn, _PROGRAM_HAS_ACCOUNTS, {"program_id": program_id})
    assert row is not None
    return bool(row.found)


async def list_programs(
    conn: Conn,
    status: ProgramStatus | None,
    ids: frozenset[str] | None,
    after: int | None,
    limit: int,
) -> Page[Program]:
    """A page of programs, of those with `ids` only (None: all)."""
    filters = {"status": status.value if status else None, "id": ids}
    return await filtered_page(conn, programs, PROGRAM_COLUMNS, filters, after, limit, program_of)
