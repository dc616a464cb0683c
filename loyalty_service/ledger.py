"""Use cases. Each is one database transaction, whose locked rows and their order are visible
in its body; postings, which run in batches (group commit), say theirs in store.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from psycopg import IsolationLevel
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from . import db, domain, store
from .domain import (
    Account,
    AccountAlreadyExists,
    AccountFilter,
    AccountNotClosed,
    AccountNotFound,
    AccountStatus,
    EarningRuleNotFound,
    Event,
    EventFilter,
    EventType,
    FieldViolation,
    InvalidArgument,
    MergeResult,
    NewProgram,
    NewTransaction,
    OriginKind,
    Page,
    PaymentIdReused,
    PaymentNotFound,
    PaymentOutcome,
    PaymentResult,
    PointsTransaction,
    Program,
    ProgramAlreadyExists,
    ProgramChanges,
    ProgramNotFound,
    ProgramStatus,
    RefundIdReused,
    RefundResult,
    RequestIdReused,
    TransactionFilter,
    TransactionNotFound,
    account_event,
    transaction_event,
)
from .store import Conn

T = TypeVar("T")
log = logging.getLogger(__name__)
Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


class _Moved(Exception):
    """What the transaction read moved before it could lock it: a merge moved a transaction
    to another account, or a racing payment enrolled the customer. Ledger._run starts the
    transaction again, which then finds the row where it is now."""


Item = TypeVar("Item")
Result = TypeVar("Result")


class Batches(Generic[Item, Result]):
    """Group commit: calls that arrive while a batch runs wait, and run together in the next.

    A call that finds nothing running starts a batch of its own at once, so an idle service
    answers as fast as without batching; under load one statement and one commit serve many
    calls, which is what lets two cores keep up (docs/benchmarks.md). One batch runs at a
    time. `keys` names what may appear only once in a batch (for postings: the account and
    the request key); a call whose keys are taken waits for a later batch. When
    `max_waiting` calls wait already, `submit` returns None and the caller goes alone, so
    the queue (and the work of forming a batch from it) stays bounded.

    A call waits to be taken into a batch, and its batch waits for a connection, no longer
    than the call's deadline (db.call_deadline) or `max_wait` seconds, whichever is sooner:
    during an outage calls fail in time instead of queueing behind each other's waits.
    """

    def __init__(
        self,
        run: Callable[[list[Item]], Awaitable[list[Result]]],
        keys: Callable[[Item], tuple[object, ...]],
        max_size: int = 100,
        max_waiting: int = 500,
        max_wait: float = float("inf"),
    ) -> None:
        self._run = run
        self._keys = keys
        self._max_size = max_size
        self._max_waiting = max_waiting
        self._max_wait = max_wait
        # (item, its future result, the loop time by which it must be in a batch)
        self._waiting: list[tuple[Item, asyncio.Future[Result], float]] = []
        self._running: set[asyncio.Future[Result]] = set()  # the batch being run
        self._runner: asyncio.Task[None] | None = None

    def submit(self, item: Item) -> asyncio.Future[Result] | None:
        """The future result of `item`, or None when too many calls wait already."""
        if len(self._waiting) >= self._max_waiting:
            return None
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future, self._expiry()))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run_batches())
            self._runner.add_done_callback(self._runner_done)
        return future

    async def run(self, item: Item) -> Result | None:
        """The result of `item`, run in a batch; None when too many calls wait already (the
        caller then goes alone). PoolTimeout when no batch took it in time."""
        future = self.submit(item)
        if future is None:
            return None
        timeout = self._expiry() - asyncio.get_running_loop().time()
        try:
            await asyncio.wait({future}, timeout=None if timeout == float("inf") else timeout)
            if not future.done() and future in self._running:
                # Taken in time: its batch waits for a connection no longer than this call
                # may (_run_batches), and its statements have their own time-out.
                return await future
        finally:
            if not future.done():  # timed out, or this call was cancelled
                future.cancel()  # the runner skips it, or drops its result
        if future.cancelled():
            raise _not_taken()
        return future.result()

    def _expiry(self) -> float:
        """The loop time by which a call submitted now must be in a batch."""
        deadline = db.call_deadline.get()
        expires = asyncio.get_running_loop().time() + self._max_wait
        return expires if deadline is None else min(expires, deadline)

    def _runner_done(self, runner: asyncio.Task[None]) -> None:
        """A runner ends when nothing waits, unless it was cancelled (the loop is closing) or
        failed (a bug): then nobody may be left waiting forever."""
        error = None if runner.cancelled() else runner.exception()
        if error is not None:
            log.error("the batch runner failed", exc_info=error)
        if runner.cancelled() or error is not None:
            for _, future, _ in self._waiting:
                if error is None:
                    future.cancel()
                elif not future.done():
                    future.set_exception(error)
            self._waiting = []

    def _next_batch(self) -> list[tuple[Item, asyncio.Future[Result], float]]:
        """The waiting calls with no key in common, oldest first; the rest wait on."""
        batch, later, taken = [], [], set()
        now = asyncio.get_running_loop().time()
        for entry in self._waiting:
            if entry[1].done():  # cancelled while waiting
                continue
            if entry[2] <= now:  # its caller's wait is over (its timer may not have fired)
                entry[1].set_exception(_not_taken())
                continue
            keys = self._keys(entry[0])
            if len(batch) < self._max_size and taken.isdisjoint(keys):
                batch.append(entry)
                taken.update(keys)
            else:
                later.append(entry)
        self._waiting = later
        return batch

    async def _run_batches(self) -> None:
        while batch := self._next_batch():
            self._running = {future for _, future, _ in batch}
            # The latest: one member with a short deadline must not fail the others. A
            # caller whose deadline comes first is cancelled by gRPC, and its result dropped.
            expires = max(expires for _, _, expires in batch)
            db.call_deadline.set(None if expires == float("inf") else expires)
            try:
                results = await self._run([item for item, _, _ in batch])
            except Exception as error:
                for _, future, _ in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            except BaseException:
                for _, future, _ in batch:  # cancelled; the waiting ones: see _runner_done
                    future.cancel()
                raise
            finally:
                self._running = set()
            if len(results) != len(batch):  # a bug; fail the batch rather than strand one
                error = RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
                results = [error] * len(batch)
            for (_, future, _), result in zip(batch, results, strict=True):
                if future.done():  # the call was cancelled meanwhile
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


def _not_taken() -> PoolTimeout:
    return PoolTimeout("no batch could take the posting before its deadline")


@dataclass(frozen=True)
class AccountChanges:
    """What UpdateAccount changes; None leaves a field as it is."""

    customer: str | None = None
    clear_customer: bool = False
    metadata: dict[str, str] | None = None


class Ledger:
    def __init__(self, pool: AsyncConnectionPool, clock: Clock = system_clock) -> None:
        self.pool = pool
        self.clock = clock
        self._postings = Batches(self._post_batch, keys=_posting_keys, max_wait=pool.timeout)

    # -- programs ------------------------------------------------------------------------

    async def create_program(
        self, program_id: str | None, new: NewProgram, request_id: str = ""
    ) -> Program:
        # A generated id is drawn once per call, outside the transaction: a replay returns
        # the first call's program.
        new_id = program_id or domain.new_id("prog_")

        async def work(conn: Conn) -> Program:
            now = self.clock()
            program = Program(
                id=new_id,
                name=new.name,
                currency=new.currency,
                auto_enroll=new.auto_enroll,
                tiers=new.tiers,
                status=new.status,
                create_time=now,
                update_time=now,
                earning_rules=domain.versioned_rules(_RULES_PATH, [], new.earning_rules),
            )
            if not await store.insert_program(conn, program):
                raise ProgramAlreadyExists(f"program {new_id} already exists", program=new_id)
            await store.save_rule_versions(conn, program.id, program.earning_rules, now)
            return program

        # No program events: the event log records accounts and transactions only.
        params = {"program_id": program_id, "program": store.to_json(new)}
        return await self._run("CreateProgram", request_id, params, Program, work)

    async def get_program(self, program_id: str) -> Program:
        async with db.connection(self.pool) as conn:
            program = await store.get_program(conn, program_id)
        if program is None:
            raise _program_not_found(program_id)
        return program

    async def get_earning_rule(self, rule_id: str, version: int | None) -> domain.EarningRule:
        """A rule as it was at `version`, or as it is now (None), also after its removal."""
        async with db.connection(self.pool) as conn:
            rule = await store.get_rule_version(conn, rule_id, version)
        if rule is None:
            raise EarningRuleNotFound(
                f"earning rule {rule_id} has no version {version}"
                if version
                else f"earning rule {rule_id} does not exist",
                rule=rule_id,
                version=version or "",
            )
        return rule

    async def list_programs(
        self, status: ProgramStatus | None, after: int | None, limit: int
    ) -> Page[Program]:
        async with db.connection(self.pool) as conn:
            return await store.list_programs(conn, status, after, limit)

    async def update_program(
        self, program_id: str, changes: ProgramChanges, request_id: str = ""
    ) -> Program:
        async def work(conn: Conn) -> Program:
            # FOR UPDATE: enrollments (which hold the row FOR KEY SHARE) and other updates
            # wait, so the check for accounts below cannot miss one being created.
            program = await store.lock_program(conn, program_id)
            if program is None:
                raise _program_not_found(program_id)
            if changes.currency is not None and changes.currency != program.currency:
                has_accounts = await store.program_has_accounts(conn, program_id)
                domain.check_currency_change(program, changes.currency, has_accounts)
            tiers = program.tiers if changes.tiers is None else changes.tiers
            rules = program.earning_rules
            if changes.earning_rules is not None:
                rules = domain.versioned_rules(_RULES_PATH, rules, changes.earning_rules)
            # Checked against the tiers the program will have: a multiplier must name one.
            _raise_if_any(domain.rule_violations(_RULES_PATH, rules, tiers))
            updated = replace(
                program,
                name=program.name if changes.name is None else changes.name,
                currency=program.currency if changes.currency is None else changes.currency,
                auto_enroll=program.auto_enroll
                if changes.auto_enroll is None
                else changes.auto_enroll,
                tiers=tiers,
                status=program.status if changes.status is None else changes.status,
                update_time=self.clock(),
                earning_rules=rules,
            )
            await store.save_program(conn, updated)
            await store.save_rule_versions(conn, program_id, rules, updated.update_time)
            return updated

        params = {"id": program_id, "changes": store.to_json(changes)}
        return await self._run("UpdateProgram", request_id, params, Program, work)

    # -- accounts ------------------------------------------------------------------------

    async def create_account(
        self,
        program: str,
        customer: str | None,
        metadata: dict[str, str],
        request_id: str = "",
    ) -> Account:
        async def work(conn: Conn) -> Account:
            # Held until commit: an UpdateProgram that archives the program, or changes its
            # currency, waits for this enrollment or is waited for.
            found = await store.share_program(conn, program)
            if found is None:
                raise _program_not_found(program)
            domain.require_program_active(found)
            enrollment = await _enroll(conn, found, customer, metadata, self.clock())
            if enrollment is None:
                assert customer is not None  # accounts without a customer never conflict
                raise await self._already_exists(conn, program, customer)
            await store.append_events(conn, enrollment.events)
            return enrollment.account

        params = {"program": program, "customer": customer, "metadata": metadata}
        return await self._run("CreateAccount", request_id, params, Account, work)

    async def get_account(self, account_id: str) -> Account:
        async with db.connection(self.pool) as conn:
            account = await store.get_account(conn, account_id)
        if account is None:
            raise _account_not_found(account_id)
        return account

    async def list_accounts(
        self, where: AccountFilter, after: int | None, limit: int
    ) -> Page[Account]:
        async with db.connection(self.pool) as conn:
            return await store.list_accounts(conn, where, after, limit)

    async def update_account(
        self, account_id: str, changes: AccountChanges, request_id: str = ""
    ) -> Account:
        async def work(conn: Conn) -> Account:
            account = await self._lock_account(conn, account_id)
            if account.status is AccountStatus.MERGED:
                # Merged accounts are frozen; closed ones may still be relabelled.
                domain.require_active(account)
            customer = account.customer
            if changes.clear_customer:
                customer = None
            elif changes.customer is not None:
                customer = changes.customer
            updated = domain.revised(
                account,
                self.clock(),
                customer=customer,
                metadata=account.metadata if changes.metadata is None else changes.metadata,
            )
            await self._save_account(conn, updated)
            await store.append_events(conn, [account_event(EventType.ACCOUNT_UPDATED, updated)])
            return updated

        params = {
            "id": account_id,
            "customer": changes.customer,
            "clear_customer": changes.clear_customer,
            "metadata": changes.metadata,
        }
        return await self._run("UpdateAccount", request_id, params, Account, work)

    async def close_account(self, account_id: str, request_id: str = "") -> Account:
        async def work(conn: Conn) -> Account:
            account = await self._lock_account(conn, account_id)
            domain.require_active(account)
            closed = domain.revised(account, self.clock(), status=AccountStatus.CLOSED)
            await store.save_account(conn, closed)
            await store.append_events(conn, [account_event(EventType.ACCOUNT_CLOSED, closed)])
            return closed

        return await self._run("CloseAccount", request_id, {"id": account_id}, Account, work)

    async def reopen_account(self, account_id: str, request_id: str = "") -> Account:
        async def work(conn: Conn) -> Account:
            account = await self._lock_account(conn, account_id)
            if account.status is not AccountStatus.CLOSED:
                raise AccountNotClosed(
                    f"account {account_id} is {account.status}, not CLOSED",
                    account=account_id,
                    status=account.status,
                )
            reopened = domain.revised(account, self.clock(), status=AccountStatus.ACTIVE)
            await self._save_account(conn, reopened)
            await store.append_events(conn, [account_event(EventType.ACCOUNT_REOPENED, reopened)])
            return reopened

        return await self._run("ReopenAccount", request_id, {"id": account_id}, Account, work)

    async def merge_accounts(
        self, source_id: str, target_id: str, request_id: str = ""
    ) -> MergeResult:
        if source_id == target_id:
            raise InvalidArgument([FieldViolation("target", "must differ from source")])

        async def work(conn: Conn) -> MergeResult:
            # Both rows, locked in id order: merges A->B and B->A cannot deadlock.
            locked = await store.lock_accounts(conn, [source_id, target_id])
            for account_id in (source_id, target_id):
                if account_id not in locked:
                    raise _account_not_found(account_id)
            source, target = locked[source_id], locked[target_id]
            domain.check_merge(source, target)
            now = self.clock()
            after_seq = await store.last_transaction_seq(conn, [source_id, target_id])
            await store.reparent_transactions(conn, source_id, target_id)
            await store.record_merge(conn, source, target_id, after_seq, now)
            merged_source = domain.merged_source(source, target, now)
            # The target's lifetime points grow: it may reach a higher tier of its program.
            program = await store.get_program(conn, target.program)
            assert program is not None  # accounts' programs are never deleted
            merged_target = domain.merged_target(target, source, now, program.tiers)
            await store.save_account(conn, merged_source)
            await store.save_account(conn, merged_target)
            merge_events = [
                account_event(EventType.ACCOUNT_MERGED, merged_source),
                account_event(EventType.ACCOUNT_UPDATED, merged_target),
            ]
            if merged_target.tier != target.tier:
                merge_events.append(account_event(EventType.ACCOUNT_TIER_CHANGED, merged_target))
            await store.append_events(conn, merge_events)
            return MergeResult(target=merged_target, source=merged_source)

        params = {"source": source_id, "target": target_id}
        return await self._run("MergeAccounts", request_id, params, MergeResult, work)

    # -- points --------------------------------------------------------------------------

    async def create_transaction(
        self, new: NewTransaction, request_id: str = ""
    ) -> PointsTransaction:
        # The hot path: the posting joins the next batch (group commit), where one statement
        # locks the accounts, applies each change within the domain's bounds and writes the
        # ledger rows (store.post_transactions); what the batch leaves alone is posted by
        # itself (store.post_transaction).
        change = domain.change(new.type, new.direction, new.amount)
        ptx = domain.to_post(new, self.clock())
        # What the request asked for, in a fixed order, for its fingerprint.
        asked = [
            new.account, new.type, new.direction, new.amount, new.reason,
            new.origin_kind, new.origin_id, new.metadata,
        ]  # fmt: skip
        key, fingerprint = _request_key("CreatePointsTransaction", request_id, asked)
        posting = store.NewPosting(ptx, change, (key, fingerprint) if request_id else None)
        posted = await self._postings.run(posting)
        if posted is None:
            posted = store.Posted(None)
        if posted.points_after is None and posted.prior is None:
            # The batch left it alone: on its own, the posting waits for the account's lock
            # and finds why it is refused, if it is.
            posted = await self._post_alone(posting)
        if posted.points_after is not None:
            return replace(ptx, points_after=posted.points_after)
        if posted.prior is not None:
            _check_fingerprint(posted.prior, fingerprint, _request_id_reused(request_id))
            async with db.connection(self.pool) as conn:
                first = await store.get_transaction(conn, posted.prior.response)
            assert first is not None  # transactions are never deleted
            return domain.as_posted(first)
        if posted.account is None:
            raise _account_not_found(new.account)
        domain.check(posted.account, change)  # raises why the change was refused
        raise AssertionError("the database refused a change the domain allows")

    async def _post_batch(self, postings: list[store.NewPosting]) -> list[store.Posted]:
        async with db.connection(self.pool) as conn:
            try:
                return await store.post_transactions(conn, postings)
            except store.BatchNotTaken as error:
                # Each posting goes again on its own, so that none can fail the others.
                log.info("a batch of %d postings was refused: %s", len(postings), error)
                return [store.Posted(None)] * len(postings)

    async def _post_alone(self, posting: store.NewPosting) -> store.Posted:
        async with db.connection(self.pool) as conn:
            try:
                posted = await store.post_transaction(conn, posting)
            except store.KeyTaken:
                assert posting.request is not None
                prior = await store.stored_response(conn, posting.request[0])
                return store.Posted(None, prior=prior)
            if posted.points_after is None and posted.prior is None and posting.request:
                # A retry that raced the first attempt waited for the account's lock, so the
                # first attempt's response is committed by now if it succeeded.
                prior = await store.stored_response(conn, posting.request[0])
                posted = replace(posted, prior=prior)
        return posted

    async def get_transaction(self, transaction_id: str) -> PointsTransaction:
        async with db.connection(self.pool) as conn:
            ptx = await store.get_transaction(conn, transaction_id)
        if ptx is None:
            raise _transaction_not_found(transaction_id)
        return ptx

    async def list_transactions(
        self, where: TransactionFilter, after: int | None, limit: int
    ) -> Page[PointsTransaction]:
        async with db.connection(self.pool) as conn:
            return await store.list_transactions(conn, where, after, limit)

    async def reverse_transaction(
        self, transaction_id: str, amount: int | None, reason: str, request_id: str = ""
    ) -> PointsTransaction:
        async def work(conn: Conn) -> PointsTransaction:
            seen = await store.get_transaction(conn, transaction_id)
            if seen is None:
                raise _transaction_not_found(transaction_id)
            # Lock order is account, then transaction, as in merges (which re-parent
            # transactions while holding their accounts' locks).
            account = await self._lock_account(conn, seen.account)
            original = await store.get_transaction(conn, transaction_id, lock=True)
            assert original is not None  # transactions are never deleted
            if original.account != account.id:
                raise _Moved
            points = domain.check_reversal(original, amount)
            account = domain.reversed_by(account, original, points, self.clock(), refund=False)
            origin = (original.origin_kind, original.origin_id)
            reversal = domain.reversal_transaction(account, original, points, origin, reason)
            await store.add_reversed_amount(conn, original.id, points)
            await _write_postings(conn, account, [reversal])
            await store.append_events(conn, [transaction_event(reversal, account.program)])
            return reversal

        params = {"id": transaction_id, "amount": amount, "reason": reason}
        return await self._run(
            "ReversePointsTransaction", request_id, params, PointsTransaction, work
        )

    # -- payments and refunds ------------------------------------------------------------

    async def record_payment(self, new: domain.NewPayment) -> PaymentResult:
        """Records a payment and credits what its program's earning rules give, once per
        payment id. Locks, in order: the program (KEY SHARE, against archiving and currency
        changes), the payment id (its row's insert: a replay waits for the first attempt),
        the customer's account (FOR UPDATE, or the unique index on a new one), the event
        log's head (last, in append_events)."""
        fingerprint = _fingerprint(new)
        reused = PaymentIdReused(f"payment {new.id} was recorded with other fields", payment=new.id)

        async def work(conn: Conn) -> PaymentResult:
            program = await store.share_program(conn, new.program)
            if program is None:
                # A recorded payment sent again with another program is that, not a typo.
                if await store.stored_payment(conn, new.id):
                    raise reused
                raise _program_not_found(new.program)
            now = self.clock()
            stored = await store.claim_payment(conn, new, fingerprint, now)
            if stored is not None:
                return _replay(stored, fingerprint, reused, PaymentResult)
            # After the claim: a replay answers as the first time, whatever changed since.
            domain.check_payment_currency(program, new.currency)
            result, earn_ids, new_events = await _settle(conn, program, new, now)
            account_id = result.account.id if result.account else None
            await store.save_payment(
                conn, new.id, result.payment.outcome, account_id, earn_ids, store.to_json(result)
            )
            await store.append_events(conn, new_events)
            return result

        # No request id: the payment id is the idempotency key (claim_payment).
        return await self._run("RecordPayment", "", None, PaymentResult, work)

    async def record_refund(self, new: domain.NewRefund) -> RefundResult:
        """Records a refund and reverses its share of the payment's earns, once per refund
        id. Locks, in order: the payment (FOR UPDATE: its refunds one at a time), the refund
        id, the account holding the earns, the earns (in id order), the event log's head."""
        fingerprint = _fingerprint(new)
        reused = RefundIdReused(f"refund {new.id} was recorded with other fields", refund=new.id)

        async def work(conn: Conn) -> RefundResult:
            payment = await store.lock_payment(conn, new.payment_id)
            if payment is None:
                # A recorded refund sent again with another payment is that, not a typo.
                if await store.stored_refund(conn, new.id):
                    raise reused
                raise PaymentNotFound(
                    f"payment {new.payment_id} was never recorded", payment=new.payment_id
                )
            now = self.clock()
            stored = await store.claim_refund(conn, new, fingerprint, now)
            if stored is not None:
                return _replay(stored, fingerprint, reused, RefundResult)
            domain.check_refund(payment.id, payment.amount, payment.refunded_amount, new.amount)
            refunded = payment.refunded_amount + new.amount
            account, reversals = None, []
            if payment.earn_ids:
                account, reversals = await _reverse_for_refund(conn, payment, new, refunded, now)
            await store.save_refunded(conn, payment.id, refunded)
            refund = domain.Refund(new.id, payment.id, new.amount, refunded, now)
            result = RefundResult(refund, reversals, account)
            await store.save_refund(conn, new.id, store.to_json(result))
            if account is not None:
                await store.append_events(
                    conn, [transaction_event(r, account.program) for r in reversals]
                )
            return result

        return await self._run("RecordRefund", "", None, RefundResult, work)

    # -- events --------------------------------------------------------------------------

    async def list_events(
        self, where: EventFilter, after: int, limit: int, *, check: bool
    ) -> store.EventPage:
        """A page of events after a position; with `check`, OUT_OF_RANGE unless every event
        after it is still retained."""
        async with db.connection(self.pool) as conn:
            page = await store.events_page(conn, where, after, limit)
        if check:
            domain.check_position(after, page.oldest, page.head)
        return page

    async def prune_events(self, keep: timedelta) -> int:
        """Deletes the events older than `keep`."""
        async with db.connection(self.pool) as conn:
            return await store.prune_events(conn, self.clock() - keep)

    # -- housekeeping --------------------------------------------------------------------

    async def prune_request_ids(self, keep: timedelta) -> int:
        """Forgets request ids older than `keep`; their retries would run again."""
        async with db.connection(self.pool) as conn:
            return await store.prune_request_keys(conn, self.clock() - keep)

    # -- helpers -------------------------------------------------------------------------

    async def _run(
        self,
        method: str,
        request_id: str,
        params: object,
        result_type: type[T],
        work: Callable[[Conn], Awaitable[T]],
    ) -> T:
        """Runs `work` in one transaction, once per request id (AIP-155).

        The request id is claimed first, in the same transaction as the change: a retry that
        races the first attempt waits for it and then replays its response. Only successful
        responses are kept; a request that failed may be retried with the same id. `work`
        appends the change's events as its last step (store.append_events), so a replay
        writes none.
        """
        # Without a request id there is nothing to remember (nor to fingerprint).
        key, fingerprint = _request_key(method, request_id, params) if request_id else ("", "")
        for _ in range(3):
            try:
                # Pipeline mode sends statements whose results are not needed yet together
                # with the next one that is: the writes and the COMMIT go in one round trip.
                async with db.connection(self.pool) as conn, conn.pipeline(), conn.transaction():
                    if request_id:
                        stored = await store.claim_request(conn, key, fingerprint, self.clock())
                        if stored is not None:
                            reused = _request_id_reused(request_id)
                            return _replay(stored, fingerprint, reused, result_type)
                    result = await work(conn)
                    if request_id:
                        await store.save_response(conn, key, store.to_json(result))
                    return result
            except _Moved:
                continue
        raise RuntimeError(f"{method}: the rows kept moving under concurrent changes")

    @staticmethod
    async def _lock_account(conn: Conn, account_id: str) -> Account:
        account = await store.lock_account(conn, account_id)
        if account is None:
            raise _account_not_found(account_id)
        return account

    async def _save_account(self, conn: Conn, account: Account) -> None:
        try:
            await store.save_account(conn, account)
        except store.ActiveCustomerTaken:
            assert account.customer is not None
            raise await self._already_exists(conn, account.program, account.customer) from None

    @staticmethod
    async def _already_exists(conn: Conn, program: str, customer: str) -> AccountAlreadyExists:
        existing = await store.find_active_account(conn, program, customer)
        return AccountAlreadyExists(
            f"customer {customer} already has ACTIVE account {existing} in {program}",
            existingAccount=existing or "",
            program=program,
            customer=customer,
        )


_RULES_PATH = "program.earning_rules"


def _raise_if_any(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument(violations)


@dataclass(frozen=True)
class _Enrollment:
    account: Account  # after its welcome bonus, if any
    transactions: list[PointsTransaction]
    events: list[Event]


async def _enroll(
    conn: Conn, program: Program, customer: str | None, metadata: dict[str, str], now: datetime
) -> _Enrollment | None:
    """Creates an account in `program` (held FOR KEY SHARE) with its welcome bonus; None if
    the customer has an ACTIVE one already (a racing enrollment waits for the other's
    commit on the unique index, and then gets None)."""
    account = Account(
        id=domain.new_id("loy_"),
        program=program.id,
        customer=customer,
        status=AccountStatus.ACTIVE,
        balance=0,
        lifetime_points=0,
        # A tier from 0 lifetime points holds from the start (no tier_changed event: the
        # account is created in it).
        tier=domain.starting_tier(program),
        metadata=metadata,
        create_time=now,
        update_time=now,
    )
    if not await store.insert_account(conn, account):
        return None
    welcome = domain.welcome_earns(program.earning_rules)
    bonus = domain.credit_earns(account, welcome, (OriginKind.RULE, ""), {}, program, now)
    if bonus.transactions:
        await _write_postings(conn, bonus.account, bonus.transactions)
    created = [account_event(EventType.ACCOUNT_CREATED, account), *bonus.events]
    return _Enrollment(bonus.account, bonus.transactions, created)


async def _write_postings(
    conn: Conn, account: Account, transactions: list[PointsTransaction]
) -> None:
    """Writes postings worked out in Python under the account's lock (taken by the caller)."""
    for ptx in transactions:
        await store.insert_transaction(conn, ptx)
    await store.save_posted(conn, account)


async def _settle(
    conn: Conn, program: Program, new: domain.NewPayment, now: datetime
) -> tuple[PaymentResult, list[str], list[Event]]:
    """What a newly claimed payment earns, written: the result, the ids of its earns (for
    refunds) and the events to append."""

    def result(
        outcome: PaymentOutcome,
        account: Account | None = None,
        transactions: list[PointsTransaction] | None = None,
        enrolled: bool = False,
    ) -> PaymentResult:
        payment = domain.Payment(
            id=new.id,
            program=new.program,
            customer=new.customer,
            amount=new.amount,
            currency=new.currency,
            occurred_at=new.occurred_at,
            metadata=new.metadata,
            outcome=outcome,
            account=account.id if account else None,
            enrolled=enrolled,
            create_time=now,
        )
        return PaymentResult(payment, transactions or [], account)

    if new.customer is None:
        return result(PaymentOutcome.GUEST), [], []
    account = await _member(conn, program.id, new.customer)
    if isinstance(account, PaymentOutcome):
        return result(account), [], []
    enrollment = None
    if account is None:
        if not program.auto_enroll or program.status is not ProgramStatus.ACTIVE:
            return result(PaymentOutcome.NOT_ENROLLED), [], []
        # Only a payment that earns enrolls: one that earns nothing leaves no empty account.
        # It earns by the tier the new account will have, after its welcome bonus.
        if not domain.payment_earns(program.earning_rules, new, domain.welcomed_tier(program)):
            return result(PaymentOutcome.NO_POINTS), [], []
        enrollment = await _enroll(conn, program, new.customer, {}, now)
        if enrollment is None:
            # A racing payment (or CreateAccount) enrolled the customer and has committed:
            # start again, and credit the account it made.
            raise _Moved
        account = enrollment.account
    # The tier when the payment is recorded: for a new member, after the welcome bonus.
    earns = domain.payment_earns(program.earning_rules, new, account.tier)
    if not earns:  # a member's payment (an enrolling one earns: see above)
        return result(PaymentOutcome.NO_POINTS, account), [], []
    origin = (OriginKind.PAYMENT, new.id)
    earned = domain.credit_earns(account, earns, origin, new.metadata, program, now)
    await _write_postings(conn, earned.account, earned.transactions)
    bonus = enrollment.transactions if enrollment else []
    created = enrollment.events if enrollment else []
    return (
        result(
            PaymentOutcome.EARNED, earned.account, bonus + earned.transactions, bool(enrollment)
        ),
        [ptx.id for ptx in earned.transactions],
        created + earned.events,
    )


async def _member(conn: Conn, program: str, customer: str) -> Account | PaymentOutcome | None:
    """The account a customer's payment credits, locked: their ACTIVE account, or the ACTIVE
    account one of theirs was merged into (so a merge does not make them a new member, with
    a second welcome bonus). ACCOUNT_CLOSED if theirs is CLOSED; None if they have none."""
    account = await store.lock_active_account(conn, program, customer)
    if account is not None:
        return account
    former = await store.former_account(conn, program, customer)
    if former is None:
        return None
    account_id, status = former
    if status is not AccountStatus.ACTIVE:
        return PaymentOutcome.ACCOUNT_CLOSED
    account = await store.lock_account(conn, account_id)
    if account is None or account.status is not AccountStatus.ACTIVE:
        raise _Moved  # merged or closed between the read and the lock: start again
    return account


async def _reverse_for_refund(
    conn: Conn, payment: store.PaidPayment, refund: domain.NewRefund, refunded: int, now: datetime
) -> tuple[Account, list[PointsTransaction]]:
    """Reverses the payment's earns down to their share after refunds totalling `refunded`;
    the account holding them, after, and the reversals."""
    seen = await store.get_transaction(conn, payment.earn_ids[0])
    assert seen is not None  # transactions are never deleted
    # Lock order: account, then its transactions, as in merges and ReversePointsTransaction.
    account = await store.lock_account(conn, seen.account)
    assert account is not None
    earns = await store.lock_transactions(conn, payment.earn_ids)
    if any(earn.account != account.id for earn in earns):
        raise _Moved  # a merge moved them between the read and the lock
    reversals = []
    for earn, points in domain.refund_reversals(earns, payment.amount, refunded):
        account = domain.reversed_by(account, earn, points, now, refund=True)
        reversals.append(
            domain.reversal_transaction(
                account, earn, points, (OriginKind.REFUND, refund.id),
                f"refund of payment {payment.id}",
            )
        )  # fmt: skip
        await store.add_reversed_amount(conn, earn.id, points)
    if reversals:
        await _write_postings(conn, account, reversals)
    return account, reversals


def _fingerprint(request: object) -> str:
    """The digest of what a request (a domain object) asked for: a replay must ask for the
    same."""
    return _digest(store.to_json(request))


def _digest(params: object) -> str:
    body = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(body).hexdigest()


def _posting_keys(posting: store.NewPosting) -> tuple[object, ...]:
    """What may appear only once in a batch of postings: the account and the request key."""
    if posting.request is None:
        return (posting.ptx.account,)
    return (posting.ptx.account, posting.request[0])


def _request_key(method: str, request_id: str, params: object) -> tuple[str, str]:
    """The stored key of a request id, and the fingerprint of what it asked for."""
    return f"{method}:{request_id}", _digest(params)  # params are JSON-ready: no to_json


def _request_id_reused(request_id: str) -> RequestIdReused:
    return RequestIdReused(
        f"request_id {request_id} was used for a different request", requestId=request_id
    )


def _check_fingerprint(
    stored: store.StoredResponse, fingerprint: str, reused: RequestIdReused
) -> None:
    """A replay must ask for what the first call asked for; `reused` says it did not."""
    if stored.fingerprint != fingerprint:
        raise reused


def _replay(
    stored: store.StoredResponse, fingerprint: str, reused: RequestIdReused, result_type: type[T]
) -> T:
    _check_fingerprint(stored, fingerprint, reused)
    return store.from_json(result_type, stored.response)


def _program_not_found(program_id: str) -> ProgramNotFound:
    return ProgramNotFound(f"program {program_id} does not exist", program=program_id)


def _account_not_found(account_id: str) -> AccountNotFound:
    return AccountNotFound(f"account {account_id} does not exist", account=account_id)


def _transaction_not_found(transaction_id: str) -> TransactionNotFound:
    return TransactionNotFound(
        f"points transaction {transaction_id} does not exist", pointsTransaction=transaction_id
    )


async def find_violations(pool: AsyncConnectionPool) -> list[str]:
    """Checks the ledger's invariants; returns one line per violation.

    - balance == sum(credits) - sum(debits), lifetime_points == sum(EARN and ADJUST credits);
    - each reversed_amount equals the sum of the reversals that point at it;
    - each payment's refunded_amount equals the sum of its refunds (and, by a check
      constraint, is at most its amount);
    - every points_after equals the running balance of the account it was posted to
      (a merge adds the source's balance to its target's running balance);
    - MERGED accounts hold nothing; no customer has two ACTIVE accounts in a program.
    """
    async with pool.connection() as conn:
        # One snapshot for every query, so a ledger that is being written to checks clean.
        await conn.set_isolation_level(IsolationLevel.REPEATABLE_READ)
        try:
            async with conn.transaction():
                return await _violations(conn)
        finally:
            await conn.set_isolation_level(IsolationLevel.READ_COMMITTED)


async def _violations(conn: Conn) -> list[str]:
    found = [
        *await store.balance_violations(conn),
        *await store.reversal_violations(conn),
        *await store.refund_violations(conn),
        *await store.duplicate_active_customers(conn),
        *await store.merged_account_violations(conn),
    ]
    balances = await store.account_balances(conn)
    chain_account, running = None, 0
    async for entry in store.points_after_chains(conn):
        if entry.account_id != chain_account:
            found += _chain_end(chain_account, running, balances)
            chain_account, running = entry.account_id, 0
        running += entry.signed_amount
        if entry.points_after is not None and entry.points_after != running:
            found.append(
                f"transaction {entry.id}: points_after {entry.points_after},"
                f" running balance {running}"
            )
    found += _chain_end(chain_account, running, balances)
    return found


def _chain_end(
    account_id: str | None, running: int, balances: dict[str, tuple[AccountStatus, int]]
) -> list[str]:
    if account_id is None:
        return []
    status, balance = balances[account_id]
    if status is not AccountStatus.MERGED and running != balance:
        return [f"account {account_id}: chain ends at {running}, balance is {balance}"]
    return []
