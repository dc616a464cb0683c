"""Use cases of accounts: enrollment, changes, closing, reopening, merges."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from .. import domain, store
from ..domain.accounts import Account, AccountFilter, AccountStatus, MergeResult
from ..domain.callers import Caller
from ..domain.errors import (
    AccountHasActiveHolds,
    AccountNotClosed,
    FieldViolation,
    InvalidArgument,
)
from ..domain.events import Event, EventType, account_event
from ..domain.ids import Page
from ..domain.points import OriginKind, PointsTransaction
from ..domain.programs import Program
from ..store.sql import Conn
from .postings import post
from .requests import UseCases, account_not_found, program_not_found


@dataclass(frozen=True)
class AccountChanges:
    """What UpdateAccount changes; None leaves a field as it is."""

    customer: str | None = None
    clear_customer: bool = False
    metadata: dict[str, str] | None = None


class AccountUseCases(UseCases):
    async def create_account(
        self,
        caller: Caller,
        program: str,
        customer: str | None,
        metadata: dict[str, str],
        request_id: str = "",
    ) -> Account:
        async def work(conn: Conn) -> Account:
            # Held until commit: an UpdateProgram that archives the program, or changes its
            # currency, waits for this enrollment or is waited for.
            found = await store.programs.get_program(conn, program, lock="key share")
            if found is None or not caller.sees(program):
                raise program_not_found(program)
            domain.programs.require_program_active(found)
            enrollment = await enroll(conn, found, customer, metadata, self.clock(), caller)
            if enrollment is None:
                assert customer is not None  # accounts without a customer never conflict
                raise await self._already_exists(conn, program, customer)
            _, account = await post(conn, caller, enrollment.welcome, [enrollment.created])
            return account or enrollment.account

        params = {"program": program, "customer": customer, "metadata": metadata}
        return await self.run(caller, "CreateAccount", request_id, params, Account, work)

    async def get_account(self, caller: Caller, account_id: str) -> Account:
        account = await self.call(store.accounts.get_account, account_id, self.clock())
        if account is None:
            raise account_not_found(account_id)
        return self.visible(caller, account)

    async def list_accounts(
        self, caller: Caller, where: AccountFilter, after: int | None, limit: int
    ) -> Page[Account]:
        if where.program is not None and not caller.sees(where.program):
            return Page([], None, [])  # as for a program that does not exist
        where = replace(where, programs=caller.programs)
        return await self.call(store.accounts.list_accounts, where, after, limit, self.clock())

    async def update_account(
        self, caller: Caller, account_id: str, changes: AccountChanges, request_id: str = ""
    ) -> Account:
        async def work(conn: Conn) -> Account:
            account = await self._lock_account(conn, caller, account_id)
            if account.status is AccountStatus.MERGED:
                # Merged accounts are frozen; closed ones may still be relabelled.
                domain.accounts.require_active(account)
            customer = account.customer
            if changes.clear_customer:
                customer = None
            elif changes.customer is not None:
                customer = changes.customer
            updated = domain.accounts.revised(
                account,
                self.clock(),
                caller.identity,
                customer=customer,
                metadata=account.metadata if changes.metadata is None else changes.metadata,
            )
            await self._save_account(conn, updated)
            await store.events.log_events(conn, [account_event(EventType.ACCOUNT_UPDATED, updated)])
            return updated

        params = {
            "id": account_id,
            "customer": changes.customer,
            "clear_customer": changes.clear_customer,
            "metadata": changes.metadata,
        }
        return await self.run(caller, "UpdateAccount", request_id, params, Account, work)

    async def close_account(self, caller: Caller, account_id: str, request_id: str = "") -> Account:
        async def work(conn: Conn) -> Account:
            account = await self._lock_account(conn, caller, account_id)
            domain.accounts.require_active(account)
            if account.held_points:  # read as of now: holds whose time is up hold nothing
                raise AccountHasActiveHolds(
                    f"account {account_id} holds {account.held_points} points in HELD holds",
                    account=account_id,
                    held=account.held_points,
                )
            closed = domain.accounts.revised(
                account, self.clock(), caller.identity, status=AccountStatus.CLOSED
            )
            await store.accounts.save_account(conn, closed)
            await store.events.log_events(conn, [account_event(EventType.ACCOUNT_CLOSED, closed)])
            return closed

        return await self.run(caller, "CloseAccount", request_id, {"id": account_id}, Account, work)

    async def reopen_account(
        self, caller: Caller, account_id: str, request_id: str = ""
    ) -> Account:
        async def work(conn: Conn) -> Account:
            account = await self._lock_account(conn, caller, account_id)
            if account.status is not AccountStatus.CLOSED:
                raise AccountNotClosed(
                    f"account {account_id} is {account.status}, not CLOSED",
                    account=account_id,
                    status=account.status,
                )
            reopened = domain.accounts.revised(
                account, self.clock(), caller.identity, status=AccountStatus.ACTIVE
            )
            await self._save_account(conn, reopened)
            await store.events.log_events(
                conn, [account_event(EventType.ACCOUNT_REOPENED, reopened)]
            )
            return reopened

        return await self.run(
            caller, "ReopenAccount", request_id, {"id": account_id}, Account, work
        )

    async def merge_accounts(
        self, caller: Caller, source_id: str, target_id: str, request_id: str = ""
    ) -> MergeResult:
        if source_id == target_id:
            raise InvalidArgument([FieldViolation("target", "must differ from source")])

        async def work(conn: Conn) -> MergeResult:
            # Both rows, locked in id order: merges A->B and B->A cannot deadlock.
            now = self.clock()
            locked = await store.accounts.lock_accounts(conn, [source_id, target_id], now)
            for account_id in (source_id, target_id):
                if account_id not in locked or not caller.sees(locked[account_id].program):
                    raise account_not_found(account_id)
            source, target = locked[source_id], locked[target_id]
            domain.accounts.check_merge(source, target)
            after_seq = await store.accounts.last_transaction_seq(conn, [source_id, target_id])
            await store.accounts.reparent_transactions(conn, source_id, target_id)
            # Holds in flight go with the points (expired ones too: the job records their
            # expiry where they are then), so that checkout's captures still land.
            await store.holds.move_holds(conn, source_id, target_id)
            await store.accounts.record_merge(
                conn, source, target_id, after_seq, now, caller.identity
            )
            merged_source = domain.accounts.merged_source(source, target, now, caller.identity)
            # The target's lifetime points grow: it may reach a higher tier of its program.
            program = await store.programs.get_program(conn, target.program)
            assert program is not None  # accounts' programs are never deleted
            merged_target = domain.accounts.merged_target(
                target, source, now, caller.identity, program.tiers
            )
            await store.accounts.save_account(conn, merged_source)
            await store.accounts.save_account(conn, merged_target)
            merge_events = [
                account_event(EventType.ACCOUNT_MERGED, merged_source),
                account_event(EventType.ACCOUNT_UPDATED, merged_target),
            ]
            if merged_target.tier != target.tier:
                merge_events.append(account_event(EventType.ACCOUNT_TIER_CHANGED, merged_target))
            await store.events.log_events(conn, merge_events)
            return MergeResult(target=merged_target, source=merged_source)

        params = {"source": source_id, "target": target_id}
        return await self.run(caller, "MergeAccounts", request_id, params, MergeResult, work)


@dataclass(frozen=True)
class Enrollment:
    account: Account  # as created, before its welcome bonus
    created: Event  # its loyalty.account.created
    welcome: list[tuple[PointsTransaction, domain.points.Change]]  # its welcome bonus, to post


async def enroll(
    conn: Conn,
    program: Program,
    customer: str | None,
    metadata: dict[str, str],
    now: datetime,
    caller: Caller,
) -> Enrollment | None:
    """Creates an account in `program` (held FOR KEY SHARE), and says what its welcome
    bonus is; None if the customer has an ACTIVE one already (a racing enrollment waits for
    the other's commit on the unique index, and then gets None)."""
    account = Account(
        id=domain.ids.new_id("loy_"),
        program=program.id,
        customer=customer,
        status=AccountStatus.ACTIVE,
        balance=0,
        lifetime_points=0,
        # A tier from 0 lifetime points holds from the start (no tier_changed event: the
        # account is created in it).
        tier=domain.programs.starting_tier(program),
        metadata=metadata,
        create_time=now,
        update_time=now,
        actor=caller.identity,
    )
    if not await store.accounts.insert_account(conn, account):
        return None
    welcome = domain.payments.welcome_earns(program.earning_rules)
    bonus = domain.payments.earn_postings(account.id, welcome, (OriginKind.RULE, ""), {}, now)
    return Enrollment(account, account_event(EventType.ACCOUNT_CREATED, account), bonus)
