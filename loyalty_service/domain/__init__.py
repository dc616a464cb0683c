"""The ledger's rules as plain Python (stdlib only): no gRPC, no SQL. One module per
sub-domain, as in store/ and ledger/."""

from . import accounts, codec, errors, events, holds, ids, payments, points, programs

__all__ = [
    "accounts",
    "codec",
    "errors",
    "events",
    "holds",
    "ids",
    "payments",
    "points",
    "programs",
]
