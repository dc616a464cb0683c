"""Use cases of payments and refunds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from .. import domain, store
from ..domain.accounts import Account, AccountStatus
from ..domain.callers import Caller
from ..domain.errors import LedgerError, PaymentIdReused, RefundIdReused, RequestIdReused
from ..domain.payments import PaymentOutcome, PaymentResult, RefundResult
from ..domain.points import OriginKind, PointsTransaction
from ..domain.programs import Program, ProgramStatus
from ..store.requests import StoredResponse
from ..store.sql import Conn
from .accounts import enroll
from .postings import post
from .requests import (
    Moved,
    UseCases,
    fingerprint_of,
    payment_not_found,
    program_not_found,
    replay,
)


class PaymentUseCases(UseCases):
    async def record_payment(
        self, caller: Caller, new: domain.payments.NewPayment
    ) -> PaymentResult:
        """Records a payment and credits what its program's earning rules give, once per
        payment id. Locks, in order: the program (KEY SHARE, against archiving and currency
        changes), the payment id (its row's insert: a replay waits for the first attempt),
        the customer's account (FOR UPDATE, or the unique index on a new one); then the
        posting kernel queues the events, after every lock."""
        fingerprint = fingerprint_of(new)
        reused = PaymentIdReused(f"payment {new.id} was recorded with other fields", payment=new.id)

        async def work(conn: Conn) -> PaymentResult:
            if not caller.sees(new.program):
                raise program_not_found(new.program)
            now = self.clock()
            claim = await store.payments.claim_payment(conn, new, fingerprint, now, caller.identity)
            if claim.program is None:
                missing = program_not_found(new.program)
                raise await _reused_or(conn, store.payments.stored_payment, new.id, reused, missing)
            if claim.stored is not None:
                return replay(claim.stored, fingerprint, reused, PaymentResult)
            program = claim.program
            # After the claim: a replay answers as the first time, whatever changed since.
            domain.payments.check_payment_currency(program, new.currency)
            result, earn_ids = await _settle(conn, caller, program, new, now)
            # A row this transaction inserted: no lock taken after the kernel's.
            account_id = result.account.id if result.account else None
            await store.payments.save_payment(
                conn,
                new.id,
                result.payment.outcome,
                account_id,
                earn_ids,
                domain.codec.to_json(result),
            )
            return result

        # No request id: the payment id is the idempotency key (claim_payment).
        return await self.run(caller, "RecordPayment", "", None, PaymentResult, work)

    async def record_refund(self, caller: Caller, new: domain.payments.NewRefund) -> RefundResult:
        """Records a refund and reverses its share of the payment's earns, once per refund
        id. Locks, in order: the payment (FOR UPDATE: its refunds one at a time), the refund
        id, the account holding the earns, the earns (in id order); then the posting kernel
        queues the events, after every lock."""
        fingerprint = fingerprint_of(new)
        reused = RefundIdReused(f"refund {new.id} was recorded with other fields", refund=new.id)

        async def work(conn: Conn) -> RefundResult:
            payment = await store.payments.lock_payment(conn, new.payment_id)
            if payment is not None and not caller.sees(payment.program):
                raise payment_not_found(new.payment_id)
            if payment is None:
                missing = payment_not_found(new.payment_id)
                raise await _reused_or(conn, store.payments.stored_refund, new.id, reused, missing)
            now = self.clock()
            stored = await store.payments.claim_refund(conn, new, fingerprint, now, caller.identity)
            if stored is not None:
                return replay(stored, fingerprint, reused, RefundResult)
            domain.payments.check_refund(
                payment.id, payment.amount, payment.refunded_amount, new.amount
            )
            refunded = payment.refunded_amount + new.amount
            account, reversals = None, []
            if payment.earn_ids:
                account, reversals = await _reverse_for_refund(
                    conn, caller, payment, new, refunded, now
                )
            await store.payments.save_refunded(conn, payment.id, refunded)
            refund = domain.payments.Refund(
                new.id, payment.id, new.amount, refunded, now, caller.identity
            )
            result = RefundResult(refund, reversals, account)
            # Rows this transaction holds: no lock taken after the kernel's.
            await store.payments.save_refund(conn, new.id, domain.codec.to_json(result))
            return result

        return await self.run(caller, "RecordRefund", "", None, RefundResult, work)


async def _reused_or(
    conn: Conn,
    stored: Callable[[Conn, str], Awaitable[StoredResponse | None]],
    new_id: str,
    reused: RequestIdReused,
    missing: LedgerError,
) -> LedgerError:
    """What a payment whose program, or a refund whose payment, does not exist fails with:
    `reused` if its id was recorded already (one sent again with another program or payment
    is that, not a typo), else `missing`."""
    return reused if await stored(conn, new_id) else missing


async def _settle(
    conn: Conn, caller: Caller, program: Program, new: domain.payments.NewPayment, now: datetime
) -> tuple[PaymentResult, list[str]]:
    """What a newly claimed payment earns, posted: the result and the ids of its earns (for
    refunds)."""

    def result(
        outcome: PaymentOutcome,
        account: Account | None = None,
        transactions: list[PointsTransaction] | None = None,
        enrolled: bool = False,
    ) -> PaymentResult:
        # The payment as asked for (every field of NewPayment), and what came of it.
        payment = domain.payments.Payment(
            **vars(new),
            outcome=outcome,
            account=account.id if account else None,
            enrolled=enrolled,
            create_time=now,
            actor=caller.identity,
        )
        return PaymentResult(payment, transactions or [], account)

    if new.customer is None:
        return result(PaymentOutcome.GUEST), []
    account = await _member(conn, program.id, new.customer, now)
    if isinstance(account, PaymentOutcome):
        return result(account), []
    enrollment = None
    if account is None:
        if not program.auto_enroll or program.status is not ProgramStatus.ACTIVE:
            return result(PaymentOutcome.NOT_ENROLLED), []
        # Only a payment that earns enrolls: one that earns nothing leaves no empty account.
        # It earns by the tier the new account will have, after its welcome bonus.
        if not domain.payments.payment_earns(
            program.earning_rules, new, domain.payments.welcomed_tier(program)
        ):
            return result(PaymentOutcome.NO_POINTS), []
        enrollment = await enroll(conn, program, new.customer, {}, now, caller)
        if enrollment is None:
            # A racing payment (or CreateAccount) enrolled the customer and has committed:
            # start again, and credit the account it made.
            raise Moved
        account = enrollment.account
    # The tier when the payment is recorded: for a new member, after the welcome bonus.
    tier = domain.payments.welcomed_tier(program) if enrollment else account.tier
    earns = domain.payments.payment_earns(program.earning_rules, new, tier)
    if not earns:  # a member's payment (an enrolling one earns: see above)
        return result(PaymentOutcome.NO_POINTS, account), []
    origin = (OriginKind.PAYMENT, new.id)
    earned = domain.payments.earn_postings(account.id, earns, origin, new.metadata, now)
    welcome = enrollment.welcome if enrollment else []
    created = [enrollment.created] if enrollment else []
    posted, after = await post(conn, caller, welcome + earned, created)
    return (
        result(PaymentOutcome.EARNED, after, posted, bool(enrollment)),
        [ptx.id for ptx, _ in earned],
    )


async def _member(
    conn: Conn, program: str, customer: str, now: datetime
) -> Account | PaymentOutcome | None:
    """The account a customer's payment credits, locked: their ACTIVE account, or the ACTIVE
    account one of theirs was merged into (so a merge does not make them a new member, with
    a second welcome bonus). ACCOUNT_CLOSED if theirs is CLOSED; None if they have none."""
    account = await store.accounts.lock_active_account(conn, program, customer, now)
    if account is not None:
        return account
    # A statement of its own, after the lock: had a merge or close of that account held the
    # lock, it has committed, and this snapshot sees where the account went.
    former = await store.accounts.former_account(conn, program, customer)
    if former is None:
        return None
    account_id, status = former
    if status is not AccountStatus.ACTIVE:
        return PaymentOutcome.ACCOUNT_CLOSED
    account = await store.accounts.lock_account(conn, account_id, now)
    if account is None or account.status is not AccountStatus.ACTIVE:
        raise Moved  # merged or closed between the read and the lock: start again
    return account


async def _reverse_for_refund(
    conn: Conn,
    caller: Caller,
    payment: store.payments.PaidPayment,
    refund: domain.payments.NewRefund,
    refunded: int,
    now: datetime,
) -> tuple[Account | None, list[PointsTransaction]]:
    """Reverses the payment's earns down to their share after refunds totalling `refunded`;
    the account holding them, after (None if nothing was due), and the reversals."""
    seen = await store.postings.get_transaction(conn, payment.earn_ids[0])
    assert seen is not None  # transactions are never deleted
    # Lock order: account, then its transactions, as in merges and ReversePointsTransaction.
    account = await store.accounts.lock_account(conn, seen.account, now)
    assert account is not None
    earns = await store.postings.lock_transactions(conn, payment.earn_ids)
    if any(earn.account != account.id for earn in earns):
        raise Moved  # a merge moved them between the read and the lock
    origin = (OriginKind.REFUND, refund.id)
    reason = f"refund of payment {payment.id}"
    due = domain.payments.refund_reversals(earns, payment.amount, refunded)
    postings = [
        domain.points.reversal(e, points, origin, reason, now, refund=True) for e, points in due
    ]
    reversals, after = await post(conn, caller, postings)
    return after or account, reversals
