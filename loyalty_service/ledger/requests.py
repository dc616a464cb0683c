"""What every use case shares: one transaction per request, the replay of its request id,
and the errors for rows that do not exist."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from psycopg_pool import AsyncConnectionPool

from .. import db, domain, store
from ..domain.accounts import Account
from ..domain.errors import (
    AccountAlreadyExists,
    AccountNotFound,
    FieldViolation,
    InvalidArgument,
    LedgerError,
    PaymentNotFound,
    ProgramNotFound,
    RequestIdReused,
    TransactionNotFound,
)
from ..store.sql import Conn

T = TypeVar("T")
Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


class Moved(Exception):
    """What the transaction read moved before it could lock it: a merge moved a transaction
    to another account, or a racing payment enrolled the customer. UseCases.run starts the
    transaction again, which then finds the row where it is now."""


class UseCases:
    """The state every group of use cases shares; Ledger (ledger/__init__.py) is all of them."""

    pool: AsyncConnectionPool
    clock: Clock

    async def call(self, store_function: Callable[..., Awaitable[T]], *args: object) -> T:
        """One store function on a connection of the pool: a read, or a write that is one
        statement (autocommit)."""
        async with db.connection(self.pool) as conn:
            return await store_function(conn, *args)

    async def found(
        self,
        store_function: Callable[[Conn, str], Awaitable[T | None]],
        key: str,
        missing: Callable[[str], LedgerError],
    ) -> T:
        """What `store_function` reads by `key`; `missing(key)` is raised if nothing."""
        row = await self.call(store_function, key)
        if row is None:
            raise missing(key)
        return row

    async def run(
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
        responses are kept; a request that failed may be retried with the same id. A replay
        writes no events.
        """
        # Without a request id there is nothing to remember (nor to fingerprint).
        key, fingerprint = request_key(method, request_id, params) if request_id else ("", "")
        for _ in range(3):
            try:
                # Pipeline mode sends statements whose results are not needed yet together
                # with the next one that is: the writes and the COMMIT go in one round trip.
                async with db.connection(self.pool) as conn, conn.pipeline(), conn.transaction():
                    if request_id:
                        stored = await store.requests.claim_request(
                            conn, key, fingerprint, self.clock()
                        )
                        if stored is not None:
                            reused = request_id_reused(request_id)
                            return replay(stored, fingerprint, reused, result_type)
                    result = await work(conn)
                    if request_id:
                        await store.requests.save_response(conn, key, domain.codec.to_json(result))
                    return result
            except Moved:
                continue
        raise RuntimeError(f"{method}: the rows kept moving under concurrent changes")

    @staticmethod
    async def _lock_account(conn: Conn, account_id: str) -> Account:
        account = await store.accounts.lock_account(conn, account_id)
        if account is None:
            raise account_not_found(account_id)
        return account

    async def _save_account(self, conn: Conn, account: Account) -> None:
        try:
            await store.accounts.save_account(conn, account)
        except store.accounts.ActiveCustomerTaken:
            assert account.customer is not None
            raise await self._already_exists(conn, account.program, account.customer) from None

    @staticmethod
    async def _already_exists(conn: Conn, program: str, customer: str) -> AccountAlreadyExists:
        existing = await store.accounts.find_active_account(conn, program, customer)
        return AccountAlreadyExists(
            f"customer {customer} already has ACTIVE account {existing} in {program}",
            existingAccount=existing or "",
            program=program,
            customer=customer,
        )


def raise_if_any(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument(violations)


def fingerprint_of(request: object) -> str:
    """The digest of what a request (a domain object) asked for: a replay must ask for the
    same."""
    return domain.codec.digest(domain.codec.to_json(request))


def request_key(method: str, request_id: str, params: object) -> tuple[str, str]:
    """The stored key of a request id, and the fingerprint of what it asked for."""
    # params are JSON-ready: no to_json
    return f"{method}:{request_id}", domain.codec.digest(params)


def request_id_reused(request_id: str) -> RequestIdReused:
    return RequestIdReused(
        f"request_id {request_id} was used for a different request", requestId=request_id
    )


def check_fingerprint(
    stored: store.requests.StoredResponse, fingerprint: str, reused: RequestIdReused
) -> None:
    """A replay must ask for what the first call asked for; `reused` says it did not."""
    if stored.fingerprint != fingerprint:
        raise reused


def replay(
    stored: store.requests.StoredResponse,
    fingerprint: str,
    reused: RequestIdReused,
    result_type: type[T],
) -> T:
    check_fingerprint(stored, fingerprint, reused)
    return domain.codec.from_json(result_type, stored.response)


def program_not_found(program_id: str) -> ProgramNotFound:
    return ProgramNotFound(f"program {program_id} does not exist", program=program_id)


def payment_not_found(payment_id: str) -> PaymentNotFound:
    return PaymentNotFound(f"payment {payment_id} was never recorded", payment=payment_id)


def account_not_found(account_id: str) -> AccountNotFound:
    return AccountNotFound(f"account {account_id} does not exist", account=account_id)


def transaction_not_found(transaction_id: str) -> TransactionNotFound:
    return TransactionNotFound(
        f"points transaction {transaction_id} does not exist", pointsTransaction=transaction_id
    )
