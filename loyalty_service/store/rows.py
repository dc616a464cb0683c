"""Rows <-> domain objects: the columns read and written of accounts and ledger rows."""

from __future__ import annotations

import sqlalchemy as sa
from psycopg.types.json import Jsonb

from ..db import accounts, points_transactions
from ..domain.accounts import Account, AccountStatus
from ..domain.points import Direction, OriginKind, PointsTransaction, TransactionType
from .sql import Row

TRANSACTION_COLUMNS = [c for c in points_transactions.c if c.name != "seq"]


def transaction_of(row: Row) -> PointsTransaction:
    return PointsTransaction(
        id=row.id,
        account=row.account_id,
        type=TransactionType(row.type),
        direction=Direction(row.direction),
        amount=row.amount,
        points_after=row.points_after,
        reason=row.reason,
        origin_kind=OriginKind(row.origin_kind),
        origin_id=row.origin_id,
        metadata=row.metadata,
        create_time=row.create_time,
        reverses=row.reverses_id,
        original_account=row.original_account_id,
        reversed_amount=row.reversed_amount,
        rule=row.rule_id,
        rule_version=row.rule_version,
        actor=row.actor,
    )


ACCOUNT_COLUMNS = [c for c in accounts.c if c.name != "seq"]


# An account as read at `now`: the points of its holds whose time is up there are not held
# any more, whether or not they were settled (SQL held_at, migration 0011). What it stores
# is written only by the hold functions and the kernel: account_params leaves it out.
ACCOUNT_COLUMNS_AT = [
    sa.func.held_at(
        sa.literal_column("accounts"), sa.bindparam("now", type_=sa.DateTime(True))
    ).label("held_points")
    if c.name == "held_points"
    else c
    for c in ACCOUNT_COLUMNS
]


def account_of(row: Row) -> Account:
    return Account(
        id=row.id,
        program=row.program_id,
        customer=row.customer,
        status=AccountStatus(row.status),
        balance=row.balance,
        lifetime_points=row.lifetime_points,
        tier=row.tier,
        metadata=row.metadata,
        create_time=row.create_time,
        update_time=row.update_time,
        merged_into=row.merged_into,
        version=row.version,
        actor=row.actor,
        held_points=row.held_points,
    )


def account_params(account: Account) -> dict[str, object]:
    return {
        "id": account.id,
        "program_id": account.program,
        "customer": account.customer,
        "status": account.status.value,
        "balance": account.balance,
        "lifetime_points": account.lifetime_points,
        "tier": account.tier,
        "metadata": Jsonb(account.metadata),
        "create_time": account.create_time,
        "update_time": account.update_time,
        "merged_into": account.merged_into,
        "version": account.version,
        "actor": account.actor,
    }
