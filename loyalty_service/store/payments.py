"""Payments and refunds. Their ids are exactly-once keys, claimed by inserting the row first."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from psycopg.types.json import Jsonb
from sqlalchemy.dialects.postgresql import insert as pg_insert

from ..db import payments, refunds
from ..domain.payments import NewPayment, NewRefund
from .requests import StoredResponse
from .sql import Conn, bind, compiled, one

_CLAIMED_PAYMENT_COLUMNS = (
    "id", "program_id", "customer", "amount", "currency", "occurred_at", "metadata",
    "fingerprint", "create_time",
)  # fmt: skip


CLAIM_PAYMENT = compiled(
    pg_insert(payments)
    .values({name: bind(payments.c[name]) for name in _CLAIMED_PAYMENT_COLUMNS})
    .on_conflict_do_nothing(index_elements=["id"])
    .returning(payments.c.id)
)


_STORED_PAYMENT = compiled(
    sa.select(payments.c.fingerprint, payments.c.response).where(
        payments.c.id == bind(payments.c.id)
    )
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
    sa.select(payments.c.id, payments.c.amount, payments.c.earn_ids, payments.c.refunded_amount)
    .where(payments.c.id == bind(payments.c.id))
    .with_for_update()
)


_SAVE_REFUNDED = compiled(
    sa.update(payments)
    .where(payments.c.id == bind(payments.c.id))
    .values(refunded_amount=bind(payments.c.refunded_amount))
)


_CLAIM_REFUND = compiled(
    pg_insert(refunds)
    .values(
        {
            c.name: bind(c)
            for c in refunds.c
            if c.name in ("id", "payment_id", "amount", "fingerprint", "create_time")
        }
    )
    .on_conflict_do_nothing(index_elements=["id"])
    .returning(refunds.c.id)
)


_STORED_REFUND = compiled(
    sa.select(refunds.c.fingerprint, refunds.c.response).where(refunds.c.id == bind(refunds.c.id))
)


_SAVE_REFUND = compiled(
    sa.update(refunds)
    .where(refunds.c.id == bind(refunds.c.id))
    .values(response=bind(refunds.c.response))
)


@dataclass(frozen=True)
class PaidPayment:
    """What a refund needs of a payment (locked)."""

    id: str
    amount: int
    earn_ids: list[str]
    refunded_amount: int


async def _claim(
    conn: Conn, claim_sql: str, stored_sql: str, params: dict[str, object]
) -> StoredResponse | None:
    """Inserts the row that claims an id (`params["id"]`), or returns what is stored for it."""
    if await one(conn, claim_sql, params) is not None:
        return None
    stored = await _stored(conn, stored_sql, params["id"])
    assert stored is not None, "a conflicting claim is committed before the conflict shows"
    return stored


async def _stored(conn: Conn, stored_sql: str, claimed_id: object) -> StoredResponse | None:
    row = await one(conn, stored_sql, {"id": claimed_id})
    return StoredResponse(row.fingerprint, row.response) if row else None


async def claim_payment(
    conn: Conn, payment: NewPayment, fingerprint: str, now: datetime
) -> StoredResponse | None:
    """Claims the payment id for this transaction, or returns what is stored for it; a
    concurrent claim waits for the first to end (see claim_request)."""
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
    }
    return await _claim(conn, CLAIM_PAYMENT, _STORED_PAYMENT, params)


async def stored_payment(conn: Conn, payment_id: str) -> StoredResponse | None:
    return await _stored(conn, _STORED_PAYMENT, payment_id)


async def stored_refund(conn: Conn, refund_id: str) -> StoredResponse | None:
    return await _stored(conn, _STORED_REFUND, refund_id)


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
    return PaidPayment(row.id, row.amount, row.earn_ids, row.refunded_amount) if row else None


async def save_refunded(conn: Conn, payment_id: str, refunded_amount: int) -> None:
    await conn.execute(_SAVE_REFUNDED, {"id": payment_id, "refunded_amount": refunded_amount})


async def claim_refund(
    conn: Conn, refund: NewRefund, fingerprint: str, now: datetime
) -> StoredResponse | None:
    """As claim_payment, for a refund id."""
    params = {
        "id": refund.id,
        "payment_id": refund.payment_id,
        "amount": refund.amount,
        "fingerprint": fingerprint,
        "create_time": now,
    }
    return await _claim(conn, _CLAIM_REFUND, _STORED_REFUND, params)


async def save_refund(conn: Conn, refund_id: str, response: object) -> None:
    await conn.execute(_SAVE_REFUND, {"id": refund_id, "response": Jsonb(response)})
