"""What every use case shares: one transaction per request, the replay of its request id,
and the errors for rows that do not exist."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from psycopg_pool import AsyncConnectionPool

from .. import db, domain, store
from ..domain.accounts import Account
from ..domain.callers import Caller
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
        caller: Caller,
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
        writes no events. Request ids are the caller's own: another caller's same id is
        another request.
        """
        # Without a request id there is nothing to remember (nor to fingerprint).
        key, fingerprint = ("", "")
        if request_id:
            key, fingerprint = request_key(caller, method, request_id, params)
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

    async def require_account(self, caller: Caller, account_id: str) -> None:
        """Raises ACCOUNT_NOT_FOUND unless the account exists for the caller."""
        account = await self.call(store.accounts.get_account, account_id, self.clock())
        if account is None:
            raise account_not_found(account_id)
        self.visible(caller, account)

    @staticmethod
    def visible(caller: Caller, account: Account) -> Account:
        """The account, if its program exists for the caller; else it does not exist."""
        if not caller.sees(account.program):
            raise account_not_found(account.id)
        return account

    async def _lock_account(self, conn: Conn, caller: Caller, account_id: str) -> Account:
        account = await store.accounts.lock_account(conn, account_id, self.clock())
        if account is None:
            raise account_not_found(account_id)
        return self.visible(caller, account)

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


# Between a request key's actor and the rest: identities hold no control characters
# (api.identity), so the actor is all before the first one (migration 0010).
_ACTOR_END = "\x1f"


def request_key(caller: Caller, method: str, request_id: str, params: object) -> tuple[str, str]:
    """The stored key of a caller's request id, and the fingerprint of what it asked for."""
    if _ACTOR_END in caller.identity:  # api.identity lets none through
        raise ValueError(f"an identity with a control character: {caller.identity!r}")
    # params are JSON-ready: no to_json
    key = f"{caller.identity}{_ACTOR_END}{method}:{request_id}"
    return key, domain.codec.digest(params)


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
