"""Callers in the use cases, on a real PostgreSQL: the actor each change records, request ids
kept per caller, and callers limited to some programs (whose other programs do not exist for
them, and who write nothing there)."""

from __future__ import annotations

import pytest

from loyalty_service import db
from loyalty_service.domain.accounts import AccountFilter, AccountStatus
from loyalty_service.domain.callers import ANYONE, Caller, Scope
from loyalty_service.domain.errors import (
    AccountNotFound,
    InvalidArgument,
    ProgramNotFound,
    ProgramsRestricted,
    TransactionNotFound,
)
from loyalty_service.domain.events import EventFilter
from loyalty_service.domain.points import (
    Direction,
    NewTransaction,
    TransactionFilter,
    TransactionType,
)
from loyalty_service.domain.programs import NewProgram
from loyalty_service.ledger import Ledger

from .support import run, sequence

CHECKOUT = Caller("spiffe://vinr/checkout", frozenset(Scope))
CRM = Caller("spiffe://vinr/crm", frozenset(Scope), frozenset({"prog_default"}))


def earn(account: str, amount: int) -> NewTransaction:
    return NewTransaction(account, TransactionType.EARN, Direction.CREDIT, amount)


async def _actors(ledger: Ledger, table: str) -> list[tuple[str, str]]:
    async with db.connection(ledger.pool) as conn:
        rows = await conn.execute(f"SELECT id, actor FROM {table} ORDER BY id")
        return [tuple(row) for row in await rows.fetchall()]


def test_each_change_records_its_caller_as_actor(databases):
    async def scenario(ledger: Ledger) -> None:
        account = await ledger.create_account(CHECKOUT, "prog_default", "cust-1", {})
        assert account.actor == CHECKOUT.identity
        posted = await ledger.create_transaction(CRM, earn(account.id, 40), "r-1")
        assert posted.actor == CRM.identity
        closed = await ledger.close_account(CRM, account.id)
        assert closed.actor == CRM.identity
        assert (await ledger.get_account(ANYONE, account.id)).actor == CRM.identity
        assert (await ledger.get_transaction(ANYONE, posted.id)).actor == CRM.identity
        assert await _actors(ledger, "points_transactions") == [(posted.id, CRM.identity)]
        assert await _actors(ledger, "accounts") == [(account.id, CRM.identity)]

    run(databases.create(), scenario)


def test_request_ids_belong_to_their_caller(databases):
    """One request id from two callers is two requests; the same caller sending it again gets
    its first answer."""

    async def scenario(ledger: Ledger) -> None:
        account = (await ledger.create_account(ANYONE, "prog_default", None, {})).id
        first = await ledger.create_transaction(CHECKOUT, earn(account, 5), "same-id")
        other = await ledger.create_transaction(CRM, earn(account, 5), "same-id")
        again = await ledger.create_transaction(CHECKOUT, earn(account, 5), "same-id")
        assert first.id != other.id
        assert again.id == first.id
        assert (await ledger.get_account(ANYONE, account)).balance == 10

    run(databases.create(), scenario)


def test_a_limited_caller_finds_nothing_of_other_programs_and_writes_nothing_there(databases):
    async def scenario(ledger: Ledger) -> None:
        other = await ledger.create_program(ANYONE, None, NewProgram("Other", "EUR"))
        theirs = (await ledger.create_account(ANYONE, other.id, None, {})).id
        mine = (await ledger.create_account(CRM, "prog_default", None, {})).id
        posted = await ledger.create_transaction(ANYONE, earn(theirs, 9))
        await sequence(ledger)

        with pytest.raises(AccountNotFound):
            await ledger.get_account(CRM, theirs)
        with pytest.raises(AccountNotFound):
            await ledger.create_transaction(CRM, earn(theirs, 1), "r-x")
        with pytest.raises(AccountNotFound):
            await ledger.close_account(CRM, theirs)
        with pytest.raises(ProgramNotFound):
            await ledger.get_program(CRM, other.id)
        with pytest.raises(ProgramNotFound):
            await ledger.create_account(CRM, other.id, None, {})
        with pytest.raises(ProgramsRestricted):
            await ledger.create_program(CRM, None, NewProgram("Mine", "EUR"))
        with pytest.raises(InvalidArgument):
            await ledger.list_transactions(CRM, TransactionFilter(), None, 10)
        with pytest.raises(InvalidArgument):
            await ledger.list_events(CRM, EventFilter(frozenset()), 0, 10, check=False)
        with pytest.raises(ProgramNotFound):
            await ledger.list_events(
                CRM, EventFilter(frozenset(), program=other.id), 0, 10, check=False
            )

        listed = await ledger.list_accounts(CRM, AccountFilter(), None, 10)
        assert [a.id for a in listed.items] == [mine]
        assert (
            await ledger.list_accounts(CRM, AccountFilter(program=other.id), None, 10)
        ).items == []
        programs = await ledger.list_programs(CRM, None, None, 10)
        assert [p.id for p in programs.items] == ["prog_default"]
        with pytest.raises(TransactionNotFound):
            await ledger.get_transaction(CRM, posted.id)

        assert (await ledger.get_account(ANYONE, theirs)).balance == 9
        assert (await ledger.get_account(ANYONE, theirs)).status is AccountStatus.ACTIVE

    run(databases.create(), scenario)
