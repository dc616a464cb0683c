"""Use cases of points transactions: posting (in batches), reading, reversing."""

from __future__ import annotations

import logging
from dataclasses import replace

from .. import db, domain, store
from ..domain.callers import LIMITED_CALLER, Caller
from ..domain.errors import FieldViolation
from ..domain.ids import Page
from ..domain.points import NewTransaction, PointsTransaction, TransactionFilter
from ..store.sql import Conn
from .batches import Batches
from .postings import post
from .requests import (
    Moved,
    UseCases,
    check_fingerprint,
    raise_if_any,
    request_id_reused,
    request_key,
    transaction_not_found,
)

log = logging.getLogger(__name__)


class PointsUseCases(UseCases):
    _postings: Batches[store.postings.NewPosting, store.postings.Posted]

    async def create_transaction(
        self, caller: Caller, new: NewTransaction, request_id: str = ""
    ) -> PointsTransaction:
        # The hot path: the posting joins the next batch (group commit), where the kernel
        # posts many at once without waiting for any account's lock (store.postings.post); what the
        # batch skips is posted by itself, waiting for its account.
        if caller.programs is not None:  # an account's program never changes
            await self.require_account(caller, new.account)
        change = domain.points.change(new.type, new.direction, new.amount)
        ptx = replace(domain.points.to_post(new, self.clock()), actor=caller.identity)
        # What the request asked for, in a fixed order, for its fingerprint.
        asked = [
            new.account, new.type, new.direction, new.amount, new.reason,
            new.origin_kind, new.origin_id, new.metadata,
        ]  # fmt: skip
        key, fingerprint = request_key(caller, "CreatePointsTransaction", request_id, asked)
        posting = store.postings.NewPosting(ptx, change, (key, fingerprint) if request_id else None)
        posted = await self._postings.run(posting)
        if posted is None or posted.result == store.postings.SKIPPED:
            posted = await self._post_alone(posting)
        if posted.result == store.postings.POSTED:
            return replace(ptx, points_after=posted.points_after)
        if posted.result == store.postings.REPLAYED:
            assert posted.prior is not None
            check_fingerprint(posted.prior, fingerprint, request_id_reused(request_id))
            first = await self.call(store.postings.get_transaction, posted.prior.response)
            assert first is not None  # transactions are never deleted
            return domain.points.as_posted(first)
        raise domain.points.refusal(posted.result, new.account, posted.account, change)

    async def _post_batch(
        self, postings: list[store.postings.NewPosting]
    ) -> list[store.postings.Posted]:
        async with db.connection(self.pool) as conn:
            try:
                return await store.postings.post(conn, postings, wait=False)
            except store.postings.NotTaken as error:
                # Each posting goes again on its own, so that none can fail the others.
                log.info("a batch of %d postings was refused: %s", len(postings), error)
                return [store.postings.Posted(store.postings.SKIPPED)] * len(postings)

    async def _post_alone(self, posting: store.postings.NewPosting) -> store.postings.Posted:
        async with db.connection(self.pool) as conn:
            try:
                (posted,) = await store.postings.post(conn, [posting])
            except store.postings.NotTaken as error:
                if not (error.key_taken and posting.request):
                    raise error.error from None
                # A retry that raced the first attempt: its response is committed now.
                prior = await store.requests.stored_response(conn, posting.request[0])
                assert prior is not None  # a key is kept until pruned, long after
                return store.postings.Posted(store.postings.REPLAYED, prior=prior)
        return posted

    async def get_transaction(self, caller: Caller, transaction_id: str) -> PointsTransaction:
        get = store.postings.get_transaction
        ptx = await self.found(get, transaction_id, transaction_not_found)
        if caller.programs is not None:
            try:
                await self.require_account(caller, ptx.account)
            except domain.errors.AccountNotFound:
                raise transaction_not_found(transaction_id) from None
        return ptx

    async def list_transactions(
        self, caller: Caller, where: TransactionFilter, after: int | None, limit: int
    ) -> Page[PointsTransaction]:
        if caller.programs is not None:
            if where.account is None:
                raise_if_any([FieldViolation("account", LIMITED_CALLER)])
            else:
                await self.require_account(caller, where.account)
        return await self.call(store.postings.list_transactions, where, after, limit)

    async def reverse_transaction(
        self,
        caller: Caller,
        transaction_id: str,
        amount: int | None,
        reason: str,
        request_id: str = "",
    ) -> PointsTransaction:
        async def work(conn: Conn) -> PointsTransaction:
            seen = await store.postings.get_transaction(conn, transaction_id)
            if seen is None:
                raise transaction_not_found(transaction_id)
            # Lock order is account, then transaction, as in merges (which re-parent
            # transactions while holding their accounts' locks).
            try:
                account = await self._lock_account(conn, caller, seen.account)
            except domain.errors.AccountNotFound:  # of a program the caller may not see
                raise transaction_not_found(transaction_id) from None
            original = await store.postings.get_transaction(conn, transaction_id, lock=True)
            assert original is not None  # transactions are never deleted
            if original.account != account.id:
                raise Moved
            points = domain.points.check_reversal(original, amount)
            origin = (original.origin_kind, original.origin_id)
            reversal = domain.points.reversal(
                original, points, origin, reason, self.clock(), refund=False
            )
            [posted], _ = await post(conn, caller, [reversal])
            return posted

        params = {"id": transaction_id, "amount": amount, "reason": reason}
        return await self.run(
            caller, "ReversePointsTransaction", request_id, params, PointsTransaction, work
        )
