"""Use cases. Each is one database transaction, whose locked rows and their order are visible
in its body (docs/architecture.md has them in one table); postings, which run in batches
(group commit), go through the posting kernel (store.postings.post)."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool

from .accounts import AccountUseCases
from .batches import Batches
from .events import EventUseCases
from .holds import HoldUseCases
from .payments import PaymentUseCases
from .points import PointsUseCases
from .postings import posting_keys
from .programs import ProgramUseCases
from .requests import Clock, system_clock


class Ledger(
    ProgramUseCases,
    AccountUseCases,
    PointsUseCases,
    PaymentUseCases,
    HoldUseCases,
    EventUseCases,
):
    """Every use case, on one pool and one clock."""

    def __init__(self, pool: AsyncConnectionPool, clock: Clock = system_clock) -> None:
        self.pool = pool
        self.clock = clock
        self._postings = Batches(self._post_batch, keys=posting_keys, max_wait=pool.timeout)
