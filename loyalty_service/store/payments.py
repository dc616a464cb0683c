"""Payments and refunds. Their ids are exactly-once keys, claimed by inserting the row first."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from psycopg.types.json import Jsonb
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ..db import payments, programs, refunds
from ..domain.payments import NewPayment, NewRefund
from ..domain.programs import Program
from .programs import PROGRAM_COLUMNS, program_of
from .requests import Claims, StoredResponse
from .sql import Conn, bind, compiled, one

_CLAIMED_PAYMENT_COLUMNS = (
    "id", "program_id", "customer", "amount", "currency", "occurred_at", "metadata",
    "fingerprint", "create_time", "actor",
)  # fmt: skip


# A payment's response is saved with its outcome (SAVE_PAYMENT), not by _PAYMENTS.save; its
# id is claimed by CLAIM_PAYMENT, not by _PAYMENTS.claim.
_PAYMENTS = Claims(payments, "id", _CLAIMED_PAYMENT_COLUMNS)


# The payment's program, held FOR KEY SHARE (as store.programs.SHARE_PROGRAM holds it, against
# UpdateProgram), and the payment id claimed, in one round trip. The claim's row is selected
# from the program's, so the program is locked first, and a payment of a program that does
# not exist claims nothing (and returns no row).
_PROGRAM = (
    sa.select(*PROGRAM_COLUMNS)
    .where(programs.c.id == bind(payments.c.program_id))
    .with_for_update(read=True, key_share=True)
    .cte("program")
)
_CLAIM = (
    pg_insert(payments)
    .from_select(
        _CLAIMED_PAYMENT_COLUMNS,
        sa.select(
            *(
                _PROGRAM.c.id if name == "program_id" else bind(payments.c[name])
                for name in _CLAIMED_PAYMENT_COLUMNS
            )
        ),
    )
    .on_conflict_do_nothing(index_elements=["id"])
    .returning(payments.c.id)
    .cte("claim")
)
CLAIM_PAYMENT = compiled(
    sa.select(_PROGRAM, sa.exists(sa.select(_CLAIM.c.id)).label("claimed")).select_from(_PROGRAM)
)


SAVE_PAYMENT = compiled(
    sa.update(payments)
    .where(payments.c.id == bind(payments.c.id))
    .values(
        {
            c.name: bind(c)
            for c in payments.c
            if c.name in ("outcome", "account_id", "earn_ids", "response")
        }
    )
)


_LOCK_PAYMENT = compiled(
    sa.select(
        payments.c.id,
        payments.c.program_id,
        payments.c.amount,
        payments.c.earn_ids,
        payments.c.refunded_amount,
    )
    .where(payments.c.id == bind(payments.c.id))
    .with_for_update()
)


_SAVE_REFUNDED = compiled(
    sa.update(payments)
    .where(payments.c.id == bind(payments.c.id))
    .values(refunded_amount=bind(payments.c.refunded_amount))
)


_REFUNDS = Claims(
    refunds, "id", ("id", "payment_id", "amount", "fingerprint", "create_time", "actor")
)


@dataclass(frozen=True)
class PaidPayment:
    """What a refund needs of a payment (locked)."""

    id: str
    program: str
    amount: int
    earn_ids: list[str]
    refunded_amount: int


@dataclass(frozen=True)
class PaymentClaim:
    """The payment's program (None if it does not exist: nothing was claimed), held FOR KEY
    SHARE, and what a first attempt stored for the payment id (None: this one claimed it)."""

    program: Program | None
    stored: StoredResponse | None = None


async def claim_payment(
    conn: Conn, payment: NewPayment, fingerprint: str, now: datetime, actor: str
) -> PaymentClaim:
    """Holds the payment's program and claims the payment id for this transaction, or returns
    what is stored for it; a concurrent claim waits for the first to end (see Claims)."""
    params = {
        "id": payment.id,
        "program_id": payment.program,
        "customer": payment.customer,
        "amount": payment.amount,
        "currency": payment.currency,
        "occurred_at": payment.occurred_at,
        "metadata": Jsonb(payment.metadata),
        "fingerprint": fingerprint,
        "create_time": now,
        "actor": actor,
    }
    row = await one(conn, CLAIM_PAYMENT, params)
    if row is None:
        return PaymentClaim(None)
    if row.claimed:
        return PaymentClaim(program_of(row))
    # After the conflict waited for the first attempt to commit: a new statement sees it.
    stored = await _PAYMENTS.stored(conn, payment.id)
    assert stored is not None, "a conflicting claim is committed before the conflict shows"
    return PaymentClaim(program_of(row), stored)


async def stored_payment(conn: Conn, payment_id: str) -> StoredResponse | None:
    return await _PAYMENTS.stored(conn, payment_id)


async def stored_refund(conn: Conn, refund_id: str) -> StoredResponse | None:
    return await _REFUNDS.stored(conn, refund_id)


async def save_payment(
    conn: Conn, payment_id: str, outcome: str, account_id: str | None, earn_ids: list[str],
    response: object,
) -> None:  # fmt: skip
    params = {
        "id": payment_id,
        "outcome": outcome,
        "account_id": account_id,
        "earn_ids": earn_ids,
        "response": Jsonb(response),
    }
    await conn.execute(SAVE_PAYMENT, params)


async def lock_payment(conn: Conn, payment_id: str) -> PaidPayment | None:
    row = await one(conn, _LOCK_PAYMENT, {"id": payment_id})
    if row is None:
        return None
    return PaidPayment(row.id, row.program_id, row.amount, row.earn_ids, row.refunded_amount)


async def save_refunded(conn: Conn, payment_id: str, refunded_amount: int) -> None:
    await conn.execute(_SAVE_REFUNDED, {"id": payment_id, "refunded_amount": refunded_amount})


async def claim_refund(
    conn: Conn, refund: NewRefund, fingerprint: str, now: datetime, actor: str
) -> StoredResponse | None:
    """As claim_payment, for a refund id."""
    params = {
        "id": refund.id,
        "payment_id": refund.payment_id,
        "amount": refund.amount,
        "fingerprint": fingerprint,
        "create_time": now,
        "actor": actor,
    }
    return await _REFUNDS.claim(conn, params)


async def save_refund(conn: Conn, refund_id: str, response: object) -> None:
    await _REFUNDS.save(conn, refund_id, response)
