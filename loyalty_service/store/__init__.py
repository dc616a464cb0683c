"""All SQL: row locks, the posting kernel, ledger rows, keyset pages, idempotency keys,
invariant checks. One module per sub-domain, as in domain/ and ledger/."""

from . import accounts, checks, events, holds, payments, postings, programs, requests, settings

__all__ = [
    "accounts",
    "checks",
    "events",
    "holds",
    "payments",
    "postings",
    "programs",
    "requests",
    "settings",
]
