"""Use-case tests of group commit (ledger.Batches): postings that run together in one batch
stay independent, and a batch never holds up or fails a posting it cannot take."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from loyalty_service import db
from loyalty_service.domain.callers import ANYONE
from loyalty_service.domain.errors import AccountNotActive, InsufficientPoints
from loyalty_service.domain.points import Direction, NewTransaction, TransactionType
from loyalty_service.ledger import Ledger
from loyalty_service.ledger.batches import Batches
from tests.ledger.support import run

EARN, REDEEM = TransactionType.EARN, TransactionType.REDEEM
CREDIT, DEBIT = Direction.CREDIT, Direction.DEBIT


def earn(account: str, amount: int, **fields: object) -> NewTransaction:
    return NewTransaction(account, EARN, CREDIT, amount, **fields)  # type: ignore[arg-type]


def redeem(account: str, amount: int) -> NewTransaction:
    return NewTransaction(account, REDEEM, DEBIT, amount)


def batch_sizes(ledger: Ledger) -> list[int]:
    """Records the size of every batch the ledger writes from now on."""
    sizes: list[int] = []
    post_batch = ledger._postings._run

    async def recording(postings: list) -> list:
        sizes.append(len(postings))
        return await post_batch(postings)

    ledger._postings._run = recording
    return sizes


async def balances(ledger: Ledger, *account_ids: str) -> list[int]:
    return [(await ledger.get_account(ANYONE, account_id)).balance for account_id in account_ids]


def test_one_refused_posting_does_not_fail_its_batch(databases):
    """A posting the database refuses (text with U+0000, which the API rejects before it
    gets here) fails alone; the others of its batch are posted."""

    async def scenario(ledger: Ledger) -> None:
        a, b, c = [await ledger.create_account(ANYONE, "prog_default", None, {}) for _ in range(3)]
        sizes = batch_sizes(ledger)
        results = await asyncio.gather(
            ledger.create_transaction(ANYONE, earn(a.id, 5)),
            ledger.create_transaction(ANYONE, earn(b.id, 7, reason="bad\x00")),
            ledger.create_transaction(ANYONE, earn(c.id, 9)),
            return_exceptions=True,
        )
        assert [r.points_after for r in (results[0], results[2])] == [5, 9]
        assert isinstance(results[1], psycopg.DataError)
        assert sizes == [3], "the three went in one batch, which the database refused"
        assert await balances(ledger, a.id, b.id, c.id) == [5, 0, 9]

    run(databases.create(), scenario)


def test_refusals_in_a_batch_are_reported_per_posting(databases):
    async def scenario(ledger: Ledger) -> None:
        rich, poor, closed = [
            await ledger.create_account(ANYONE, "prog_default", None, {}) for _ in "abc"
        ]
        await ledger.create_transaction(ANYONE, earn(rich.id, 100))
        await ledger.close_account(ANYONE, closed.id)
        sizes = batch_sizes(ledger)
        results = await asyncio.gather(
            ledger.create_transaction(ANYONE, redeem(rich.id, 60)),
            ledger.create_transaction(ANYONE, redeem(poor.id, 1)),
            ledger.create_transaction(ANYONE, earn(closed.id, 3)),
            # After the first, in the same batch:
            ledger.create_transaction(ANYONE, redeem(rich.id, 60)),
            return_exceptions=True,
        )
        assert results[0].points_after == 40
        assert isinstance(results[1], InsufficientPoints)
        assert isinstance(results[2], AccountNotActive)
        assert isinstance(results[3], InsufficientPoints)
        assert results[3].metadata == {
            "available": "40",
            "held": "0",
            "balance": "40",
            "requested": "60",
        }
        assert sizes == [4], "postings on one account share a batch, applied in order"
        assert await balances(ledger, rich.id, poor.id, closed.id) == [40, 0, 0]

    run(databases.create(), scenario)


def test_a_batch_skips_an_account_locked_elsewhere(databases):
    """A batch does not wait for a row lock: the posting on the locked account waits alone,
    and the rest of the batch is posted meanwhile."""
    url = databases.create()

    async def scenario(ledger: Ledger) -> None:
        held, free = [await ledger.create_account(ANYONE, "prog_default", None, {}) for _ in "ab"]
        async with await psycopg.AsyncConnection.connect(db.libpq_url(url)) as blocker:
            await blocker.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", [held.id])
            sizes = batch_sizes(ledger)
            stuck = asyncio.ensure_future(ledger.create_transaction(ANYONE, earn(held.id, 4)))
            posted = await asyncio.wait_for(ledger.create_transaction(ANYONE, earn(free.id, 6)), 5)
            assert posted.points_after == 6
            assert sizes == [2], "both went in one batch, which skipped the locked account"
            await asyncio.sleep(0.3)
            assert not stuck.done(), "the posting on the locked account waits for the lock"
            await blocker.rollback()
        assert (await asyncio.wait_for(stuck, 5)).points_after == 4

    run(url, scenario)


def test_same_request_id_in_flight_ten_times_takes_effect_once(databases):
    async def scenario(ledger: Ledger) -> None:
        account = await ledger.create_account(ANYONE, "prog_default", None, {})
        results = await asyncio.gather(
            *(
                ledger.create_transaction(ANYONE, earn(account.id, 10), "req-once")
                for _ in range(10)
            )
        )
        assert len({r.id for r in results}) == 1
        assert await balances(ledger, account.id) == [10]

    run(databases.create(), scenario)


def test_batches_keep_keys_apart_and_release_every_caller():
    async def scenario() -> None:
        seen: list[list[str]] = []

        async def run_batch(items: list[str]) -> list[str]:
            seen.append(items)
            await asyncio.sleep(0.01)
            if "a2" in items:
                raise RuntimeError("a2 failed")
            return [item.upper() for item in items]

        batches = Batches(run_batch, keys=lambda item: (item[0],), max_waiting=5)
        futures = [batches.submit(item) for item in ["a1", "b1", "a2", "c1", "a3"]]
        assert batches.submit("d1") is None, "the queue is full: the caller goes alone"
        results = await asyncio.gather(*futures, return_exceptions=True)  # type: ignore[arg-type]
        # One item per key in a batch; the later ones wait for the next. A failure fails its
        # own batch only.
        assert seen == [["a1", "b1", "c1"], ["a2"], ["a3"]]
        assert results[:2] + results[3:] == ["A1", "B1", "C1", "A3"]
        assert isinstance(results[2], RuntimeError)

        # A runner cancelled (as when the loop closes) leaves nobody waiting forever, and the
        # next call starts a new one.
        waiting = batches.submit("x1")
        assert waiting is not None and batches._runner is not None
        batches._runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await batches.submit("y1") == "Y1"  # type: ignore[misc]

        # A runner that fails outside a batch (a bug) fails everyone waiting, loudly.
        def keys(item: str) -> tuple[str]:
            if item == "bug":
                raise ValueError("no keys")
            return (item,)

        broken = Batches(run_batch, keys=keys)
        stranded = [broken.submit("bug"), broken.submit("z1")]
        for future in stranded:
            with pytest.raises(ValueError, match="no keys"):
                await future  # type: ignore[misc]

    asyncio.run(scenario())


def test_the_kernel_says_what_it_did_with_each_posting_of_a_batch(databases):
    """store.postings.post without waiting (as group commit calls it): posted, replayed, skipped
    (locked elsewhere or missing), refused with the reason and the account as it is (not
    ACTIVE, out of bounds), each read back from one statement."""
    from datetime import UTC, datetime

    from loyalty_service import domain, store

    url = databases.create()

    def posting(new: NewTransaction, key: str | None = None) -> store.postings.NewPosting:
        change = domain.points.change(new.type, new.direction, new.amount)
        request = (key, "fp-" + key) if key else None
        return store.postings.NewPosting(
            domain.points.to_post(new, datetime.now(UTC)), change, request
        )

    async def scenario(ledger: Ledger) -> None:
        ids = [(await ledger.create_account(ANYONE, "prog_default", None, {})).id for _ in range(5)]
        fresh, replayed, held, closed, poor = ids
        first = await ledger.create_transaction(ANYONE, earn(replayed, 8), "req-1")
        await ledger.close_account(ANYONE, closed)
        key = "anonymous\x1fCreatePointsTransaction:req-1"
        async with (
            db.connection(ledger.pool) as conn,
            await psycopg.AsyncConnection.connect(db.libpq_url(url)) as blocker,
        ):
            await blocker.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", [held])
            done = await store.postings.post(
                conn,
                [
                    posting(earn(fresh, 3), "anonymous\x1fCreatePointsTransaction:req-2"),
                    posting(earn(replayed, 8), key),
                    posting(earn(held, 1)),
                    posting(earn(closed, 1)),
                    posting(redeem(poor, 1)),
                    posting(earn("loy_" + "M" * 20, 1)),
                ],
                wait=False,
            )
            await blocker.rollback()
        assert done[0] == store.postings.Posted(store.postings.POSTED, 3)
        assert (done[1].result, done[1].points_after) == (store.postings.REPLAYED, None)
        assert done[1].prior == store.requests.StoredResponse(
            (await _stored(ledger, key)).fingerprint, first.id
        )
        assert done[2] == store.postings.Posted(store.postings.SKIPPED)
        assert done[3].result == "ACCOUNT_NOT_ACTIVE"
        assert done[3].account is not None and done[3].account.status == "CLOSED"
        assert done[4].result == "INSUFFICIENT_POINTS"
        assert done[4].account is not None and done[4].account.balance == 0
        assert done[5] == store.postings.Posted(store.postings.SKIPPED)
        assert await balances(ledger, *ids) == [3, 8, 0, 0, 0]

    run(url, scenario)


async def _stored(ledger: Ledger, key: str):
    from loyalty_service import store

    async with db.connection(ledger.pool) as conn:
        return await store.requests.stored_response(conn, key)


def test_a_batch_applies_postings_in_the_order_they_came(databases):
    """Postings on one account in one batch go in arrival order, whatever their request
    ids: an earn then a redeem of what it earned both post."""

    async def scenario(ledger: Ledger) -> None:
        account = await ledger.create_account(ANYONE, "prog_default", None, {})
        sizes = batch_sizes(ledger)
        earned, spent = await asyncio.gather(
            ledger.create_transaction(ANYONE, earn(account.id, 100), "z-earn"),
            ledger.create_transaction(ANYONE, redeem(account.id, 100), "a-redeem"),
        )
        assert sizes == [2]
        assert (earned.points_after, spent.points_after) == (100, 0)

    run(databases.create(), scenario)
